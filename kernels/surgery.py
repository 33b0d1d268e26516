"""Fused Triton kernels for conflict-aware gradient surgery over a bucket of tensor pairs.

Per pair ``(g_u, g_r)`` (math in ``gradproj.reference.surgery``): ``d = g_u·g_r``;
when ``d < 0``, ``g_u ← g_u − c_u g_r`` (and, symmetric, ``g_r ← g_r − c_r g_u``).

Three launches for the whole bucket, none per tensor, and no host sync — the
conflict test happens on the device:

1. ``_partial_sums_kernel``: every program reduces one chunk of one pair to
   ``(Σ u·r, Σ u·u, Σ r·r)`` (fp32 accumulation), a (tensor, chunk) block table
   mapping programs to pairs as in ``kernels/project.py``;
2. ``_coefficients_kernel``: one program per pair adds its chunks' partials in a
   fixed order (deterministic, no atomics) and turns them into ``c_u``, ``c_r``
   (zero without a conflict, so nothing divides by a zero norm);
3. ``_apply_kernel``: every program rewrites its chunk. Each element is read
   twice (once per pass) and written once — a reduction over a whole tensor must
   finish before any element can change.

Addresses: every pair is found as element offsets (int64) from one base pointer,
the bucket's first ``g_u`` (all tensors share its dtype), never through an
int-to-pointer cast, so Triton knows the alignment: when every address and
``numel`` is a multiple of 16 bytes (checked on the host, ``VEC`` elements),
``tl.multiple_of`` makes each load and store a 16-byte vector. Programs walk
their chunk in ``BLOCK``-element steps, consecutive lanes on consecutive
addresses. Bytes per element of ``b`` bytes per grad: ``4b`` read (``u`` and
``r`` once per pass), ``b`` written (``2b`` when symmetric).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gradproj.kernels.device_table import cached_table

_BLOCK = 1024
_CHUNK = 16 * _BLOCK  # elements per program: big enough to amortize the table look-up
_META = 3  # per pair: element offsets of g_u and g_r from the base pointer, numel


@triton.jit
def _pair(table_ptr, n_pairs, pid, g0_ptr, VEC: tl.constexpr, CHUNK: tl.constexpr):
    """Program ``pid``'s pair: pointers to ``g_u`` and ``g_r``, numel, first element."""
    blk = table_ptr + n_pairs * 3 + pid * 3
    t = tl.load(blk)
    start = tl.multiple_of(tl.load(blk + 1), CHUNK)
    meta = table_ptr + t * 3
    u_ptr = g0_ptr + tl.multiple_of(tl.load(meta), VEC)
    r_ptr = g0_ptr + tl.multiple_of(tl.load(meta + 1), VEC)
    n = tl.multiple_of(tl.load(meta + 2), VEC)
    return u_ptr, r_ptr, n, start


@triton.jit
def _partial_sums_kernel(
    table_ptr,
    n_pairs,
    partial_ptr,
    g0_ptr,
    VEC: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    u_ptr, r_ptr, n, start = _pair(table_ptr, n_pairs, pid, g0_ptr, VEC, CHUNK)
    ur = tl.zeros((BLOCK,), dtype=tl.float32)
    uu = tl.zeros((BLOCK,), dtype=tl.float32)
    rr = tl.zeros((BLOCK,), dtype=tl.float32)
    for off in range(0, CHUNK, BLOCK):
        idx = start + off + tl.arange(0, BLOCK)
        mask = idx < n
        u = tl.load(u_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        r = tl.load(r_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        ur += u * r
        uu += u * u
        rr += r * r
    tl.store(partial_ptr + pid * 3, tl.sum(ur, axis=0))
    tl.store(partial_ptr + pid * 3 + 1, tl.sum(uu, axis=0))
    tl.store(partial_ptr + pid * 3 + 2, tl.sum(rr, axis=0))


@triton.jit
def _coefficients_kernel(
    first_ptr,
    partial_ptr,
    coef_ptr,
    strength,
    COSINE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    t = tl.program_id(0)
    lo = tl.load(first_ptr + t)
    hi = tl.load(first_ptr + t + 1)
    ur = tl.zeros((BLOCK,), dtype=tl.float32)
    uu = tl.zeros((BLOCK,), dtype=tl.float32)
    rr = tl.zeros((BLOCK,), dtype=tl.float32)
    for b0 in range(lo, hi, BLOCK):
        b = b0 + tl.arange(0, BLOCK)
        mask = b < hi
        ur += tl.load(partial_ptr + b * 3, mask=mask, other=0.0)
        uu += tl.load(partial_ptr + b * 3 + 1, mask=mask, other=0.0)
        rr += tl.load(partial_ptr + b * 3 + 2, mask=mask, other=0.0)
    d = tl.sum(ur, axis=0)
    nu = tl.sum(uu, axis=0)
    nr = tl.sum(rr, axis=0)
    conflict = d < 0.0  # implies nu > 0 and nr > 0
    # Safe denominators: without a conflict the coefficient is zero anyway.
    if COSINE:
        den_u = tl.where(conflict, tl.sqrt(nu) * nr, 1.0)
        den_r = tl.where(conflict, tl.sqrt(nr) * nu, 1.0)
    else:
        den_u = tl.where(conflict, nr, 1.0)
        den_r = tl.where(conflict, nu, 1.0)
    lam = tl.cast(strength, tl.float32)  # scalar args may arrive as fp64; the math is fp32
    tl.store(coef_ptr + t * 2, tl.where(conflict, lam * d / den_u, 0.0))
    tl.store(coef_ptr + t * 2 + 1, tl.where(conflict, lam * d / den_r, 0.0))


@triton.jit
def _apply_kernel(
    table_ptr,
    n_pairs,
    coef_ptr,
    g0_ptr,
    SYMMETRIC: tl.constexpr,
    VEC: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    u_ptr, r_ptr, n, start = _pair(table_ptr, n_pairs, pid, g0_ptr, VEC, CHUNK)
    t = tl.load(table_ptr + n_pairs * 3 + pid * 3)
    c_u = tl.load(coef_ptr + t * 2)
    c_r = tl.load(coef_ptr + t * 2 + 1)
    for off in range(0, CHUNK, BLOCK):
        idx = start + off + tl.arange(0, BLOCK)
        mask = idx < n
        u = tl.load(u_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        r = tl.load(r_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        tl.store(u_ptr + idx, (u - c_u * r).to(g0_ptr.dtype.element_ty), mask=mask)
        if SYMMETRIC:
            tl.store(r_ptr + idx, (r - c_r * u).to(g0_ptr.dtype.element_ty), mask=mask)


def surgery_bucket_(
    g_unlearn: list[torch.Tensor],
    g_retain: list[torch.Tensor],
    strength: float,
    variant: str,
    symmetric: bool,
) -> None:
    """The ``"triton"`` backend's surgery kernel (contract in ``gradproj.backends``)."""
    device = g_unlearn[0].device
    g0 = g_unlearn[0]
    size = g0.element_size()
    offs = _offsets(g0, g_unlearn + g_retain)
    meta = tuple((offs[i], offs[len(g_unlearn) + i], u.numel()) for i, u in enumerate(g_unlearn))
    vec = 16 // size
    aligned = all(t.data_ptr() % 16 == 0 and t.numel() % vec == 0 for t in g_unlearn + g_retain)
    vec = vec if aligned else 1
    chunks = [triton.cdiv(m[2], _CHUNK) for m in meta]

    def build() -> list[int]:
        # third column of each block row is padding so rows stay 3 wide
        blocks = [v for t, c in enumerate(chunks) for i in range(c) for v in (t, i * _CHUNK, 0)]
        return [v for m in meta for v in m] + blocks

    table = cached_table((device, "surgery", _CHUNK, g0.data_ptr(), meta), build)
    first = [0]
    for c in chunks:
        first.append(first[-1] + c)
    firsts = cached_table((device, "surgery-first", tuple(first)), lambda: first)
    n_blocks = first[-1]
    partial = torch.empty(n_blocks, 3, dtype=torch.float32, device=device)
    coef = torch.empty(len(meta), 2, dtype=torch.float32, device=device)
    common = {"VEC": vec, "CHUNK": _CHUNK, "BLOCK": _BLOCK}
    _partial_sums_kernel[(n_blocks,)](table, len(meta), partial, g0, **common)
    _coefficients_kernel[(len(meta),)](
        firsts, partial, coef, float(strength), COSINE=variant == "cosine", BLOCK=128
    )
    _apply_kernel[(n_blocks,)](table, len(meta), coef, g0, SYMMETRIC=symmetric, **common)


def _offsets(base: torch.Tensor, tensors: list[torch.Tensor]) -> list[int]:
    """Element offsets of ``tensors`` from ``base``'s address (all share its dtype)."""
    size = base.element_size()
    out = []
    for i, t in enumerate(tensors):
        delta = t.data_ptr() - base.data_ptr()
        if delta % size:
            raise ValueError(f"surgery bucket tensor {i} is not {size}-byte aligned to the first")
        out.append(delta // size)
    return out
