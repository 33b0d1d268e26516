"""The peers every gradproj op is measured against, in the same run, each at its strongest.

Each projection peer does the same math as ``gradproj.project_`` (``side="input"``:
every row ``g ← g − U(Uᵀg)``, in place), so they time the same work:

* ``eager``: per tensor, in place, one fused GEMM-and-accumulate:
  ``g.addmm_(g @ U, Uᵀ, alpha=-1)`` — ``g @ U`` (a ``rows × k`` temporary) and
  ``g ← g − C Uᵀ`` in the GEMM's epilogue, no full-size temporary and no separate
  subtraction pass. bf16/fp16 grads run both GEMMs in their dtype with fp32
  accumulation inside the GEMM (what torch does for them): the coefficients ``C``
  are rounded to the grad dtype once, the cheapest form whose error stays at that
  dtype's rounding (the suite reports every contender's error against float64);
  ``U`` is converted to the grad dtype once, outside the timed call, as gradproj
  caches its basis. Where the device has no fast half-precision GEMM the float32 form
  (:func:`eager_upcast_project_`) is faster: for bf16/fp16 the suite times both and keeps
  the faster as ``eager``, and uses that form for ``grouped`` and ``compiled`` too;
* ``compiled`` / ``compiled_max_autotune``: ``torch.compile`` of that loop (modes
  ``default`` and ``max-autotune-no-cudagraphs``), in every case, compiled afresh for each
  case (dynamo's recompile limit would otherwise fall back to eager after 8 shapes);
* ``grouped``: the best case for eager PyTorch — every gradient lives in one flat
  buffer (as in a DDP bucket), so all rows are one ``(R × D)`` matrix and the whole
  bucket is one ``addmm_`` pair;
* ``copy``: a device copy of the bucket's bytes (one read and one write of every
  element): the roofline every projection is held to.

torch has no foreach matmul, so there is no foreach projection peer. The optimizer
peers are torch's own AdamW (``fused=True`` where torch supports it, and ``foreach``)
and AdamW followed by the best eager anchored projection, ``W ← W − (W U − C) Uᵀ`` per
weight in one ``addmm_`` (:func:`anchored_project_`), which is what
``ProjectedOptimizer``'s update mode computes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def eager_project_(grads: list[torch.Tensor], basis: torch.Tensor) -> None:
    """Per tensor, in place: ``g ← g − (g U) Uᵀ`` as one ``addmm_`` (``basis`` in ``g``'s dtype)."""
    for g in grads:
        g.addmm_(g @ basis, basis.T, alpha=-1)


def eager_upcast_project_(grads: list[torch.Tensor], basis: torch.Tensor) -> None:
    """The bf16/fp16 alternative: per tensor, in float32, ``x ← x − (x U) Uᵀ`` in one
    ``addmm_`` on a float32 copy, written back once (one full-size float32 temporary per
    tensor). Faster than :func:`eager_project_` where the device has no fast half-precision
    GEMM (CPUs without AVX-512 BF16 / AMX); the suite times both and keeps the faster."""
    for g in grads:
        _project_in_fp32_(g, basis)


def _project_in_fp32_(rows: torch.Tensor, basis: torch.Tensor) -> None:
    x = rows.float()
    x.addmm_(x @ basis, basis.T, alpha=-1)
    rows.copy_(x)


def grouped_buffer(grads: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The grads copied into one flat buffer, and views of it shaped like them (a DDP bucket)."""
    total = sum(g.numel() for g in grads)
    flat = torch.empty(total, dtype=grads[0].dtype, device=grads[0].device)
    views, offset = [], 0
    for g in grads:
        v = flat[offset : offset + g.numel()].view(g.shape)
        v.copy_(g)
        views.append(v)
        offset += g.numel()
    return flat, views


def grouped_project_(flat: torch.Tensor, basis: torch.Tensor) -> None:
    """All rows of a flat bucket as one matrix: one ``addmm_`` pair for the whole bucket."""
    rows = flat.view(-1, basis.shape[0])
    rows.addmm_(rows @ basis, basis.T, alpha=-1)


def grouped_upcast_project_(flat: torch.Tensor, basis: torch.Tensor) -> None:
    """:func:`grouped_project_` in float32 on a copy of the bucket (the bf16/fp16 alternative)."""
    _project_in_fp32_(flat.view(-1, basis.shape[0]), basis)


def compiled(
    mode: str, fn: Callable[[list[torch.Tensor], torch.Tensor], None] = eager_project_
) -> Callable[[list[torch.Tensor], torch.Tensor], None]:
    """``torch.compile`` of ``fn`` (an eager form above) in ``mode`` (compiled on first call)."""
    return torch.compile(fn, mode=mode, dynamic=False)


def copy_roofline(flat: torch.Tensor) -> Callable[[], None]:
    """A closure that copies ``flat`` into a same-size buffer: one read + one write per element."""
    dst = torch.empty_like(flat)
    return lambda: dst.copy_(flat)


@torch.no_grad()
def anchored_project_(
    weights: list[torch.Tensor], anchors: list[torch.Tensor], basis: torch.Tensor
) -> None:
    """After an optimizer step, per weight: ``W ← W − (W U − C) Uᵀ`` (one ``addmm_``)."""
    for w, c in zip(weights, anchors, strict=True):
        w.addmm_(torch.addmm(c, w, basis, alpha=1, beta=-1), basis.T, alpha=-1)


def surgery_loop_(
    g_unlearn: list[torch.Tensor], g_retain: list[torch.Tensor], strength: float = 1.0
) -> None:
    """DoCo's public per-parameter loop: cosine per tensor, a host branch on its sign.

    ``float(cos)`` synchronizes with the device once per tensor, as the original's
    ``if cos < 0`` does; the update is its ``g_u −= λ·cos·ĝ_r`` (the "cosine" variant).
    """
    for u, r in zip(g_unlearn, g_retain, strict=True):
        cos = torch.nn.functional.cosine_similarity(u.flatten(), r.flatten(), dim=0)
        if float(cos) < 0:
            u.sub_(strength * cos * r / r.norm())


def surgery_no_sync_(
    g_unlearn: list[torch.Tensor], g_retain: list[torch.Tensor], strength: float = 1.0
) -> None:
    """The same update with the branch on the device: no host synchronization.

    Per tensor: ``c = min(cos, 0)``, ``g_u ← g_u − λ·c·r/‖r‖`` as one ``addcmul_`` (no
    full-size temporary; a conflict-free pair adds exactly zero).
    """
    for u, r in zip(g_unlearn, g_retain, strict=True):
        rn = r.norm()
        cos = torch.dot(u.flatten(), r.flatten()) / (u.norm() * rn).clamp_min(1e-30)
        u.addcmul_(r, strength * cos.clamp(max=0) / rn, value=-1)
