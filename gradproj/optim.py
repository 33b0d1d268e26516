"""``ProjectedOptimizer``: any ``torch.optim.Optimizer``, with the weights kept off a subspace.

For a protected weight ``W (out × in)`` with basis ``U (in × k)`` (orthonormal
columns) the promise is ``(W_T − W_0) U = 0``: the layer's response to inputs in
``span(U)`` (a prohibited concept's embeddings) never changes. Two ways to get it:

``mode="update"`` (default; keeps the guarantee for *every* inner optimizer)
    The inner optimizer steps, then its update is projected::

        W ← W₀ + (W − W₀)(I − U diag(w) Uᵀ)

    without a copy of ``W₀``: only the anchor ``C = W₀ U`` (``out × k``, float32;
    float64 for float64 weights) is kept, and each row ``x`` becomes ``x − U (w ⊙ (Uᵀx − c))``
    (:func:`gradproj.ops.project_anchored_`, one fused launch per bucket). With the
    hard projector this pulls ``W U`` back to ``C`` exactly every step, so rounding
    does not accumulate: what remains is one step's rounding, ``≈ ε·‖W‖``
    (measured below 6e-8·‖W_0‖ in fp32; for bf16 weights the store rounds W to
    bf16, bounded by 2⁻⁸·‖W_T‖ and measured 3e-4 … 1.1e-3 ·‖W_0‖ after 100 steps).

``mode="grad"``
    ``G ← G (I − U diag(w) Uᵀ)`` before the inner step. The update is in
    ``span`` of the projected gradients only when the inner optimizer is *linear
    in the gradient with a scalar step*: SGD, SGD with momentum or Nesterov, and
    without weight decay (decay adds ``λW``, which has a component along ``U``).
    Adam, AdamW, Adagrad and RMSprop divide each element by its own running
    scale, which rotates the update back into ``span(U)``, and AdamW's decoupled
    decay shrinks ``W U`` directly. Measured (``tests/test_optim.py``: a 3-layer
    MLP, protected 48 × 32 and 8 × 32 weights sharing one k = 4 basis, 100 steps,
    lr 1e-2, fp32), ``‖(W_T − W_0) U‖ / ‖W_0‖`` in grad mode: AdamW (wd 1e-2)
    5.7e-2, Adam 5.8e-2, Adagrad 2.7e-2, RMSprop 2.9e-1; SGD and SGD+Nesterov
    momentum 9e-8. In update mode every one of them stays below 6e-8.

The wrapper *is* a ``torch.optim.Optimizer`` and shares ``param_groups``,
``state`` and ``defaults`` with the inner one, so LR schedulers,
``add_param_group``, ``zero_grad`` and ``isinstance`` checks (accelerate,
Lightning) see the inner optimizer. The wrapper's part of ``step`` reads no
tensor values, so it adds no host-device synchronization to the inner step.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from gradproj import buckets, ops, reference
from gradproj.reference import SIDES, side_dim

MODES = ("update", "grad")

# Key of gradproj's own section in an optimizer state dict, beside "state" and
# "param_groups" (which stay exactly the inner optimizer's).
STATE_KEY = "gradproj"

BasesArg = Mapping[Any, Any]
NamedParams = nn.Module | Iterable[tuple[str, torch.Tensor]] | None


class Subspace:
    """``(U, w)`` of one protected parameter, on one device.

    Every parameter that shares one user basis object gets the same ``Subspace``
    (and the same device copies), so :mod:`gradproj.buckets`, which groups by the
    identity of ``U``, puts them into one launch.
    """

    def __init__(self, basis: torch.Tensor, weights: torch.Tensor | None) -> None:
        self.basis = basis
        self.weights = weights
        self._on: dict[torch.device, Subspace] = {basis.device: self}

    def on(self, device: torch.device) -> Subspace:
        """This subspace on ``device``, copied once and cached (the model may move after wrap)."""
        sub = self._on.get(device)
        if sub is None:
            w = None if self.weights is None else self.weights.to(device)
            sub = self._on[device] = Subspace(self.basis.to(device), w)
        return sub


class Protected:
    """One protected parameter: the tensor, a name for messages, its subspace and index."""

    __slots__ = ("index", "name", "param", "subspace")

    def __init__(self, param: torch.Tensor, name: str, subspace: Subspace, index: int) -> None:
        self.param = param
        self.name = name
        self.subspace = subspace
        self.index = index  # position in the flattened param_groups, as in state_dict()


def _param_order(param_groups: list[dict]) -> dict[int, int]:
    """``id(param) -> index`` in the flattened ``param_groups`` (the ids ``state_dict`` uses)."""
    order: dict[int, int] = {}
    for group in param_groups:
        for p in group["params"]:
            order.setdefault(id(p), len(order))
    return order


def _position_names(param_groups: list[dict]) -> dict[int, str]:
    names = {}
    for gi, group in enumerate(param_groups):
        for pi, p in enumerate(group["params"]):
            names.setdefault(id(p), f"param_groups[{gi}]['params'][{pi}]")
    return names


class Protection:
    """The protected parameters of an optimizer, their anchors, and their saved form.

    Shared by :class:`ProjectedOptimizer` and :class:`gradproj.ProjectedAdamW`.
    """

    def __init__(
        self,
        param_groups: list[dict],
        bases: BasesArg,
        side: str,
        named_parameters: NamedParams = None,
    ) -> None:
        if side not in SIDES:
            raise ValueError(f"side must be one of {SIDES}, got {side!r}")
        if not isinstance(bases, Mapping):
            raise TypeError(
                "bases must be a mapping {parameter: basis} or {name: basis} (with "
                f"named_parameters=), got {type(bases).__name__}; bases are never matched "
                "to parameters by position"
            )
        self.side = side
        by_name = _named(named_parameters)
        names = _position_names(param_groups)
        names.update({id(p): n for n, p in by_name.items()})
        order = _param_order(param_groups)

        subspaces: dict[int, tuple[object, Subspace]] = {}
        entries: dict[int, Protected] = {}
        seen: set[int] = set()
        for key, basis in bases.items():
            param = self._lookup(key, by_name)
            name = names.get(id(param), f"parameter of shape {tuple(param.shape)}")
            if id(param) not in order:
                raise ValueError(
                    f"parameter {name!r} (shape {tuple(param.shape)}) has a basis but is not "
                    "in the optimizer's param_groups"
                )
            if id(param) in seen:
                raise ValueError(f"parameter {name!r} is given a basis twice")
            seen.add(id(param))
            if basis is None:
                continue
            if id(basis) not in subspaces:
                u, w = ops.unpack_basis(basis, None, f"basis for parameter {name!r}")
                subspaces[id(basis)] = (basis, Subspace(u, w))
            sub = subspaces[id(basis)][1]
            _validate(param, sub, side, name)
            if sub.basis.shape[1] == 0 or param.numel() == 0:
                continue  # nothing to protect
            entries[id(param)] = Protected(param, name, sub, order[id(param)])
        # In param_groups order, so launches and saved state are deterministic.
        self.entries = sorted(entries.values(), key=lambda e: e.index)
        self.anchors: dict[int, torch.Tensor] = {}  # id(param) -> C (rows × k), float32/64

    @staticmethod
    def _lookup(key: object, by_name: dict[str, torch.Tensor]) -> torch.Tensor:
        if isinstance(key, str):
            if not by_name:
                raise ValueError(
                    f"bases are keyed by name ({key!r}) but no named_parameters= was given "
                    "(pass the model or model.named_parameters())"
                )
            if key not in by_name:
                close = [n for n in by_name if key.split(".")[-1] in n][:5]
                raise ValueError(
                    f"no parameter named {key!r} in named_parameters"
                    + (f"; similar names: {close}" if close else "")
                )
            return by_name[key]
        if isinstance(key, torch.Tensor):
            return key
        raise TypeError(
            f"bases keys must be parameters (tensors) or their names (str), got "
            f"{type(key).__name__}"
        )

    # -- per step ---------------------------------------------------------------

    def stepping(self) -> list[Protected]:
        """The protected parameters that have a gradient this step (Python check, no sync)."""
        return [e for e in self.entries if e.param.grad is not None]

    def project_grads(self, todo: list[Protected], backend: str | None = None) -> None:
        """``G ← G (I − U diag(w) Uᵀ)`` for every entry, in one ``project_`` call."""
        if not todo:
            return
        ops.project_(
            [e.param.grad for e in todo],
            [e.subspace.on(e.param.device) for e in todo],
            side=self.side,
            backend=backend,
            names=[e.name for e in todo],
        )

    def ensure_anchors(self, todo: list[Protected]) -> None:
        """Create ``C = rows(W) U`` for entries seen for the first time (before they move)."""
        for e in todo:
            c = self.anchors.get(id(e.param))
            if c is None:
                self.anchors[id(e.param)] = ops.anchor(
                    e.param, e.subspace.on(e.param.device), side=self.side
                )
            elif c.device != e.param.device:  # the model moved (e.g. accelerate.prepare)
                self.anchors[id(e.param)] = c.to(e.param.device)

    def project_updates(self, todo: list[Protected], backend: str | None = None) -> None:
        """``W ← W₀ + (W − W₀)P`` for every entry via its anchor, in one call (fused buckets)."""
        if not todo:
            return
        ops.project_anchored_(
            [e.param for e in todo],
            [self.anchors[id(e.param)] for e in todo],
            [e.subspace.on(e.param.device) for e in todo],
            side=self.side,
            backend=backend,
            names=[e.name for e in todo],
        )

    # -- saving -----------------------------------------------------------------

    def state_dict(self, extra: dict[str, Any]) -> dict[str, Any]:
        """gradproj's section of the state dict: only tensors, numbers and strings.

        Keys are the parameter indices that ``Optimizer.state_dict`` uses. Bases
        are saved so that a resumed run can check it protects the same subspaces.
        """
        section: dict[str, Any] = dict(extra)
        section["side"] = self.side
        section["names"] = {e.index: e.name for e in self.entries}
        section["bases"] = {e.index: e.subspace.basis for e in self.entries}
        section["weights"] = {
            e.index: e.subspace.weights for e in self.entries if e.subspace.weights is not None
        }
        section["anchors"] = {
            e.index: self.anchors[id(e.param)] for e in self.entries if id(e.param) in self.anchors
        }
        return section

    def load_state_dict(self, section: dict[str, Any], extra: dict[str, Any]) -> None:
        """Check ``section`` matches this protection (side, parameters, bases); restore anchors."""
        for key, value in {"side": self.side, **extra}.items():
            if section.get(key) != value:
                raise ValueError(
                    f"the state dict was saved with {key}={section.get(key)!r}, "
                    f"but this optimizer has {key}={value!r}"
                )
        saved = set(section["bases"])
        current = {e.index for e in self.entries}
        if saved != current:
            raise ValueError(
                "the state dict protects the parameters at indices "
                f"{sorted(saved)} ({[section['names'][i] for i in sorted(saved - current)]} "
                f"not protected here), this optimizer protects {sorted(current)} "
                f"({[e.name for e in self.entries if e.index not in saved]} not in the state dict)"
            )
        for e in self.entries:
            for what, mine, theirs in (
                ("basis", e.subspace.basis, section["bases"][e.index]),
                ("weights", e.subspace.weights, section["weights"].get(e.index)),
            ):
                same = (mine is None) == (theirs is None) and (
                    mine is None
                    or (mine.shape == theirs.shape and torch.equal(mine, theirs.to(mine.device)))
                )
                if not same:
                    raise ValueError(
                        f"parameter {e.name!r}: the {what} in the state dict (saved for "
                        f"{section['names'][e.index]!r}) differs from the one this optimizer "
                        "was given; resuming would protect a different subspace"
                    )
        self.anchors = {}
        for e in self.entries:
            c = section["anchors"].get(e.index)
            if c is not None:
                dt = buckets.accumulate_dtype(e.param.dtype)
                self.anchors[id(e.param)] = c.to(device=e.param.device, dtype=dt).clone(
                    memory_format=torch.contiguous_format
                )


def _named(named_parameters: NamedParams) -> dict[str, torch.Tensor]:
    if named_parameters is None:
        return {}
    if isinstance(named_parameters, nn.Module):
        return dict(named_parameters.named_parameters())
    return dict(named_parameters)


def _validate(param: torch.Tensor, sub: Subspace, side: str, name: str) -> None:
    """Construction-time checks of one (parameter, basis) pair; errors name the parameter."""
    u, w = sub.basis, sub.weights
    where = f"parameter {name!r} (shape {tuple(param.shape)})"
    if not param.is_floating_point():
        raise TypeError(
            f"{where} is {param.dtype}; only floating-point parameters can be protected"
        )
    if not isinstance(u, torch.Tensor) or not u.is_floating_point() or u.dim() != 2:
        raise ValueError(
            f"the basis for {where} must be a 2-D floating-point tensor (d × k), got "
            f"{type(u).__name__} {getattr(u, 'dtype', '')} {tuple(getattr(u, 'shape', ()))}"
        )
    if side == "input" and param.dim() < 2:
        raise ValueError(
            f"{where}: side='input' projects the rows of a weight with at least 2 dims; "
            "protect 1-D tensors with side='flat' or leave them out"
        )
    d = side_dim(param.shape, side)
    if u.shape[0] != d:
        raise ValueError(
            f"the basis for {where} has {u.shape[0]} rows, but side={side!r} needs {d} "
            f"(basis shape {tuple(u.shape)})"
        )
    if u.shape[1] > d:
        raise ValueError(f"the basis for {where} has k={u.shape[1]} > d={d} columns")
    ops.check_orthonormal_(u, f"the basis for {where}")
    if w is not None:
        if w.dim() != 1 or w.shape[0] != u.shape[1]:
            raise ValueError(
                f"the weights for {where} must have shape ({u.shape[1]},), got {tuple(w.shape)}"
            )
        lo, hi = w.min().item(), w.max().item()  # construction time: a sync is fine here
        if not (lo >= 0.0 and hi <= 1.0):
            raise ValueError(f"the weights for {where} must lie in [0, 1], got [{lo:g}, {hi:g}]")


def init_optimizer_hooks(opt: torch.optim.Optimizer) -> None:
    """What ``Optimizer.__init__`` sets up besides params, for a wrapper that shares them."""
    opt._optimizer_step_pre_hooks = OrderedDict()
    opt._optimizer_step_post_hooks = OrderedDict()
    opt._optimizer_state_dict_pre_hooks = OrderedDict()
    opt._optimizer_state_dict_post_hooks = OrderedDict()
    opt._optimizer_load_state_dict_pre_hooks = OrderedDict()
    opt._optimizer_load_state_dict_post_hooks = OrderedDict()
    opt._patch_step_function()  # runs step pre/post hooks registered on the wrapper


class ProjectedOptimizer(torch.optim.Optimizer):
    """Wrap ``optimizer`` so that protected weights never move along their bases.

    See the module docstring for the math of the two modes and which keeps the
    guarantee ``(W_T − W_0) U = 0`` (update mode: every inner optimizer; grad
    mode: SGD with or without momentum, without weight decay).

    Args:
        optimizer: any ``torch.optim.Optimizer``; its ``param_groups``, ``state``
            and ``defaults`` are shared, not copied.
        bases: ``{parameter: basis}`` (by identity) or ``{name: basis}`` with
            ``named_parameters``. A basis is a ``(d × k)`` tensor with orthonormal
            columns (``d = side dim`` of the parameter) or an object with
            ``.basis`` and ``.weights`` (``ConceptSubspace``); ``None`` leaves the
            parameter unprotected. Parameters that share one basis object are
            projected in one fused launch.
        mode: ``"update"`` or ``"grad"``.
        side: ``"input"`` (rows of ``W``, ``ΔW U = 0``), ``"output"`` (``Vᵀ ΔW = 0``)
            or ``"flat"`` (the flattened tensor).
        named_parameters: a module or ``module.named_parameters()``; needed for
            name keys, and used in messages.
        backend: force a gradproj backend (default: the fastest installed).

    ``step(closure)`` runs the closure first (Lightning runs backward inside it),
    then projects and steps. Under ``torch.amp.GradScaler`` a skipped step never
    reaches this ``step``, so nothing is projected and anchors do not move.
    Parameters whose ``grad`` is ``None`` are left to the inner optimizer (which
    leaves them alone). Parameters added later with ``add_param_group`` are not
    protected.
    """

    # GradScaler calls step() directly (passing found_inf/grad_scale attributes)
    # only for optimizers that handle scaling themselves. The wrapper does not: it
    # lets the scaler unscale the grads and skip the whole step on inf, even when
    # the inner optimizer is a fused one that could.
    _step_supports_amp_scaling = False

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        bases: BasesArg,
        *,
        mode: str = "update",
        side: str = "input",
        named_parameters: NamedParams = None,
        backend: str | None = None,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer)}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        # Not Optimizer.__init__: that would build a second set of param_groups.
        self.optimizer = optimizer
        self.mode = mode
        self.backend = backend
        self.protection = Protection(optimizer.param_groups, bases, side, named_parameters)
        init_optimizer_hooks(self)

    # Shared with the inner optimizer, so schedulers and loggers see one object.
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self):  # type: ignore[override]
        return self.optimizer.state

    @state.setter
    def state(self, value) -> None:
        self.optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizer.defaults = value

    @property
    def side(self) -> str:
        return self.protection.side

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__.copy()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return (
            f"ProjectedOptimizer(mode={self.mode!r}, side={self.side!r}, "
            f"protected={len(self.protection.entries)}, optimizer={self.optimizer!r})"
        )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Run ``closure`` (with grad), then project (grad mode) or step and project (update)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        todo = self.protection.stepping()
        if self.mode == "grad":
            self.protection.project_grads(todo, self.backend)
            self.optimizer.step()
        else:
            self.protection.ensure_anchors(todo)
            self.optimizer.step()
            self.protection.project_updates(todo, self.backend)
        return loss

    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state dict plus a ``"gradproj"`` section (anchors, bases)."""
        sd = dict(self.optimizer.state_dict())
        sd[STATE_KEY] = self.protection.state_dict({"mode": self.mode})
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load the inner state; check the saved bases match; restore the anchors.

        A state dict without a ``"gradproj"`` section (a plain inner one) is
        accepted: anchors are then created afresh at the next step.
        """
        state_dict = dict(state_dict)
        section = state_dict.pop(STATE_KEY, None)
        if section is not None:
            self.protection.load_state_dict(section, {"mode": self.mode})
        else:
            self.protection.anchors = {}
        self.optimizer.load_state_dict(state_dict)


@torch.no_grad()
def subspace_drift(
    w: torch.Tensor, w0: torch.Tensor, basis: ops.BasisLike, *, side: str = "input"
) -> float:
    """``‖rows(W − W₀) U‖_F / ‖W₀‖_F`` in float64: what the guarantee bounds.

    ``rows`` as ``side`` selects (for ``"input"``: ``‖(W − W₀) U‖``). Reads the
    result on the host (synchronizes): a measurement, not for a training step.
    """
    u = ops.unpack_basis(basis, None, "basis")[0].to(device=w.device, dtype=torch.float64)
    d = w.detach().to(torch.float64) - w0.detach().to(torch.float64)
    along = d - reference.project(d, u, side=side)  # = rows(d) U Uᵀ, same norm as rows(d) U
    return (along.norm() / w0.detach().to(torch.float64).norm()).item()
