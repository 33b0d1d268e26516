"""The math of every gradproj op in plain PyTorch.

This module is the correctness oracle (the tests run it in float64) and the CPU
fallback backend. It is written to be read, not to be fast: every function
allocates freely. It imports nothing from the rest of the package.

Notation: ``U`` is a basis with orthonormal columns, ``w`` optional per-direction
weights in [0, 1] (``None`` means all ones), ``P = I - U diag(w) Uᵀ`` the
(soft) projector onto the orthogonal complement of ``span(U)``.
"""

from __future__ import annotations

import math

import torch

SIDES = ("input", "output", "flat")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the reference computes in: at least float32 (fp16/bf16 accumulate in fp32)."""
    return torch.promote_types(dtype, torch.float32)


def side_dim(shape: torch.Size | tuple[int, ...], side: str) -> int:
    """Length of the vectors that ``side`` projects, i.e. the number of rows the basis must have.

    ``input``: ``prod(shape[1:])`` (a conv weight ``(out, in, kh, kw)`` is ``(out, in·kh·kw)``);
    ``output``: ``shape[0]``; ``flat``: ``prod(shape)``.
    """
    if side == "input":
        n = 1
        for s in shape[1:]:
            n *= s
        return n
    if side == "output":
        return shape[0]
    if side == "flat":
        n = 1
        for s in shape:
            n *= s
        return n
    raise ValueError(f"side must be one of {SIDES}, got {side!r}")


def project(
    g: torch.Tensor,
    basis: torch.Tensor,
    *,
    side: str = "input",
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Out-of-place projection of one gradient onto the complement of ``span(basis)``.

    With ``U = basis`` and ``c = w ⊙ (Uᵀ x)`` for each projected vector ``x``::

        x ← x − U c = x − U (w ⊙ Uᵀ x)

    in the orientation that ``side`` selects:

    * ``"input"``: ``G (out × in)``, ``U (in × k)``, every row is projected:
      ``G − (G U) diag(w) Uᵀ``. A layer ``y = W x`` updated by such a ``G`` keeps
      ``ΔW U = 0``: its response to inputs in ``span(U)`` never changes. Conv weights
      ``(out, in, kh, kw)`` are viewed as ``(out, in·kh·kw)``.
    * ``"output"``: ``G (out × in)``, ``V (out × k)``, every column is projected:
      ``G − V diag(w) (Vᵀ G)``, so ``Vᵀ ΔW = 0``.
    * ``"flat"``: ``g`` flattened to a vector of ``numel`` entries, ``U (numel × k)``.

    ``weights=None`` is the hard projector. Soft weights generalize the ridge
    projector used by continual-unlearning code: for any ``C (d × n)`` with thin SVD
    ``C = U S Vᵀ`` and ``λ > 0``::

        I − C (CᵀC + λI)⁻¹ Cᵀ  =  I − U diag(s² / (s² + λ)) Uᵀ

    i.e. ``project(g, U, weights=s**2 / (s**2 + λ))`` (see :func:`ridge_projector`).

    NaN or inf in ``g`` propagate as the arithmetic says: a non-finite entry in a
    row makes the coefficients ``Uᵀ x`` of that row non-finite, so (for ``k ≥ 1``)
    the whole projected row becomes non-finite. Nothing is masked.

    Returns a new tensor of ``g``'s shape and dtype; computes in
    ``compute_dtype(promote(g, basis))``.
    """
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")
    dt = compute_dtype(torch.promote_types(g.dtype, basis.dtype))
    u = basis.to(dt)
    x = g.to(dt)
    w = None if weights is None else weights.to(dt)
    if side == "input":
        m = x.reshape(x.shape[0], math.prod(x.shape[1:]))  # -1 is ambiguous at 0 rows
        c = m @ u
        if w is not None:
            c = c * w
        out = m - c @ u.T
    elif side == "output":
        m = x.reshape(x.shape[0], math.prod(x.shape[1:]))  # -1 is ambiguous at 0 rows
        c = u.T @ m
        if w is not None:
            c = c * w[:, None]
        out = m - u @ c
    else:
        v = x.reshape(-1)
        c = u.T @ v
        if w is not None:
            c = c * w
        out = v - u @ c
    return out.reshape(g.shape).to(g.dtype)


def anchor(p: torch.Tensor, basis: torch.Tensor, *, side: str = "input") -> torch.Tensor:
    """The anchor ``C`` of a parameter: the coefficients of its projected vectors on ``U``.

    ``side="input"``: ``C = W U`` (``out × k``); ``"output"``: ``C = (Vᵀ W)ᵀ``
    (``in × k``, one row per column of ``W``); ``"flat"``: ``C = (Uᵀ vec W)ᵀ``
    (``1 × k``). Always float32 or wider (``compute_dtype``).
    """
    dt = compute_dtype(torch.promote_types(p.dtype, basis.dtype))
    return _rows(p.to(dt), side) @ basis.to(dt)


def project_anchored(
    p: torch.Tensor,
    anchor: torch.Tensor,
    basis: torch.Tensor,
    *,
    side: str = "input",
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Project the change of ``p`` since its anchor, without a copy of the old ``p``.

    The update projection ``p ← p₀ + P (p − p₀)`` with ``P = I − U diag(w) Uᵀ``
    needs ``p₀`` only through ``C = p₀ U`` (:func:`anchor`), since for each
    projected vector (row) ``x``::

        a = Uᵀ x
        x ← x − U (w ⊙ (a − C))             (= x₀ + P (x − x₀))
        C ← C + (1 − w) ⊙ (a − C)           (= Uᵀ x_new; C is unchanged when w = 1)

    Keeping ``C`` instead of ``p₀`` means rounding does not accumulate in
    ``ΔW U``: each step pulls ``x U`` back to the exact anchor.
    Returns ``(p_new, C_new)`` in ``p``'s and ``anchor``'s dtypes.
    """
    dt = compute_dtype(torch.promote_types(p.dtype, basis.dtype))
    u = basis.to(dt)
    x = _rows(p.to(dt), side)
    c0 = anchor.to(dt)
    delta = x @ u - c0
    c_new = c0
    if weights is not None:
        w = weights.to(dt)
        c_new = c0 + (1 - w) * delta
        delta = delta * w
    x = x - delta @ u.T
    if side == "output":
        x = x.T
    return x.reshape(p.shape).to(p.dtype), c_new.to(anchor.dtype)


def _rows(x: torch.Tensor, side: str) -> torch.Tensor:
    """The matrix whose rows ``side`` projects (a view where possible)."""
    if side == "flat":
        return x.reshape(1, -1)
    m = x.reshape(x.shape[0], math.prod(x.shape[1:]))  # -1 is ambiguous at 0 rows
    return m.T if side == "output" else m


def ridge_projector(c: torch.Tensor, lam: float) -> torch.Tensor:
    """The ridge projector ``I − C (CᵀC + λI)⁻¹ Cᵀ`` as a dense ``d × d`` matrix (``C: d × n``).

    Written as the textbook formula on purpose: the tests check it against the
    soft projector built from the SVD of ``C`` (``U``, ``w = s²/(s²+λ)``).
    """
    d, n = c.shape
    eye_n = torch.eye(n, dtype=c.dtype, device=c.device)
    eye_d = torch.eye(d, dtype=c.dtype, device=c.device)
    return eye_d - c @ torch.linalg.solve(c.T @ c + lam * eye_n, c.T)


def soft_basis_from_ridge(c: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U, w)`` with ``I − U diag(w) Uᵀ`` equal to the ridge projector of ``C`` and ``λ``.

    ``C = U S Vᵀ`` (thin SVD); ``w = s² / (s² + λ)``. Directions with ``s = 0``
    get ``w = 0`` and are dropped.
    """
    u, s, _ = torch.linalg.svd(c, full_matrices=False)
    keep = s > 0
    u, s = u[:, keep], s[keep]
    return u, s * s / (s * s + lam)


def project_bucket_(
    matrices: list[torch.Tensor],
    basis: torch.Tensor,
    weights: torch.Tensor | None,
    side: str,
) -> None:
    """The ``"reference"`` backend's bucket kernel (contract in ``gradproj.backends``).

    ``matrices`` are already oriented so that rows (or, for ``side="flat"``, the
    whole 1-D view) are the vectors to project, so every side is the row case here.
    """
    row_side = "flat" if side == "flat" else "input"
    for m in matrices:
        m.copy_(project(m, basis, side=row_side, weights=weights))


def project_anchored_bucket_(
    matrices: list[torch.Tensor],
    anchors: list[torch.Tensor],
    basis: torch.Tensor,
    weights: torch.Tensor | None,
    side: str,
) -> None:
    """The ``"reference"`` backend's anchored bucket kernel (contract in ``gradproj.backends``)."""
    for m, c in zip(matrices, anchors, strict=True):
        rows = m.view(1, -1) if side == "flat" else m
        new_rows, new_c = project_anchored(rows, c, basis, side="input", weights=weights)
        rows.copy_(new_rows)
        c.copy_(new_c)


# ---------------------------------------------------------------------------
# Projected AdamW: one AdamW step whose update is projected (anchored form).


def projected_adamw(
    p: torch.Tensor,
    g: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: int | torch.Tensor,
    anchor: torch.Tensor | None,
    basis: torch.Tensor | None,
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    side: str = "input",
    weights: torch.Tensor | None = None,
    amsgrad: bool = False,
    max_exp_avg_sq: torch.Tensor | None = None,
    maximize: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One step of AdamW, then the anchored update projection; out of place.

    With ``t = step`` (the count *including* this step, ``t ≥ 1``), ``g ← −g`` if
    ``maximize``, and everything computed in ``compute_dtype`` of the inputs::

        p ← p (1 − lr·λ)                                   (decoupled weight decay)
        m ← β₁ m + (1 − β₁) g
        v ← β₂ v + (1 − β₂) g²
        v̂ ← max(v̂, v) if amsgrad else v
        p ← p − lr/(1 − β₁ᵗ) · m / (√v̂ / √(1 − β₂ᵗ) + ε)

    and then, when ``basis`` is given, every projected vector ``x`` of the new ``p``
    (rows for ``side="input"``, see :func:`project_anchored`) with anchor row ``c``::

        a = Uᵀ x;   x ← x − U (w ⊙ (a − c));   c ← c + (1 − w) ⊙ (a − c)

    so ``rows(p) U`` stays equal to the anchor ``C = rows(p₀) U`` (hard projector):
    the update, weight decay included, never moves ``p`` along ``span(U)``.

    Returns ``(p, exp_avg, exp_avg_sq, max_exp_avg_sq, anchor)``, each in its input's
    dtype (``None`` where the input was ``None``).
    """
    beta1, beta2 = betas
    dt = compute_dtype(p.dtype)
    if basis is not None:
        dt = compute_dtype(torch.promote_types(dt, basis.dtype))
    x, grad = p.to(dt), g.to(dt)
    if maximize:
        grad = -grad
    m = exp_avg.to(dt) * beta1 + grad * (1 - beta1)
    v = exp_avg_sq.to(dt) * beta2 + grad * grad * (1 - beta2)
    v_hat = v
    v_max = None
    if amsgrad:
        if max_exp_avg_sq is None:
            raise ValueError("amsgrad=True needs max_exp_avg_sq")
        v_max = torch.maximum(max_exp_avg_sq.to(dt), v)
        v_hat = v_max
    bias1 = 1 - beta1**step
    bias2 = 1 - beta2**step
    x = x * (1 - lr * weight_decay)
    x = x - (lr / bias1) * m / (v_hat.sqrt() / bias2**0.5 + eps)
    c_new = anchor
    if basis is not None:
        if anchor is None:
            raise ValueError("a basis needs its anchor (see anchor())")
        x, c_new = project_anchored(x, anchor, basis, side=side, weights=weights)
    return (
        x.to(p.dtype),
        m.to(exp_avg.dtype),
        v.to(exp_avg_sq.dtype),
        None if v_max is None else v_max.to(max_exp_avg_sq.dtype),
        c_new,
    )


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
    """The ``"reference"`` backend's projected-AdamW bucket kernel.

    Contract in ``gradproj.backends``. The step count is read from each
    ``steps[i]`` tensor with tensor arithmetic, not ``.item()``, so this fallback
    does not synchronize with the device either.
    """
    amsgrad = max_exp_avg_sqs is not None

    def rows_of(t: torch.Tensor) -> torch.Tensor:
        return t.view(1, -1) if side == "flat" else t

    for i, (p, c) in enumerate(zip(params, anchors, strict=True)):
        rows, g, m, v = (rows_of(t) for t in (p, grads[i], exp_avgs[i], exp_avg_sqs[i]))
        v_max = rows_of(max_exp_avg_sqs[i]) if amsgrad else None
        # `step` as a 0-d float64 tensor: β**t and the bias corrections stay on the
        # device, and 1 − β₂ᵗ (1e-3 at t = 1) keeps its digits.
        t = steps[i].to(torch.float64)
        new_p, new_m, new_v, new_vmax, new_c = projected_adamw(
            rows,
            g,
            m,
            v,
            t,
            c,
            basis,
            lr=lr,
            betas=(beta1, beta2),
            eps=eps,
            weight_decay=weight_decay,
            side="input",
            weights=weights,
            amsgrad=amsgrad,
            max_exp_avg_sq=v_max,
            maximize=maximize,
        )
        rows.copy_(new_p)
        m.copy_(new_m)
        v.copy_(new_v)
        if amsgrad:
            v_max.copy_(new_vmax)
        c.copy_(new_c)


SURGERY_VARIANTS = ("projection", "cosine")


def surgery(
    g_unlearn: torch.Tensor,
    g_retain: torch.Tensor,
    *,
    strength: float = 1.0,
    variant: str = "projection",
    symmetric: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Conflict-aware gradient surgery of one tensor pair (seed 001, DoCo; PCGrad).

    With ``d = g_u·g_r`` (over all elements), the pair conflicts when ``d < 0``.
    Only then, with ``λ = strength``::

        "projection":  g_u ← g_u − λ (g_u·ĝ_r) ĝ_r = g_u − λ d/‖g_r‖² · g_r
        "cosine":      g_u ← g_u − λ cos(g_u, g_r) ĝ_r = g_u − λ d/(‖g_u‖ ‖g_r‖²) · g_r

    ``"projection"`` removes exactly the conflicting component (λ = 1 leaves
    ``g_u·g_r = 0``). ``"cosine"`` is what DoCo's public code does: it subtracts a
    vector of norm ``λ|cos|`` whatever ``‖g_u‖`` is, so it under-corrects large
    gradients and over-corrects small ones.

    ``symmetric=True`` (PCGrad with two task gradients) also updates
    ``g_r ← g_r − λ d/‖g_u‖² · g_u`` (``"projection"``) from the *original* pair.
    ``d = 0`` (cos exactly 0) or a zero gradient means no conflict: no change,
    never NaN. Returns ``(g_u_new, g_r_new)`` in the inputs' dtype, computed in
    ``compute_dtype``.
    """
    if variant not in SURGERY_VARIANTS:
        raise ValueError(f"variant must be one of {SURGERY_VARIANTS}, got {variant!r}")
    dt = compute_dtype(g_unlearn.dtype)
    u = g_unlearn.to(dt).reshape(-1)
    r = g_retain.to(dt).reshape(-1)
    d, uu, rr = u @ r, u @ u, r @ r
    conflict = d < 0  # implies uu > 0 and rr > 0
    one = torch.ones((), dtype=dt, device=u.device)
    if variant == "projection":
        coef_u = d / torch.where(conflict, rr, one)
        coef_r = d / torch.where(conflict, uu, one)
    else:
        coef_u = d / torch.where(conflict, uu.sqrt() * rr, one)
        coef_r = d / torch.where(conflict, rr.sqrt() * uu, one)
    zero = torch.zeros((), dtype=dt, device=u.device)
    coef_u = torch.where(conflict, strength * coef_u, zero)
    coef_r = torch.where(conflict, strength * coef_r, zero)
    new_u = u - coef_u * r
    new_r = r - coef_r * u if symmetric else r
    return (
        new_u.reshape(g_unlearn.shape).to(g_unlearn.dtype),
        new_r.reshape(g_retain.shape).to(g_retain.dtype),
    )


def surgery_bucket_(
    g_unlearn: list[torch.Tensor],
    g_retain: list[torch.Tensor],
    strength: float,
    variant: str,
    symmetric: bool,
) -> None:
    """The ``"reference"`` backend's surgery kernel (contract in ``gradproj.backends``)."""
    for u, r in zip(g_unlearn, g_retain, strict=True):
        new_u, new_r = surgery(u, r, strength=strength, variant=variant, symmetric=symmetric)
        u.copy_(new_u)
        if symmetric:
            r.copy_(new_r)
