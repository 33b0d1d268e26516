"""The reference itself against the textbook dense formulas, in float64."""

from __future__ import annotations

import pytest
import torch

from gradproj import reference as R

from .test_project import orthonormal

F64 = torch.float64


def dense_projector(u: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    """``I − U diag(w) Uᵀ`` as a matrix."""
    w = torch.ones(u.shape[1], dtype=u.dtype) if w is None else w
    return torch.eye(u.shape[0], dtype=u.dtype) - u @ torch.diag(w) @ u.T


@pytest.mark.parametrize("soft", [False, True])
def test_sides_match_dense_projectors(soft):
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(9, 14, generator=gen, dtype=F64)
    for side, d in (("input", 14), ("output", 9), ("flat", 126)):
        u = orthonormal(d, 4, dtype=F64, seed=d)
        w = torch.rand(4, generator=gen, dtype=F64) if soft else None
        p = dense_projector(u, w)
        if side == "input":
            expected = g @ p  # every row x ← P x, and P is symmetric
        elif side == "output":
            expected = p @ g
        else:
            expected = (p @ g.reshape(-1)).reshape(g.shape)
        torch.testing.assert_close(
            R.project(g, u, side=side, weights=w), expected, rtol=0, atol=1e-13
        )


def test_conv_weight_is_its_unfolded_matrix():
    g = torch.randn(6, 3, 3, 3, dtype=F64)
    u = orthonormal(27, 5, dtype=F64)
    unfolded = R.project(g.reshape(6, 27), u)
    torch.testing.assert_close(R.project(g, u), unfolded.reshape(g.shape), rtol=0, atol=0)


def test_ridge_projector_equals_soft_projector_from_svd():
    gen = torch.Generator().manual_seed(1)
    for n, lam in ((3, 0.1), (7, 2.0), (20, 1e-3)):
        c = torch.randn(32, n, generator=gen, dtype=F64)
        u, w = R.soft_basis_from_ridge(c, lam)
        torch.testing.assert_close(
            R.ridge_projector(c, lam), dense_projector(u, w), rtol=0, atol=1e-12
        )
        assert ((w > 0) & (w < 1)).all()


def test_low_precision_in_same_dtype_out():
    g = torch.randn(5, 8, dtype=torch.bfloat16)
    out = R.project(g, orthonormal(8, 2))
    assert out.dtype == torch.bfloat16 and out.shape == g.shape


@pytest.mark.parametrize("side", ["input", "output", "flat"])
@pytest.mark.parametrize("soft", [False, True])
def test_anchored_equals_copy_and_project(side, soft):
    """``p − U(w ⊙ (Uᵀp − C))`` with ``C = Uᵀp₀`` equals ``p₀ + P(p − p₀)``; C tracks ``Uᵀp``."""
    gen = torch.Generator().manual_seed(2)
    p0 = torch.randn(7, 10, generator=gen, dtype=F64)
    p = p0 + torch.randn(7, 10, generator=gen, dtype=F64)
    u = orthonormal(R.side_dim(p0.shape, side), 3, dtype=F64)
    w = torch.rand(3, generator=gen, dtype=F64) if soft else None
    c = R.anchor(p0, u, side=side)
    new_p, new_c = R.project_anchored(p, c, u, side=side, weights=w)
    expected = p0 + R.project(p - p0, u, side=side, weights=w)
    torch.testing.assert_close(new_p, expected, rtol=0, atol=1e-13)
    torch.testing.assert_close(new_c, R.anchor(new_p, u, side=side), rtol=0, atol=1e-13)


def test_side_dim_and_unknown_side():
    assert R.side_dim((4, 3, 2, 2), "input") == 12
    assert R.side_dim((4, 3, 2, 2), "output") == 4
    assert R.side_dim((4, 3, 2, 2), "flat") == 48
    with pytest.raises(ValueError, match="side must be one of"):
        R.side_dim((4, 3), "rows")
    with pytest.raises(ValueError, match="side must be one of"):
        R.project(torch.randn(2, 2), torch.eye(2), side="rows")
