"""Fused projected AdamW: one step of AdamW, then the anchored projection, per bucket.

Per parameter row ``x`` (row views as in ``kernels/project.py``: rows of ``W`` for
``side="input"``, transposed views for ``"output"``, the whole tensor for
``"flat"``), with anchor row ``c`` and ``t`` the step count read on the device (no
host sync)::

    g ← −g if maximize
    m ← β₁ m + (1 − β₁) g          v ← β₂ v + (1 − β₂) g²       (v̂ = max(v̂, v) if amsgrad)
    x' ← x (1 − lr·λ) − lr/(1 − β₁ᵗ) · m / (√v̂ / √(1 − β₂ᵗ) + ε)
    a = Uᵀ x'
    x ← x' − U (w ⊙ (a − c))
    c ← c + (1 − w) ⊙ (a − c)       (soft weights only)

Design (sides ``input``/``output``: ``_projected_adamw_kernel``, one launch)
---------------------------------------------------------------------------
A program owns ``BLOCK_R`` rows of one tensor; a device table maps each program to
(tensor, first row) and holds each tensor's element offsets from one base pointer
(``p0_ptr``; anchors and steps, fp32, from ``c0_ptr``, the first step tensor), its
row count and strides, all int64: no pointer is rebuilt from an integer (those
loads were scalar), and no offset is formed in int32.

* **Layout** (constexpr ``LAYOUT``, chosen on the host from the strides): ``ROWS``
  (stride 1 along ``D``: ``side="input"``), ``COLS`` (stride 1 along the rows: the
  transposed views of ``side="output"``) or ``STRIDED`` (anything else). The tile's
  fast axis is the contiguous one, so a warp reads whole 128-byte lines. When the
  host has checked 16-byte alignment of every offset and stride (``ALIGN`` =
  elements per 16 bytes, else 1), ``tl.multiple_of`` lets the loads be 16-byte
  vectors.
* **Tiles** (``_rows_config``, per arch, the arch cached per device): ``BLOCK_R ×
  BLOCK_D`` of p, g, m, v (16 rows: ``side="input"`` 16 × 64 fp32 / 16 × 128 bf16 at
  k ≤ 16, 16 × 64 at k ≤ 32, 16 × 32 beyond; ``"output"`` 16 × 64 at 16 < k ≤ 32 for
  fp32 and k ≤ 16 for 16-bit without amsgrad, else 16 × 32; on sm_90 at 64 < k ≤ 128,
  for a bucket of many rows, 64 × 32 on 8 warps, except fp32 with amsgrad), the
  ``BLOCK_D × BLOCK_K`` slice of ``U`` and
  ``BLOCK_R × BLOCK_K`` fp32 coefficients in registers, ``BLOCK_K = max(16,
  next_pow2(k))``; for 128 < k ≤ 256 the coefficients are two 128-wide tiles
  (``KSPLIT = 2``), because a 3xTF32 dot's A operand (the coefficients, in pass 2)
  is held whole by every warp, hi and lo. 4 warps (8 for ``KSPLIT = 2`` and the
  64-row blocks), no software pipelining. Shared memory holds only the dot operands
  (≤ 48 KB; 96 KB for the 64-row blocks, sm_90 only), inside A100's 163 KB per block
  and H100's 227 KB. Compiled, not measured: no spill on
  ``sm_80`` or ``sm_90`` (``make gpu-compile-check``).
* **Resident form** (constexpr ``RESIDENT``, when ``D ≤ BLOCK_D``): the row block
  is loaded once, its update ``x'`` stays in registers between the two GEMMs, then
  p, m, v are stored. HBM bytes per element: exactly a fused AdamW's — p, g, m, v
  read once, p, m, v written once (7 streams; 9 with amsgrad) — plus ``U`` once per
  program (from L2 after the first).
* **FMA form** (constexpr ``FMA_CHUNKS`` > 0: ``ROWS`` layout, ``128 < D ≤ 4096``, ``k ≤
  FMA_MAX_K``: 32 for fp32, 16 for bf16/fp16 (16 in 8-row blocks without amsgrad,
  ``FMA_8ROW_MAX_K``, where the two-pass form leads above), up to ``D`` = 3072; beyond,
  ``FMA_4TILE_MAX_K``, 16 and 8; and 16-byte aligned ``COLS`` views, ``128 < D ≤ 768``,
  ``k ≤ FMA_COLS_MAX_K``, 16 and 8, in blocks of one 32-byte sector a column: fp32 8 rows
  on 4 warps, 16-bit 16 on 8, ``_fma_cols_tiles``): ``x'`` of an 8-row block stays in
  registers as up to 3 tiles of 256 / 128 / 64 columns, for ``D`` > 768 a 4-row block as
  2–3 tiles of 512, for ``D`` > 1536 a 2-row block as 2–3 tiles of 1024
  (``project.resident_tiles``; 4 tiles of 256 spilled up to 380 B on sm_90), for ``D`` >
  3072 as 4 tiles of 1024 on 8 warps (``_fma_tiles``; ptxas capped at 255 registers, as
  left to itself it aimed at 168 and spilled 8 B), m and v are stored as each tile is
  formed, and the basis is applied one column at a time in fp32 FMA (``a = x' u_j``, ``x'
  −= (w ⊙ (a − c))_j u_jᵀ``, the basis columns loaded through Triton's pipeliner, 2 ahead
  in shared memory; for orthonormal ``U`` this equals the one-shot formula). The block's
  anchors and the weights are read once, as a tile, before the column loop
  (``project._anchor_tile``, as ``project_``'s resident kernel; read per column they put a
  dependent global load in every iteration: bf16 k = 8 on H100 was predicted at 1.08× at
  ``D`` = 768 and 1.50× at 1024, now 1.00×). Each of p, g, m, v is read once and p, m, v
  written once: a fused AdamW's bytes, predicted at 1.00× its time at ``D`` = 768 up to k
  = 16 (fp32; bf16 1.58×), where the two-pass form reads more (wider ``D``: docs/gpu.md).
* **Two-pass form** (``D > BLOCK_D``): pass 1 walks ``D`` in ``BLOCK_D`` chunks,
  forms ``x'`` and accumulates ``a = x' U``; pass 2 walks the chunks again and stores
  ``x' − (w ⊙ (a − c)) Uᵀ``. fp32 parameters (constexpr ``RELOAD``): pass 1 stores
  m, v and ``x'`` itself into p (exact in fp32), and pass 2 reads p alone back —
  p, g, m, v read once, p, m, v written once, plus one more read and write of p
  (9 streams, 1.29× a fused AdamW's bytes; 7 when pass 2's read hits L2 and the
  first write of p is still in it). 16-bit parameters: ``x'`` stored rounded and
  projected from the rounded rows left the rounding's error where the projection
  cancels most of a row (a relative 1.8 at an element, test_adamw), so pass 2
  loads the same p, g, m, v chunks again, recomputes ``x'`` bit for bit (same code,
  same inputs) and stores p, m, v (11 streams, 1.57×, unless pass 2's reads hit L2:
  a program touches ``BLOCK_R × D × 4 × itemsize`` bytes between its two reads,
  16 × 768 × 8 B = 96 KB in bf16, times the resident programs must fit in L2, 40 MB
  A100, 50 MB H100 — not measured). Keeping a whole ``BLOCK_R × D`` tile in
  registers for every ``D`` is not expressible in Triton without chunk-indexed
  register arrays. ``U`` is loaded once per program per pass.
* **Dots**: both GEMMs (``x' U`` and ``(a − c) Uᵀ``) run on tensor cores in fp32
  with the split-precision scheme ``_PRECISION`` (3xTF32: ``a·b ≈ a_hi b_hi +
  a_hi b_lo + a_lo b_hi`` with ``a_hi = tf32(a)``, ``a_lo = a − a_hi`` read by the
  tensor cores as its tf32 bits; the projection's ``_dot_split``, through ``_dot``).
  Each product then carries a relative error ≤ ~2⁻²¹ (the dropped
  ``a_lo b_lo`` and the truncation of the ``lo`` parts), typically ~2⁻²⁴, i.e.
  fp32's own rounding level, and the fp32 accumulation is unchanged; the issue's
  emulation over 100 anchored fp32 steps gave max ‖ΔW U‖/‖W₀‖ = 5.3e-8 / 5.4e-8 /
  1.1e-7 at k = 8/32/128, as "ieee" does. Plain tf32 (3.2e-4) would break the
  1e-6 guarantee. bf16/fp16 parameters use the same scheme: ``x'`` is fp32 in
  registers (their update is computed in fp32 and rounded once, at the store), so
  splitting it to bf16 hi/lo would add error for no byte saved.

Design (``side="flat"``: three launches over fixed-size chunks)
---------------------------------------------------------------
Every vector of a flat bucket has the basis' length ``N``; it is cut into
``_FLAT_CHUNK``-element chunks and a 1-D grid maps program → (tensor, chunk)
(no grid.y, so no 65535-tensor limit):

1. ``_adamw_flat_partial_kernel``: per chunk, ``x'`` from p, g, m, v and the partial
   ``Σ x'ᵢ Uᵢ`` (minus ``c`` on chunk 0) into a ``(T·n_chunks) × k`` fp32 buffer;
2. ``_adamw_flat_reduce_kernel``: per tensor, the partials summed in chunk order
   (deterministic, no atomics) into ``a − c``; soft weights update ``c`` here;
3. ``_adamw_flat_apply_kernel``: per chunk, ``x'`` recomputed from the same loads,
   ``x' − U (w ⊙ (a − c))``, p, m, v stored.

HBM bytes per element: p, g, m, v read twice and p, m, v written once (11 streams,
13 with amsgrad: 1.57× a fused AdamW's), plus ``U`` (``4k`` bytes per element)
read twice — a flat basis is as long as the tensor, so it dominates for k ≥ 8.
The dot is a GEMV (one row), done with FMAs in true fp32.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from gradproj.kernels.device_table import cached_table
from gradproj.kernels.project import (
    RESIDENT_STAGES,
    ResidentTiles,
    _anchor_tile,
    _basis_columns,
    _column_coef,
    _dot_split,
    _rank1_update,
    _row_dots,
    _sm_count,
    _store_anchor_tile,
    few_rows,
    resident_tiles,
)

# The dot-product scheme of both GEMMs: 3xTF32 on tensor cores (error analysed in
# the module docstring). "tf32" alone leaves (x U − c) at ~1e-4 relative, far above
# the rounding level the anchored projection promises.
_PRECISION = "tf32x3"

# Layouts of a bucket's row views (constexpr LAYOUT).
_ROWS, _COLS, _STRIDED = 0, 1, 2

# Columns of the per-tensor table: element offsets of p, g, m, v, v̂max (from
# p0_ptr), of the anchor and the step (from c0_ptr, fp32), rows, then the strides
# of p/m/v and g: the non-unit one (ROWS: row stride, COLS: column stride), and the
# column strides (STRIDED only).
_META = 12

_FLAT_CHUNK = 4096
_MAX_K = 256
# The FMA form's largest k, per element size (contiguous rows, 128 < D <= 3072; see
# _fma_tiles): beyond, its 2k FMAs per element cost more than the two-pass form's
# tensor-core GEMMs and extra reads. With the basis columns pipelined (RESIDENT_STAGES),
# predicted (benchmarks/perf_model.py; A100 / H100, torch's fused AdamW = 1): fp32 k = 32
# 1.00 / 1.00x at D = 768, 1024, 1536, 1.05 / 1.27x at 2048, 1.00 / 1.04x at 3072 (the
# two-pass form 1.29x), k = 64 1.90 / 1.85x at 768; bf16 k = 16 1.00 / 1.00x at 768, 1.05
# / 1.53x at 1024, 1.00 / 1.13x at 1536, 1.24 / 1.60x at 2048, 1.18 / 1.23x at 3072 (the
# two-pass form 1.57x), k = 32 1.54 / 1.50x at 768.
FMA_MAX_K = {4: 32, 2: 16}
# 3072 < D <= 4096: 4 tiles of 1024 columns, 2 rows, on 8 warps (on 4 warps they spilled
# 384-496 B on sm_90, as 4 tiles of 256 or 512 did: 168-404 B). Predicted at D = 4096:
# fp32 k = 16 1.00 / 1.00x, k = 32 1.30 / 1.35x; bf16 k = 8 1.00 / 1.00x; the two-pass
# form 1.29x (fp32) / 1.57x (16-bit).
FMA_4TILE_MAX_K = {4: 16, 2: 8}
FMA_MAXNREG = 255
# Transposed views (side="output", COLS, 16-byte aligned), 128 < D <= 768: the FMA form in
# blocks of one 32-byte sector a column (FMA_COLS_ROWS_WARPS: rows, warps per element size),
# k <= FMA_COLS_MAX_K. fp32, 8 rows on 4 warps: predicted at D = 768, k = 1 / 8 / 16, 1.00x
# torch's fused AdamW on A100 and H100 (201-232 registers, 2 programs per SM), against the
# two-pass form's 1.29x. 16-bit, 16 rows on 8 warps (on 4 they spilled 232-1084 B; 8 rows
# would read half sectors): 155-168 registers, one program an SM, no spills (sm_80, sm_90;
# capped at 128 for two, 24-72 B); predicted (A100 / H100, 4096 and 32768 rows; docs/gpu.md
# #adamw-cols-16bit) bf16 k = 1 1.39 / 1.20x and 1.10 / 1.20x against the two-pass form's
# 6.33 / 7.98x and 2.37 / 1.99x, k = 4 1.91 / 1.64x and 1.51 / 1.64x against 6.41 / 8.05x
# and 2.40 / 2.01x, k = 8 2.48 / 2.12x and 1.96 / 2.12x against 6.41 / 8.05x and 2.40 /
# 2.01x (the one loss: H100 at 32768 rows, 5 %); k = 16 3.62 / 3.07x and 2.86 / 3.07x
# against 6.33 / 8.01x and 2.37 / 2.00x, so 16-bit stops at 8.
FMA_COLS_MAX_K = {4: 16, 2: 8}
FMA_COLS_ROWS_WARPS = {4: (8, 4), 2: (16, 8)}


# ... and 16-bit views of 3 tiles of 256 (512 < D <= 768; of 128 or 64 they took <= 128
# anyway) on sm_80 capped at 128 registers: 2 programs (16 warps) an SM where uncapped they
# took 148-168, one (benchmarks/perf_model.py, predicted, D = 768, A100, x torch's fused
# AdamW: bf16 k = 8 1.75 -> 1.05x at 32768 rows, 2.21 -> 1.60x at 4096; docs/gpu.md
# #adamw-cols-cap). Only k > 1 without soft weights or
# amsgrad: those spilled 16-32 B at 128 (k = 1 120 B), and so did every sm_90 variant
# (24-80 B): they take FMA_COLS_16BIT_WARPS_MAXNREG.
FMA_COLS_16BIT_SM80_MAXNREG = 128
# The rest of those 3-tile blocks (sm_90; soft weights, amsgrad or k = 1 on sm_80): 16 warps
# capped at 128, one program of 16 warps an SM where 8 warps uncapped made one of 8 (104-128
# registers, no spills, triton 3.9 and 3.6). Predicted, bf16 side output, D = 768, x torch's
# fused AdamW (32768 / 4096 rows): H100 k = 1 1.03 / 1.03 -> 1.01 / 1.00x, k = 8 1.86 / 1.86
# -> 1.67 / 1.67x; A100 k = 1 1.00 / 1.25 -> 1.00 / 1.09x. Not for sm_80's plain k > 1: the
# cross-warp sums of 16 warps a row cost more than the second program (1.57x against 1.05x).
FMA_COLS_16BIT_WARPS_MAXNREG = (16, 128)


def _fma_cols_tiles(
    d: int, itemsize: int, k: int, cap: int = 0, weighted: bool = False, amsgrad: bool = False
) -> tuple[ResidentTiles, int, int] | None:
    """``(tiles, num_warps, maxnreg)`` of the FMA form for transposed views (``COLS``, 16-byte
    aligned) of ``d``, or ``None``: rows of one 32-byte sector a column (fp32 8 on 4 warps,
    16-bit 16 on 8: ``FMA_COLS_ROWS_WARPS``) of up to 3 tiles of 256 / 128 / 64 columns,
    ``k ≤ FMA_COLS_MAX_K``. 16-bit blocks of 3 tiles of 256: on compute capability ``cap``
    < 9 with k > 1, without soft weights (``weighted``) or ``amsgrad``, capped at
    ``FMA_COLS_16BIT_SM80_MAXNREG``; else on ``FMA_COLS_16BIT_WARPS_MAXNREG``."""
    res = resident_tiles(d, max_chunks=3)
    if res is None or res.wide or k > FMA_COLS_MAX_K.get(itemsize, 0):
        return None
    rows, warps = FMA_COLS_ROWS_WARPS[itemsize]
    maxnreg = FMA_MAXNREG
    if itemsize == 2 and res.chunks == 3 and res.block_d == 256:
        if k > 1 and cap < 90 and not (weighted or amsgrad):
            maxnreg = FMA_COLS_16BIT_SM80_MAXNREG
        else:
            warps, maxnreg = FMA_COLS_16BIT_WARPS_MAXNREG
    return res._replace(block_r=rows), warps, maxnreg


# The 8-row blocks of contiguous rows (D <= 768): (warps, register cap). On 4 warps, uncapped,
# ptxas took 147-181 registers, 3 programs (12 warps) an SM, and the model's occupancy bound
# held them (benchmarks/perf_model.py; predicted, A100 / H100, D = 768, 32768 rows, x torch's
# fused AdamW: fp32 k = 32 1.95 / 2.08x, bf16 k = 8 1.36 / 1.50x, k = 16 2.03 / 2.21x). On 8
# warps capped at 128, 92-128 registers, 2 programs (16 warps) an SM, no spills (sm_80, sm_90,
# triton 3.9 and 3.6): 1.60 / 1.71x, 1.24 / 1.35x, 1.90 / 2.04x; k = 1 and 8 1.00-1.02x, no
# row higher at 32768 rows. At 4096 rows two A100 rows rise (fp32 k = 8 1.06 -> 1.14x, bf16
# k = 1 1.09 -> 1.13x: 512 programs on 216 slots, a tail the 324 of 4 warps' 3 an SM cut),
# the rest fall or stay (fp32 k = 32 2.41 / 3.02 -> 2.02 / 1.71x). Uncapped on 8 warps the
# k = 1 kernels took 131-138 registers, one program an SM (bf16 k = 1, A100: 1.33x). With
# amsgrad (a fifth stream) capped at 128 they spilled 16-32 B, so amsgrad keeps 4 warps.
# docs/gpu.md #adamw-fma-warps.
FMA_8ROW_WARPS_MAXNREG = (8, 128)
# Their largest k (not with amsgrad, whose blocks keep 4 warps and FMA_MAX_K): 16, since the
# two-pass form's split dots shed a third of their instructions and took 16-row tiles
# (docs/gpu.md #adamw-tiles). Predicted, D = 768, 32768 rows, x torch's fused AdamW, A100 /
# H100, k = 32: bf16 2.70 / 2.86x here against the two-pass form's 1.64 / 1.62x, fp32 1.35 /
# 1.41x against 1.29 / 1.29x; at k = 16 this form leads (bf16 1.58 / 1.66x against 1.62 /
# 1.98x, fp32 1.00 / 1.02x against 1.29 / 1.38x).
FMA_8ROW_MAX_K = {4: 16, 2: 16}


def fma_max_k(d: int, itemsize: int, amsgrad: bool = False) -> int:
    """The FMA form's largest k for contiguous rows of ``d`` (0: none), as ``_fma_tiles``
    takes it."""
    res = resident_tiles(d, max_chunks=3)
    if res is not None:
        if res.block_r == 8 and not amsgrad:
            return FMA_8ROW_MAX_K[itemsize]
        return FMA_MAX_K[itemsize]
    res = resident_tiles(d, max_chunks=4)
    return FMA_4TILE_MAX_K[itemsize] if res is not None and res.wide else 0


def _fma_tiles(
    d: int, itemsize: int, k: int, amsgrad: bool = False
) -> tuple[ResidentTiles, int, int] | None:
    """``(tiles, num_warps, maxnreg)`` of the FMA form for contiguous rows of ``d``, or
    ``None``.

    Up to 3 tiles (``project.resident_tiles``: 8 rows up to ``D`` = 768 on 8 warps,
    ``FMA_8ROW_WARPS_MAXNREG``, ``k ≤ FMA_8ROW_MAX_K``, but on 4 with ``amsgrad``; 4 rows
    of 512 columns up to 1536 and 2 rows of 1024 up to 3072, on 4 warps); 4 tiles of 1024
    on 8 warps up to 4096. ``k`` to ``fma_max_k``.
    """
    res = resident_tiles(d, max_chunks=3)
    if res is not None:
        if k > fma_max_k(d, itemsize, amsgrad):
            return None
        if res.block_r == 8 and not amsgrad:
            return (res, *FMA_8ROW_WARPS_MAXNREG)
        return res, 4, FMA_MAXNREG
    res = resident_tiles(d, max_chunks=4)
    if res is not None and res.wide and k <= fma_max_k(d, itemsize, amsgrad):
        return res, 8, FMA_MAXNREG
    return None


@triton.jit
def _adamw_update(
    p,
    g,
    m,
    v,
    vmax,
    beta1,
    beta2,
    one_minus_beta1,
    one_minus_beta2,
    eps,
    decay,
    step_size,
    inv_sqrt_bias2,
    AMSGRAD: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    FAST_SQRT: tl.constexpr,
):
    """The AdamW update of one tile, in fp32: returns (p', m', v', v̂max')."""
    if MAXIMIZE:
        g = -g
    m = beta1 * m + one_minus_beta1 * g
    v = beta2 * v + one_minus_beta2 * g * g
    if AMSGRAD:
        vmax = tl.maximum(vmax, v)
        v_hat = vmax
    else:
        v_hat = v
    if FAST_SQRT:  # the SFU's sqrt.approx.ftz.f32 (_fast_sqrt)
        root = tl.sqrt(v_hat)
    else:  # IEEE-rounded, as torch's AdamW
        root = tl.sqrt_rn(v_hat)
    p = p * decay - step_size * m / (root * inv_sqrt_bias2 + eps)
    return p, m, v, vmax


@triton.jit
def _updated_tile(
    p_ptr,
    g_ptr,
    m_ptr,
    v_ptr,
    vmax_ptr,
    offs,
    g_offs,
    mask,
    beta1,
    beta2,
    one_minus_beta1,
    one_minus_beta2,
    eps,
    decay,
    step_size,
    inv_sqrt_bias2,
    AMSGRAD: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    FAST_SQRT: tl.constexpr,
):
    """Load one tile of p, g, m, v (and v̂max) and return its AdamW update in fp32.

    Both passes call this with the same arguments, so pass 2 recomputes exactly the
    values pass 1 projected. Masked lanes come out 0 (0·decay − 0/(√v̂·c + ε)): their v
    reads as 1, so the quotient is 0 even at ε = 0 (read as 0 it was 0/0, a NaN that the
    projection's sums carried into every row of the tile).
    """
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + g_offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=mask, other=1.0).to(tl.float32)
    vmax = v
    if AMSGRAD:
        vmax = tl.load(vmax_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return _adamw_update(
        p,
        g,
        m,
        v,
        vmax,
        beta1,
        beta2,
        one_minus_beta1,
        one_minus_beta2,
        eps,
        decay,
        step_size,
        inv_sqrt_bias2,
        AMSGRAD,
        MAXIMIZE,
        FAST_SQRT,
    )


@triton.jit
def _store_moments(p_ptr, m_ptr, v_ptr, vmax_ptr, offs, mask, x, m, v, vmax, AMSGRAD: tl.constexpr):
    """Store a tile's p, m, v (and v̂max) in the parameters' dtype."""
    ty = p_ptr.dtype.element_ty
    tl.store(p_ptr + offs, x.to(ty), mask=mask)
    tl.store(m_ptr + offs, m.to(ty), mask=mask)
    tl.store(v_ptr + offs, v.to(ty), mask=mask)
    if AMSGRAD:
        tl.store(vmax_ptr + offs, vmax.to(ty), mask=mask)


@triton.jit
def _one_minus_exp(y):
    """1 − eʸ = −expm1(y) in fp32 for y ≤ 0, to a few ulps of itself (``_bias_terms``).

    Down to y = −1 its Taylor series to y¹¹/11! (the rest below 4e-9 of it; Horner's sums
    stay above 0.6 of their first term, so no cancellation); below, eʸ ≤ 0.37 and
    1 − ``tl.exp`` (ex2.approx of y·log₂e: 2⁻²²·⁵ and |y|·2⁻²⁴ of eʸ) is within 1.5e-7 of it.
    """
    ys = tl.maximum(y, -1.0)  # the series' argument stays small where the exp is taken
    p = 1.0 / 39916800.0
    p = p * ys + 1.0 / 3628800.0
    p = p * ys + 1.0 / 362880.0
    p = p * ys + 1.0 / 40320.0
    p = p * ys + 1.0 / 5040.0
    p = p * ys + 1.0 / 720.0
    p = p * ys + 1.0 / 120.0
    p = p * ys + 1.0 / 24.0
    p = p * ys + 1.0 / 6.0
    p = p * ys + 0.5
    series = -(ys + ys * ys * p)
    return tl.where(y >= -1.0, series, 1.0 - tl.exp(y))


@triton.jit
def _bias_terms(step_ptr, lr, log_beta1, log_beta2, weight_decay):
    """(step size, 1/√(1 − β₂ᵗ), decay) from the step count on the device, in fp32.

    1 − βᵗ = −expm1(t·ln β), ln β formed on the host in fp64 (``_log_beta``, then rounded
    to fp32), and −expm1 to a few ulps of itself (``_one_minus_exp``): 1 − β₂ᵗ is
    1e-3 at t = 1, where 1 minus an fp32 β₂ᵗ would cost 3 of fp32's 7 digits. Within 1e-6
    of the fp64 value over β ∈ [0, 1 − 10⁻⁷] and t ≤ 10⁷ (tests/test_adamw.py). It was
    fp64 exp and log of the step on the device: 2109 warp instructions a warp became 1898
    (bf16 k = 8, sm_80; docs/gpu.md #bias-fp32).
    """
    step = tl.load(step_ptr)
    bias1 = _one_minus_exp(step * log_beta1)
    bias2 = _one_minus_exp(step * log_beta2)
    # the fast division and rsqrt (2 ulps each, as the update's own: docs/gpu.md
    # #fast-update): correctly rounded, they took 20 more instructions a warp
    step_size = lr / bias1
    inv_sqrt_bias2 = tl.math.rsqrt(bias2)
    decay = 1.0 - lr * weight_decay
    return step_size, inv_sqrt_bias2, decay


@triton.jit
def _tile_offsets(rows, ds, s, s_d, LAYOUT: tl.constexpr):
    """int64 element offsets of a ``rows × ds`` tile (``s``: the non-unit stride)."""
    if LAYOUT == 0:  # ROWS: unit stride along D
        return rows[:, None] * s + ds[None, :]
    elif LAYOUT == 1:  # COLS: unit stride along the rows
        return rows[:, None] + ds[None, :].to(tl.int64) * s
    else:
        return rows[:, None] * s + ds[None, :].to(tl.int64) * s_d


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr):
    """``a·b`` from a zero accumulator. "tf32x3": the projection's ``_dot_split`` (a and b
    each split once, hi rounded and lo as it is: 3 instructions a value), where Triton's
    own tf32x3 rounds hi by ``cvt.rna.tf32.f32``, which ptxas expands into 6 (docs/gpu.md
    #raw-lo); else ``tl.dot`` at ``PRECISION`` ("ieee": fp32 FMAs)."""
    if PRECISION == "tf32x3":
        acc = _dot_split(a, b, True, False, False)
    else:
        acc = tl.dot(a, b, input_precision=PRECISION)
    return acc


@triton.jit
def _basis_tile(u_ptr, ds, ks, D, K):
    """``U[ds, ks]`` (row-major, fp32), zero outside ``D × K``."""
    return tl.load(
        u_ptr + ds[:, None] * K + ks[None, :],
        mask=(ds < D)[:, None] & (ks < K)[None, :],
        other=0.0,
    )


@triton.jit
def _coef_minus_anchor(a, c_ptr, w_ptr, rows, row_mask, ks, K, HAS_W: tl.constexpr):
    """``w ⊙ (a − c)`` for the columns ``ks``; soft weights also move the anchor."""
    c_offs = rows[:, None] * K + ks[None, :]
    c_mask = row_mask[:, None] & (ks < K)[None, :]
    c0 = tl.load(c_ptr + c_offs, mask=c_mask, other=0.0)
    coef = a - c0
    if HAS_W:
        w = tl.load(w_ptr + ks, mask=ks < K, other=0.0)
        tl.store(c_ptr + c_offs, c0 + (1.0 - w[None, :]) * coef, mask=c_mask)
        coef = coef * w[None, :]
    return coef


@triton.jit
def _fma_chunk(
    p_ptr,
    g_ptr,
    m_ptr,
    v_ptr,
    vmax_ptr,
    rows,
    row_mask,
    s,
    sg,
    s_d,
    sg_d,
    D,
    beta1,
    beta2,
    one_minus_beta1,
    one_minus_beta2,
    eps,
    decay,
    step_size,
    inv_sqrt_bias2,
    j: tl.constexpr,
    BLOCK_D: tl.constexpr,
    LAYOUT: tl.constexpr,
    AMSGRAD: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    FAST_SQRT: tl.constexpr,
):
    """Columns ``[j·BLOCK_D, (j+1)·BLOCK_D)``: m, v (and v̂max) updated and stored, x' returned."""
    ds = j * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = row_mask[:, None] & (ds < D)[None, :]
    offs = _tile_offsets(rows, ds, s, s_d, LAYOUT)
    x, m, v, vmax = _updated_tile(
        p_ptr,
        g_ptr,
        m_ptr,
        v_ptr,
        vmax_ptr,
        offs,
        _tile_offsets(rows, ds, sg, sg_d, LAYOUT),
        mask,
        beta1,
        beta2,
        one_minus_beta1,
        one_minus_beta2,
        eps,
        decay,
        step_size,
        inv_sqrt_bias2,
        AMSGRAD,
        MAXIMIZE,
        FAST_SQRT,
    )
    ty = p_ptr.dtype.element_ty
    tl.store(m_ptr + offs, m.to(ty), mask=mask)
    tl.store(v_ptr + offs, v.to(ty), mask=mask)
    if AMSGRAD:
        tl.store(vmax_ptr + offs, vmax.to(ty), mask=mask)
    return x


@triton.jit
def _fma_store(
    p_ptr,
    x,
    rows,
    row_mask,
    s,
    s_d,
    D,
    j: tl.constexpr,
    BLOCK_D: tl.constexpr,
    LAYOUT: tl.constexpr,
):
    ds = j * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = row_mask[:, None] & (ds < D)[None, :]
    tl.store(
        p_ptr + _tile_offsets(rows, ds, s, s_d, LAYOUT), x.to(p_ptr.dtype.element_ty), mask=mask
    )


@triton.jit
def _projected_adamw_kernel(
    table_ptr,
    n_tensors,
    u_ptr,
    w_ptr,
    p0_ptr,
    c0_ptr,
    D,
    K,
    lr,
    beta1,
    beta2,
    one_minus_beta1,
    one_minus_beta2,
    log_beta1,
    log_beta2,
    eps,
    weight_decay,
    HAS_W: tl.constexpr,
    AMSGRAD: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    FAST_SQRT: tl.constexpr,
    LAYOUT: tl.constexpr,
    ALIGN: tl.constexpr,
    RESIDENT: tl.constexpr,
    FMA_CHUNKS: tl.constexpr,
    KSPLIT: tl.constexpr,
    RELOAD: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
    META: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    blk = table_ptr + n_tensors * META + pid * 2
    t = tl.load(blk)
    r0 = tl.multiple_of(tl.load(blk + 1), BLOCK_R)  # the host's block table: r0 = i·BLOCK_R
    meta = table_ptr + t * META
    p_off = tl.load(meta)
    g_off = tl.load(meta + 1)
    m_off = tl.load(meta + 2)
    v_off = tl.load(meta + 3)
    vmax_off = tl.load(meta + 4)
    c_off = tl.load(meta + 5)
    step_off = tl.load(meta + 6)
    n_rows = tl.load(meta + 7)
    s = tl.load(meta + 8)
    sg = tl.load(meta + 9)
    s_d = tl.load(meta + 10)
    sg_d = tl.load(meta + 11)
    if ALIGN > 1:  # checked on the host: 16-byte aligned offsets and strides
        p_off = tl.multiple_of(p_off, ALIGN)
        g_off = tl.multiple_of(g_off, ALIGN)
        m_off = tl.multiple_of(m_off, ALIGN)
        v_off = tl.multiple_of(v_off, ALIGN)
        vmax_off = tl.multiple_of(vmax_off, ALIGN)
        s = tl.multiple_of(s, ALIGN)
        sg = tl.multiple_of(sg, ALIGN)
        if LAYOUT == 1:  # the row mask is then constant over ALIGN rows
            n_rows = tl.multiple_of(n_rows, ALIGN)
    p_ptr = p0_ptr + p_off
    g_ptr = p0_ptr + g_off
    m_ptr = p0_ptr + m_off
    v_ptr = p0_ptr + v_off
    vmax_ptr = p0_ptr + vmax_off
    c_ptr = c0_ptr + c_off
    ty = p0_ptr.dtype.element_ty
    step_size, inv_sqrt_bias2, decay = _bias_terms(
        c0_ptr + step_off, lr, log_beta1, log_beta2, weight_decay
    )

    rows = r0 + tl.arange(0, BLOCK_R).to(tl.int64)
    row_mask = rows < n_rows
    # k in KSPLIT parts of BLOCK_K columns: each part is its own accumulator and its
    # own pass-2 A operand, so a warp holds BLOCK_R × BLOCK_K coefficients (split
    # hi/lo by 3xTF32) at a time, not BLOCK_R × k.
    ks = tl.arange(0, BLOCK_K)
    ks2 = BLOCK_K + ks

    if FMA_CHUNKS > 0:
        # The row block's update x' in registers as FMA_CHUNKS (at most 4) tiles of BLOCK_D
        # columns (m, v stored as they are formed), the basis applied one column at a time.
        x0 = _fma_chunk(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, rows, row_mask, s, sg, s_d, sg_d,
                        D, beta1, beta2, one_minus_beta1, one_minus_beta2, eps, decay, step_size,
                        inv_sqrt_bias2, 0, BLOCK_D, LAYOUT, AMSGRAD, MAXIMIZE,
                        FAST_SQRT)  # fmt: skip
        x1 = x0
        x2 = x0
        x3 = x0
        if FMA_CHUNKS > 1:
            x1 = _fma_chunk(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, rows, row_mask, s, sg, s_d,
                            sg_d, D, beta1, beta2, one_minus_beta1, one_minus_beta2, eps, decay,
                            step_size, inv_sqrt_bias2, 1, BLOCK_D, LAYOUT, AMSGRAD,
                            MAXIMIZE, FAST_SQRT)  # fmt: skip
        if FMA_CHUNKS > 2:
            x2 = _fma_chunk(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, rows, row_mask, s, sg, s_d,
                            sg_d, D, beta1, beta2, one_minus_beta1, one_minus_beta2, eps, decay,
                            step_size, inv_sqrt_bias2, 2, BLOCK_D, LAYOUT, AMSGRAD,
                            MAXIMIZE, FAST_SQRT)  # fmt: skip
        if FMA_CHUNKS > 3:
            x3 = _fma_chunk(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, rows, row_mask, s, sg, s_d,
                            sg_d, D, beta1, beta2, one_minus_beta1, one_minus_beta2, eps, decay,
                            step_size, inv_sqrt_bias2, 3, BLOCK_D, LAYOUT, AMSGRAD,
                            MAXIMIZE, FAST_SQRT)  # fmt: skip
        # the block's anchors and the weights, read once (BLOCK_K >= K columns)
        kt, c_tile, c_mask, c_all, w_all = _anchor_tile(
            c_ptr, w_ptr, rows * K, row_mask, K, BLOCK_K, True, HAS_W
        )
        # basis columns through Triton's pipeliner, as project.py's resident kernel
        for kk in tl.range(0, K, num_stages=RESIDENT_STAGES):
            u0, u1, u2, u3 = _basis_columns(u_ptr, kk, D, K, BLOCK_D, FMA_CHUNKS)
            a = _row_dots(x0, x1, x2, x3, u0, u1, u2, u3, FMA_CHUNKS)
            a, c_all = _column_coef(a, kk, kt, c_all, w_all, True, HAS_W)
            x0, x1, x2, x3 = _rank1_update(x0, x1, x2, x3, a, u0, u1, u2, u3, FMA_CHUNKS)
        _store_anchor_tile(c_ptr, c_tile, c_mask, c_all, True, HAS_W)
        _fma_store(p_ptr, x0, rows, row_mask, s, s_d, D, 0, BLOCK_D, LAYOUT)
        if FMA_CHUNKS > 1:
            _fma_store(p_ptr, x1, rows, row_mask, s, s_d, D, 1, BLOCK_D, LAYOUT)
        if FMA_CHUNKS > 2:
            _fma_store(p_ptr, x2, rows, row_mask, s, s_d, D, 2, BLOCK_D, LAYOUT)
        if FMA_CHUNKS > 3:
            _fma_store(p_ptr, x3, rows, row_mask, s, s_d, D, 3, BLOCK_D, LAYOUT)
    elif RESIDENT:
        # The whole row block in one tile: x' stays in registers between the GEMMs.
        ds = tl.arange(0, BLOCK_D)
        d_mask = ds < D
        mask = row_mask[:, None] & d_mask[None, :]
        offs = _tile_offsets(rows, ds, s, s_d, LAYOUT)
        x, m, v, vmax = _updated_tile(
            p_ptr,
            g_ptr,
            m_ptr,
            v_ptr,
            vmax_ptr,
            offs,
            _tile_offsets(rows, ds, sg, sg_d, LAYOUT),
            mask,
            beta1,
            beta2,
            one_minus_beta1,
            one_minus_beta2,
            eps,
            decay,
            step_size,
            inv_sqrt_bias2,
            AMSGRAD,
            MAXIMIZE,
            FAST_SQRT,
        )
        u = _basis_tile(u_ptr, ds, ks, D, K)
        coef = _coef_minus_anchor(_dot(x, u, PRECISION), c_ptr, w_ptr, rows, row_mask, ks, K, HAS_W)
        if KSPLIT == 2:
            u2 = _basis_tile(u_ptr, ds, ks2, D, K)
            coef2 = _dot(x, u2, PRECISION)
            coef2 = _coef_minus_anchor(coef2, c_ptr, w_ptr, rows, row_mask, ks2, K, HAS_W)
            x = x - _dot(coef2, tl.trans(u2), PRECISION)
        x = x - _dot(coef, tl.trans(u), PRECISION)
        _store_moments(p_ptr, m_ptr, v_ptr, vmax_ptr, offs, mask, x, m, v, vmax, AMSGRAD)
    else:
        # Pass 1: a = x' U over D in chunks (x' = the AdamW-updated rows). RELOAD (fp32):
        # m, v take their final values and x' is stored into p as it is, for pass 2 to
        # read back alone. 16-bit p would store x' rounded, and projecting the rounded
        # rows leaves the rounding's error where the projection cancels most of a row
        # (a relative 1.8 at an element, test_adamw): there pass 2 recomputes x'.
        coef = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
        coef2 = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)  # KSPLIT == 2 only
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            d_mask = ds < D
            mask = row_mask[:, None] & d_mask[None, :]
            offs = _tile_offsets(rows, ds, s, s_d, LAYOUT)
            x, m, v, vmax = _updated_tile(
                p_ptr,
                g_ptr,
                m_ptr,
                v_ptr,
                vmax_ptr,
                offs,
                _tile_offsets(rows, ds, sg, sg_d, LAYOUT),
                mask,
                beta1,
                beta2,
                one_minus_beta1,
                one_minus_beta2,
                eps,
                decay,
                step_size,
                inv_sqrt_bias2,
                AMSGRAD,
                MAXIMIZE,
                FAST_SQRT,
            )
            if RELOAD:
                _store_moments(p_ptr, m_ptr, v_ptr, vmax_ptr, offs, mask, x, m, v, vmax, AMSGRAD)
            coef += _dot(x, _basis_tile(u_ptr, ds, ks, D, K), PRECISION)
            if KSPLIT == 2:
                u2 = _basis_tile(u_ptr, ds, ks2, D, K)
                coef2 += _dot(x, u2, PRECISION)
        coef = _coef_minus_anchor(coef, c_ptr, w_ptr, rows, row_mask, ks, K, HAS_W)
        if KSPLIT == 2:
            coef2 = _coef_minus_anchor(coef2, c_ptr, w_ptr, rows, row_mask, ks2, K, HAS_W)
        if RELOAD:
            # pass 2 reads rows of p that other threads of this program stored in pass 1
            tl.debug_barrier()

        # Pass 2: x' read back from p (RELOAD: one stream, from L2 while the program's
        # BLOCK_R × D of it is there) or recomputed bit for bit from the same p, g, m, v
        # loads as pass 1; projected and stored.
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            d_mask = ds < D
            mask = row_mask[:, None] & d_mask[None, :]
            offs = _tile_offsets(rows, ds, s, s_d, LAYOUT)
            if RELOAD:
                x = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            else:
                x, m, v, vmax = _updated_tile(
                    p_ptr,
                    g_ptr,
                    m_ptr,
                    v_ptr,
                    vmax_ptr,
                    offs,
                    _tile_offsets(rows, ds, sg, sg_d, LAYOUT),
                    mask,
                    beta1,
                    beta2,
                    one_minus_beta1,
                    one_minus_beta2,
                    eps,
                    decay,
                    step_size,
                    inv_sqrt_bias2,
                    AMSGRAD,
                    MAXIMIZE,
                    FAST_SQRT,
                )
            u = _basis_tile(u_ptr, ds, ks, D, K)
            x = x - _dot(coef, tl.trans(u), PRECISION)
            if KSPLIT == 2:
                u2 = _basis_tile(u_ptr, ds, ks2, D, K)
                x = x - _dot(coef2, tl.trans(u2), PRECISION)
            if RELOAD:
                tl.store(p_ptr + offs, x.to(ty), mask=mask)
            else:
                _store_moments(p_ptr, m_ptr, v_ptr, vmax_ptr, offs, mask, x, m, v, vmax, AMSGRAD)


# ---------------------------------------------------------------- side="flat"


@triton.jit
def _adamw_flat_pointers(meta, p0_ptr, ALIGN: tl.constexpr):
    """p, g, m, v, v̂max of one flat tensor: base pointer + int64 element offsets."""
    p_off = tl.load(meta)
    g_off = tl.load(meta + 1)
    m_off = tl.load(meta + 2)
    v_off = tl.load(meta + 3)
    vmax_off = tl.load(meta + 4)
    if ALIGN > 1:  # checked on the host: 16-byte aligned
        p_off = tl.multiple_of(p_off, ALIGN)
        g_off = tl.multiple_of(g_off, ALIGN)
        m_off = tl.multiple_of(m_off, ALIGN)
        v_off = tl.multiple_of(v_off, ALIGN)
        vmax_off = tl.multiple_of(vmax_off, ALIGN)
    return p0_ptr + p_off, p0_ptr + g_off, p0_ptr + m_off, p0_ptr + v_off, p0_ptr + vmax_off


@triton.jit
def _adamw_flat_partial_kernel(
    table_ptr,
    u_ptr,
    partial_ptr,
    p0_ptr,
    c0_ptr,
    N,
    K,
    n_chunks,
    lr,
    beta1,
    beta2,
    one_minus_beta1,
    one_minus_beta2,
    log_beta1,
    log_beta2,
    eps,
    weight_decay,
    AMSGRAD: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    FAST_SQRT: tl.constexpr,
    UNIT: tl.constexpr,
    ALIGN: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    META: tl.constexpr,
):
    """Partial ``Σ x'ᵢ Uᵢ`` of one chunk (minus the anchor on chunk 0), in true fp32."""
    pid = tl.program_id(0).to(tl.int64)
    t = pid // n_chunks
    chunk = pid - t * n_chunks
    meta = table_ptr + t * META
    p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr = _adamw_flat_pointers(meta, p0_ptr, ALIGN)
    s = tl.load(meta + 8)
    sg = tl.load(meta + 9)
    step_size, inv_sqrt_bias2, decay = _bias_terms(
        c0_ptr + tl.load(meta + 6), lr, log_beta1, log_beta2, weight_decay
    )
    ks = tl.arange(0, BLOCK_K)
    k_mask = ks < K
    start = chunk * CHUNK
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, CHUNK, BLOCK_N):
        ns = start + n0 + tl.arange(0, BLOCK_N)
        n_mask = ns < N
        if UNIT:
            e_offs = ns
            g_offs = ns
        else:
            e_offs = ns * s
            g_offs = ns * sg
        x, _, _, _ = _updated_tile(
            p_ptr,
            g_ptr,
            m_ptr,
            v_ptr,
            vmax_ptr,
            e_offs,
            g_offs,
            n_mask,
            beta1,
            beta2,
            one_minus_beta1,
            one_minus_beta2,
            eps,
            decay,
            step_size,
            inv_sqrt_bias2,
            AMSGRAD,
            MAXIMIZE,
            FAST_SQRT,
        )
        u = tl.load(
            u_ptr + ns[:, None] * K + ks[None, :],
            mask=n_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        acc += x[:, None] * u
    part = tl.sum(acc, axis=0)
    if chunk == 0:  # the anchor enters once, so the sum over chunks is a − c
        part -= tl.load(c0_ptr + tl.load(meta + 5) + ks, mask=k_mask, other=0.0)
    tl.store(partial_ptr + pid * K + ks, part, mask=k_mask)


@triton.jit
def _adamw_flat_reduce_kernel(
    table_ptr,
    partial_ptr,
    coef_ptr,
    w_ptr,
    c0_ptr,
    K,
    n_chunks,
    HAS_W: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
    META: tl.constexpr,
):
    """Per tensor: ``a − c`` summed over its chunks in a fixed order; the soft anchor update."""
    t = tl.program_id(0).to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    k_mask = ks < K
    acc = tl.zeros((BLOCK_C, BLOCK_K), dtype=tl.float32)
    for j0 in range(0, n_chunks, BLOCK_C):
        js = j0 + tl.arange(0, BLOCK_C)
        acc += tl.load(
            partial_ptr + (t * n_chunks + js[:, None]) * K + ks[None, :],
            mask=(js < n_chunks)[:, None] & k_mask[None, :],
            other=0.0,
        )
    coef = tl.sum(acc, axis=0)
    if HAS_W:
        c_ptr = c0_ptr + tl.load(table_ptr + t * META + 5)
        w = tl.load(w_ptr + ks, mask=k_mask, other=0.0)
        c0 = tl.load(c_ptr + ks, mask=k_mask, other=0.0)
        tl.store(c_ptr + ks, c0 + (1.0 - w) * coef, mask=k_mask)
        coef = coef * w
    tl.store(coef_ptr + t * K + ks, coef, mask=k_mask)


@triton.jit
def _adamw_flat_apply_kernel(
    table_ptr,
    u_ptr,
    coef_ptr,
    p0_ptr,
    c0_ptr,
    N,
    K,
    n_chunks,
    lr,
    beta1,
    beta2,
    one_minus_beta1,
    one_minus_beta2,
    log_beta1,
    log_beta2,
    eps,
    weight_decay,
    AMSGRAD: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    FAST_SQRT: tl.constexpr,
    UNIT: tl.constexpr,
    ALIGN: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    META: tl.constexpr,
):
    """``x' − U (w ⊙ (a − c))`` over one chunk, with ``x'`` recomputed as in the partial pass."""
    pid = tl.program_id(0).to(tl.int64)
    t = pid // n_chunks
    chunk = pid - t * n_chunks
    meta = table_ptr + t * META
    p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr = _adamw_flat_pointers(meta, p0_ptr, ALIGN)
    s = tl.load(meta + 8)
    sg = tl.load(meta + 9)
    step_size, inv_sqrt_bias2, decay = _bias_terms(
        c0_ptr + tl.load(meta + 6), lr, log_beta1, log_beta2, weight_decay
    )
    ty = p0_ptr.dtype.element_ty
    ks = tl.arange(0, BLOCK_K)
    k_mask = ks < K
    coef = tl.load(coef_ptr + t * K + ks, mask=k_mask, other=0.0)
    start = chunk * CHUNK
    for n0 in range(0, CHUNK, BLOCK_N):
        ns = start + n0 + tl.arange(0, BLOCK_N)
        n_mask = ns < N
        if UNIT:
            e_offs = ns
            g_offs = ns
        else:
            e_offs = ns * s
            g_offs = ns * sg
        x, m, v, vmax = _updated_tile(
            p_ptr,
            g_ptr,
            m_ptr,
            v_ptr,
            vmax_ptr,
            e_offs,
            g_offs,
            n_mask,
            beta1,
            beta2,
            one_minus_beta1,
            one_minus_beta2,
            eps,
            decay,
            step_size,
            inv_sqrt_bias2,
            AMSGRAD,
            MAXIMIZE,
            FAST_SQRT,
        )
        u = tl.load(
            u_ptr + ns[:, None] * K + ks[None, :],
            mask=n_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        x = x - tl.sum(u * coef[None, :], axis=1)
        tl.store(p_ptr + e_offs, x.to(ty), mask=n_mask)
        tl.store(m_ptr + e_offs, m.to(ty), mask=n_mask)
        tl.store(v_ptr + e_offs, v.to(ty), mask=n_mask)
        if AMSGRAD:
            tl.store(vmax_ptr + e_offs, vmax.to(ty), mask=n_mask)


# ---------------------------------------------------------------- launcher


def _interpreting() -> bool:
    try:
        from triton import knobs

        return bool(knobs.runtime.interpret)
    except ImportError:  # triton < 3.4
        import os

        return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# (driver type, device) → compute capability, e.g. 80, 90.
_CAPABILITY: dict[tuple[str, int], int] = {}
# What the interpreter (no GPU) plans for: tiles must only be valid there.
_DEFAULT_CAPABILITY = 90


def _capability() -> int:
    """The compute capability Triton compiles for now (cached per driver and device)."""
    if _interpreting():
        return _DEFAULT_CAPABILITY
    drv = triton.runtime.driver.active
    key = (type(drv).__name__, int(drv.get_current_device()))
    cap = _CAPABILITY.get(key)
    if cap is None:
        target = drv.get_current_target()
        cap = _CAPABILITY[key] = int(target.arch) if isinstance(target.arch, int) else 0
    return cap


def _block_k(k: int, what: str) -> int:
    # tl.dot needs every dim ≥ 16. The whole of k is one tile (x' is recomputed per
    # pass, so chunking k as project.py does would recompute it per chunk);
    # 256 fp32 coefficients per row is the register cap.
    if k > _MAX_K:
        raise ValueError(
            f"{what}: the fused projected AdamW supports k ≤ {_MAX_K} basis columns, got {k}; "
            "use backend='reference' (AdamW + project_anchored_) for larger bases"
        )
    return max(16, triton.next_power_of_2(k))


@functools.lru_cache(maxsize=512)  # once per shape and arch, not per optimizer step
def _rows_config(
    layout: int,
    itemsize: int,
    block_k: int,
    d: int,
    cap: int,
    *,
    k: int,
    aligned: bool = True,
    amsgrad: bool = False,
    weighted: bool = False,
    few_rows: bool = False,
) -> Mapping[str, object]:
    """Tiles and warps of the row kernel: no spills, shared memory inside the arch's limit.
    ``few_rows``: the bucket has fewer than ``kernels.project.FEW_ROWS_PER_SM`` rows an SM
    (``project.few_rows``), so 64-row blocks would leave SMs idle.

    The tile's fast axis spans ≥ 128 bytes of the contiguous axis (``D`` for ROWS,
    the rows for COLS) where registers allow. The registers of the 3xTF32 dots
    (both operands split hi/lo) bound the tiles: the ``BLOCK_R × BLOCK_K``
    coefficients are pass 2's A operand, the ``BLOCK_D × BLOCK_K`` slice of ``U``
    pass 1's B operand, so both shrink as ``k`` grows. No software pipelining
    (``num_stages=1``): the loads of a chunk are independent and other resident
    warps hide their latency, while prefetched chunks would cost registers and
    shared memory. Shared memory (the dot operands) then stays ≤ 48 KB, inside
    both A100's 163 KB (``cap`` 80) and H100's 227 KB (``cap`` 90) per block, so
    those two get the same tiles; ``cap`` < 80 (no tf32 tensor cores) gets
    "ieee" dots.
    """
    ksplit = 2 if block_k > 128 else 1
    part = block_k // ksplit
    if ksplit == 2:  # two 128-wide coefficient tiles: 8 warps share the U slices
        # COLS sits at ptxas's 255-register edge (compile check, k = 129 and 256):
        # fp32 with 32-wide D chunks spilled 8-16 B on sm_90 without amsgrad (and, since
        # pass 1 stores p, m, v, 8 B with it on sm_80), and 16-bit 16-wide ones 16 B on
        # sm_80; each choice below compiled with none on sm_80 and sm_90
        block_r = 16
        block_d = 16 if layout == _COLS and itemsize == 4 else 32
    elif layout == _COLS:
        # 16 rows (one 32-byte sector of a 16-bit column; two of fp32) where 32 held twice
        # the pieces of the split dots a thread (docs/gpu.md #adamw-tiles, predicted at
        # D = 768, 32768 rows, A100 / H100, over torch's fused AdamW): k = 32 bf16 16 x 32
        # 1.59 / 1.65x (32 x 32: 3.62 / 4.12x, 218 / 205 registers), fp32 16 x 64 1.29 /
        # 1.29x (32 x 32: 1.51 / 1.36x); 16-bit k = 16 16 x 64 1.65 / 1.61x (32 x 16: 2.03 /
        # 1.71x), but 16 x 32 with amsgrad (16 x 64 spilled 4 B on sm_90) and for fp32 (on
        # unaligned views 16 x 64 spilled 8 B on sm_80; aligned ones take the FMA form)
        block_r = 16
        wide = itemsize == 4 if part == 32 else (itemsize == 2 and not amsgrad and part == 16)
        block_d = 64 if wide else 32
    else:
        block_r = 16
        # k = 33-64: 16 x 32 (bf16 2.84 / 3.18 -> 2.26 / 2.43x, fp32 1.36 / 1.43 -> 1.29x);
        # 16-bit k = 17-32 16 x 64 (1.64 / 1.62x; 16 x 128 took 212 registers: 3.08 / 3.12x)
        block_d = (64 if itemsize == 4 or part == 32 else 128) if part <= 32 else 32
    d_pad = max(16, triton.next_power_of_2(d))
    # 8 rows of 4 tiles of 256 (769 <= D <= 1024) spilled up to 380 B on sm_90: 4 rows of
    # 2 tiles of 512 instead (_fma_tiles)
    if layout == _ROWS:
        fma = _fma_tiles(d, itemsize, k, amsgrad)
    elif layout == _COLS and aligned:
        fma = _fma_cols_tiles(d, itemsize, k, cap, weighted, amsgrad)
    else:
        fma = None
    if fma is not None:  # x' in registers, the basis applied with FMAs (no dots)
        res, warps, maxnreg = fma
        return MappingProxyType(
            {
                "maxnreg": maxnreg,
                "BLOCK_R": res.block_r,
                "BLOCK_D": res.block_d,
                "RESIDENT": False,
                "FMA_CHUNKS": res.chunks,
                "KSPLIT": 1,
                "RELOAD": False,
                "BLOCK_K": block_k,
                "PRECISION": "ieee",
                "num_warps": warps,
                "num_stages": 1,
            }
        )
    warps = 8 if ksplit == 2 else 4
    if (
        cap >= 90
        and ksplit == 1
        and part == 128
        and (itemsize == 2 or not amsgrad)
        and layout in (_ROWS, _COLS)
        and not few_rows
    ):
        # k = 65-128 on sm_90: 64-row blocks (a warpgroup's M: wgmma) of 32 columns on 8
        # warps, each U slice serving 4x the rows; no spill (triton 3.9 / 3.6: 16-bit 218-248
        # registers, fp32 224-254). Predicted at D = 768, 32768 rows, over torch's fused
        # AdamW, k = 128, rows / views: bf16 6.69 / 6.18x -> 4.20 / 4.39x, fp32 1.90 / 2.07x
        # -> 1.72 / 1.84x. At 4096 rows (few: 64 programs on 132 SMs) bf16 was 8.3 / 9.1x, so
        # few rows keep 16 x 32 (docs/gpu.md #adamw-many-rows); so does fp32 with amsgrad,
        # which spilled 12-16 B on triton 3.6
        block_r, block_d, warps = 64, 32, 8
    resident = d_pad <= block_d
    config = {
        "BLOCK_R": block_r,
        "BLOCK_D": d_pad if resident else block_d,
        "RESIDENT": resident,
        "FMA_CHUNKS": 0,
        "KSPLIT": ksplit,
        # the two-pass form's pass 2 reads p alone back (fp32 stores x' exactly)
        "RELOAD": not resident and itemsize == 4,
        "BLOCK_K": part,
        # 3xTF32 needs tf32 tensor cores (sm_80+); older GPUs take true fp32 FMAs
        "PRECISION": _PRECISION if cap >= 80 else "ieee",
        "num_warps": warps,
        "num_stages": 1,
    }
    if layout == _COLS and itemsize == 4 and part == 64 and ksplit == 1 and not resident:
        # triton 3.6's ptxas (the GPU machines') took 96 registers for the soft-weight
        # kernel on sm_90 and spilled 12 B; capped at 128, 114-124 and no spill (3.6, 3.9)
        config["maxnreg"] = 128
    return MappingProxyType(config)


def _offset(t: torch.Tensor, base: int, itemsize: int, what: str) -> int:
    delta = t.data_ptr() - base
    if delta % itemsize:
        raise ValueError(f"{what}: address not a multiple of {itemsize} bytes from the bucket's")
    return delta // itemsize


def _aligned(values: list[int], itemsize: int) -> bool:
    return all(v * itemsize % 16 == 0 for v in values)


def _rows_table(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    max_exp_avg_sqs: list[torch.Tensor] | None,
    steps: list[torch.Tensor],
    anchors: list[torch.Tensor],
    block_r_of: Callable[[int, bool], int],
) -> tuple[torch.Tensor, int, int, int]:
    """``(table, n_blocks, layout, align)`` of a row bucket.

    Per tensor: int64 element offsets (p, g, m, v, v̂max from ``params[0]``; anchor
    and step from ``steps[0]``), rows and strides; then (tensor, first row) pairs,
    one per program of ``block_r_of(layout, align > 1)`` rows.
    """
    isz = params[0].element_size()
    # fp32 base: a step (never empty; an empty anchor, k = 0, may have no address)
    base, fbase = params[0].data_ptr(), steps[0].data_ptr()
    rows_ok = cols_ok = True
    meta, aligned = [], [base % 16 == 0]
    for i, p in enumerate(params):
        g, m, v = grads[i], exp_avgs[i], exp_avg_sqs[i]
        vmax = max_exp_avg_sqs[i] if max_exp_avg_sqs is not None else v
        if not (m.stride() == v.stride() == vmax.stride() == p.stride()):
            raise ValueError(
                f"params[{i}]: p, exp_avg, exp_avg_sq (and max_exp_avg_sq) must share strides, "
                f"got {p.stride()}, {m.stride()}, {v.stride()}, {vmax.stride()}"
            )
        if steps[i].dtype != torch.float32 or anchors[i].dtype != torch.float32:
            raise ValueError(
                f"params[{i}]: step and anchor must be float32, got {steps[i].dtype}, "
                f"{anchors[i].dtype}"
            )
        offs = [_offset(t, base, isz, f"params[{i}]") for t in (p, g, m, v, vmax)]
        meta.append(
            (
                *offs,
                _offset(anchors[i], fbase, 4, f"anchors[{i}]"),
                _offset(steps[i], fbase, 4, f"steps[{i}]"),
                p.shape[0],
                p.stride(0),
                p.stride(1),
                g.stride(0),
                g.stride(1),
            )
        )
        aligned.append(_aligned(offs, isz))
        rows_ok &= all(t.shape[1] <= 1 or t.stride(1) == 1 for t in (p, g))
        cols_ok &= all(t.shape[0] <= 1 or t.stride(0) == 1 for t in (p, g))
    layout = _ROWS if rows_ok else _COLS if cols_ok else _STRIDED
    # table columns 8-11: the non-unit stride of p and g, then (STRIDED) their column strides
    if layout == _ROWS:
        meta = [(*m[:8], m[8], m[10], 0, 0) for m in meta]
    elif layout == _COLS:
        meta = [(*m[:8], m[9], m[11], 0, 0) for m in meta]
    else:
        meta = [(*m[:8], m[8], m[10], m[9], m[11]) for m in meta]
    if layout == _ROWS:
        aligned += [_aligned([m[8], m[9]], isz) for m in meta]
    elif layout == _COLS:
        aligned += [_aligned([m[8], m[9], m[7]], isz) for m in meta]
    else:
        aligned.append(False)
    align = 16 // isz if all(aligned) else 1
    block_r = block_r_of(layout, align > 1)
    meta_t = tuple(meta)

    def build() -> list[int]:
        blocks = [
            v for t, m in enumerate(meta_t) for r0 in range(0, m[7], block_r) for v in (t, r0)
        ]
        return [v for m in meta_t for v in m] + blocks

    key = (params[0].device, "adamw", block_r, base, fbase, meta_t)
    table = cached_table(key, build)
    return table, (table.numel() - _META * len(params)) // 2, layout, align


def _flat_table(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    max_exp_avg_sqs: list[torch.Tensor] | None,
    steps: list[torch.Tensor],
    anchors: list[torch.Tensor],
) -> tuple[torch.Tensor, bool, int]:
    """``(table, unit, align)`` of a flat bucket: offsets as the row table, element strides."""
    isz = params[0].element_size()
    # fp32 base: a step (never empty; an empty anchor, k = 0, may have no address)
    base, fbase = params[0].data_ptr(), steps[0].data_ptr()
    meta, aligned = [], [base % 16 == 0]
    unit = True
    for i, p in enumerate(params):
        g, m, v = grads[i], exp_avgs[i], exp_avg_sqs[i]
        vmax = max_exp_avg_sqs[i] if max_exp_avg_sqs is not None else v
        if not (m.stride() == v.stride() == vmax.stride() == p.stride()):
            raise ValueError(
                f"params[{i}]: p, exp_avg, exp_avg_sq (and max_exp_avg_sq) must share strides, "
                f"got {p.stride()}, {m.stride()}, {v.stride()}, {vmax.stride()}"
            )
        if steps[i].dtype != torch.float32 or anchors[i].dtype != torch.float32:
            raise ValueError(
                f"params[{i}]: step and anchor must be float32, got {steps[i].dtype}, "
                f"{anchors[i].dtype}"
            )
        offs = [_offset(t, base, isz, f"params[{i}]") for t in (p, g, m, v, vmax)]
        s, sg = p.stride(0), g.stride(0)
        unit &= (s == 1 or p.numel() <= 1) and (sg == 1 or g.numel() <= 1)
        aligned.append(_aligned(offs, isz))
        meta.append(
            (
                *offs,
                _offset(anchors[i], fbase, 4, f"anchors[{i}]"),
                _offset(steps[i], fbase, 4, f"steps[{i}]"),
                p.numel(),
                s,
                sg,
                0,
                0,
            )
        )
    meta_t = tuple(meta)
    key = (params[0].device, "adamw-flat", base, fbase, meta_t)
    table = cached_table(key, lambda: [v for m in meta_t for v in m])
    return table, unit, 16 // isz if unit and all(aligned) else 1


class _Hyper(NamedTuple):
    """The kernels' scalar arguments after ``n_chunks`` / ``K``, in their order (``*hyper``)."""

    lr: float
    beta1: float
    beta2: float
    one_minus_beta1: float
    one_minus_beta2: float
    log_beta1: float
    log_beta2: float
    eps: float
    weight_decay: float


def _log_beta(beta: float) -> float:
    """ln β in fp64, for the kernels' bias corrections 1 − βᵗ = −expm1(t·ln β)
    (``_bias_terms``); −inf for β = 0 (βᵗ = 0 from t = 1)."""
    return math.log(beta) if beta > 0.0 else -math.inf


def projected_adamw_bucket_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    max_exp_avg_sqs: list[torch.Tensor] | None,
    steps: list[torch.Tensor],
    anchors: list[torch.Tensor],
    basis: torch.Tensor,
    weights: torch.Tensor | None,
    side: str,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    maximize: bool,
) -> None:
    """The ``"triton"`` backend's projected-AdamW bucket kernel (contract in ``gradproj.backends``).

    One launch per bucket (three for ``side="flat"``). ``lr`` is read as a Python
    float (a tensor ``lr`` is converted with ``float()``, which synchronizes).
    """
    d, k = basis.shape
    block_k = _block_k(k, "basis")
    amsgrad = max_exp_avg_sqs is not None
    hyper = _Hyper(
        float(lr),
        beta1,
        beta2,
        1.0 - beta1,  # in fp64 on the host: exact enough, unlike 1 − fp32(β) on the device
        1.0 - beta2,
        _log_beta(beta1),  # ln β for the bias corrections (_bias_terms)
        _log_beta(beta2),
        eps,
        weight_decay,
    )
    if side == "flat":
        views = [[t.view(-1) for t in ts] for ts in (params, grads, exp_avgs, exp_avg_sqs)]
        vmaxs = [t.view(-1) for t in max_exp_avg_sqs] if amsgrad else None
        _launch_flat(*views, vmaxs, steps, anchors, basis, weights, block_k, hyper, maximize)
        return
    cap = _capability()
    isz = params[0].element_size()
    few = few_rows(sum(p.shape[0] for p in params), _sm_count(params[0].device))

    def config(layout: int, aligned: bool) -> Mapping[str, object]:
        return _rows_config(
            layout, isz, block_k, d, cap, k=k, aligned=aligned, amsgrad=amsgrad,
            weighted=weights is not None, few_rows=few,
        )  # fmt: skip

    table, n_blocks, layout, align = _rows_table(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        max_exp_avg_sqs,
        steps,
        anchors,
        lambda lay, al: config(lay, al)["BLOCK_R"],
    )
    tiles = config(layout, align > 1)
    _projected_adamw_kernel[(n_blocks,)](
        table,
        len(params),
        basis,
        weights if weights is not None else basis,
        params[0],
        steps[0],
        d,
        k,
        *hyper,
        HAS_W=weights is not None,
        AMSGRAD=amsgrad,
        MAXIMIZE=maximize,
        FAST_SQRT=_fast_sqrt(eps, amsgrad, tiles),
        LAYOUT=layout,
        ALIGN=align,
        META=_META,
        **tiles,
    )


# The smallest eps that takes the SFU's square root. sqrt.approx.ftz.f32 (1 ulp, from
# compute capability 5.2) flushes a subnormal v̂ (|g| below 1e-19 at every step) to 0, which
# moves the denominator √v̂ / √(1 − β₂ᵗ) + eps by at most 1.1e-19 · 316 (β₂ ≤ 0.99999):
# 3.5e-7 of it where eps ≥ 1e-10, below the update's own rounding; a smaller eps (0 makes
# such a v̂ a division by zero) keeps sqrt_rn. sqrt_rn's Newton steps and special cases were
# a fifth of the kernel's instructions at k ≤ 8 (benchmarks/perf_model.py; docs/gpu.md
# #fast-update).
FAST_SQRT_MIN_EPS = 1e-10


def _fast_sqrt(eps: float, amsgrad: bool, config: Mapping[str, object] | None) -> bool:
    """Whether a launch takes the SFU's square root (``FAST_SQRT``): eps ≥ FAST_SQRT_MIN_EPS,
    except where the compile check found it costlier. ``config``: the rows kernel's
    (_rows_config), None for the flat kernels, whose two passes must agree (pass 2 forms
    the x' pass 1 projected)."""
    if eps < FAST_SQRT_MIN_EPS:
        return False
    if config is None:
        # amsgrad: the 16-bit partial kernel spilled 4 B at 72 registers (triton 3.6, sm_80)
        return not amsgrad
    if amsgrad and config["FMA_CHUNKS"] and config["BLOCK_D"] >= 1024:
        # fp32 rows of 2 x 1024 with soft weights spilled 8-12 B at 255 registers (sm_90)
        return False
    # (16-bit transposed views at k = 32 kept sqrt_rn on sm_90 while their tiles were 32 x
    # 32: 211 registers against 168; their 16 x 32 tiles take 80, docs/gpu.md #adamw-tiles)
    return True


def _flat_block_n(block_k: int) -> int:
    # acc and the U tile are BLOCK_N × BLOCK_K fp32: 4096 values = 32 a thread at 4 warps
    # (k = 256: 2048, as 4096 spilled on sm_90)
    return min(1024, (4096 if block_k < 256 else 2048) // block_k)


def _launch_flat(
    params, grads, exp_avgs, exp_avg_sqs, vmaxs, steps, anchors, basis, weights, block_k, hyper,
    maximize,
) -> None:  # fmt: skip
    n, k = basis.shape
    table, unit, align = _flat_table(params, grads, exp_avgs, exp_avg_sqs, vmaxs, steps, anchors)
    n_chunks = triton.cdiv(n, _FLAT_CHUNK)
    n_tensors = len(params)
    dev = basis.device
    partial = torch.empty(n_tensors * n_chunks, k, dtype=torch.float32, device=dev)
    coef = torch.empty(n_tensors, k, dtype=torch.float32, device=dev)
    common = {
        "AMSGRAD": vmaxs is not None,
        "MAXIMIZE": maximize,
        "FAST_SQRT": _fast_sqrt(hyper.eps, vmaxs is not None, None),
        "UNIT": unit,
        "ALIGN": align,
        "CHUNK": _FLAT_CHUNK,
        "BLOCK_N": _flat_block_n(block_k),
        "BLOCK_K": block_k,
        "META": _META,
    }
    grid = (n_tensors * n_chunks,)
    # fp32 partials with amsgrad at BLOCK_K = 256: triton 3.6's ptxas (the GPU machines') took
    # 56 registers on sm_90 at k = 129 and spilled 16 B; capped at 64 they take 64, no spill
    # (3.6 and 3.9, sm_80 and sm_90; the cap spills 8-600 B at smaller BLOCK_K)
    fp32_ams = vmaxs is not None and params[0].element_size() == 4
    cap = {"maxnreg": 64} if fp32_ams and block_k >= 256 else {}
    _adamw_flat_partial_kernel[grid](
        table, basis, partial, params[0], steps[0], n, k, n_chunks, *hyper, **common, **cap
    )
    _adamw_flat_reduce_kernel[(n_tensors,)](
        table,
        partial,
        coef,
        weights if weights is not None else basis,
        steps[0],
        k,
        n_chunks,
        HAS_W=weights is not None,
        BLOCK_C=max(1, 2048 // block_k),
        BLOCK_K=block_k,
        META=_META,
    )
    _adamw_flat_apply_kernel[grid](
        table, basis, coef, params[0], steps[0], n, k, n_chunks, *hyper, **common
    )
