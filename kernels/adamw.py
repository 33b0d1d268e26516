"""Fused projected AdamW: one launch per bucket reads p, g, m, v once and writes p, m, v.

Per parameter row ``x`` (row views as in ``kernels/project.py``: rows of ``W`` for
``side="input"``, transposed views for ``"output"``), with anchor row ``c`` and
``t`` the step count loaded from the device (no host sync)::

    g ← −g if maximize
    m ← β₁ m + (1 − β₁) g          v ← β₂ v + (1 − β₂) g²       (v̂ = max(v̂, v) if amsgrad)
    x' ← x (1 − lr·λ) − lr/(1 − β₁ᵗ) · m / (√v̂ / √(1 − β₂ᵗ) + ε)
    a = Uᵀ x'                       (pass 1 over the row block, fp32, tl.dot "ieee")
    x ← x' − U (w ⊙ (a − c))        (pass 2: recompute x', m, v from the same loads,
                                      then store x, m, v)
    c ← c + (1 − w) ⊙ (a − c)       (soft weights only)

Pass 2 recomputes the AdamW update instead of keeping it: a row block of
``BLOCK_R × D`` fp32 values does not fit in registers for ``D`` in the thousands,
and writing it out would add a full extra round trip to HBM. When pass 2's reads
hit L2, the HBM traffic is exactly that of a fused AdamW (p, g, m, v read; p, m,
v written) plus the small basis and anchors. A program's block is
``BLOCK_R × D × 4`` values (16 × 768 × 4 fp32 = 196 KB), so whether the resident
blocks of a whole GPU fit in L2 (50 MB on H100) depends on ``D``; not yet
measured on a GPU (the goal is ≤ 1.10× ``torch.optim.AdamW(fused=True)``).

``side="flat"`` tensors arrive as one row of ``numel`` elements: correct, but one
program walks the whole tensor, so a large flat-protected tensor is slow here.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gradproj.kernels.device_table import cached_table

# True fp32 dot products: tf32 would leave (x U − c) at ~1e-3 relative, far
# above the rounding level the anchored projection promises.
_PRECISION = "ieee"

# Columns of the per-tensor table: p, g, m, v, v̂max, anchor, step addresses,
# rows, p/m/v row stride, p/m/v column stride, g row stride, g column stride.
_META = 12
_BLOCK_R = 16
_BLOCK_D = 64


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
    # sqrt_rn: IEEE-rounded, as torch's AdamW (tl.sqrt is the approximate one on GPU).
    p = p * decay - step_size * m / (tl.sqrt_rn(v_hat) * inv_sqrt_bias2 + eps)
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
):
    """Load one tile of p, g, m, v (and v̂max) and return its AdamW update in fp32.

    Both passes of the kernel call this with the same arguments, so pass 2
    recomputes exactly the values pass 1 projected.
    """
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + g_offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
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
    )


@triton.jit
def _projected_adamw_kernel(
    table_ptr,
    n_tensors,
    u_ptr,
    w_ptr,
    p0_ptr,
    D,
    K,
    lr,
    beta1,
    beta2,
    one_minus_beta1,
    one_minus_beta2,
    eps,
    weight_decay,
    HAS_W: tl.constexpr,
    AMSGRAD: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
    META: tl.constexpr,
):
    pid = tl.program_id(0)
    blk = table_ptr + n_tensors * META + pid * 2
    t = tl.load(blk)
    r0 = tl.load(blk + 1)
    meta = table_ptr + t * META
    # p0_ptr only carries the element type, shared by p, g, m, v of the bucket.
    ty = p0_ptr.dtype.element_ty
    p_ptr = tl.load(meta).to(tl.pointer_type(ty))
    g_ptr = tl.load(meta + 1).to(tl.pointer_type(ty))
    m_ptr = tl.load(meta + 2).to(tl.pointer_type(ty))
    v_ptr = tl.load(meta + 3).to(tl.pointer_type(ty))
    vmax_ptr = tl.load(meta + 4).to(tl.pointer_type(ty))
    c_ptr = tl.load(meta + 5).to(tl.pointer_type(tl.float32))
    step_ptr = tl.load(meta + 6).to(tl.pointer_type(tl.float32))
    n_rows = tl.load(meta + 7)
    s_r = tl.load(meta + 8)
    s_d = tl.load(meta + 9)
    sg_r = tl.load(meta + 10)
    sg_d = tl.load(meta + 11)

    # Bias corrections from the step count on the device, in fp64: 1 − β₂ᵗ is
    # 1e-3 at t = 1, and forming it from an fp32 β₂ᵗ would cost 3 of fp32's 7
    # digits. β**t = exp(t·log(1 − (1 − β))) from the argument 1 − β, which fp32
    # holds to 7 significant digits (an fp32 β holds 1 − β to about 4).
    step = tl.load(step_ptr).to(tl.float64)
    bias1 = 1.0 - tl.exp(step * tl.log(1.0 - tl.cast(one_minus_beta1, tl.float64)))
    bias2 = 1.0 - tl.exp(step * tl.log(1.0 - tl.cast(one_minus_beta2, tl.float64)))
    step_size = (lr / bias1).to(tl.float32)
    inv_sqrt_bias2 = (1.0 / tl.sqrt(bias2)).to(tl.float32)
    decay = 1.0 - lr * weight_decay

    rows = r0 + tl.arange(0, BLOCK_R)
    row_mask = rows < n_rows
    ks = tl.arange(0, BLOCK_K)
    k_mask = ks < K

    # Pass 1: a = Uᵀ x' for every row of the block (x' = the AdamW-updated row).
    coef = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_mask = ds < D
        mask = row_mask[:, None] & d_mask[None, :]
        offs = rows[:, None] * s_r + ds[None, :] * s_d
        p, m, v, vmax = _updated_tile(
            p_ptr,
            g_ptr,
            m_ptr,
            v_ptr,
            vmax_ptr,
            offs,
            rows[:, None] * sg_r + ds[None, :] * sg_d,
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
        )
        p = tl.where(mask, p, 0.0)  # masked lanes: 0·decay − 0/(0+ε) is 0, but be explicit
        u = tl.load(
            u_ptr + ds[:, None] * K + ks[None, :],
            mask=d_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        coef += tl.dot(p, u, input_precision=PRECISION)

    c_offs = rows[:, None] * K + ks[None, :]
    c_mask = row_mask[:, None] & k_mask[None, :]
    c0 = tl.load(c_ptr + c_offs, mask=c_mask, other=0.0)
    coef = coef - c0
    if HAS_W:
        w = tl.load(w_ptr + ks, mask=k_mask, other=0.0)
        tl.store(c_ptr + c_offs, c0 + (1.0 - w[None, :]) * coef, mask=c_mask)
        coef = coef * w[None, :]

    # Pass 2: the same update again (_updated_tile, same loads), projected, stored.
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_mask = ds < D
        mask = row_mask[:, None] & d_mask[None, :]
        offs = rows[:, None] * s_r + ds[None, :] * s_d
        p, m, v, vmax = _updated_tile(
            p_ptr,
            g_ptr,
            m_ptr,
            v_ptr,
            vmax_ptr,
            offs,
            rows[:, None] * sg_r + ds[None, :] * sg_d,
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
        )
        u = tl.load(
            u_ptr + ds[:, None] * K + ks[None, :],
            mask=d_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        p = p - tl.dot(coef, tl.trans(u), input_precision=PRECISION)
        tl.store(p_ptr + offs, p.to(ty), mask=mask)
        tl.store(m_ptr + offs, m.to(ty), mask=mask)
        tl.store(v_ptr + offs, v.to(ty), mask=mask)
        if AMSGRAD:
            tl.store(vmax_ptr + offs, vmax.to(ty), mask=mask)


# ---------------------------------------------------------------- launcher


def _block_k(k: int, what: str) -> int:
    # tl.dot needs every dim >= 16. The whole of k is kept in one tile (the update
    # is recomputed per pass, so k cannot be chunked as in project.py without
    # recomputing it per chunk); 256 fp32 coefficients per row is the register cap.
    if k > 256:
        raise ValueError(
            f"{what}: the fused projected AdamW supports k ≤ 256 basis columns, got {k}; "
            "use backend='reference' (AdamW + project_anchored_) for larger bases"
        )
    return max(16, triton.next_power_of_2(k))


def _table(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    max_exp_avg_sqs: list[torch.Tensor] | None,
    steps: list[torch.Tensor],
    anchors: list[torch.Tensor],
) -> tuple[torch.Tensor, int]:
    """``(table, n_blocks)``: per-tensor addresses and strides, then (tensor, first row) pairs."""
    meta = []
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
        meta.append(
            (
                p.data_ptr(),
                g.data_ptr(),
                m.data_ptr(),
                v.data_ptr(),
                vmax.data_ptr(),
                anchors[i].data_ptr(),
                steps[i].data_ptr(),
                p.shape[0],
                p.stride(0),
                p.stride(1),
                g.stride(0),
                g.stride(1),
            )
        )
    meta_t = tuple(meta)

    def build() -> list[int]:
        blocks = [
            v for t, m in enumerate(meta_t) for r0 in range(0, m[7], _BLOCK_R) for v in (t, r0)
        ]
        return [v for m in meta_t for v in m] + blocks

    table = cached_table((params[0].device, "adamw", _BLOCK_R, meta_t), build)
    return table, (table.numel() - _META * len(params)) // 2


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

    One launch for the whole bucket. ``lr`` is read as a Python float (a tensor
    ``lr`` is converted with ``float()``, which synchronizes).
    """
    if side == "flat":  # one row of numel elements per tensor
        views = [[t.view(1, -1) for t in ts] for ts in (params, grads, exp_avgs, exp_avg_sqs)]
        params, grads, exp_avgs, exp_avg_sqs = views
        if max_exp_avg_sqs is not None:
            max_exp_avg_sqs = [t.view(1, -1) for t in max_exp_avg_sqs]
    d, k = basis.shape
    table, n_blocks = _table(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, anchors)
    _projected_adamw_kernel[(n_blocks,)](
        table,
        len(params),
        basis,
        weights if weights is not None else basis,
        params[0],
        d,
        k,
        float(lr),
        beta1,
        beta2,
        1.0 - beta1,  # in fp64 on the host: exact enough, unlike 1 − fp32(β) on the device
        1.0 - beta2,
        eps,
        weight_decay,
        HAS_W=weights is not None,
        AMSGRAD=max_exp_avg_sqs is not None,
        MAXIMIZE=maximize,
        BLOCK_R=_BLOCK_R,
        BLOCK_D=_BLOCK_D,
        BLOCK_K=_block_k(k, "basis"),
        PRECISION=_PRECISION,
        META=_META,
    )
