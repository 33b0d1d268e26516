"""``ProjectedAdamW``: AdamW whose update never moves protected weights along their bases.

One step, per parameter with ``t`` the step count including this step::

    m ← β₁ m + (1 − β₁) g            v ← β₂ v + (1 − β₂) g²      (v̂ = max(v̂, v) if amsgrad)
    W' ← W (1 − lr·λ) − lr/(1 − β₁ᵗ) · m / (√v̂ / √(1 − β₂ᵗ) + ε)

and, for a protected ``W`` with basis ``U`` (weights ``w``) and anchor
``C = W₀ U`` kept as state, every row ``x`` of ``W'``::

    x ← x − U (w ⊙ (Uᵀx − c))

i.e. ``W ← W₀ + (W' − W₀)(I − U diag(w) Uᵀ)``: the update (weight decay
included) is projected, which is what keeps ``(W_T − W_0) U = 0`` for an
adaptive optimizer (projecting the *gradient* does not: Adam's per-element
scaling rotates it back into ``span(U)``; see :mod:`gradproj.optim`). Because
the anchor, not ``W₀``, is kept, ``W U`` is pulled back to ``C`` every step and
rounding does not accumulate.

Protected parameters go through one fused bucket kernel per (basis, dtype,
device) — on CUDA the compiled kernel of ``csrc/cuda/adamw.cu`` or the Triton
kernel of ``kernels/adamw.py``, which compute the AdamW update and its projection
in registers and write p, m, v once (the bytes of a fused AdamW when the second
pass over a row hits cache) — chosen by :func:`gradproj.backends.select` (op
``"projected_adamw_bucket_"``; on CPU the C++ kernel of ``csrc/cpu/adamw.cpp``
when ``gradproj._C`` is built, else the plain-PyTorch reference;
``benchmarks/bench_optim.py``).
Unprotected parameters take ``torch.optim.adamw.adamw`` with ``fused=True`` where
torch has a fused kernel for them (CPU and CUDA, floating dtypes): the same result as
``torch.optim.AdamW(fused=True)``, bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim.adamw import adamw as torch_adamw

from gradproj import backends, buckets, ops
from gradproj.inplace import check_writable, mark_written
from gradproj.optim import (
    STATE_KEY,
    BasesArg,
    NamedParams,
    Protected,
    Protection,
    load_state_dict_with_hooks,
    picklable_state,
    state_dict_with_hooks,
)

# Where torch.optim.AdamW(fused=True) runs (torch ≥ 2.4: CPU and CUDA, floating dtypes).
_FUSED_DEVICES = ("cpu", "cuda")
_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class ProjectedAdamW(torch.optim.Optimizer):
    """AdamW with the anchored update projection fused in (math in the module docstring).

    Args:
        params: parameters or param groups, as for ``torch.optim.AdamW``.
        lr, betas, eps, weight_decay, amsgrad, maximize: as ``torch.optim.AdamW``
            (``weight_decay`` is decoupled; the default 1e-2 matches it).
        bases: ``{parameter: basis}`` or ``{name: basis}`` (with
            ``named_parameters``); a basis is a ``(d × k)`` orthonormal tensor or
            a ``ConceptSubspace``. See :class:`gradproj.ProjectedOptimizer`.
        side: ``"input"``, ``"output"`` or ``"flat"``.
        named_parameters: a module or ``module.named_parameters()``.
        backend: force a gradproj backend for the protected parameters.

    The step count lives on each parameter's device (as a float32 0-d tensor)
    and the kernels read it there, so ``step`` does not synchronize on CUDA.
    Under ``torch.amp.GradScaler`` a skipped step never reaches ``step``.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        bases: BasesArg,
        side: str = "input",
        amsgrad: bool = False,
        maximize: bool = False,
        named_parameters: NamedParams = None,
        backend: str | None = None,
    ) -> None:
        if not 0.0 <= lr:
            raise ValueError(f"lr must be ≥ 0, got {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"eps must be ≥ 0, got {eps}")
        for i, beta in enumerate(betas):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"betas[{i}] must be in [0, 1), got {beta}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"weight_decay must be ≥ 0, got {weight_decay}")
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "amsgrad": amsgrad,
            "maximize": maximize,
        }
        super().__init__(params, defaults)
        self.backend = backend
        self.protection = Protection(self.param_groups, bases, side, named_parameters)

    @property
    def side(self) -> str:
        return self.protection.side

    def __getstate__(self) -> dict[str, Any]:
        # Optimizer.__getstate__ keeps only defaults, state and param_groups: a copy
        # or an unpickled optimizer would lose its protection.
        return picklable_state(self)

    def _init_state(self, p: torch.Tensor, amsgrad: bool) -> dict[str, Any]:
        state = self.state[p]
        if not state:
            # float32 step on the parameter's device: read there by the kernels
            # (and by torch's capturable path on accelerators), never by the host.
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if amsgrad and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One projected AdamW step; ``closure`` (re-evaluating the loss) runs first."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.protection.check_optimized(self.param_groups)
        protected = {id(e.param): e for e in self.protection.stepping()}
        self.protection.ensure_anchors(list(protected.values()))
        late: list[Protected] = []
        for group in self.param_groups:
            plain: list[torch.Tensor] = []
            fused: list[tuple[Protected, tuple[torch.Tensor, ...]]] = []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("ProjectedAdamW does not support sparse gradients")
                state = self._init_state(p, group["amsgrad"])
                e = protected.get(id(p))
                views = None if e is None else _row_views(state, p, self.side, group["amsgrad"])
                if views is not None:
                    fused.append((e, views))
                else:
                    plain.append(p)
                    if e is not None:
                        # No strided row view (e.g. a non-contiguous conv weight):
                        # AdamW, then the anchored projection, which copies to and fro.
                        late.append(e)
            self._plain_adamw(group, plain)
            self._fused_adamw(group, fused)
        self.protection.project_updates(late, self.backend)
        return loss

    def _plain_adamw(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        if not params:
            return
        states = [self.state[p] for p in params]
        beta1, beta2 = group["betas"]
        # torch's fused AdamW (one kernel for all of them) where torch has one: its default
        # on CPU is a per-tensor loop, 2-3x slower for a whole UNet's unprotected weights.
        fused = all(p.device.type in _FUSED_DEVICES and p.dtype in _FUSED_DTYPES for p in params)
        torch_adamw(
            params,
            [p.grad for p in params],
            [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states],
            [s["max_exp_avg_sq"] for s in states] if group["amsgrad"] else [],
            [s["step"] for s in states],
            # On accelerators the step stays on the device (torch's capturable
            # path); on CPU torch reads it on the host, which costs no device sync.
            capturable=params[0].device.type != "cpu",
            fused=fused or None,
            amsgrad=group["amsgrad"],
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=group["maximize"],
        )

    def _fused_adamw(
        self, group: dict[str, Any], entries: list[tuple[Protected, tuple[torch.Tensor, ...]]]
    ) -> None:
        """One bucket-kernel call per (basis, dtype, device) among ``entries``."""
        if not entries:
            return
        for e, _ in entries:  # torch's in-place rules, before anything is written
            check_writable(e.param, f"parameter {e.name!r}")
        beta1, beta2 = group["betas"]
        by_bucket: dict[tuple, list[tuple[Protected, tuple[torch.Tensor, ...]]]] = {}
        for e, views in entries:
            key = (id(e.subspace.on(e.param.device)), e.param.dtype, e.param.device)
            by_bucket.setdefault(key, []).append((e, views))
        kernels = [
            backends.select(
                "projected_adamw_bucket_", todo[0][0].param.device, todo[0][0].param.dtype,
                self.backend,
            ).op("projected_adamw_bucket_")
            for todo in by_bucket.values()
        ]  # fmt: skip
        torch._foreach_add_([self.state[e.param]["step"] for e, _ in entries], 1.0)
        for kernel, todo in zip(kernels, by_bucket.values(), strict=True):
            p0 = todo[0][0].param
            sub = todo[0][0].subspace.on(p0.device)
            dt = buckets.accumulate_dtype(p0.dtype)
            basis = buckets.kernel_basis(sub.basis, dt)
            weights = None if sub.weights is None else sub.weights.to(dt).contiguous()
            kernel(
                [v[0] for _, v in todo],
                [v[1] for _, v in todo],
                [v[2] for _, v in todo],
                [v[3] for _, v in todo],
                [v[4] for _, v in todo] if group["amsgrad"] else None,
                [self.state[e.param]["step"] for e, _ in todo],
                [e.anchor for e, _ in todo],
                basis,
                weights,
                self.side,
                lr=group["lr"],
                beta1=beta1,
                beta2=beta2,
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                maximize=group["maximize"],
            )
        # The kernels write through raw pointers: bump the versions as torch's
        # AdamW does, so a step between forward and backward makes backward raise.
        mark_written(t for _, views in entries for t in views[:1] + views[2:])

    def state_dict(self) -> dict[str, Any]:
        """``Optimizer.state_dict()`` plus a ``"gradproj"`` section (anchors, bases)."""

        def build() -> dict[str, Any]:
            # The section first: it refuses lost weights before torch trips over them.
            section = self.protection.state_dict(self.param_groups, {})
            return {**super(ProjectedAdamW, self).state_dict(), STATE_KEY: section}

        return state_dict_with_hooks(self, build)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load the AdamW state and the anchors, all or nothing, after checking every field.

        See :meth:`gradproj.optim.Protection.load_state_dict` (the model's weights
        must be loaded first); without a ``"gradproj"`` section: a ``UserWarning``.
        """
        load_state_dict_with_hooks(self, state_dict, self.protection, {}, self._load_adamw_state)

    def _load_adamw_state(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        # Optimizer.load_state_dict leaves "step" where it was saved; the kernels
        # read it on the parameter's device, as float32.
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if state and "step" in state:
                    state["step"] = state["step"].to(device=p.device, dtype=torch.float32)


def _row_views(
    state: dict[str, Any], p: torch.Tensor, side: str, amsgrad: bool
) -> tuple[torch.Tensor, ...] | None:
    """Row views of (p, g, m, v[, v̂max]) for the bucket kernel, or ``None`` if one has none."""
    if ops.local_tensor(p, side, "parameter") is not p:
        return None  # a DTensor (FSDP2): torch's AdamW, then project_anchored_ on the shards
    tensors = [p, p.grad, state["exp_avg"], state["exp_avg_sq"]]
    if amsgrad:
        tensors.append(state["max_exp_avg_sq"])
    if p.grad.dtype != p.dtype:
        return None
    try:
        views = tuple(buckets.row_view(t, side) for t in tensors)
    except RuntimeError:
        return None
    if side == "flat":
        return views
    return views if all(v.stride() == views[0].stride() for v in views[2:]) else None
