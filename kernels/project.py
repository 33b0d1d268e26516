"""Fused Triton kernels for the bucketed projection ``x ← x − U (w ⊙ (Uᵀx − c))``.

One launch projects every gradient of a bucket (all tensors sharing one basis,
dtype and device), whatever their shapes: a small device table holds each
tensor's address, row count and strides, and a block table maps each program to
(tensor, first row) — the grouped-GEMM / multi-tensor-apply pattern. No gradient
is concatenated or copied; each element is read from HBM once and written once
(the second read of a row block in the apply pass hits cache: a block is
``BLOCK_R × D`` elements, 96 KB at D = 768 in fp32).

Row kernel (sides ``input``/``output``; ``output`` arrives as transposed views)::

    for each block of BLOCK_R rows X (R × D) and each chunk of BLOCK_K basis columns:
        A = X U_k                       (pass 1, fp32 accumulation, tl.dot)
        A = (A − C_k) ⊙ w_k             (anchored / soft variants)
        X = X − A U_kᵀ                  (pass 2, stored in the grad's dtype)

Chunks of ``k`` are applied one after another; that equals the one-shot formula
because ``U_jᵀ (X − A U_kᵀ) = U_jᵀ X`` for orthonormal ``U`` (``U_jᵀ U_k = 0``).

Flat kernel (side ``flat``, one long vector per tensor): a split reduction —
partial ``Uᵀx`` per chunk of the vector, summed in a fixed order (deterministic,
no atomics), then an apply pass.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gradproj.kernels.device_table import cached_table

# Pass-1/pass-2 dot products run in true fp32 ("ieee"): tf32 would cost ~3
# significant digits and the projection must leave (G U) at rounding level.
_PRECISION = "ieee"

# Columns of the per-tensor metadata table: address, rows, row stride, column
# stride, anchor address (0 when there is none).
_META = 5


@triton.jit
def _project_rows_kernel(
    table_ptr,
    n_tensors,
    u_ptr,
    w_ptr,
    g0_ptr,
    D,
    K,
    HAS_W: tl.constexpr,
    HAS_ANCHOR: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    blk = table_ptr + n_tensors * 5 + pid * 2
    t = tl.load(blk)
    r0 = tl.load(blk + 1)
    meta = table_ptr + t * 5
    # g0_ptr only carries the element type: every tensor of the bucket shares it.
    g_ptr = tl.load(meta).to(tl.pointer_type(g0_ptr.dtype.element_ty))
    n_rows = tl.load(meta + 1)
    s_r = tl.load(meta + 2)
    s_d = tl.load(meta + 3)
    c_ptr = tl.load(meta + 4).to(tl.pointer_type(tl.float32))

    rows = r0 + tl.arange(0, BLOCK_R)
    row_mask = rows < n_rows
    row_off = rows * s_r
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        coef = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            d_mask = ds < D
            x = tl.load(
                g_ptr + row_off[:, None] + ds[None, :] * s_d,
                mask=row_mask[:, None] & d_mask[None, :],
                other=0.0,
            ).to(tl.float32)
            u = tl.load(
                u_ptr + ds[:, None] * K + ks[None, :],
                mask=d_mask[:, None] & k_mask[None, :],
                other=0.0,
            )
            coef += tl.dot(x, u, input_precision=PRECISION)
        c_offs = rows[:, None] * K + ks[None, :]
        c_mask = row_mask[:, None] & k_mask[None, :]
        if HAS_ANCHOR:
            c0 = tl.load(c_ptr + c_offs, mask=c_mask, other=0.0)
            coef = coef - c0
        if HAS_W:
            w = tl.load(w_ptr + ks, mask=k_mask, other=0.0)
            if HAS_ANCHOR:
                tl.store(c_ptr + c_offs, c0 + (1.0 - w[None, :]) * coef, mask=c_mask)
            coef = coef * w[None, :]
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            d_mask = ds < D
            offs = row_off[:, None] + ds[None, :] * s_d
            mask = row_mask[:, None] & d_mask[None, :]
            x = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            u = tl.load(
                u_ptr + ds[:, None] * K + ks[None, :],
                mask=d_mask[:, None] & k_mask[None, :],
                other=0.0,
            )
            x = x - tl.dot(coef, tl.trans(u), input_precision=PRECISION)
            tl.store(g_ptr + offs, x.to(g0_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _flat_coef_kernel(
    addr_ptr,
    u_ptr,
    partial_ptr,
    g0_ptr,
    D,
    K,
    n_chunks,
    CHUNK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    chunk = tl.program_id(0)
    t = tl.program_id(1)
    x_ptr = tl.load(addr_ptr + t).to(tl.pointer_type(g0_ptr.dtype.element_ty))
    start = chunk.to(tl.int64) * CHUNK
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        acc = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for n0 in range(0, CHUNK, BLOCK_N):
            ns = start + n0 + tl.arange(0, BLOCK_N)
            n_mask = ns < D
            x = tl.load(x_ptr + ns, mask=n_mask, other=0.0).to(tl.float32)
            u = tl.load(
                u_ptr + ns[:, None] * K + ks[None, :],
                mask=n_mask[:, None] & k_mask[None, :],
                other=0.0,
            )
            acc += tl.sum(x[:, None] * u, axis=0)
        tl.store(partial_ptr + (t * n_chunks + chunk) * K + ks, acc, mask=k_mask)


@triton.jit
def _flat_apply_kernel(
    addr_ptr,
    u_ptr,
    coef_ptr,
    g0_ptr,
    D,
    K,
    CHUNK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    chunk = tl.program_id(0)
    t = tl.program_id(1)
    x_ptr = tl.load(addr_ptr + t).to(tl.pointer_type(g0_ptr.dtype.element_ty))
    start = chunk.to(tl.int64) * CHUNK
    for n0 in range(0, CHUNK, BLOCK_N):
        ns = start + n0 + tl.arange(0, BLOCK_N)
        n_mask = ns < D
        x = tl.load(x_ptr + ns, mask=n_mask, other=0.0).to(tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_mask = ks < K
            u = tl.load(
                u_ptr + ns[:, None] * K + ks[None, :],
                mask=n_mask[:, None] & k_mask[None, :],
                other=0.0,
            )
            c = tl.load(coef_ptr + t * K + ks, mask=k_mask, other=0.0)
            x -= tl.sum(u * c[None, :], axis=1)
        tl.store(x_ptr + ns, x.to(g0_ptr.dtype.element_ty), mask=n_mask)


# ---------------------------------------------------------------- launchers


def _block_k(k: int) -> int:
    # tl.dot needs every dim >= 16. Beyond 128 columns the coefficient tile
    # (BLOCK_R × BLOCK_K fp32) would crowd registers, so k is chunked; each extra
    # chunk stores the rows once more in the grad's dtype (one more rounding for
    # bf16/fp16), so the cap is as high as registers allow.
    return max(16, min(128, triton.next_power_of_2(k)))


_BLOCK_R = 32
_BLOCK_D = 64
_FLAT_BLOCK_N = 256
_FLAT_CHUNK = 8192


def _row_table(
    matrices: list[torch.Tensor], anchors: list[torch.Tensor] | None, block_r: int
) -> tuple[torch.Tensor, int]:
    """``(table, n_blocks)``: per-tensor metadata, then a (tensor, first row) pair per program."""
    meta = tuple(
        (
            m.data_ptr(),
            m.shape[0],
            m.stride(0),
            m.stride(1),
            anchors[i].data_ptr() if anchors is not None else 0,
        )
        for i, m in enumerate(matrices)
    )

    def build() -> list[int]:
        blocks = [v for t, m in enumerate(meta) for r0 in range(0, m[1], block_r) for v in (t, r0)]
        return [v for m in meta for v in m] + blocks

    table = cached_table((matrices[0].device, "rows", block_r, meta), build)
    return table, (table.numel() - _META * len(matrices)) // 2


def _launch_rows(
    matrices: list[torch.Tensor],
    anchors: list[torch.Tensor] | None,
    basis: torch.Tensor,
    weights: torch.Tensor | None,
) -> None:
    d, k = basis.shape
    table, n_blocks = _row_table(matrices, anchors, _BLOCK_R)
    _project_rows_kernel[(n_blocks,)](
        table,
        len(matrices),
        basis,
        weights if weights is not None else basis,
        matrices[0],
        d,
        k,
        HAS_W=weights is not None,
        HAS_ANCHOR=anchors is not None,
        BLOCK_R=_BLOCK_R,
        BLOCK_D=_BLOCK_D,
        BLOCK_K=_block_k(k),
        PRECISION=_PRECISION,
    )


def _launch_flat(
    vectors: list[torch.Tensor],
    anchors: list[torch.Tensor] | None,
    basis: torch.Tensor,
    weights: torch.Tensor | None,
) -> None:
    d, k = basis.shape
    n_chunks = triton.cdiv(d, _FLAT_CHUNK)
    ptrs = tuple(v.data_ptr() for v in vectors)
    addr = cached_table((basis.device, "flat", ptrs), lambda: list(ptrs))
    block_k = _block_k(k)
    partial = torch.empty(len(vectors), n_chunks, k, dtype=torch.float32, device=basis.device)
    grid = (n_chunks, len(vectors))
    common = {"CHUNK": _FLAT_CHUNK, "BLOCK_N": _FLAT_BLOCK_N, "BLOCK_K": block_k}
    _flat_coef_kernel[grid](addr, basis, partial, vectors[0], d, k, n_chunks, **common)
    coef = partial.sum(dim=1)  # fixed-order reduction over chunks: deterministic
    if anchors is not None:
        c0 = torch.cat(anchors, dim=0)  # (T × k): T small tensors, one row each
        coef = coef - c0
        if weights is not None:
            torch._foreach_copy_(anchors, list((c0 + (1.0 - weights) * coef).split(1)))
    if weights is not None:
        coef = coef * weights
    _flat_apply_kernel[grid](addr, basis, coef.contiguous(), vectors[0], d, k, **common)


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
