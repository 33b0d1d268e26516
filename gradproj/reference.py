"""The math of every gradproj op in plain PyTorch.

This module is the correctness oracle (the tests run it in float64) and the CPU
fallback backend. It is written to be read, not to be fast: every function
allocates freely. It imports nothing from the rest of the package.

Notation: ``U`` is a basis with orthonormal columns, ``w`` optional per-direction
weights in [0, 1] (``None`` means all ones), ``P = I - U diag(w) Uᵀ`` the
(soft) projector onto the orthogonal complement of ``span(U)``.
"""

from __future__ import annotations

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
        m = x.reshape(x.shape[0], -1)
        c = m @ u
        if w is not None:
            c = c * w
        out = m - c @ u.T
    elif side == "output":
        m = x.reshape(x.shape[0], -1)
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
    m = x.reshape(x.shape[0], -1)
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
