"""The peers every gradproj kernel is measured against, in the same run.

Each peer projects a bucket in place with the same math as ``gradproj.project_``
(``side="input"``: every row ``g ← g − U(Uᵀg)``), so they time the same work:

* ``eager``: the straightforward per-tensor PyTorch a user would write,
  ``g.sub_((g @ U) @ U.T)`` — 2 GEMMs, a temporary and a subtraction per tensor;
* ``compiled`` / ``compiled_max_autotune``: ``torch.compile`` of that loop (modes
  ``default`` and ``max-autotune-no-cudagraphs``);
* ``grouped``: the best case for eager PyTorch — every gradient lives in one flat
  buffer (as in a DDP bucket) and all rows are one ``(R × D)`` matrix, so the whole
  bucket is two GEMMs and one subtraction;
* ``copy``: a device copy of the bucket's bytes (one read, one write of every
  element): the roofline every projection is held to.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def eager_project_(grads: list[torch.Tensor], basis: torch.Tensor) -> None:
    """Per-tensor eager PyTorch: ``g -= (g U) Uᵀ`` (fp32 math for low-precision grads)."""
    for g in grads:
        x = g.float()
        g.copy_(x - (x @ basis) @ basis.T)


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
    """All rows of a flat bucket as one matrix: two GEMMs for the whole bucket."""
    rows = flat.view(-1, basis.shape[0])
    x = rows.float()
    rows.copy_(x - (x @ basis) @ basis.T)


def compiled(mode: str) -> Callable[[list[torch.Tensor], torch.Tensor], None]:
    """``torch.compile`` of :func:`eager_project_` in ``mode`` (compiled on first call)."""
    return torch.compile(eager_project_, mode=mode, dynamic=False)


def copy_roofline(flat: torch.Tensor) -> Callable[[], None]:
    """A closure that copies ``flat`` into a same-size buffer: one read + one write per element."""
    dst = torch.empty_like(flat)
    return lambda: dst.copy_(flat)


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
