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

import contextlib
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from gradproj import buckets, ops
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
    """One protected parameter: the tensor, a name for messages, its subspace and anchor.

    ``anchor`` is ``C = rows(W₀) U`` once the first step that can move the
    parameter has begun (``None`` before); it lives here, not in a dict keyed by
    ``id(param)``, so ``copy.deepcopy`` and pickling carry it with the parameter.
    """

    __slots__ = ("anchor", "index", "name", "param", "subspace")

    def __init__(self, param: torch.Tensor, name: str, subspace: Subspace, index: int) -> None:
        self.param = param
        self.name = name
        self.subspace = subspace
        self.index = index  # position in the flattened param_groups, as in state_dict()
        self.anchor: torch.Tensor | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, v)


class NamedBases(dict):
    """``{parameter: basis}`` that also knows each parameter's name in its module.

    What :func:`gradproj.integrations.diffusers.protect` returns, so that errors
    and saved state name ``down_blocks.0…attn2.to_k.weight`` rather than a
    position in ``param_groups``, without a separate ``named_parameters=``.
    """

    def __init__(self, items: Mapping[torch.Tensor, Any], names: Mapping[torch.Tensor, str]):
        super().__init__(items)
        self.param_names = {id(p): n for p, n in names.items()}


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


def _is_position_name(name: str) -> bool:
    return name.startswith("param_groups[")


# Largest ‖rows(W)U − C‖_F / ‖W‖_F accepted when a state dict's anchors are checked
# against the weights (hard projector), per parameter dtype. After every step the
# projection puts rows(W)U back on C up to that step's rounding: a few float32 ulps
# of ‖W‖ (measured ≤ 6e-8), or the 16-bit store's 2⁻⁹ relative error at most. The
# bounds sit well above that and far below what a swapped or zeroed anchor, or
# weights from another run, give (measured 0.1 to 0.6 with k = 4 of d = 32; ≳ √(k/d)).
ANCHOR_TOL: dict[torch.dtype, float] = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.bfloat16: 2.0**-7,
    torch.float16: 2.0**-10,
}

_REWRITTEN_HINT = (
    "were param_groups rewritten after wrapping? DeepSpeed ZeRO (and FSDP1's flat "
    "parameters) replace a client optimizer's parameters with flat partitions, which "
    "gradproj cannot project by rows; use DDP, FSDP2 (fully_shard) or plain training, "
    "and wrap the optimizer after any step that replaces parameters"
)


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
        names.update(getattr(bases, "param_names", {}))
        names.update({id(p): n for n, p in by_name.items()})
        order = _param_order(param_groups)

        subspaces: dict[int, tuple[object, Subspace]] = {}
        entries: dict[int, Protected] = {}
        seen: set[int] = set()
        for key, basis in bases.items():
            param = self._lookup(key, by_name)
            name = names.get(id(param), f"parameter of shape {tuple(param.shape)}")
            if id(param) not in order:
                frozen = (
                    "; it is frozen (requires_grad=False): with LoRA, build the bases after "
                    "add_adapter (gradproj.diffusers.protect), so that they name the adapters"
                    if not param.requires_grad
                    else ""
                )
                raise ValueError(
                    f"parameter {name!r} (shape {tuple(param.shape)}) has a basis but is not "
                    f"in the optimizer's param_groups{frozen}"
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
            _validate(param, sub, side, name, getattr(basis, "orthonormal_tol", None))
            if sub.basis.shape[1] == 0 or param.numel() == 0:
                continue  # nothing to protect
            entries[id(param)] = Protected(param, name, sub, order[id(param)])
        # In param_groups order, so launches and saved state are deterministic.
        self.entries = sorted(entries.values(), key=lambda e: e.index)

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

    def anchor_of(self, param: torch.Tensor) -> torch.Tensor | None:
        """The anchor of protected ``param`` (``None`` before its first step or if unprotected)."""
        return next((e.anchor for e in self.entries if e.param is param), None)

    # -- per step ---------------------------------------------------------------

    def check_optimized(
        self, param_groups: list[dict], outcome: str = "nothing was stepped"
    ) -> None:
        """Raise ``RuntimeError`` unless every protected parameter is still in ``param_groups``.

        Run before anything moves, every step: a trainer that swapped the
        optimizer's parameters (DeepSpeed ZeRO's flat partitions) would otherwise
        train on with no projection at all. Python identity checks only, no sync.
        """
        present = {id(p) for group in param_groups for p in group["params"]}
        lost = [e.name for e in self.entries if id(e.param) not in present]
        if lost:
            shown = ", ".join(repr(n) for n in lost[:4]) + (", …" if len(lost) > 4 else "")
            raise RuntimeError(
                f"{len(lost)} protected parameter(s) ({shown}) are no longer in the optimizer's "
                f"param_groups, so they would be trained without projection; {outcome}. "
                f"Likely cause: {_REWRITTEN_HINT}."
            )

    def stepping(self) -> list[Protected]:
        """The protected parameters that have a gradient this step (Python check, no sync)."""
        return [e for e in self.entries if e.param.grad is not None]

    def anchored(self) -> list[Protected]:
        """The protected parameters with a gradient and an anchor: what a step may have moved."""
        return [e for e in self.entries if e.param.grad is not None and e.anchor is not None]

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
            if e.anchor is None:
                e.anchor = ops.anchor(e.param, e.subspace.on(e.param.device), side=self.side)
            elif e.anchor.device != e.param.device:  # the model moved (accelerate.prepare)
                e.anchor = e.anchor.to(e.param.device)

    def project_updates(self, todo: list[Protected], backend: str | None = None) -> None:
        """``W ← W₀ + (W − W₀)P`` for every entry via its anchor, in one call (fused buckets)."""
        if not todo:
            return
        ops.project_anchored_(
            [e.param for e in todo],
            [e.anchor for e in todo],
            [e.subspace.on(e.param.device) for e in todo],
            side=self.side,
            backend=backend,
            names=[e.name for e in todo],
        )

    # -- saving -----------------------------------------------------------------

    def state_dict(self, param_groups: list[dict], extra: dict[str, Any]) -> dict[str, Any]:
        """gradproj's section of the state dict: only tensors, numbers and strings.

        Keys are the parameter indices that ``Optimizer.state_dict`` uses, and
        ``names`` records whose index each is, so a resume can check it is
        looking at the same parameters in the same order. Bases are saved so a
        resumed run can check it protects the same subspaces.
        """
        # Else a lost weight would silently go unsaved.
        self.check_optimized(param_groups, "no state dict was made")
        order = _param_order(param_groups)
        entries = [(order[id(e.param)], e) for e in self.entries]
        section: dict[str, Any] = dict(extra)
        section["side"] = self.side
        section["names"] = {i: e.name for i, e in entries}
        section["bases"] = {i: e.subspace.basis for i, e in entries}
        section["weights"] = {
            i: e.subspace.weights for i, e in entries if e.subspace.weights is not None
        }
        section["anchors"] = {i: e.anchor for i, e in entries if e.anchor is not None}
        return section

    def load_state_dict(
        self, section: object, param_groups: list[dict], extra: dict[str, Any]
    ) -> Callable[[], None]:
        """Check every field of a saved ``section`` against this protection; change nothing.

        Returns the function that installs the saved anchors, for the caller to
        run once the inner optimizer's state has loaded too (all or nothing).
        Raises ``ValueError`` naming the parameter for: a malformed section, another
        side/mode, other parameters or another order, other bases or weights, and
        anchors that are not tensors of the right shape, not finite, or (hard
        projector) do not equal ``rows(W) U`` of the weights as they are now — the
        model's weights must be loaded before the optimizer's state.
        """
        if not isinstance(section, Mapping):
            raise ValueError(
                f"the state dict's {STATE_KEY!r} section must be a dict, got "
                f"{type(section).__name__}"
            )
        for key in ("side", "names", "bases", "weights", "anchors"):
            if key not in section:
                raise ValueError(f"the state dict's {STATE_KEY!r} section has no {key!r} entry")
            if key != "side" and not isinstance(section[key], Mapping):
                raise ValueError(
                    f"the state dict's {STATE_KEY!r} section: {key!r} must be a dict keyed by "
                    f"parameter index, got {type(section[key]).__name__}"
                )
        for key, value in {"side": self.side, **extra}.items():
            if section.get(key) != value:
                raise ValueError(
                    f"the state dict was saved with {key}={section.get(key)!r}, "
                    f"but this optimizer has {key}={value!r}"
                )
        self.check_optimized(param_groups, "nothing was loaded")
        order = _param_order(param_groups)
        here = {order[id(e.param)]: e for e in self.entries}
        saved_names = section["names"]
        saved = set(section["bases"])
        if saved != set(here):
            missing = [saved_names.get(i, f"index {i}") for i in sorted(saved - set(here))]
            extra_here = [here[i].name for i in sorted(set(here) - saved)]
            raise ValueError(
                f"the state dict protects the parameters at indices {sorted(saved)}, this "
                f"optimizer those at {sorted(here)} (protected only in the state dict: "
                f"{missing}; only here: {extra_here}); resuming would protect other weights"
            )
        anchors: dict[int, torch.Tensor | None] = {}
        for i, e in here.items():
            theirs = saved_names.get(i)
            if (
                isinstance(theirs, str)
                and theirs != e.name
                and not (_is_position_name(theirs) or _is_position_name(e.name))
            ):
                raise ValueError(
                    f"parameter index {i} is {e.name!r} here but was {theirs!r} when the state "
                    "dict was saved: the parameters are in another order, and optimizer state "
                    "(moments, anchors) is matched by position, so it would be swapped between "
                    "weights. Build the optimizer with the parameters in the saved order"
                )
            for what, mine, stored in (
                ("basis", e.subspace.basis, section["bases"].get(i)),
                ("weights", e.subspace.weights, section["weights"].get(i)),
            ):
                same = (mine is None) == (stored is None) and (
                    mine is None
                    or (
                        isinstance(stored, torch.Tensor)
                        and mine.shape == stored.shape
                        and torch.equal(mine, stored.to(mine.device, mine.dtype))
                    )
                )
                if not same:
                    raise ValueError(
                        f"parameter {e.name!r}: the {what} in the state dict (saved for "
                        f"{theirs!r}) differs from the one this optimizer was given; resuming "
                        "would protect a different subspace"
                    )
            anchors[id(e.param)] = self._checked_anchor(e, section["anchors"].get(i))

        def install() -> None:
            for e in self.entries:
                e.anchor = anchors.get(id(e.param))

        return install

    def _checked_anchor(self, e: Protected, c: object) -> torch.Tensor | None:
        """``c`` as ``e``'s anchor, after checking it could be ``e``'s: else ``ValueError``."""
        if c is None:
            return None
        where = f"the anchor saved for parameter {e.name!r}"
        dt = buckets.accumulate_dtype(e.param.dtype)
        sub = e.subspace.on(e.param.device)
        expected = (ops.rows_of(ops.local_tensor(e.param, self.side, e.name).shape, self.side),
                    sub.basis.shape[1])  # fmt: skip
        if not isinstance(c, torch.Tensor) or not c.is_floating_point():
            raise ValueError(f"{where} must be a floating-point tensor, got {type(c).__name__}")
        if tuple(c.shape) != expected:
            raise ValueError(
                f"{where} has shape {tuple(c.shape)}, but rows × k of this parameter is {expected}"
            )
        c = c.to(device=e.param.device, dtype=dt).clone(memory_format=torch.contiguous_format)
        if not bool(torch.isfinite(c).all()):
            raise ValueError(f"{where} holds NaN or inf values")
        if sub.weights is None:
            # Hard projector: every step leaves rows(W)U on the anchor, so the
            # weights loaded with this checkpoint must sit on it too.
            now = ops.anchor(e.param, sub, side=self.side)
            err = (now.double() - c.double()).norm().item()
            w = ops.local_tensor(e.param, self.side, e.name)
            scale = torch.linalg.vector_norm(w, dtype=torch.float32).item()
            tol = ANCHOR_TOL[e.param.dtype]
            if not err <= tol * max(scale, 1e-30):
                raise ValueError(
                    f"{where} does not match the weights: ‖rows(W)U − C‖/‖W‖ = "
                    f"{err / max(scale, 1e-30):.3g} > {tol:g}. Either the model's weights were "
                    "not loaded from the same checkpoint before the optimizer state (load "
                    "the model first), or the anchors belong to other weights (another run, "
                    "or another parameter order); resuming would pull the weights to them"
                )
        return c


def _named(named_parameters: NamedParams) -> dict[str, torch.Tensor]:
    if named_parameters is None:
        return {}
    if isinstance(named_parameters, nn.Module):
        return dict(named_parameters.named_parameters())
    return dict(named_parameters)


def _validate(
    param: torch.Tensor, sub: Subspace, side: str, name: str, tol: float | None = None
) -> None:
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
    ops.check_orthonormal_(u, f"the basis for {where}", tol=tol)
    if w is not None:
        if w.dim() != 1 or w.shape[0] != u.shape[1]:
            raise ValueError(
                f"the weights for {where} must have shape ({u.shape[1]},), got {tuple(w.shape)}"
            )
        lo, hi = w.min().item(), w.max().item()  # construction time: a sync is fine here
        if not (lo >= 0.0 and hi <= 1.0):
            raise ValueError(f"the weights for {where} must lie in [0, 1], got [{lo:g}, {hi:g}]")


_HOOK_DICTS = (
    "_optimizer_step_pre_hooks",
    "_optimizer_step_post_hooks",
    "_optimizer_state_dict_pre_hooks",
    "_optimizer_state_dict_post_hooks",
    "_optimizer_load_state_dict_pre_hooks",
    "_optimizer_load_state_dict_post_hooks",
)


def init_optimizer_hooks(opt: torch.optim.Optimizer) -> None:
    """What ``Optimizer.__init__`` sets up besides params, for a wrapper that shares them."""
    for name in _HOOK_DICTS:
        if name not in opt.__dict__:
            setattr(opt, name, OrderedDict())
    opt._patch_step_function()  # runs step pre/post hooks registered on the wrapper


def picklable_state(opt: torch.optim.Optimizer) -> dict[str, Any]:
    """``opt.__dict__`` without its hooks: like torch, hooks (often lambdas) are not saved."""
    return {k: v for k, v in opt.__dict__.items() if k not in _HOOK_DICTS}


def refuse_differentiable(param_groups: list[dict], what: str) -> None:
    """Raise ``ValueError`` for ``differentiable=True``: autograd cannot see the projection."""
    if any(group.get("differentiable", False) for group in param_groups):
        raise ValueError(
            f"{what}: differentiable=True is not supported. The projection writes the "
            "weights in place outside autograd, so gradients through the optimizer step "
            "would miss it and be wrong; build the inner optimizer with differentiable=False"
        )


@contextlib.contextmanager
def _hooks_off(opt: torch.optim.Optimizer, *names: str):
    """Run ``Optimizer``'s own state-dict methods without the hooks the wrapper runs itself."""
    saved = {name: getattr(opt, name) for name in names}
    try:
        for name in names:
            setattr(opt, name, OrderedDict())
        yield
    finally:
        for name, hooks in saved.items():
            setattr(opt, name, hooks)


def state_dict_with_hooks(
    opt: torch.optim.Optimizer, build: Callable[[], dict[str, Any]]
) -> dict[str, Any]:
    """``build()`` between ``opt``'s state-dict pre and post hooks, as ``Optimizer.state_dict``."""
    for pre_hook in opt._optimizer_state_dict_pre_hooks.values():
        pre_hook(opt)
    with _hooks_off(opt, "_optimizer_state_dict_pre_hooks", "_optimizer_state_dict_post_hooks"):
        state_dict = build()
    for post_hook in opt._optimizer_state_dict_post_hooks.values():
        result = post_hook(opt, state_dict)
        if result is not None:
            state_dict = result
    return state_dict


def load_state_dict_with_hooks(
    opt: torch.optim.Optimizer,
    state_dict: dict[str, Any],
    protection: Protection,
    extra: dict[str, Any],
    load_inner: Callable[[dict[str, Any]], None],
) -> None:
    """Load a state dict with gradproj's section, all or nothing, between ``opt``'s load hooks.

    The section is checked in full first; then the inner state loads; only then
    are the anchors installed. A state dict without the section (saved by a bare
    optimizer) warns: the protected weights are re-anchored where they are now.
    """
    state_dict = dict(state_dict)
    for pre_hook in opt._optimizer_load_state_dict_pre_hooks.values():
        result = pre_hook(opt, state_dict)
        if result is not None:
            state_dict = dict(result)
    section = state_dict.pop(STATE_KEY, None)
    if section is not None:
        install = protection.load_state_dict(section, opt.param_groups, extra)
    else:
        if protection.entries:
            warnings.warn(
                f"loading a state dict without a {STATE_KEY!r} section (saved by an optimizer "
                "without protection?) into a protected optimizer: its "
                f"{len(protection.entries)} protected parameter(s) are re-anchored at their "
                "current weights, so the guarantee holds from this checkpoint on, not from the "
                "weights the run started from",
                UserWarning,
                stacklevel=3,
            )

        def install() -> None:
            for e in protection.entries:
                e.anchor = None

    with _hooks_off(
        opt, "_optimizer_load_state_dict_pre_hooks", "_optimizer_load_state_dict_post_hooks"
    ):
        load_inner(state_dict)
    install()
    for post_hook in opt._optimizer_load_state_dict_post_hooks.values():
        post_hook(opt)


class ProjectedOptimizer(torch.optim.Optimizer):
    """Wrap ``optimizer`` so that protected weights never move along their bases.

    See the module docstring for the math of the two modes and which keeps the
    guarantee ``(W_T − W_0) U = 0`` (update mode: every inner optimizer; grad
    mode: SGD with or without momentum, without weight decay, and LBFGS).

    Args:
        optimizer: any ``torch.optim.Optimizer``; its ``param_groups``, ``state``
            and ``defaults`` are shared, not copied. ``differentiable=True`` is
            refused (autograd cannot see the projection).
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
            name keys, and used in messages and saved state.
        backend: force a gradproj backend (default: the fastest installed).

    ``step(closure)`` hands the closure to the inner optimizer (LBFGS evaluates
    it many times); in grad mode every evaluation's gradients are projected.
    Before anything moves, every step checks that each protected parameter is
    still in ``param_groups`` (a trainer that replaced them, as DeepSpeed ZeRO
    does, gets a ``RuntimeError``, never an unprojected step). Step hooks fire
    once per step (global ones included), after the projection; state-dict hooks
    registered on the wrapper fire around the full state dict. Under
    ``torch.amp.GradScaler`` a skipped step never reaches this ``step``, so
    nothing is projected and anchors do not move. Parameters added later with
    ``add_param_group`` are not protected.
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
        refuse_differentiable(optimizer.param_groups, "ProjectedOptimizer")
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
        return picklable_state(self)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        init_optimizer_hooks(self)

    def __repr__(self) -> str:
        return (
            f"ProjectedOptimizer(mode={self.mode!r}, side={self.side!r}, "
            f"protected={len(self.protection.entries)}, optimizer={self.optimizer!r})"
        )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        refuse_differentiable([param_group], "ProjectedOptimizer.add_param_group")
        self.optimizer.add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Project (grad mode) or step and project (update mode); the closure goes inside.

        The closure runs with grad enabled; in grad mode the gradients of every
        evaluation are projected before the inner optimizer reads them, and in
        update mode anchors are taken after the first evaluation, before
        anything has moved.
        """
        protection = self.protection
        protection.check_optimized(self.param_groups)
        if closure is None:
            if self.mode == "grad":
                protection.project_grads(protection.stepping(), self.backend)
            else:
                protection.ensure_anchors(protection.stepping())
            loss = self._inner_step(None)
        else:

            def evaluate() -> Any:
                with torch.enable_grad():
                    loss = closure()
                if self.mode == "grad":
                    protection.project_grads(protection.stepping(), self.backend)
                else:  # no-op after the first evaluation: anchors exist by then
                    protection.ensure_anchors(protection.stepping())
                return loss

            if self.mode == "update":  # grads left from an earlier backward
                protection.ensure_anchors(protection.stepping())
            loss = self._inner_step(evaluate)
        if self.mode == "update":
            protection.project_updates(protection.anchored(), self.backend)
        return loss

    def _inner_step(self, closure: Callable[[], Any] | None) -> Any:
        """The inner optimizer's step with its own hooks but not the global ones.

        The wrapper's step (patched by ``Optimizer``) runs the global step hooks
        once, around the projection; going through the inner optimizer's patched
        step would run them a second time, the post hook seeing unprojected weights.
        """
        inner = self.optimizer
        step = type(inner).step
        raw = getattr(step, "__wrapped__", None) if getattr(step, "hooked", False) else None
        if raw is None:  # not patched by Optimizer: it runs no hooks itself
            return inner.step() if closure is None else inner.step(closure)
        args: tuple = (inner,) if closure is None else (inner, closure)
        kwargs: dict[str, Any] = {}
        for pre_hook in inner._optimizer_step_pre_hooks.values():
            result = pre_hook(inner, args, kwargs)
            if result is not None:
                args, kwargs = result
        out = raw(*args, **kwargs)
        inner._optimizer_step_code()
        for post_hook in inner._optimizer_step_post_hooks.values():
            post_hook(inner, args, kwargs)
        # An LR scheduler attached to the inner optimizer watches its step for this flag.
        inner._opt_called = True
        return out

    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state dict plus a ``"gradproj"`` section (anchors, bases)."""

        def build() -> dict[str, Any]:
            # The section first: it refuses lost weights before torch trips over them.
            section = self.protection.state_dict(self.param_groups, {"mode": self.mode})
            return {**self.optimizer.state_dict(), STATE_KEY: section}

        return state_dict_with_hooks(self, build)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load the inner state and the anchors, all or nothing, after checking every field.

        See :meth:`Protection.load_state_dict` for what is checked (the model's
        weights must be loaded first). A state dict without a ``"gradproj"``
        section (a plain inner one) loads with a ``UserWarning``: anchors are
        then created afresh at the next step.
        """
        load_state_dict_with_hooks(
            self, state_dict, self.protection, {"mode": self.mode}, self.optimizer.load_state_dict
        )
