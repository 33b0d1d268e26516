"""Grouping gradients into buckets a backend can run in one launch.

A bucket is every (validated, non-empty) gradient that shares one basis object,
one weights object, one side, one dtype and one device. Inside a bucket each
gradient is reduced to the matrix whose rows are the vectors to project (the
"row view"), so backends only ever see the row case:

* ``input``: ``G.view(out, -1)``       rows of length ``in·kh·kw``
* ``output``: ``G.view(out, -1).T``    columns of ``G`` as rows (stride ``(1, in)``)
* ``flat``: ``g.view(-1)``             one vector of ``numel`` entries

A view is taken whenever the strides allow it, so the kernels write straight into
the caller's gradient. When they do not (a non-contiguous conv grad, a
non-contiguous flat grad) the bucket holds a contiguous copy and remembers to copy
it back after the kernel: slower, never wrong.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch


@dataclass
class Bucket:
    """Gradients that one kernel launch projects with one basis."""

    side: str
    basis: torch.Tensor  # (D × k), contiguous, float32 (float64 for float64 grads)
    weights: torch.Tensor | None  # (k,), basis dtype, or None for the hard projector
    matrices: list[torch.Tensor] = field(default_factory=list)
    # (caller's gradient, contiguous working copy) pairs to copy back after the kernel
    writebacks: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    # one (R_i × k) anchor per matrix, in the basis dtype, for the anchored (update) projection
    anchors: list[torch.Tensor] = field(default_factory=list)

    @property
    def device(self) -> torch.device:
        return self.matrices[0].device

    @property
    def dtype(self) -> torch.dtype:
        return self.matrices[0].dtype

    def add(self, g: torch.Tensor) -> None:
        """Append ``g``'s row view, or a working copy of it when no view exists."""
        try:
            self.matrices.append(row_view(g, self.side))
        except RuntimeError:
            work = g.contiguous()
            self.matrices.append(row_view(work, self.side))
            self.writebacks.append((g, work))

    def finish(self) -> None:
        """Copy working copies back into the caller's gradients."""
        for g, work in self.writebacks:
            g.copy_(work)


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype bases, weights and anchors take for grads of ``dtype``: float32, or float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def row_view(g: torch.Tensor, side: str) -> torch.Tensor:
    """The view of ``g`` whose rows are projected; raises ``RuntimeError`` if strides forbid it."""
    if side == "flat":
        if not g.is_contiguous():  # view(-1) of g[::2] exists but has stride 2: kernels need 1
            raise RuntimeError("a flat row view needs a contiguous tensor")
        return g.view(-1)
    if g.dim() == 2:  # a linear weight's grad is its own row view (no view to build)
        m = g
    elif g.dim() == 1:  # a bias under side="output": one column of length out
        m = g.view(g.shape[0], 1)
    else:
        m = g.view(g.shape[0], -1)
    return m.T if side == "output" else m


# (id(U), dtype) -> (weak reference to U, U's version, the kernel-ready copy); see kernel_basis
_KERNEL_BASES: dict[tuple[int, torch.dtype], tuple[weakref.ref, int, torch.Tensor]] = {}


def kernel_basis(u: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``U`` as the kernels take it: contiguous, in ``dtype``; ``U`` itself when it is one.

    A basis straight from ``torch.linalg.qr`` or an SVD is column-major. Its contiguous
    copy is made once and reused while ``U`` lives with an unchanged version counter (an
    in-place write to ``U`` makes a new one): a fresh copy each call defeated the CUDA
    extension's packed-basis cache, which is keyed by the tensor's storage and version,
    and re-packed the basis on every call (measured on an H200: bf16 rows of ``d`` = 768,
    k = 8, 0.243 ms a call against 0.077 ms at k = 1, whose ``d × 1`` basis is contiguous
    as it is). The copy costs the memory of one more basis while ``U`` lives, as each call
    did before. Inference tensors carry no version counter: they are copied each call. A
    write that bypasses ``U``'s version counter (through ``U.data``) is not seen, as the
    extension's cache does not see it for a contiguous ``U``: write bases in place with
    ``torch.no_grad()``, not through ``.data``. Under ``torch.compile`` the copy is traced,
    as an op of the graph.
    """
    if u.dtype == dtype and u.is_contiguous():
        return u
    if torch.compiler.is_compiling():
        # traced: the copy is an op of the graph, made from U's value at each run (a cache
        # filled while tracing would hand the graph a tensor of trace time)
        return u.to(dtype).contiguous()
    if u.is_inference():
        return u.detach().to(dtype).contiguous()
    key = (id(u), dtype)
    hit = _KERNEL_BASES.get(key)
    if hit is not None and hit[0]() is u and hit[1] == u._version:
        return hit[2]
    # detached: a cached copy holding U's autograd graph would keep U alive for good
    copy = u.detach().to(dtype).contiguous()
    ref = weakref.ref(u, lambda _, key=key: _KERNEL_BASES.pop(key, None))
    _KERNEL_BASES[key] = (ref, u._version, copy)
    return copy


def group(
    grads: list[torch.Tensor],
    bases: list[tuple[torch.Tensor, torch.Tensor | None]],
    side: str,
    anchors: list[torch.Tensor] | None = None,
) -> list[Bucket]:
    """Bucket ``grads[i]`` with its ``bases[i] = (U, w)`` by (U, w, dtype, device), keeping order.

    ``anchors[i]``, when given, travels with ``grads[i]`` into its bucket.

    Bases are keyed by object identity: the same basis tensor serving many
    gradients (all cross-attention K/V weights of a UNet) lands in one bucket and
    is converted and loaded once.
    """
    buckets: dict[tuple, Bucket] = {}
    converted: dict[tuple[int, torch.dtype], torch.Tensor] = {}
    for i, (g, (u, w)) in enumerate(zip(grads, bases, strict=True)):
        key = (id(u), id(w) if w is not None else None, g.dtype, g.device)
        bucket = buckets.get(key)
        if bucket is None:
            dt = accumulate_dtype(g.dtype)
            if (id(u), dt) not in converted:
                converted[id(u), dt] = kernel_basis(u, dt)
            wf = None if w is None else w.to(dt).contiguous()
            bucket = buckets[key] = Bucket(side, converted[id(u), dt], wf)
        bucket.add(g)
        if anchors is not None:
            bucket.anchors.append(anchors[i])
    return list(buckets.values())
