"""Fused Triton kernels for the bucketed projection ``x ← x − U (w ⊙ (Uᵀx − c))``.

One launch projects every gradient of a bucket (all tensors sharing one basis,
dtype and device), whatever their shapes: a small device table holds each
tensor's element offset from a base pointer (the bucket's first tensor), row
count and strides, and a block table maps each program to (tensor, first row) —
the grouped-GEMM / multi-tensor-apply pattern. No gradient is concatenated or
copied.

Row kernel (sides ``input``/``output``; ``output`` arrives as transposed views; the
resident variant for small ``k`` is described below)::

    for each block of BLOCK_R rows X (R × D) and each chunk of BLOCK_K basis columns:
        A = X U_k                       (pass 1, fp32 accumulation, tensor cores)
        A = (A − C_k) ⊙ w_k             (anchored / soft variants)
        X = X − A U_kᵀ                  (pass 2, stored in the grad's dtype)

Chunks of ``k`` are applied one after another; that equals the one-shot formula
because ``U_jᵀ (X − A U_kᵀ) = U_jᵀ X`` for orthonormal ``U`` (``U_jᵀ U_k = 0``).

Design of the row kernel (bytes per gradient element of ``b`` bytes; tiles in
:func:`_row_tiles`, one program = ``BLOCK_R`` rows of one tensor, 4 warps):

* Layout: the contiguous axis is a constexpr (``CONTIG``: 1 = columns, the
  ``input`` side; 0 = rows, the transposed views of the ``output`` side; -1 =
  general strides), so the unit stride is known at compile time and a warp's
  lanes walk consecutive addresses. Tensors are addressed as int64 element
  offsets from one base pointer (the bucket's first tensor; all share its
  dtype), never through int-to-pointer casts. When the host has checked that
  every address, the other stride and the masked extent along the unit-stride
  axis are multiples of 16 bytes (``VEC`` elements), ``tl.multiple_of`` lets
  Triton issue 16-byte vector loads and stores. All offsets are int64.
* One pass (``ONE_PASS``: ``D`` padded to a power of two ≤ 128; ``BLOCK_R`` 32
  or 16, ``BLOCK_K`` ≤ 32): the ``BLOCK_R × D`` tile is loaded once into
  registers, both GEMMs run on it for every chunk of ``k`` (later chunks see the
  fp32 tile, no intermediate rounding), and it is stored once: ``b`` bytes read
  and ``b`` written per element.
* Two passes (larger ``D``; ``BLOCK_D`` 64, or 32 at ``BLOCK_K`` = 128;
  ``BLOCK_R`` 32 for ``k`` ≤ 32, else 16): pass 1 streams the tile in ``BLOCK_D``
  chunks to accumulate ``A``; pass 2 streams it again and stores ``X − A Uᵀ``.
  DRAM sees ``b`` read and ``b`` written per element when the tile
  (``BLOCK_R × D × b``: 96 KiB at ``D = 768``, fp32, ``BLOCK_R = 32``) is still in
  L2 for the second read; a larger tile does not fit registers next to the dot
  operands (Triton stages both through shared memory). ``k ≤ 128`` is one chunk;
  beyond, every chunk reads and writes the rows once more (one more rounding for
  bf16/fp16) after a barrier, since other threads of the program wrote them.
* Resident (``RESIDENT``: contiguous rows, ``128 < D ≤ 4096``, or transposed views
  (side="output") of 16-byte vectors with ``128 < D ≤ 768`` and ``k ≤ 16`` fp32 / 8
  16-bit, or ``D ≤ 1536`` in 512-column tiles on 8 warps and ``k ≤ 8`` / 4, in blocks of
  8 (fp32) or 16 rows (16-bit), one 32-byte sector a column; and
  small ``k``: ``RESIDENT_MAX_K``, 16 (fp32) and 8, ``BLOCK_R`` = 8 (on 8 warps; 16-bit
  on 4 for soft weights and some few-rows buckets, ``RESIDENT_WARPS``), up to
  ``D`` = 1024; beyond, ``RESIDENT_WIDE_MAX_K``, 8 and 8, ``BLOCK_R`` = 4 up to 2048,
  then 8 and 4, ``BLOCK_R`` = 2): the row
  block stays in registers as up to 4 tiles of ``BLOCK_D`` ∈ {64, 128, 256} columns, 512
  for the 4-row blocks, 1024 for the 2-row ones (``CHUNKS``, the split that pads ``D``
  least; ``resident_tiles``), and the basis is applied one column at a time in fp32 FMA,
  ``a = X u_j`` (a row reduction), then ``X −= a u_jᵀ``; the columns' loads go through
  Triton's pipeliner (``RESIDENT_STAGES``), two columns ahead in shared memory. Each
  element is read once and written once, with no tensor cores: at small ``k`` the 2k
  FMAs per element cost less than the second read of the two-pass kernel (predicted at
  ``D`` = 768, k = 8: 100 % of copy for fp32, 93 / 94 % for bf16 on A100 / H100, against
  66 %). Applying the columns one after another equals the one-shot
  formula for the same reason chunks of ``k`` do. The tensor-core kernels could not keep
  such a tile on chip without spills (docs/gpu.md).
* The basis is read once per program per pass and chunk (``BLOCK_D × BLOCK_K``
  fp32 tiles shared by the ``BLOCK_R`` rows): ``4k/BLOCK_R`` bytes of L2 traffic
  per element per pass. No software pipelining (``num_stages=1``): the staged
  copies of a pipelined loop spill registers; latency is hidden by resident
  programs instead.

Precision (``DOT_SCHEME``, emulated bit for bit in ``tests/test_precision_split.py``):
``"tf32x3"`` runs both GEMMs on tensor cores in tf32 with each operand split
into two pieces in the kernel, ``a = a_hi + a_lo`` exactly (``a_hi`` = ``a``
rounded to 10 mantissa bits, ties away from zero, as ``cvt.rna.tf32.f32``;
``a_lo`` = the rest in fp32, which the tensor cores read truncated to its tf32 bits),
and ``a·b ≈ a_lo b_hi + a_hi b_lo + a_hi b_hi`` with fp32 accumulation: about 2⁻²¹
relative per product instead of tf32's 2⁻¹¹. Where the result is 16-bit (bf16/fp16
rows, ``TRUNCATED``) ``a_hi`` is ``a`` truncated instead (``_split_truncated``: about 2⁻¹⁹
a product, far below the result's rounding, 2 instructions a value where rounding takes
3). bf16/fp16 gradients are exact in tf32, so pass 1 needs two
products, not three. Splitting ``U`` in the kernel (a few integer ops per basis
element per program) reads the fp32 basis once instead of two stored pieces and
needs no host cache. Their sums are not rounded to nearest: each MMA
(8 along ``k``) truncates its sum to fp32, so an accumulator chained through many MMAs
drifts toward zero (measured on an H200: pass 1 chained through all of ``D`` = 768, 288
MMAs, left 3e-5 of max|x| where a full-rank projection leaves 0, 3x the fp32 tolerance).
So every product starts from zero and running sums are fp32 adds (``_dot_split``: pass
1 adds one chunk of ``BLOCK_D`` at a time; ``scripts/gpu_compile_check.py`` fails a
compiled kernel whose tensor-core dot takes a running accumulator). The tests' Triton
interpreter truncates as the tensor cores do (``tests/tensor_cores.py``; it reproduced
the H200 failures before the change). bf16 pieces (``x·U_hi + x·U_lo``, 16 bits of ``U``) were
measured in that emulation to miss the bf16 tolerances when ``k = D`` (the
result is all cancellation); tf32 pieces (22 bits) keep them. ``"ieee"``: true
fp32 dots on FMA units.

Flat kernel (side ``flat``, one long vector per tensor, all of the basis's ``D``
elements): a matrix-vector product dominated by the ``D × k`` basis read. A 1-D
grid of fixed-size chunks (program → (tensor, chunk) = divmod(pid, chunks per
tensor), all tensors of a flat bucket have ``D`` elements) computes a partial
``Uᵀx`` per chunk in fp32 FMA; the partials are summed in a fixed order
(deterministic, no atomics), then an apply pass over the same chunks writes
``x − U c``. Bytes per element: ``2b`` read (once per pass; the first pass
reads its chunk again, from L2, per 64 basis columns), ``b`` written, ``8k`` of
basis read. Tiles of ``BLOCK_N × BLOCK_K`` = 2048 fp32 products (no spills),
fp32 FMA throughout: the basis read, not arithmetic, bounds this side.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterator
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from gradproj.kernels.device_table import cached_table

# How the two small GEMMs use the tensor cores; tests/test_precision_split.py
# imports this and emulates the scheme. "tf32x3" keeps max ‖ΔW U‖/‖W₀‖ over 100
# anchored fp32 steps at the level of true fp32 (issue 14: 5e-8 … 1.1e-7 against
# ieee's 2.7e-8 … 1.1e-7; plain tf32 reaches 3.2e-4, above the 1e-6 guarantee).
DOT_SCHEME = "tf32x3"

# Columns of the per-tensor metadata table: element offset from the base
# pointer, rows, row stride, column stride, anchor element offset.
_META = 5


@triton.jit
def _tf32_round(x):
    # Round fp32 to tf32 (10 mantissa bits), ties away from zero: cvt.rna.tf32.f32
    # written with integer ops so the interpreter computes the same bits.
    bits = x.to(tl.int32, bitcast=True) + 0x1000
    return (bits & -8192).to(tl.float32, bitcast=True)


@triton.jit
def _split_tf32(x):
    # x = hi + lo: hi the tf32 value nearest x, lo = x - hi exactly, in fp32. lo goes to
    # the tensor cores as it is: they read its tf32 bits (the low 13 dropped, what CUTLASS's
    # round_half_ulp_truncate relies on; tests/tensor_cores.py models it): hi and what they
    # read of lo are within 2^-22 |x| of x (|lo| <= 2^-11 |x|). Rounding lo too cost 3 more
    # instructions a value at every use, and U's split runs per tile of every program
    # (docs/gpu.md #raw-lo). A NaN x keeps a NaN lo whatever hi becomes (a payload that
    # fills the mantissa carries into hi's sign: -0.0), and a NaN read truncated stays NaN,
    # so its row stays NaN.
    hi = _tf32_round(x)
    return hi, x - hi


@triton.jit
def _split_truncated(x):
    # _split_tf32 for products that end in a 16-bit result (bf16/fp16 rows): hi = x with its
    # low 13 bits cleared, lo = x - hi exactly, 2 instructions where _split_tf32 takes 3.
    # |lo| < 2^-10 |x|, so what the tensor cores drop from lo is below 2^-21 |x| (rounding:
    # 2^-22), 2^12 below a bf16 result's rounding (2^-9); the CUDA kernels' mma.cuh
    # [truncated]. A NaN's bits stay NaN under the mask.
    hi = (x.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)
    return hi, x - hi


@triton.jit
def _split(x, TRUNCATED: tl.constexpr):
    """``(hi, lo)`` of ``x``: ``_split_truncated`` for a 16-bit result, else ``_split_tf32``."""
    if TRUNCATED:
        hi, lo = _split_truncated(x)
    else:
        hi, lo = _split_tf32(x)
    return hi, lo


@triton.jit
def _dot_split(a, b, SPLIT: tl.constexpr, A_EXACT: tl.constexpr, TRUNCATED: tl.constexpr):
    """``a·b`` on tensor cores from a zero accumulator, both operands split in tf32
    pieces (``a`` only when it is not exact in tf32; ``TRUNCATED``: the product ends in a
    16-bit result, the pieces of ``_split_truncated``); small terms first, as Triton's own
    tf32x3. Callers add the result to a running sum in fp32 themselves: the tensor
    cores truncate every MMA's sum (tests/tensor_cores.py), so an accumulator chained
    through all of ``D`` (288 MMAs at 768) drifted 3e-5 of max|x| toward zero on an H200,
    where one fp32 add a chunk stays at ~1e-7. The pieces' chain is not an add of a
    zero-started dot, so Triton's combine pass cannot fold the caller's add back into
    the MMA (tests/test_gpu_compile_check.py reads the TTIR)."""
    if SPLIT:
        b_hi, b_lo = _split(b, TRUNCATED)
        if A_EXACT:
            acc = tl.dot(a, b_lo, input_precision="tf32")
            acc = tl.dot(a, b_hi, acc, input_precision="tf32")
        else:
            a_hi, a_lo = _split(a, TRUNCATED)
            acc = tl.dot(a_lo, b_hi, input_precision="tf32")
            acc = tl.dot(a_hi, b_lo, acc, input_precision="tf32")
            acc = tl.dot(a_hi, b_hi, acc, input_precision="tf32")
    else:
        acc = tl.dot(a, b, input_precision="ieee")
    return acc


@triton.jit
def _tile_offsets(row_off, ds, s_d, CONTIG: tl.constexpr):
    if CONTIG == 1:
        return row_off[:, None] + ds[None, :]
    else:
        return row_off[:, None] + ds.to(tl.int64)[None, :] * s_d


@triton.jit
def _coefficients(
    coef, c0_ptr, c_off, w_ptr, ks, k_valid, k_mask, HAS_W: tl.constexpr, HAS_ANCHOR: tl.constexpr
):
    """``(A − C) ⊙ w`` from pass 1's ``A``; the anchor becomes ``C + (1 − w) ⊙ (A − C)``."""
    if HAS_ANCHOR:
        c0 = tl.load(c0_ptr + c_off, mask=k_mask, other=0.0)
        coef = coef - c0
    if HAS_W:
        w = tl.load(w_ptr + ks, mask=k_valid, other=0.0)
        if HAS_ANCHOR:
            tl.store(c0_ptr + c_off, c0 + (1.0 - w[None, :]) * coef, mask=k_mask)
        coef = coef * w[None, :]
    return coef


@triton.jit
def _resident_load(
    g0_ptr, row_off, row_mask, s_d, D, j: tl.constexpr, BLOCK_D: tl.constexpr, CONTIG: tl.constexpr
):
    """Columns ``[j·BLOCK_D, (j+1)·BLOCK_D)`` of the row block, in fp32 (0 past ``D``)."""
    ds = j * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = row_mask[:, None] & (ds < D)[None, :]
    offs = _tile_offsets(row_off, ds, s_d, CONTIG)
    return tl.load(g0_ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _resident_store(
    g0_ptr,
    row_off,
    row_mask,
    s_d,
    D,
    x,
    j: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CONTIG: tl.constexpr,
):
    ds = j * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = row_mask[:, None] & (ds < D)[None, :]
    offs = _tile_offsets(row_off, ds, s_d, CONTIG)
    tl.store(g0_ptr + offs, x.to(g0_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _basis_column(u_ptr, kk, D, K, j: tl.constexpr, BLOCK_D: tl.constexpr):
    """``U[j·BLOCK_D + i, kk]`` for ``i < BLOCK_D`` (0 past ``D`` or when ``kk ≥ K``)."""
    ds = j * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = (ds < D) & (ds * 0 + kk < K)  # (a tensor mask: the interpreter needs one)
    return tl.load(u_ptr + ds.to(tl.int64) * K + kk, mask=mask, other=0.0)


@triton.jit
def _basis_columns(u_ptr, kk, D, K, BLOCK_D: tl.constexpr, CHUNKS: tl.constexpr):
    """Column ``kk`` of ``U`` as up to 4 tiles of ``BLOCK_D`` rows (unused ones repeat tile 0)."""
    n0 = _basis_column(u_ptr, kk, D, K, 0, BLOCK_D)
    n1 = n0
    n2 = n0
    n3 = n0
    if CHUNKS > 1:
        n1 = _basis_column(u_ptr, kk, D, K, 1, BLOCK_D)
    if CHUNKS > 2:
        n2 = _basis_column(u_ptr, kk, D, K, 2, BLOCK_D)
    if CHUNKS > 3:
        n3 = _basis_column(u_ptr, kk, D, K, 3, BLOCK_D)
    return n0, n1, n2, n3


@triton.jit
def _row_dots(x0, x1, x2, x3, u0, u1, u2, u3, CHUNKS: tl.constexpr):
    """``X u`` for a row block held as ``CHUNKS`` column tiles: one fp32 sum per row.

    The tiles' products are added elementwise first (FMAs), then reduced once: a reduction
    a tile cost a row its lanes' shuffle tree each (5 shuffles and 5 adds a tile on
    contiguous rows, bf16 k = 8: 30 of the column loop's 142 instructions on sm_90)."""
    p = x0 * u0[None, :]
    if CHUNKS > 1:
        p += x1 * u1[None, :]
    if CHUNKS > 2:
        p += x2 * u2[None, :]
    if CHUNKS > 3:
        p += x3 * u3[None, :]
    return tl.sum(p, axis=1)


@triton.jit
def _rank1_update(x0, x1, x2, x3, a, u0, u1, u2, u3, CHUNKS: tl.constexpr):
    """``X − a uᵀ`` tile by tile (FMAs)."""
    x0 -= a[:, None] * u0[None, :]
    if CHUNKS > 1:
        x1 -= a[:, None] * u1[None, :]
    if CHUNKS > 2:
        x2 -= a[:, None] * u2[None, :]
    if CHUNKS > 3:
        x3 -= a[:, None] * u3[None, :]
    return x0, x1, x2, x3


@triton.jit
def _anchor_tile(c0_ptr, w_ptr, c_row, row_mask, K, BLOCK_K: tl.constexpr, HAS_ANCHOR, HAS_W):
    """A row block's anchors (``BLOCK_R × BLOCK_K``, ``BLOCK_K ≥ K``) and the weights, read
    once for the resident kernels' column loop (zeros for what the call does not have)."""
    kt = tl.arange(0, BLOCK_K)
    kt_valid = kt < K
    c_tile = c_row[:, None] + kt[None, :]
    c_mask = row_mask[:, None] & kt_valid[None, :]
    c_all = tl.zeros(c_tile.shape, dtype=tl.float32)
    w_all = tl.zeros((BLOCK_K,), dtype=tl.float32)
    if HAS_ANCHOR:
        c_all = tl.load(c0_ptr + c_tile, mask=c_mask, other=0.0)
    if HAS_W:
        w_all = tl.load(w_ptr + kt, mask=kt_valid, other=0.0)
    return kt, c_tile, c_mask, c_all, w_all


@triton.jit
def _store_anchor_tile(c0_ptr, c_tile, c_mask, c_all, HAS_ANCHOR, HAS_W):
    """Store the anchor tile ``_column_coef`` moved (only soft weights move anchors)."""
    if HAS_ANCHOR and HAS_W:
        tl.store(c0_ptr + c_tile, c_all, mask=c_mask)


@triton.jit
def _column_coef(a, kk, kt, c_all, w_all, HAS_ANCHOR, HAS_W):
    """``(a − c_kk) ⊙ w_kk`` for basis column ``kk`` (as ``_coefficients``), and the anchor
    tile with column ``kk`` moved by ``(1 − w_kk)(a − c_kk)`` when weights are soft."""
    pick = kt[None, :] == kk
    if HAS_ANCHOR:
        a -= tl.sum(tl.where(pick, c_all, 0.0), axis=1)
    if HAS_W:
        w = tl.sum(tl.where(kt == kk, w_all, 0.0), axis=0)
        if HAS_ANCHOR:
            c_all = tl.where(pick, c_all + (1.0 - w) * a[:, None], c_all)
        a = a * w
    return a, c_all


@triton.jit
def _project_rows_kernel(
    table_ptr,
    n_tensors,
    g0_ptr,
    c0_ptr,
    u_ptr,
    w_ptr,
    D,
    K,
    CONTIG: tl.constexpr,
    VEC: tl.constexpr,
    ONE_PASS: tl.constexpr,
    RESIDENT: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_ANCHOR: tl.constexpr,
    SPLIT: tl.constexpr,
    X_EXACT: tl.constexpr,
    TRUNCATED: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
    CHUNKS: tl.constexpr = 1,
):
    pid = tl.program_id(0)
    blk = table_ptr + n_tensors * 5 + pid * 2
    t = tl.load(blk)
    r0 = tl.multiple_of(tl.load(blk + 1), BLOCK_R)
    meta = table_ptr + t * 5
    g_off = tl.multiple_of(tl.load(meta), VEC)
    n_rows = tl.load(meta + 1)
    s_r = tl.load(meta + 2)
    s_d = tl.load(meta + 3)
    c_base = tl.load(meta + 4)
    if CONTIG == 0:
        # rows are the unit-stride axis: the host checked n_rows and s_d for VEC
        n_rows = tl.multiple_of(n_rows, VEC)
        s_d = tl.multiple_of(s_d, VEC)
    if CONTIG == 1:
        s_r = tl.multiple_of(s_r, VEC)
        if VEC > 1:  # (D = 1 arrives as a constant)
            D = tl.multiple_of(D, VEC)
    rows = r0 + tl.arange(0, BLOCK_R)
    row_mask = rows < n_rows
    rows64 = rows.to(tl.int64)
    if CONTIG == 0:
        row_off = g_off + rows64
    else:
        row_off = g_off + rows64 * s_r
    c_row = c_base + rows64 * K
    dtype = g0_ptr.dtype.element_ty
    if RESIDENT:
        # the row block in registers as CHUNKS tiles of BLOCK_D columns (at most 4)
        x0 = _resident_load(g0_ptr, row_off, row_mask, s_d, D, 0, BLOCK_D, CONTIG)
        x1 = x0
        x2 = x0
        x3 = x0
        if CHUNKS > 1:
            x1 = _resident_load(g0_ptr, row_off, row_mask, s_d, D, 1, BLOCK_D, CONTIG)
        if CHUNKS > 2:
            x2 = _resident_load(g0_ptr, row_off, row_mask, s_d, D, 2, BLOCK_D, CONTIG)
        if CHUNKS > 3:
            x3 = _resident_load(g0_ptr, row_off, row_mask, s_d, D, 3, BLOCK_D, CONTIG)
        # the anchors and weights of the block, read once (BLOCK_K >= K columns)
        kt, c_tile, c_mask, c_all, w_all = _anchor_tile(
            c0_ptr, w_ptr, c_row, row_mask, K, BLOCK_K, HAS_ANCHOR, HAS_W
        )
        # basis columns through Triton's pipeliner: RESIDENT_STAGES - 1 columns ahead in
        # shared memory (asynchronous copies), where a register prefetch held one
        for kk in tl.range(0, K, num_stages=RESIDENT_STAGES):
            u0, u1, u2, u3 = _basis_columns(u_ptr, kk, D, K, BLOCK_D, CHUNKS)
            a = _row_dots(x0, x1, x2, x3, u0, u1, u2, u3, CHUNKS)
            a, c_all = _column_coef(a, kk, kt, c_all, w_all, HAS_ANCHOR, HAS_W)
            x0, x1, x2, x3 = _rank1_update(x0, x1, x2, x3, a, u0, u1, u2, u3, CHUNKS)
        _store_anchor_tile(c0_ptr, c_tile, c_mask, c_all, HAS_ANCHOR, HAS_W)
        _resident_store(g0_ptr, row_off, row_mask, s_d, D, x0, 0, BLOCK_D, CONTIG)
        if CHUNKS > 1:
            _resident_store(g0_ptr, row_off, row_mask, s_d, D, x1, 1, BLOCK_D, CONTIG)
        if CHUNKS > 2:
            _resident_store(g0_ptr, row_off, row_mask, s_d, D, x2, 2, BLOCK_D, CONTIG)
        if CHUNKS > 3:
            _resident_store(g0_ptr, row_off, row_mask, s_d, D, x3, 3, BLOCK_D, CONTIG)
    elif ONE_PASS:
        ds = tl.arange(0, BLOCK_D)
        d_mask = ds < D
        offs = _tile_offsets(row_off, ds, s_d, CONTIG)
        mask = row_mask[:, None] & d_mask[None, :]
        x = tl.load(g0_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        u_row = ds.to(tl.int64)[:, None] * K
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            u_mask = d_mask[:, None] & (ks < K)[None, :]
            u = tl.load(u_ptr + u_row + ks[None, :], mask=u_mask, other=0.0)
            coef = _dot_split(x, u, SPLIT, X_EXACT, TRUNCATED)
            k_valid = ks < K
            coef = _coefficients(
                coef,
                c0_ptr,
                c_row[:, None] + ks[None, :],
                w_ptr,
                ks,
                k_valid,
                row_mask[:, None] & k_valid[None, :],
                HAS_W,
                HAS_ANCHOR,
            )
            x = x - _dot_split(coef, tl.trans(u), SPLIT, False, TRUNCATED)
        tl.store(g0_ptr + offs, x.to(dtype), mask=mask)
    else:
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            kk = (ks < K)[None, :]
            coef = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                ds = d0 + tl.arange(0, BLOCK_D)
                d_mask = ds < D
                x = tl.load(
                    g0_ptr + _tile_offsets(row_off, ds, s_d, CONTIG),
                    mask=row_mask[:, None] & d_mask[None, :],
                    other=0.0,
                ).to(tl.float32)
                u_offs = ds.to(tl.int64)[:, None] * K + ks[None, :]
                u = tl.load(u_ptr + u_offs, mask=d_mask[:, None] & kk, other=0.0)
                coef += _dot_split(x, u, SPLIT, X_EXACT, TRUNCATED)  # fp32 add: see _dot_split
            k_valid = ks < K
            coef = _coefficients(
                coef,
                c0_ptr,
                c_row[:, None] + ks[None, :],
                w_ptr,
                ks,
                k_valid,
                row_mask[:, None] & kk,
                HAS_W,
                HAS_ANCHOR,
            )
            for d0 in range(0, D, BLOCK_D):
                ds = d0 + tl.arange(0, BLOCK_D)
                d_mask = ds < D
                offs = _tile_offsets(row_off, ds, s_d, CONTIG)
                mask = row_mask[:, None] & d_mask[None, :]
                # Uᵀ chunk (BLOCK_K × BLOCK_D), read in U's row-major order
                ut_offs = ks[:, None] + ds.to(tl.int64)[None, :] * K
                ut_mask = k_valid[:, None] & d_mask[None, :]
                ut = tl.load(u_ptr + ut_offs, mask=ut_mask, other=0.0)
                p = _dot_split(coef, ut, SPLIT, False, TRUNCATED)
                x = tl.load(g0_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                tl.store(g0_ptr + offs, (x - p).to(dtype), mask=mask)
            if k0 + BLOCK_K < K:
                # The next chunk's pass 1 reads rows other threads of this program
                # just stored: make those global writes visible first.
                tl.debug_barrier()


@triton.jit
def _flat_coef_kernel(
    offset_ptr,
    g0_ptr,
    u_ptr,
    partial_ptr,
    D,
    K,
    n_chunks,
    VEC: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    t = pid // n_chunks
    x_ptr = g0_ptr + tl.multiple_of(tl.load(offset_ptr + t), VEC)
    start = (pid - t * n_chunks).to(tl.int64) * CHUNK
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        # element-wise products summed once at the end: no reduction in the loop
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for n0 in range(0, CHUNK, BLOCK_N):
            ns = start + n0 + tl.arange(0, BLOCK_N)
            n_mask = ns < D
            x = tl.load(x_ptr + ns, mask=n_mask, other=0.0).to(tl.float32)
            u = tl.load(
                u_ptr + ns[:, None] * K + ks[None, :],
                mask=n_mask[:, None] & k_mask[None, :],
                other=0.0,
            )
            acc += x[:, None] * u
        tl.store(partial_ptr + pid.to(tl.int64) * K + ks, tl.sum(acc, axis=0), mask=k_mask)


@triton.jit
def _flat_apply_kernel(
    offset_ptr,
    g0_ptr,
    u_ptr,
    coef_ptr,
    D,
    K,
    n_chunks,
    VEC: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    t = pid // n_chunks
    x_ptr = g0_ptr + tl.multiple_of(tl.load(offset_ptr + t), VEC)
    start = (pid - t * n_chunks).to(tl.int64) * CHUNK
    c_ptr = coef_ptr + t.to(tl.int64) * K
    for n0 in range(0, CHUNK, BLOCK_N):
        ns = start + n0 + tl.arange(0, BLOCK_N)
        n_mask = ns < D
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_mask = ks < K
            u = tl.load(
                u_ptr + ns[:, None] * K + ks[None, :],
                mask=n_mask[:, None] & k_mask[None, :],
                other=0.0,
            )
            c = tl.load(c_ptr + ks, mask=k_mask, other=0.0)
            acc += u * c[None, :]
        x = tl.load(x_ptr + ns, mask=n_mask, other=0.0).to(tl.float32)
        tl.store(x_ptr + ns, (x - tl.sum(acc, axis=1)).to(g0_ptr.dtype.element_ty), mask=n_mask)


# ---------------------------------------------------------------- launchers


def _arch() -> int:
    """The compute capability Triton compiles for now (``0`` under the interpreter)."""
    try:
        return triton.runtime.driver.active.get_current_target().arch
    except RuntimeError:  # the interpreter has no active GPU driver
        return 0


def _sm_count(device: torch.device) -> int:
    """The SMs of the GPU a launch on ``device`` runs on, or ``0`` where unknown (the
    interpreter). A CUDA device's come from torch's host-side cache of its properties (no
    device call, no sync); elsewhere from Triton's active driver (the compile check's
    stand-in reports the device its target stands for)."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return _cuda_sm_count(index)
    try:
        driver = triton.runtime.driver.active
        props = driver.utils.get_device_properties(driver.get_current_device())
        return int(props["multiprocessor_count"])
    except (RuntimeError, AttributeError, KeyError, TypeError):
        return 0


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


# A bucket of fewer rows than this many an SM takes its own tiles where the launcher's hold
# 64 rows (``_row_tiles`` ``few_rows``, ``_few_rows_tiles``): its 64-row programs would be
# fewer than the SMs, and a launch lasts as long as its busiest SM and block
# (benchmarks/perf_model.py waves). docs/gpu.md #few-rows.
FEW_ROWS_PER_SM = 64


def few_rows(rows: int, sms: int) -> bool:
    """Whether a bucket of ``rows`` rows is few for a GPU of ``sms`` SMs (``FEW_ROWS_PER_SM``;
    ``sms`` 0, unknown: never), as the row launcher decides it."""
    return rows < FEW_ROWS_PER_SM * sms


class _Tiles(NamedTuple):
    one_pass: bool
    block_r: int
    block_d: int
    block_k: int
    warps: int
    stages: int
    maxnreg: int | None = None  # ptxas's register cap (None: its own choice)
    resident: bool = False  # the row block in registers, one basis column at a time (FMA)
    chunks: int = 1  # resident: tiles of block_d columns (at most 4)


# The resident kernel's largest k, per element size: beyond, its k FMA passes per element
# cost more than the two-pass kernel's tensor-core GEMMs. With the model's occupancy bound
# (benchmarks/perf_model.py, calibrated on the H200's Nsight Compute figures; D = 768,
# predicted, A100 / H100): fp32 k = 16 on 8 warps was 63 / 47 % of copy against the
# two-pass kernel's 67 / 67 %; since one reduction a row (_row_dots, docs/gpu.md
# #resident-k16) it is 87 / 86 % at 32768 rows against 53 / 67 % (4096: 54 / 86 % against
# 39 / 24 %; D = 1024 and 512: 75 / 70 % and 75 / 69 %), anchored 75 / 55 % against
# 63 / 55 % (4096: 47 / 38 % against 39 / 24 %). 16-bit rows stay resident to k = 8 (on 8
# warps, RESIDENT_WARPS): 66 / 64 % there against the two-pass kernel's 67 / 67 % (the one
# two-pass figure a GPU could check came out at 0.6x the model's: fp32 k = 32, H200), and
# bf16 k = 16 resident is 36 / 35 %. A GPU's tile sweep decides it.
RESIDENT_MAX_K = {4: 16, 2: 8}
# The same for the wide blocks, per rows of the block (4: 1024 < D <= 2048; 2: beyond), whose
# basis column is loaded for fewer rows. Predicted, pipelined: fp32 k = 8 100 / 100 % at 2048
# and 4096, k = 16 67 / 65 % (the two-pass kernel 67 / 67 %); bf16 k = 8 76 / 75 % at 1536
# and 77 / 77 % at 2048 (the two-pass kernel 67 / 64-65 %), but 59-60 / 58-59 % at 3072 and
# 4096, where k = 4 gives 100 / 99-100 %.
RESIDENT_WIDE_MAX_K = {4: {4: 8, 2: 8}, 2: {4: 8, 2: 4}}
RESIDENT_MAXNREG = 192
# Warps and register cap of the resident kernel's 8-row blocks, per element size. On 4 warps
# (capped at RESIDENT_MAXNREG) the model's occupancy bound holds them at 16 resident warps an
# SM (predicted, D = 768, A100 / H100: fp32 k = 8 72 / 69 % of copy; Triton's measured H200
# kernel time there was 44 %). fp32 on 8 warps, uncapped: ptxas takes 56-80 registers, 24-32
# warps fit an SM, fp32 k = 4 / 8 100 / 100 %, 100 / 90 % (benchmarks/tile_sweep.py
# --predict), no spill in any launch of the compile check. 16-bit rows on 8 warps uncapped
# too (ptxas takes 64-76 registers, 3-4 programs an SM): bf16 k = 8 at 32768 rows 57 / 55 %
# against 43 / 44 % on 4 warps capped at 192, at 4096 rows on sm_80 46 % against 27 %
# (docs/gpu.md #resident-16bit-warps). Two exceptions, RESIDENT_16BIT_SLOW_WARPS_MAXNREG:
# soft weights (uncapped, ptxas aimed at 64 on sm_80 and spilled 8 B with 3 tiles; capped
# at 80, 16-88 B with 4 tiles or anchors; at 96, 2 programs an SM, no better than 4 warps),
# and a bucket of few rows on sm_90 (4096 rows: 512 programs, one wave of 4 programs of 4
# warps on 132 SMs, two of 3 programs of 8: bf16 k = 8 38 % against 44 %, k = 4 65 % against
# 76 %) or at k = 1 on sm_80 (memory-bound; at 4096 rows 95 % against 100 %).
RESIDENT_WARPS = {4: 8, 2: 8}
RESIDENT_WARPS_MAXNREG = {4: None, 2: None}
RESIDENT_16BIT_SLOW_WARPS_MAXNREG = (4, RESIDENT_MAXNREG)
# ... and anchored 16-bit blocks of 3 tiles capped at 80: uncapped, ptxas aimed at 64 on sm_80
# and spilled 4 B (bf16 and fp16, D = 768); at 80 they take 76, 3 programs an SM (predicted,
# 32768 rows, A100 / H100: 59 / 57 % of copy, against 48 / 49 % on 4 warps). 4 tiles (D =
# 1024) stay uncapped: 103 registers, 2 programs, 47 / 47 % (4 warps: 40 / 39 %); capped at
# 80 they spilled 56-80 B.
RESIDENT_16BIT_ANCHORED_MAXNREG = {3: 80}
# ... and plain 16-bit blocks of 3 tiles of 256 (512 < D <= 768) capped at 192: ptxas then
# takes 80 registers where uncapped it took 72, and 0.06-0.08 fewer warp instructions an
# element (docs/gpu.md #output-warps; predicted, D = 768, 32768 rows, A100 / H100: bf16 k = 8
# 69 / 66 % of copy against 66 / 64 %, at 4096 rows on sm_80 56 % against 53 %; k = 4 the
# same). Not 3 tiles of 128 (D = 320: sm_90 43 % against 45 %), 2 (D = 512) or 4 (1024).
RESIDENT_16BIT_PLAIN_MAXNREG = 192
# The wide blocks: at 192, fp32 anchored soft blocks of 3 tiles of 512 spilled 28 B on
# sm_90; anything above 170 registers leaves 2 programs of 4 warps per SM, as 192 does.
RESIDENT_WIDE_MAXNREG = 255
# Transposed views (side="output", 16-byte vectors, D <= 768: at most 3 tiles): (rows,
# register cap) per element size, the rows making each column of the tile one whole 32-byte
# sector, on RESIDENT_OUTPUT_WARPS. fp32 in 16 rows spilled 48-72 B (anchored, soft weights)
# at 255 registers and 8-88 B on 8 warps at 128; 16-bit on 8 warps was predicted issue-bound
# at 48-49 % of copy (bf16, k = 8; on 4: 73 / 67 %); 4 tiles of fp32 spilled 144-176 B at
# D = 1024. fp32's 8 rows on 8 warps, uncapped (64-80 registers), since the model counts the
# launch's waves (benchmarks/tile_sweep.py --predict --rows 4096 and 32768, A100 / H100): k =
# 4 85 / 69 % and 98 / 95 % against 4 warps capped at 192's 74 / 58 % and 91 / 84 %, k = 8
# 50 / 40 % and 61 / 58 % against 41 / 32 % and 50 / 47 %, k = 1 no lower (95-100 %).
#
# Both on 8 warps, swept again since the split dots shed instructions (docs/gpu.md
# #output-warps; benchmarks/tile_sweep.py --predict, D = 768, 4096 / 32768 rows, A100 /
# H100): 16-bit on 8 warps uncapped (110-111 registers, 2 programs an SM;
# on 4, 193-194) bf16 k = 2 64 / 96 / 100 / 99 % of copy against 45 / 72 / 72 / 72 %, k = 4
# 44 / 70 / 72 / 72 % against 29 / 46 / 46 / 46 %, k = 1 no lower; fp32 capped at 192 (ptxas
# then takes 80 registers where uncapped it took 64-73): k = 4 100 / 100 / 84 / 98 % against
# 84 / 100 / 83 / 98 %, k = 8 83 / 98 / 66 / 94 % against 68 / 97 / 65 / 94 %. On sm_90 a
# bucket of few rows takes fp32's on 4 warps capped at 192 (RESIDENT_OUTPUT_FEW_ROWS_WARPS_
# MAXNREG: k = 4 100 %, k = 8 91 % at 4096 rows; at 32768, 100 / 91 % against 98 / 94 %).
RESIDENT_OUTPUT_ROWS_MAXNREG = {4: (8, 192), 2: (16, None)}
RESIDENT_OUTPUT_WARPS = {4: 8, 2: 8}
RESIDENT_OUTPUT_FEW_ROWS_WARPS_MAXNREG = (4, 192)
# Its largest k, per element size. Once the model bounded occupancy (benchmarks/tile_sweep.py
# --predict, its :output cases, D = 768, A100 and H100 alike): fp32 resident 100 % of copy
# to k = 3, 93 / 90 % at 4, 67 / 64 % at 6, 52 / 50 % at 8, 27 % at 16; bf16 100 % at k = 1,
# 56 % at 2, 34 / 33 % at 4, 19 % at 8 (2 programs of 4 warps an SM at 207 registers); the
# two-pass 64 x 32 tile 67 % at k <= 16 for both. The H200 measured the resident bf16 k = 8
# at 25 % (1.3x the model) and the two-pass kernels at 0.6x it (k = 32), so the limits sit
# where the resident block still leads with those factors: fp32 8, bf16 4.
RESIDENT_OUTPUT_MAX_K = {4: 8, 2: 4}
# Wider transposed views, 768 < D <= 1536 (SD's 1280-wide output features): 2-3 tiles of
# 512 columns on 8 warps, (rows, register cap) per element size: fp32 capped at 128 (2
# programs per SM; 4 tiles, D = 2048, spilled 216-240 B there), 16-bit at 255 (at 128 it
# spilled 596-656 B). Predicted (pipelined basis columns) at D = 1024 / 1280, k = 8 fp32:
# 100 / 83 % of copy on both GPUs (1280 pads to 1536 columns, which the model counts as
# moved), k = 16 57 / 56 %; bf16 k = 4 83 % at 1280, k = 8 57 / 60 %; the two-pass kernel
# 67 %.
RESIDENT_OUTPUT_WIDE_ROWS_MAXNREG = {4: (8, 128), 2: (16, 255)}
RESIDENT_OUTPUT_WIDE_MAX_K = {4: 8, 2: 4}

# Pipeline stages of the resident kernels' basis-column loop (tl.range num_stages): 2 columns
# in flight ahead of the one applied, in shared memory. Predicted (benchmarks/perf_model.py,
# D = 768): bf16 k = 8 on H100 94 % of copy, against 66 % (latency-bound on the basis loads)
# with the register prefetch of one column or with 2 stages; 4 stages no better.
RESIDENT_STAGES = tl.constexpr(3)

# (rows, tile widths) of a resident block, narrowest first: on 4 warps a thread holds
# rows · width / 128 values of each tile and width / 128 of a basis column, the same in
# every tier, so the registers are too; a wider tier loads each basis column for fewer rows.
_RESIDENT_TIERS = ((8, (256, 128, 64)), (4, (512,)), (2, (1024,)))


class ResidentTiles(NamedTuple):
    """A resident row block: ``block_r`` rows held as ``chunks`` tiles of ``block_d`` columns."""

    block_r: int
    block_d: int
    chunks: int
    wide: bool  # fewer than 8 rows (4 of 512-column tiles, or 2 of 1024)


def resident_tiles(d: int, max_chunks: int = 4) -> ResidentTiles | None:
    """The resident row block of ``d`` columns, at most ``max_chunks`` tiles, or ``None``.

    The narrowest tier that holds ``d`` (``_RESIDENT_TIERS``): 8 rows in tiles of 256
    columns, or 128 / 64, whichever pads ``d`` least, for ``128 < d ≤ 256 · max_chunks``
    (the kernels name each tile; this one holds 4, projected AdamW's 3 on 4 warps);
    then 4 rows of 512 up to ``512 · max_chunks``, 2 rows of 1024 up to ``1024 ·
    max_chunks``. Below 129 the tensor-core one-pass tile holds the rows.
    """
    if d <= 128:
        return None
    for rows, widths in _RESIDENT_TIERS:
        if d <= widths[0] * max_chunks:
            block_d = min(
                (c for c in widths if triton.cdiv(d, c) <= max_chunks),
                key=lambda c: (triton.cdiv(d, c) * c, -c),
            )
            return ResidentTiles(rows, block_d, triton.cdiv(d, block_d), rows < 8)
    return None


def resident_max_k(tiles: ResidentTiles, elsize: int) -> int:
    """The largest k ``project_``'s resident ``tiles`` take for ``elsize``-byte elements."""
    limits = RESIDENT_WIDE_MAX_K[tiles.block_r] if tiles.wide else RESIDENT_MAX_K
    return limits.get(elsize, 0)


def _resident(rows: int, res: ResidentTiles, k: int, maxnreg: int | None, warps: int = 4) -> _Tiles:
    """The resident kernel's tiles: ``rows`` rows of ``res``'s column tiles; ``BLOCK_K``, the
    anchors' and weights' tile, holds all ``k``."""
    block_k = max(1, triton.next_power_of_2(k))
    return _Tiles(False, rows, res.block_d, block_k, warps, 1, maxnreg, True, res.chunks)


@functools.cache
def _row_tiles(
    arch: int,
    elsize: int,
    d: int,
    k: int,
    contig: int = 1,
    anchored: bool = False,
    vec: int = 1,
    few_rows: bool = False,
    weighted: bool = False,
) -> _Tiles:
    """The row kernel's tiles for a bucket of ``D = d`` on compute capability ``arch``;
    ``few_rows``: a bucket of fewer than ``FEW_ROWS_PER_SM`` rows an SM (its own tiles
    where :func:`_few_rows_tiles` has some, else the same); ``weighted``: soft weights
    (``HAS_W``), whose 16-bit resident blocks keep 4 warps (RESIDENT_WARPS).
    """
    tiles = _many_rows_tiles(arch, elsize, d, k, contig, anchored, vec)
    if few_rows and not tiles.resident and not tiles.one_pass and tiles.block_r == 64:
        return _few_rows_tiles(arch, elsize, tiles.block_k, contig, anchored) or tiles
    if (
        tiles.resident
        and contig == 0
        and elsize == 4
        and few_rows
        and arch >= 90
        # the narrow views' block as _many_rows_tiles takes it (not the wide views')
        and (tiles.block_r, tiles.maxnreg) == RESIDENT_OUTPUT_ROWS_MAXNREG[4]
        and tiles.warps == RESIDENT_OUTPUT_WARPS[4]
    ):
        warps, cap = RESIDENT_OUTPUT_FEW_ROWS_WARPS_MAXNREG
        return tiles._replace(warps=warps, maxnreg=cap)
    if (
        tiles.resident
        and contig == 1
        and elsize == 2
        and tiles.block_r == 8
        and (weighted or (few_rows and (arch >= 90 or k == 1)))
    ):
        warps, cap = RESIDENT_16BIT_SLOW_WARPS_MAXNREG
        return tiles._replace(warps=warps, maxnreg=cap)
    return tiles


def _few_rows_tiles(
    arch: int, elsize: int, block_k: int, contig: int, anchored: bool
) -> _Tiles | None:
    """The two-pass kernel's tiles for a bucket whose 64-row blocks would be fewer than the
    SMs (``FEW_ROWS_PER_SM``), where :func:`_many_rows_tiles` takes 64 rows; ``None``: the
    same tiles.

    Each 64-row program runs on one SM, so a bucket of fewer than 64 rows an SM leaves SMs
    idle and the busy ones short of warps. Chosen with the model counting the launch's waves
    (``benchmarks/tile_sweep.py --predict --rows``, D = 768, buckets of 4096 and 8192 rows;
    predicted, not measured; docs/gpu.md #few-rows): where a candidate beat the 64-row tiles
    at both sizes on sm_90 (132 SMs: 8192 rows are few) and at 4096 on sm_80 (108 SMs:
    4096 are few, 8192 are not).
    """
    if block_k == 16:
        if arch >= 90:
            # 64 x 64 on 8 warps, twice the warps a program: fp32 24 / 48 % of copy against
            # 20 / 40 % (plain; anchored 24 / 48 against 20 / 39; transposed 21 / 42 against
            # 17 / 34), 16-bit 19 / 39 % against 13 / 26 % (anchored, transposed alike)
            return _Tiles(False, 64, 64, block_k, 8, 1)
        # sm_80: 16 x 64 on 4 warps, 4x the programs: at 4096 rows fp32 31 % against 20 %
        # (anchored 31 against 20, transposed 29 against 18), bf16 22 against 13 (anchored
        # 22 against 13, transposed 22 against 12); 32 x 64 was 2-3 points lower, and its
        # anchored fp32 transposed kernel spilled 12 B
        return _Tiles(False, 16, 64, block_k, 4, 1)
    if block_k == 32 and arch >= 90 and contig in (0, 1):
        if anchored:
            # fp32 16 x 64 on 8 warps: 31 / 31 % against 15 / 31 % (on 4 warps 25 / 25 %);
            # 16-bit keeps its tiles (16 x 64 on 4 spilled; nothing else led)
            return _Tiles(False, 16, 64, block_k, 8, 1) if elsize == 4 else None
        # 16 x 64 on 4 warps: fp32 25 / 50 % against 15 / 31 % (transposed 23 / 46 against
        # 14 / 28), 16-bit 18 / 37 % against 15 / 30 % (transposed 18 / 36 against 15 / 31)
        return _Tiles(False, 16, 64, block_k, 4, 1)
    return None


@functools.cache
def _many_rows_tiles(
    arch: int,
    elsize: int,
    d: int,
    k: int,
    contig: int = 1,
    anchored: bool = False,
    vec: int = 1,
) -> _Tiles:
    """The row kernel's tiles for a bucket of ``D = d`` on compute capability ``arch``
    (of ``FEW_ROWS_PER_SM`` rows an SM or more).

    Chosen with scripts/gpu_compile_check.py (no spills on sm_80 and sm_90 at
    every ``k`` of its launches): the one-pass tile holds ``BLOCK_R × D`` fp32
    values and their tf32 pieces; beyond ``D = 128`` that spills (compiled for
    sm_80, ``BLOCK_R = 16``, ``BLOCK_K = 32``: ``D = 256`` at 255 registers spilled
    448 B with 4 warps, 144 B with 8; ``D = 1024`` spilled over 16 KB and asked
    136 KB of shared memory for the staged dot operands), so one pass stops at
    ``D ≤ 128``. ``contig`` is the launch's ``CONTIG``. The same tiles on both
    architectures, except on sm_90: two register caps (``maxnreg``) where ptxas's own
    choice spilled, and 64-row blocks (a warpgroup's M: Triton issues wgmma) for fp32
    at ``BLOCK_K`` = 32 and for plain contiguous rows at ``BLOCK_K`` = 128, each
    compiled without spills by triton 3.9 and 3.6 and predicted faster
    (``benchmarks/perf_model.py``). Contiguous rows take their own two-pass tiles at
    ``BLOCK_K`` ≤ 32 and fp32's resident 8-row blocks run on 8 warps: the winners of
    ``benchmarks/tile_sweep.py --predict`` once the model bounded occupancy.
    """
    d_pad = max(16, triton.next_power_of_2(d))
    res = resident_tiles(d)
    if res is not None and contig == 1 and k <= resident_max_k(res, elsize):
        # resident: each element read once and written once; the wide blocks on 4 warps
        # capped at 255 registers, the 8-row blocks as RESIDENT_WARPS says (16-bit on 4
        # warps, as _row_tiles takes them for soft weights and few rows on sm_90: capped at
        # 192, where ptxas aimed at 168 for anchored soft 4-tile blocks on sm_90 and spilled
        # 4 B)
        if res.wide:
            return _resident(res.block_r, res, k, RESIDENT_WIDE_MAXNREG)
        cap = RESIDENT_WARPS_MAXNREG[elsize]
        if anchored and elsize == 2:
            cap = RESIDENT_16BIT_ANCHORED_MAXNREG.get(res.chunks, cap)
        elif elsize == 2 and (res.chunks, res.block_d) == (3, 256):
            cap = RESIDENT_16BIT_PLAIN_MAXNREG
        return _resident(res.block_r, res, k, cap, warps=RESIDENT_WARPS[elsize])
    res = resident_tiles(d, max_chunks=3)
    if res is not None and contig == 0 and vec > 1:
        # transposed views (side="output"): rows along the unit stride, 32 bytes of them
        # (RESIDENT_OUTPUT_ROWS_MAXNREG); 16-byte vectors only (VEC > 1: with scalar
        # accesses every element's address took its own registers and they spilled
        # 140-1100 B)
        if not res.wide and k <= RESIDENT_OUTPUT_MAX_K.get(elsize, 0):
            rows, cap = RESIDENT_OUTPUT_ROWS_MAXNREG[elsize]
            return _resident(rows, res, k, cap, warps=RESIDENT_OUTPUT_WARPS[elsize])
        if res.block_r == 4 and k <= RESIDENT_OUTPUT_WIDE_MAX_K.get(elsize, 0):
            # 768 < D <= 1536: the same rows in 2-3 tiles of 512 columns, on 8 warps
            rows, cap = RESIDENT_OUTPUT_WIDE_ROWS_MAXNREG[elsize]
            return _resident(rows, res, k, cap, warps=8)
    if d_pad <= 128:
        # one pass: chunks of k cost registers only, so keep them small
        block_k = max(16, min(32, triton.next_power_of_2(k)))
        return _Tiles(True, 32 if d_pad <= 32 else 16, d_pad, block_k, 4, 1)
    # two passes: each chunk of k reads and writes the rows again, so one chunk up
    # to k = 128 (tl.dot needs every dim ≥ 16)
    block_k = max(16, min(128, triton.next_power_of_2(k)))
    if block_k == 16 and contig == 0:
        # transposed views: 64 x 32 on 4 warps, memory-bound at 66-67 % of copy (fp32 and
        # bf16, k = 8 and 16, sm_80 and sm_90, 78-96 registers, 5-6 programs an SM; the
        # :output cases of benchmarks/tile_sweep.py --predict) where 32 x 64 was predicted
        # 50-56 % (occupancy- or latency-bound; uncapped on sm_90 its 16-bit kernel spilled 4 B)
        return _Tiles(False, 64, 32, block_k, 4, 1)
    if block_k == 32 and elsize == 4 and contig in (0, 1) and arch >= 90:
        # 64-row blocks of 32 columns: a warpgroup's M, so Triton issues wgmma, and no
        # spills in any launch (120-252 registers, 2-4 programs per SM). 32 x 64 took 210-233
        # registers (2 programs: the anchored and transposed kernels predicted latency-bound
        # at 49-50 % of copy); capped at 168 the plain rows kernel reached 66 % but the
        # anchored and transposed ones spilled 48 B / 4 B. Now 66 % for all three (k = 32).
        # Anchored contiguous rows on 8 warps, two stages, since the split dots shed
        # instructions (docs/gpu.md #raw-lo; tile_sweep --predict, 32768 rows): 66 % against
        # 54 %
        if anchored and contig == 1:
            return _Tiles(False, 64, 32, block_k, 8, 2)
        return _Tiles(False, 64, 32, block_k, 4, 1)
    if block_k <= 32 and contig == 1:
        # contiguous rows, plain or anchored (benchmarks/tile_sweep.py --predict: the model
        # with its occupancy bound, D = 768, predicted A100 / H100): 64 x 32 at BLOCK_K = 16
        # (fp32 / bf16 k = 16: 67 / 66 % of copy on both, 93-164 registers, 3-5 programs an
        # SM; 32 x 64 took 128-168 registers: 67 / 55 % fp32, 55 / 50 % bf16, anchored bf16
        # 51 / 49 %); at BLOCK_K = 32 16-bit 64 x 64 on sm_90 (wgmma; 66 / 65 % plain /
        # anchored against 40 / 30 %) and on sm_80 16 x 32 for every dtype (64-92
        # registers, 5-8 programs an SM). sm_80 fp32 took 64 x 32 until the model counted
        # the launch's waves (benchmarks/perf_model.py waves): 64-row blocks are few, 3 a
        # SM resident, and at 8 x 4096 rows their 512 programs run a second wave of 188
        # on the A100's 324 slots; 16 x 32 predicted 66 / 54 % plain / anchored against
        # 53 / 53 % there, 31 / 31 % against 13 / 13 % at 4096 rows
        # (16-bit on sm_90 on 8 warps since docs/gpu.md #few-rows: 64 x 64 on 4 warps took
        # 2 programs an SM, occupancy-bound, 44 / 43 % plain / anchored at 32768 rows; on 8,
        # 49 / 48 %, and no lower at 4096-16384 rows)
        # Since the split dots shed instructions (docs/gpu.md #raw-lo; tile_sweep --predict,
        # 32768 rows, sm_80): anchored fp32 16 x 32 on two stages, 65 % against 57 %; plain
        # 16-bit 16 x 64, 55 % against 51 %
        if block_k == 16:
            return _Tiles(False, 64, 32, block_k, 4, 1)
        if arch >= 90:
            return _Tiles(False, 64, 64, block_k, 8, 1)
        if anchored and elsize == 4:
            return _Tiles(False, 16, 32, block_k, 4, 2)
        if not anchored and elsize == 2:
            return _Tiles(False, 16, 64, block_k, 4, 1)
        return _Tiles(False, 16, 32, block_k, 4, 1)
    if block_k == 32 and contig == 0:
        # transposed views at BLOCK_K = 32 (fp32 on sm_90 took 64 x 32 above): 16-row blocks,
        # the model counting the launch's waves (benchmarks/tile_sweep.py --predict, :output
        # cases at 4096 / 32768 rows): sm_80 16 x 64 fp32 30 / 48 %, bf16 22 / 45 % against
        # 32 x 64's 18 / 29 % and 12 / 33 %; sm_90 16-bit 64 x 64 on 8 warps 15 / 49 % (16 x
        # 32 on 4: 15 / 39 %; 32 x 64's 10 / 39 %), no lower at 8192 and 16384 rows
        if arch >= 90:
            # 16-bit: 64 x 32 on two stages, 64 % against 64 x 64 on 8 warps' 49 % (32768
            # rows), since the split dots shed instructions (docs/gpu.md #raw-lo)
            return _Tiles(False, 64, 32, block_k, 4, 2)
        # anchored fp32 capped at 136: with U's lo piece unrounded (_split_tf32) triton
        # 3.6's ptxas aimed the scalar (VEC = 1) kernel at 128 and spilled 12 B; at 136
        # 126-127 registers, no spill (3.6 and 3.9), 4 programs an SM as before
        return _Tiles(False, 16, 64, block_k, 4, 1, 136 if anchored and elsize == 4 else None)
    if block_k <= 32:
        return _Tiles(False, 32, 64, block_k, 4, 1)
    if block_k == 64 and elsize == 4 and contig == 0 and anchored and arch >= 90:
        # triton 3.6's ptxas (the GPU machines') took 168 registers and spilled 12 B;
        # capped at 200 both 3.6 and 3.9 compile it to 167-178 without spills
        return _Tiles(False, 16, 64, block_k, 4, 1, 200)
    if block_k == 64:
        return _Tiles(False, 16, 64, block_k, 4, 1)
    if contig == 1 and not anchored and arch >= 90:
        # 64-row blocks on 8 warps: each warp's share of the coefficients and of U's slice
        # halves against 16 rows on 4, so 64 rows fit without spills and each U slice
        # serves 4x the rows (predicted at k = 128 on H100: fp32 56 % of copy, bf16 35 %,
        # against 34 / 18 %; on 4 warps they spilled 728 B, 192 B with 32-column chunks;
        # the anchored kernels spilled 80-264 B and sm_80, without wgmma, 2-30 KB, so they
        # keep 16 rows). fp32 takes 32-column chunks: pass 1's fp32 add of each chunk's
        # product (_dot_split) holds a second 64 x 128 coefficient tile, and with 64 columns
        # ptxas (triton 3.9) spilled 116-144 B; with 32, 218-224 registers (3.6: 189-199)
        return _Tiles(False, 64, 32 if elsize == 4 else 64, block_k, 8, 1)
    return _Tiles(False, 16, 32, block_k, 4, 1)


_FLAT_CHUNK = 8192
_FLAT_TILE = 2048  # BLOCK_N × BLOCK_K fp32 products per program step: 16 registers a thread


def _block_k_flat(k: int) -> int:
    return max(2, min(64, triton.next_power_of_2(k)))


def tf32_round(x: torch.Tensor) -> torch.Tensor:
    """fp32 ``x`` rounded to tf32 (10 mantissa bits, ties away from zero): the host
    twin of the kernel's ``_tf32_round``, the same integer formula (for tests)."""
    bits = x.contiguous().view(torch.int32)
    return ((bits + 0x1000) & -8192).view(torch.float32)


def split_tf32(x: torch.Tensor, truncated: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hi, lo)`` of fp32 ``x`` as the kernel's ``_split_tf32`` (``truncated``:
    ``_split_truncated``) forms them, ``hi + lo = x`` exactly and ``lo`` unrounded (the
    tensor cores read its tf32 bits): the host twin, for tests."""
    x = x.contiguous()
    hi = (x.view(torch.int32) & -8192).view(torch.float32) if truncated else tf32_round(x)
    return hi, x - hi


def _offsets(tensors: list[torch.Tensor]) -> list[int]:
    """Element offsets of ``tensors`` from the first one's address (all share one dtype)."""
    base, size = tensors[0].data_ptr(), tensors[0].element_size()
    out = []
    for i, t in enumerate(tensors):
        delta = t.data_ptr() - base
        if delta % size:
            raise ValueError(
                f"tensor {i} of the bucket is not {size}-byte aligned relative to tensor 0"
            )
        out.append(delta // size)
    return out


# Tiles that replace _row_tiles' choice for every row launch of this context; None: its own
_ROW_TILES_OVERRIDE: contextvars.ContextVar[_Tiles | None] = contextvars.ContextVar(
    "gradproj_row_tiles_override", default=None
)


@contextlib.contextmanager
def row_tiles_override(tiles: _Tiles) -> Iterator[None]:
    """Benchmarks only (``benchmarks/tile_sweep.py``): every row launch within uses ``tiles``
    instead of :func:`_row_tiles`' choice, so a GPU can time the candidates against each
    other. A launch the tiles cannot serve raises ``ValueError`` (:func:`_check_tiles`)
    before anything runs."""
    if not isinstance(tiles, _Tiles):
        raise TypeError(f"row_tiles_override takes a _Tiles, got {type(tiles).__name__}")
    token = _ROW_TILES_OVERRIDE.set(tiles)
    try:
        yield
    finally:
        _ROW_TILES_OVERRIDE.reset(token)


def _check_tiles(tiles: _Tiles, d: int, k: int, contig: int, vec: int) -> None:
    """Raise ``ValueError`` when the row kernel cannot run ``tiles`` on rows of ``d`` with
    ``k`` basis columns (an override's tiles; _row_tiles' own always can)."""
    pow2 = all(v > 0 and v & (v - 1) == 0 for v in tiles[1:5])
    why = None
    if not pow2 or tiles.stages < 1:
        why = "BLOCK_R, BLOCK_D, BLOCK_K and warps must be powers of two, stages >= 1"
    elif tiles.resident:
        if tiles.block_k < k:
            why = f"the resident kernel holds all of k in BLOCK_K ({tiles.block_k} < k = {k})"
        elif tiles.block_d * tiles.chunks < d or not 1 <= tiles.chunks <= 4:
            why = f"the resident tiles ({tiles.chunks} x {tiles.block_d}) must cover d = {d}"
        elif not (contig == 1 or (contig == 0 and vec > 1)):
            why = "the resident kernel needs contiguous rows or 16-byte transposed views"
    elif min(tiles.block_r, tiles.block_d, tiles.block_k) < 16:
        why = "the tensor-core kernels need BLOCK_R, BLOCK_D and BLOCK_K >= 16 (tl.dot)"
    elif tiles.one_pass and tiles.block_d < d:
        why = f"one pass holds the whole row: BLOCK_D = {tiles.block_d} < d = {d}"
    if why is not None:
        raise ValueError(f"row tiles {tiles} cannot serve d = {d}, k = {k}: {why}")


def _row_layout(matrices: list[torch.Tensor], d: int) -> tuple[int, int]:
    """``(CONTIG, VEC)``: the unit-stride axis (1 columns, 0 rows, -1 none) and the
    elements per 16 bytes when every address, the other stride and the masked
    extent along the unit-stride axis are multiples of 16 bytes (else 1)."""
    if all(m.stride(1) == 1 or m.shape[1] == 1 for m in matrices):
        contig = 1
    elif all(m.stride(0) == 1 or m.shape[0] == 1 for m in matrices):
        contig = 0
    else:
        return -1, 1
    vec = 16 // matrices[0].element_size()
    aligned = all(m.data_ptr() % 16 == 0 for m in matrices)
    if contig == 1:
        aligned = aligned and d % vec == 0 and all(m.stride(0) % vec == 0 for m in matrices)
    else:
        aligned = aligned and all(
            m.shape[0] % vec == 0 and m.stride(1) % vec == 0 for m in matrices
        )
    return contig, vec if aligned else 1


def _row_table(
    matrices: list[torch.Tensor], anchors: list[torch.Tensor] | None, block_r: int
) -> tuple[torch.Tensor, int]:
    """``(table, n_blocks)``: per-tensor metadata, then a (tensor, first row) pair per program."""
    offs = _offsets(matrices)
    c_offs = _offsets(anchors) if anchors is not None else [0] * len(matrices)
    meta = tuple(
        (offs[i], m.shape[0], m.stride(0), m.stride(1), c_offs[i]) for i, m in enumerate(matrices)
    )

    def build() -> list[int]:
        blocks = [v for t, m in enumerate(meta) for r0 in range(0, m[1], block_r) for v in (t, r0)]
        return [v for m in meta for v in m] + blocks

    key = (matrices[0].device, "rows", block_r, matrices[0].data_ptr(), meta)
    table = cached_table(key, build)
    return table, (table.numel() - _META * len(matrices)) // 2


def _launch_rows(
    matrices: list[torch.Tensor],
    anchors: list[torch.Tensor] | None,
    basis: torch.Tensor,
    weights: torch.Tensor | None,
) -> None:
    d, k = basis.shape
    g0 = matrices[0]
    contig, vec = _row_layout(matrices, d)
    tiles = _ROW_TILES_OVERRIDE.get()
    if tiles is None:
        few = few_rows(sum(m.shape[0] for m in matrices), _sm_count(g0.device))
        tiles = _row_tiles(
            _arch(), g0.element_size(), d, k, contig, anchors is not None, vec, few,
            weighted=weights is not None,
        )  # fmt: skip
    else:
        _check_tiles(tiles, d, k, contig, vec)
    one_pass, block_r, block_d, block_k, warps, stages, maxnreg = tiles[:7]
    table, n_blocks = _row_table(matrices, anchors, block_r)
    _project_rows_kernel[(n_blocks,)](
        table,
        len(matrices),
        g0,
        anchors[0] if anchors is not None else basis,
        basis,
        weights if weights is not None else basis,
        d,
        k,
        CONTIG=contig,
        VEC=vec,
        ONE_PASS=one_pass,
        RESIDENT=tiles.resident,
        HAS_W=weights is not None,
        HAS_ANCHOR=anchors is not None,
        SPLIT=DOT_SCHEME == "tf32x3",
        # bf16/fp16 values are exact in tf32: no lo piece, unless a later chunk
        # of k (one pass) reads the tile already updated in fp32
        X_EXACT=g0.dtype != torch.float32 and (k <= block_k or not one_pass),
        # a 16-bit result: the dots' operands split truncated (_split_truncated)
        TRUNCATED=g0.dtype != torch.float32,
        BLOCK_R=block_r,
        BLOCK_D=block_d,
        BLOCK_K=block_k,
        CHUNKS=tiles.chunks,
        num_warps=warps,
        num_stages=stages,
        maxnreg=maxnreg,
    )


def _launch_flat(
    vectors: list[torch.Tensor],
    anchors: list[torch.Tensor] | None,
    basis: torch.Tensor,
    weights: torch.Tensor | None,
) -> None:
    d, k = basis.shape
    n_chunks = triton.cdiv(d, _FLAT_CHUNK)
    offs = tuple(_offsets(vectors))
    size = vectors[0].element_size()
    aligned = d % (16 // size) == 0 and all(v.data_ptr() % 16 == 0 for v in vectors)
    vec = 16 // size if aligned else 1
    table = cached_table((basis.device, "flat", vectors[0].data_ptr(), offs), lambda: list(offs))
    block_k = _block_k_flat(k)
    n_blocks = len(vectors) * n_chunks
    partial = torch.empty(n_blocks, k, dtype=torch.float32, device=basis.device)
    common = {
        "VEC": vec,
        "CHUNK": _FLAT_CHUNK,
        "BLOCK_N": _FLAT_TILE // block_k,
        "BLOCK_K": block_k,
    }
    g0 = vectors[0]
    _flat_coef_kernel[(n_blocks,)](table, g0, basis, partial, d, k, n_chunks, **common)
    # fixed-order reduction over each tensor's chunks: deterministic, no atomics
    coef = partial.view(len(vectors), n_chunks, k).sum(dim=1)
    if anchors is not None:
        c0 = torch.cat(anchors, dim=0)  # (T × k): T small tensors, one row each
        coef = coef - c0
        if weights is not None:
            torch._foreach_copy_(anchors, list((c0 + (1.0 - weights) * coef).split(1)))
    if weights is not None:
        coef = coef * weights
    # BLOCK_K = 32: triton 3.6's ptxas chose 56 registers and spilled 4 B (sm_80 and sm_90);
    # capped at 64 it uses 64 without spills, as triton 3.9 does on its own
    _flat_apply_kernel[(n_blocks,)](
        table, g0, basis, coef.contiguous(), d, k, n_chunks, **common,
        maxnreg=64 if block_k == 32 else None,
    )  # fmt: skip


def project_bucket_(
    matrices: list[torch.Tensor],
    basis: torch.Tensor,
    weights: torch.Tensor | None,
    side: str,
) -> None:
    """The ``"triton"`` backend's bucket kernel (contract in ``gradproj.backends``)."""
    if side == "flat":
        _launch_flat(matrices, None, basis, weights)
    else:
        _launch_rows(matrices, None, basis, weights)


def project_anchored_bucket_(
    matrices: list[torch.Tensor],
    anchors: list[torch.Tensor],
    basis: torch.Tensor,
    weights: torch.Tensor | None,
    side: str,
) -> None:
    """The ``"triton"`` backend's anchored bucket kernel (contract in ``gradproj.backends``)."""
    if side == "flat":
        _launch_flat(matrices, anchors, basis, weights)
    else:
        _launch_rows(matrices, anchors, basis, weights)
