"""Public ops: validate, group into buckets, dispatch to a backend.

The path of a gradient: ``project_`` → ``buckets.group`` → ``backends.select`` →
the backend's bucket kernel. Validation happens here, once, with errors that name
the tensor (index, and name when the caller gives names) and the mismatch, so no
kernel ever sees an input it would misread.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from gradproj import backends, buckets
from gradproj.inplace import (
    check_no_overlap,
    check_writable_eager,
    mark_written,
    tracing,
)
from gradproj.reference import SIDES, side_dim

# Largest |UᵀU − I| accepted by ``check_orthonormal``, per basis dtype. Measured
# on a (4096 × 128) Gaussian matrix: Q from torch.linalg.qr in float32 has max
# |QᵀQ − I| = 6e-7 (float64: 5e-15); the float64 Q rounded to bf16 / fp16 (QᵀQ
# in float32) gives 2.5e-4 / 3e-5. The bounds sit 15-40x above those, far below
# what a non-orthonormal input gives (unnormalized embeddings are off by O(1)).
ORTHONORMAL_TOL: dict[torch.dtype, float] = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.bfloat16: 1e-2,
    torch.float16: 1e-3,
}

# Elements of the float32 slice ``anchor`` widens a 16-bit parameter through (16 MiB).
ANCHOR_CHUNK = 1 << 22

GradList = torch.Tensor | Sequence[torch.Tensor | None]
BasisLike = torch.Tensor | object | None


def _where(i: int, names: Sequence[str] | None, what: str = "grads") -> str:
    return f"{what}[{i}] ({names[i]!r})" if names is not None else f"{what}[{i}]"


class _Where:
    """``prefix + _where(i, names, what)``, formatted only when a message uses it.

    A call checks every tensor of a bucket; building each one's name up front cost more
    host time than the checks themselves (a UNet's 32 K/V grads: ~2 µs a grad).
    """

    __slots__ = ("i", "names", "prefix", "what")

    def __init__(
        self, i: int, names: Sequence[str] | None, prefix: str = "", what: str = "grads"
    ) -> None:
        self.i, self.names, self.prefix, self.what = i, names, prefix, what

    def __str__(self) -> str:
        return self.prefix + _where(self.i, self.names, self.what)

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)


def _as_list(x, what: str) -> list:
    if isinstance(x, torch.Tensor) or x is None:
        return [x]
    if isinstance(x, (list, tuple)):
        return list(x)
    raise TypeError(f"{what} must be a tensor or a list/tuple of tensors, got {type(x).__name__}")


def unpack_basis(b: BasisLike, weights, where: object) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(U, w)`` from a basis tensor or an object with ``.basis``, ``.weights``."""
    if isinstance(b, torch.Tensor):
        return b, _as_weights(weights, b, where)
    if hasattr(b, "basis"):
        if weights is not None:
            raise ValueError(
                f"{where}: weights= was given, but the basis {type(b).__name__} carries its own "
                "weights; pass one or the other"
            )
        return b.basis, _as_weights(getattr(b, "weights", None), b.basis, where)
    raise TypeError(
        f"{where}: basis must be a tensor, an object with a .basis tensor (ConceptSubspace) "
        f"or None, got {type(b).__name__}"
    )


def _as_weights(weights, basis: torch.Tensor, where: object) -> torch.Tensor | None:
    if weights is None:
        return None
    if not isinstance(weights, torch.Tensor):
        weights = torch.as_tensor(weights, dtype=torch.float32, device=basis.device)
    return weights


@functools.cache
def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch build without distributed support
        return None
    return DTensor


def _is_dtensor(t) -> bool:
    # A plain parameter's type is Parameter; a DTensor parameter's (FSDP2) is DTensor.
    if type(t) is torch.Tensor or type(t) is torch.nn.Parameter or not isinstance(t, torch.Tensor):
        return False
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(t, dtensor)


def local_tensor(t, side: str, where: object):
    """The local tensor to project for ``t``, which may be a DTensor (FSDP2, tensor parallel).

    A plain tensor is returned as is. A DTensor is projected on its local shard
    with no communication when that is exact: every placement ``Replicate`` (the
    whole tensor is local), or ``Shard(0)`` with ``side="input"`` — FSDP2 shards
    parameters by rows, each row stays whole on one rank, and the input-side
    projection acts on rows independently with a replicated basis. Any other
    layout (a split row, ``Partial`` values, or ``side="output"``/``"flat"``
    on a sharded tensor, which need reductions across ranks) raises ``ValueError``.
    """
    if not _is_dtensor(t):
        return t
    placements = t.placements
    if all(pl.is_replicate() for pl in placements):
        return t.to_local()
    if side == "input" and all(pl.is_replicate() or pl.is_shard(0) for pl in placements):
        return t.to_local()
    raise ValueError(
        f"{where} is a DTensor with placements {tuple(placements)}; side={side!r} can be "
        "projected locally only for Replicate, or Shard(0) with side='input' (rows stay "
        "whole). Gather it (full_tensor()) or shard by rows."
    )


def _check_float(t: torch.Tensor, what: object) -> None:
    if not (t.is_floating_point()):
        raise TypeError(f"{what} must be a floating-point tensor, got dtype {t.dtype}")
    if t.layout != torch.strided:
        raise TypeError(f"{what} must be a dense (strided) tensor, got layout {t.layout}")


def validate(
    i: int,
    g: torch.Tensor,
    u: torch.Tensor,
    w: torch.Tensor | None,
    side: str,
    names: Sequence[str] | None,
    check_orthonormal: bool,
    tol: float | None = None,
    checked: set[tuple] | None = None,
) -> None:
    """Raise ``TypeError``/``ValueError`` naming ``grads[i]`` for each way ``(g, U, w)`` errs.

    ``checked``: the ``(id(U), id(w), tol)`` this call has already checked on their own
    (dtype, rank, the weights' shape and range, orthonormality); their checks against
    ``g`` (rows, ``k ≤ d``, device) still run. A basis is added once it passes.
    """
    where = _Where(i, names)
    key = (id(u), id(w), tol)
    fresh = checked is None or key not in checked
    if not isinstance(g, torch.Tensor):
        raise TypeError(f"{where} must be a tensor or None, got {type(g).__name__}")
    _check_float(g, where)
    if fresh:
        _check_float(u, _Where(i, names, "basis of "))
        if u.dim() != 2:
            raise ValueError(f"basis of {where} must be 2-D (d × k), got shape {tuple(u.shape)}")
    shape, (rows, k) = g.shape, u.shape
    if side == "input" and len(shape) < 2:
        raise ValueError(
            f"{where} has shape {tuple(shape)}: side='input' projects the rows of a weight "
            "of at least 2 dims (out × in...); use side='flat' or no basis for a 1-D tensor"
        )
    if side == "output" and not shape:
        raise ValueError(f"{where} is a 0-d tensor: side='output' needs at least 1 dim")
    d = side_dim(shape, side)
    if rows != d:
        raise ValueError(
            f"basis of {where} has {rows} rows, but side={side!r} of a grad of shape "
            f"{tuple(shape)} needs {d} (basis shape {tuple(u.shape)})"
        )
    if k > d:
        raise ValueError(f"basis of {where} has k={k} columns > d={d}: it cannot be orthonormal")
    device = g.device
    if u.device != device:
        raise ValueError(f"basis of {where} is on {u.device}, but the grad is on {device}")
    if w is not None:
        if fresh:
            _check_float(w, _Where(i, names, "weights of "))
            if w.dim() != 1 or w.shape[0] != k:
                raise ValueError(
                    f"weights of {where} must have shape ({k},) to match the basis "
                    f"(d × k = {tuple(u.shape)}), got {tuple(w.shape)}"
                )
        if w.device != device:
            raise ValueError(f"weights of {where} are on {w.device}, but the grad is on {device}")
        # Reading the values synchronizes with the device; free for CPU weights,
        # opt-in (check_orthonormal) for accelerator ones.
        # (Skipped while torch.compile traces: the values are data, not graph.)
        if (
            fresh
            and (w.device.type == "cpu" or check_orthonormal)
            and w.numel() > 0
            and not torch.compiler.is_compiling()
        ):
            lo, hi = w.min().item(), w.max().item()
            if not (lo >= 0.0 and hi <= 1.0):
                raise ValueError(
                    f"weights of {where} must lie in [0, 1], got values in [{lo:g}, {hi:g}]"
                )
    if check_orthonormal and fresh:
        check_orthonormal_(u, f"basis of {where}", tol=tol)
    if checked is not None:
        checked.add(key)


def check_orthonormal_(u: torch.Tensor, what: str = "basis", *, tol: float | None = None) -> None:
    """Raise ``ValueError`` unless ``max |UᵀU − I| ≤ tol`` (synchronizes).

    ``tol`` defaults to ``ORTHONORMAL_TOL[U.dtype]``; a basis computed in a lower
    precision than it is stored in (a float32 ``ConceptSubspace`` cast to float64)
    passes the tolerance of the precision it was made in (its ``orthonormal_tol``).
    """
    if u.shape[1] == 0:
        return
    uf = u.to(torch.promote_types(u.dtype, torch.float32))
    err = (uf.T @ uf - torch.eye(u.shape[1], dtype=uf.dtype, device=u.device)).abs().max().item()
    if tol is None:
        tol = ORTHONORMAL_TOL[u.dtype]
    if not err <= tol:
        raise ValueError(
            f"{what} (shape {tuple(u.shape)}, {u.dtype}) is not orthonormal: "
            f"max |UᵀU − I| = {err:.3g} > {tol:g}; orthonormalize it (torch.linalg.qr, "
            "or gradproj.ConceptSubspace)"
        )


def rows_of(shape: torch.Size | tuple[int, ...], side: str) -> int:
    """Number of vectors ``side`` projects in a tensor of ``shape`` (rows of its row view)."""
    if side == "flat":
        return 1
    if side == "output":
        return side_dim(shape, "input") if len(shape) > 1 else 1
    return shape[0]


def _collect(
    grads: GradList,
    bases,
    side: str,
    weights,
    names: Sequence[str] | None,
    check_orthonormal: bool,
    writes: bool = True,
) -> tuple[list[int], list[torch.Tensor], list[tuple[torch.Tensor, torch.Tensor | None]]]:
    """Validate every (grad, basis) pair; return the indices, grads and ``(U, w)`` to project.

    ``writes``: the grads will be changed in place (torch's in-place rules apply).
    """
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")
    grad_list = _as_list(grads, "grads")
    if isinstance(bases, (list, tuple)):
        basis_list = list(bases)
        if len(basis_list) != len(grad_list):
            raise ValueError(
                f"got {len(grad_list)} grads but {len(basis_list)} bases; give one basis per "
                "grad (None to skip one) or a single basis for all"
            )
    else:
        basis_list = [bases] * len(grad_list)
    if names is not None and len(names) != len(grad_list):
        raise ValueError(f"got {len(grad_list)} grads but {len(names)} names")

    idx: list[int] = []
    todo_g: list[torch.Tensor] = []
    todo_b: list[tuple[torch.Tensor, torch.Tensor | None]] = []
    # Per basis object, once a call: its (U, w) (a weights= sequence made a tensor once a
    # device, so grads sharing a basis share one bucket), and its own checks (validate).
    unpacked: dict[int, tuple[torch.Tensor, torch.Tensor | None, float | None]] = {}
    weights_on: dict[torch.device, torch.Tensor] = {}
    checked: set[tuple] = set()
    writable = writes and not tracing()  # torch's in-place rules (inplace.check_writable)
    for i, (g, b) in enumerate(zip(grad_list, basis_list, strict=True)):
        if g is None or b is None:
            continue
        found = unpacked.get(id(b))
        if found is None:
            w_arg = weights
            listed = w_arg is not None and not isinstance(w_arg, torch.Tensor)
            if listed and isinstance(b, torch.Tensor):
                if b.device not in weights_on:
                    weights_on[b.device] = _as_weights(w_arg, b, None)
                w_arg = weights_on[b.device]
            u, w = unpack_basis(b, w_arg, _Where(i, names))
            u = local_tensor(u, "flat", _Where(i, names, "basis of "))
            found = unpacked[id(b)] = (u, w, getattr(b, "orthonormal_tol", None))
        u, w, tol = found
        if type(g) is not torch.Tensor and type(g) is not torch.nn.Parameter:
            g = local_tensor(g, side, _Where(i, names))
        validate(i, g, u, w, side, names, check_orthonormal, tol, checked)
        if writable and g.is_inference():
            check_writable_eager(g, _Where(i, names))
        if g.numel() == 0 or u.shape[1] == 0:
            continue  # nothing to project
        idx.append(i)
        todo_g.append(g)
        todo_b.append((u, w))
    return idx, todo_g, todo_b


def _check_aliasing(
    idx: list[int],
    written: list[torch.Tensor],
    bases: list[tuple[torch.Tensor, torch.Tensor | None]],
    names: Sequence[str] | None,
    anchors: list[torch.Tensor] | None = None,
) -> None:
    """No written tensor (grad, anchor) may share memory with another input (see ``inplace``)."""
    out = [(g, _Where(i, names)) for i, g in zip(idx, written, strict=True)]
    if anchors is not None:
        out += [(c, _Where(i, names, "anchor of ")) for i, c in zip(idx, anchors, strict=True)]
    read, seen = [], set()
    for i, (u, w) in zip(idx, bases, strict=True):
        for t, what in ((u, "basis of "), (w, "weights of ")):
            if t is not None and id(t) not in seen:
                seen.add(id(t))
                read.append((t, _Where(i, names, what)))
    check_no_overlap(out, read)


def _launch(op: str, bucket_list: list[buckets.Bucket], backend: str | None) -> list:
    """Pick the backend of every bucket before any runs, so a refusal changes nothing."""
    return [
        (bucket, backends.select(op, bucket.device, bucket.dtype, backend).op(op))
        for bucket in bucket_list
    ]


@torch.no_grad()
def project_(
    grads: GradList,
    bases: BasisLike | Sequence[BasisLike],
    *,
    side: str = "input",
    weights: torch.Tensor | Sequence[float] | None = None,
    backend: str | None = None,
    check_orthonormal: bool = False,
    names: Sequence[str] | None = None,
) -> None:
    """Project gradients in place onto the orthogonal complement of their bases.

    For each ``grads[i]`` with basis ``U = bases[i]`` (orthonormal columns) and
    weights ``w`` (``None`` = all ones), every projected vector ``x`` becomes::

        x ← x − U (w ⊙ Uᵀ x)

    with the vectors chosen by ``side``: ``"input"`` the rows of ``G (out × in…)``
    (``G ← G − G U diag(w) Uᵀ``, so a layer ``y = W x`` keeps ``ΔW U = 0``),
    ``"output"`` the columns (``G ← G − V diag(w) Vᵀ G``), ``"flat"`` the whole
    flattened tensor. See :func:`gradproj.reference.project` for the full math.

    The GPU kernels may apply a large basis a block of columns at a time,
    ``(I − U₂W₂U₂ᵀ)(I − U₁W₁U₁ᵀ)``, which equals the formula above because the
    columns are orthonormal (``check_orthonormal=True`` verifies it); a basis that is
    not gives other results per backend.

    Args:
        grads: a tensor, or a list whose entries may be ``None`` (skipped).
        bases: one basis per grad (``None`` leaves that grad alone), or a single
            basis for all. A basis is a ``(d × k)`` tensor or an object with
            ``.basis`` (and optionally ``.weights``), e.g. ``ConceptSubspace``.
            Grads that share one basis object are projected in one launch.
        side: ``"input"``, ``"output"`` or ``"flat"``.
        weights: ``(k,)`` values in ``[0, 1]`` applied with every basis (soft
            projector); ``None`` for the hard projector.
        backend: force a backend (see ``gradproj.backends``); default: the
            fastest installed one for the device and dtype (``$GRADPROJ_BACKEND``
            overrides the default).
        check_orthonormal: also check ``UᵀU ≈ I`` (and device-resident weights'
            range); this reads values back and synchronizes, so it is off by default.
        names: optional names of the grads, used in error messages.

    NaN/inf in a grad propagate through the math: the whole projected vector that
    contains them becomes non-finite (when ``k ≥ 1``); nothing crashes.
    """
    idx, todo_g, todo_b = _collect(grads, bases, side, weights, names, check_orthonormal)
    _check_aliasing(idx, todo_g, todo_b, names)
    for bucket, kernel in _launch("project_bucket_", buckets.group(todo_g, todo_b, side), backend):
        kernel(bucket.matrices, bucket.basis, bucket.weights, side)
        bucket.finish()
    mark_written(todo_g)


@torch.no_grad()
def anchor(param: torch.Tensor, basis: BasisLike, *, side: str = "input") -> torch.Tensor:
    """The anchor ``C = rows(param) @ U`` (``R × k``) for :func:`project_anchored_`.

    Float32 (float64 for a float64 ``param``), whatever the dtypes of ``param`` and ``U``.

    ``rows(param)`` is the row view of ``side`` (``param`` itself for ``"input"``,
    its transpose for ``"output"``, one row for ``"flat"``).
    """
    param = local_tensor(param, side, "param")
    _, params, pairs = _collect([param], [basis], side, None, None, False, writes=False)
    u = local_tensor(unpack_basis(basis, None, "param")[0], "flat", "basis")
    r = rows_of(param.shape, side)
    dt = buckets.accumulate_dtype(param.dtype)
    if not params:
        return torch.zeros(r, u.shape[1], dtype=dt, device=param.device)
    u = pairs[0][0].to(dt)
    try:
        m = buckets.row_view(param, side).reshape(r, -1)  # a view whenever strides allow
    except RuntimeError:
        m = buckets.row_view(param.contiguous(), side).reshape(r, -1)
    if m.dtype == dt:
        return m @ u
    # A 16-bit parameter is widened a slice at a time, so the only temporary is
    # ANCHOR_CHUNK elements, not a float32 copy of the whole weight (2× its size).
    out = torch.empty(r, u.shape[1], dtype=dt, device=param.device)
    if r > 1:
        step = max(1, ANCHOR_CHUNK // m.shape[1])
        for i in range(0, r, step):
            torch.matmul(m[i : i + step].to(dt), u, out=out[i : i + step])
    else:
        out.zero_()
        for j in range(0, m.shape[1], ANCHOR_CHUNK):
            out.addmm_(m[:, j : j + ANCHOR_CHUNK].to(dt), u[j : j + ANCHOR_CHUNK])
    return out


def _refuse_anchor(c, p: torch.Tensor, expected: tuple[int, int], where: _Where) -> None:
    """Raise the error that says how anchor ``c`` of param ``p`` fails its contract."""
    if not isinstance(c, torch.Tensor):
        raise TypeError(f"anchor of {where} must be a tensor, got {type(c).__name__}")
    dt = buckets.accumulate_dtype(p.dtype)
    if c.shape != expected or c.dtype != dt or not c.is_contiguous():
        raise ValueError(
            f"anchor of {where} must be a contiguous {dt} tensor of shape {expected}, "
            f"got {c.dtype} {tuple(c.shape)}{'' if c.is_contiguous() else ' (non-contiguous)'}"
        )
    raise ValueError(f"anchor of {where} is on {c.device}, but the param is on {p.device}")


@torch.no_grad()
def project_anchored_(
    params: GradList,
    anchors: Sequence[torch.Tensor | None],
    bases: BasisLike | Sequence[BasisLike],
    *,
    side: str = "input",
    weights: torch.Tensor | Sequence[float] | None = None,
    backend: str | None = None,
    names: Sequence[str] | None = None,
) -> None:
    """Project each parameter's change since its anchor, in place: ``p ← p₀ + P (p − p₀)``.

    ``p₀`` is known only through its anchor ``C = rows(p₀) U`` (:func:`anchor`).
    For every projected vector ``x`` with anchor row ``c`` and ``a = Uᵀ x``::

        x ← x − U (w ⊙ (a − c))        c ← c + (1 − w) ⊙ (a − c)   (only with weights)

    so after the call ``rows(p) U`` equals the anchor again (hard projector): the
    parameter never moves along ``span(U)``. ``anchors[i]`` must be contiguous,
    of shape ``(rows, k)`` and dtype float32 (float64 for float64 params), as
    :func:`anchor` makes it; it is updated in place for soft weights.
    """
    idx, todo_p, todo_b = _collect(params, bases, side, weights, names, False)
    anchor_list = list(anchors)
    n = len(_as_list(params, "params"))
    if len(anchor_list) != n:
        raise ValueError(f"got {n} params but {len(anchor_list)} anchors")
    todo_c = []
    traced = tracing()
    for i, p, (u, _) in zip(idx, todo_p, todo_b, strict=True):
        c = anchor_list[i]
        expected = (rows_of(p.shape, side), u.shape[1])
        if not (
            isinstance(c, torch.Tensor)
            and c.shape == expected
            and c.dtype == buckets.accumulate_dtype(p.dtype)
            and c.is_contiguous()
            and c.device == p.device
        ):
            _refuse_anchor(c, p, expected, _Where(i, names))
        if not traced and c.is_inference():
            check_writable_eager(c, _Where(i, names, "anchor of "))
        todo_c.append(c)
    _check_aliasing(idx, todo_p, todo_b, names, anchors=todo_c)
    bucket_list = buckets.group(todo_p, todo_b, side, anchors=todo_c)
    for bucket, kernel in _launch("project_anchored_bucket_", bucket_list, backend):
        kernel(bucket.matrices, bucket.anchors, bucket.basis, bucket.weights, side)
        bucket.finish()
    mark_written(todo_p + todo_c)


def _pair(i: int, names: Sequence[str] | None) -> str:
    return f"pair {i}" + (f" ({names[i]!r})" if names is not None else "")


@torch.no_grad()
def surgery_(
    g_unlearn: GradList,
    g_retain: GradList,
    *,
    strength: float = 1.0,
    variant: str = "projection",
    symmetric: bool = False,
    backend: str | None = None,
    names: Sequence[str] | None = None,
) -> None:
    """Conflict-aware gradient surgery, in place, per tensor pair (seed 001, DoCo; PCGrad).

    For each pair with ``d = g_u·g_r`` (over the whole tensor), only when ``d < 0``::

        "projection" (default):  g_u ← g_u − λ (g_u·ĝ_r) ĝ_r
        "cosine" (DoCo's code):  g_u ← g_u − λ cos(g_u, g_r) ĝ_r

    ``λ = strength``. ``symmetric=True`` also updates ``g_r`` the same way from
    the original pair (PCGrad for two task gradients). The conflict test runs on
    the device: no host sync, no Python branch on a tensor value. ``d = 0`` or a
    zero gradient leaves both unchanged. Pairs whose entry is ``None`` on either
    side are skipped. See :func:`gradproj.reference.surgery` for the math and the
    difference between the variants.
    """
    from gradproj.reference import SURGERY_VARIANTS

    if variant not in SURGERY_VARIANTS:
        raise ValueError(f"variant must be one of {SURGERY_VARIANTS}, got {variant!r}")
    if not isinstance(strength, (int, float)) or isinstance(strength, bool):
        raise TypeError(f"strength must be a Python number, got {type(strength).__name__}")
    us, rs = _as_list(g_unlearn, "g_unlearn"), _as_list(g_retain, "g_retain")
    if len(us) != len(rs):
        raise ValueError(f"got {len(us)} unlearn gradients but {len(rs)} retain gradients")
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
    written: list[tuple[torch.Tensor, object]] = []
    read: list[tuple[torch.Tensor, object]] = []
    writable = not tracing()  # torch's in-place rules (inplace.check_writable)
    for i, (u, r) in enumerate(zip(us, rs, strict=True)):
        if u is None or r is None:
            continue
        named_u = _Where(i, None, what="g_unlearn")
        named_r = _Where(i, None, what="g_retain")
        for t, what in ((u, named_u), (r, named_r)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{what} must be a tensor or None, got {type(t).__name__}")
            _check_float(t, what)
        if u.shape != r.shape:
            raise ValueError(
                f"{_pair(i, names)}: g_unlearn has shape {tuple(u.shape)}, "
                f"g_retain {tuple(r.shape)}"
            )
        if u.dtype != r.dtype or u.device != r.device:
            raise ValueError(
                f"{_pair(i, names)}: g_unlearn is {u.dtype} on {u.device}, "
                f"g_retain {r.dtype} on {r.device}"
            )
        if writable and u.is_inference():
            check_writable_eager(u, named_u)
        written.append((u, named_u))
        if symmetric and writable and r.is_inference():
            check_writable_eager(r, named_r)
        (written if symmetric else read).append((r, named_r))
        if u.numel():
            pairs.append((u, r))
    check_no_overlap(written, read)
    groups: dict[tuple, tuple[list, list, list]] = {}
    for u, r in pairs:
        flat = groups.setdefault((u.dtype, u.device), ([], [], []))
        for t, dest, changes in ((u, flat[0], True), (r, flat[1], symmetric)):
            if t.is_contiguous():
                dest.append(t.view(-1))
            else:  # no flat view exists: work on a copy, write it back after
                work = t.contiguous()
                dest.append(work.view(-1))
                if changes:
                    flat[2].append((t, work))
    kernels = {
        key: backends.select("surgery_bucket_", key[1], key[0], backend).op("surgery_bucket_")
        for key in groups
    }
    for key, (fu, fr, writebacks) in groups.items():
        kernels[key](fu, fr, float(strength), variant, symmetric)
        for t, work in writebacks:
            t.copy_(work)
    mark_written(t for t, _ in written)
