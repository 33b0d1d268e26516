"""Validation in ``gradproj.ops``: each bad input gets an error naming the tensor and mismatch."""

from __future__ import annotations

import pytest
import torch

import gradproj
from gradproj import ops

from .test_project import orthonormal


def test_basis_rows_must_match_side_dim():
    g = [torch.randn(4, 8), torch.randn(4, 6)]
    with pytest.raises(ValueError, match=r"basis of grads\[1\] has 8 rows.*needs 6"):
        gradproj.project_(g, orthonormal(8, 2))
    with pytest.raises(ValueError, match=r"grads\[0\] \('unet.to_k'\).*side='output'.*needs 4"):
        gradproj.project_(g[0], orthonormal(8, 2), side="output", names=["unet.to_k"])
    with pytest.raises(ValueError, match=r"side='flat'.*needs 32"):
        gradproj.project_(g[0], orthonormal(8, 2), side="flat")


def test_conv_grad_uses_unfolded_input_dim():
    g = torch.randn(4, 3, 2, 2)
    with pytest.raises(ValueError, match=r"has 3 rows.*needs 12"):
        gradproj.project_(g, orthonormal(3, 1))


def test_basis_must_be_2d_and_not_wider_than_tall():
    with pytest.raises(ValueError, match=r"basis of grads\[0\] must be 2-D.*\(8,\)"):
        gradproj.project_(torch.randn(4, 8), torch.randn(8))
    with pytest.raises(ValueError, match=r"k=9 columns > d=8"):
        gradproj.project_(torch.randn(4, 8), torch.randn(8, 9))


def test_devices_must_agree():
    g = torch.randn(4, 8)
    u = orthonormal(8, 2).to("meta")
    with pytest.raises(ValueError, match=r"basis of grads\[0\] is on meta, but the grad is on cpu"):
        gradproj.project_(g, u)
    w = torch.rand(2, device="meta")
    with pytest.raises(ValueError, match=r"weights of grads\[0\] are on meta"):
        gradproj.project_(g, orthonormal(8, 2), weights=w)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.complex64])
def test_non_float_dtypes_rejected(dtype):
    with pytest.raises(TypeError, match=rf"grads\[0\] must be a floating-point tensor.*{dtype}"):
        gradproj.project_(torch.zeros(4, 8, dtype=dtype), orthonormal(8, 2))
    with pytest.raises(TypeError, match=r"basis of grads\[0\] must be a floating-point"):
        gradproj.project_(torch.zeros(4, 8), torch.zeros(8, 2, dtype=dtype))


def test_weights_range_and_length():
    g, u = torch.randn(4, 8), orthonormal(8, 3)
    with pytest.raises(ValueError, match=r"weights of grads\[0\] must lie in \[0, 1\].*1\.5"):
        gradproj.project_(g, u, weights=[0.1, 1.5, 0.2])
    with pytest.raises(ValueError, match=r"weights of grads\[0\] must lie in \[0, 1\].*-0\.1"):
        gradproj.project_(g, u, weights=torch.tensor([-0.1, 0.5, 0.2]))
    with pytest.raises(ValueError, match=r"weights of grads\[0\] must lie in \[0, 1\].*nan"):
        gradproj.project_(g, u, weights=torch.tensor([float("nan"), 0.5, 0.2]))
    with pytest.raises(ValueError, match=r"must have shape \(3,\).*got \(2,\)"):
        gradproj.project_(g, u, weights=[0.1, 0.2])


def test_orthonormality_checked_on_request():
    g = torch.randn(4, 8)
    not_orthonormal = torch.randn(8, 3)
    gradproj.project_(g.clone(), not_orthonormal)  # off by default: the hot path reads nothing back
    with pytest.raises(ValueError, match=r"basis of grads\[0\].*not orthonormal"):
        gradproj.project_(g, not_orthonormal, check_orthonormal=True)
    gradproj.project_(g, orthonormal(8, 3), check_orthonormal=True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_orthonormal_tolerance_accepts_rounded_qr_bases(dtype):
    """The per-dtype bound accepts a QR basis rounded to ``dtype`` at a realistic size."""
    ops.check_orthonormal_(orthonormal(4096, 128, dtype=dtype))
    scaled = orthonormal(256, 4, dtype=dtype) * 1.05
    with pytest.raises(ValueError, match="not orthonormal"):
        ops.check_orthonormal_(scaled)


def test_rank_errors():
    with pytest.raises(ValueError, match=r"grads\[0\] has shape \(8,\): side='input'"):
        gradproj.project_(torch.randn(8), orthonormal(8, 1))
    with pytest.raises(ValueError, match="0-d"):
        gradproj.project_(torch.tensor(1.0), orthonormal(1, 1), side="output")


def test_list_errors():
    with pytest.raises(ValueError, match="got 2 grads but 3 bases"):
        gradproj.project_([torch.randn(2, 3)] * 2, [orthonormal(3, 1)] * 3)
    with pytest.raises(TypeError, match=r"grads\[1\] must be a tensor or None, got str"):
        gradproj.project_([torch.randn(2, 3), "x"], orthonormal(3, 1))
    with pytest.raises(TypeError, match="grads must be a tensor or a list"):
        gradproj.project_({"a": torch.randn(2, 3)}, orthonormal(3, 1))
    with pytest.raises(TypeError, match=r"grads\[0\]: basis must be a tensor"):
        gradproj.project_(torch.randn(2, 3), [[1.0]])
    with pytest.raises(ValueError, match="side must be one of"):
        gradproj.project_(torch.randn(2, 3), orthonormal(3, 1), side="rows")


def test_aliasing_and_overlap_rejected():
    g = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"grads\[1\] shares memory with grads\[0\]"):
        gradproj.project_([g, g.view(4, 8)], orthonormal(8, 1))
    expanded = torch.randn(1, 8).expand(4, 8)
    with pytest.raises(ValueError, match="internally overlapping memory"):
        gradproj.project_(expanded, orthonormal(8, 1))


def test_contiguous_slices_overlap_only_when_their_rows_meet():
    g = torch.randn(4, 8)
    gradproj.project_([g[0:2], g[2:4]], orthonormal(8, 1))  # adjacent, disjoint: fine
    with pytest.raises(ValueError, match=r"grads\[1\] shares memory with grads\[0\]"):
        gradproj.project_([g[0:3], g[2:4]], orthonormal(8, 1))
    u = orthonormal(8, 1)
    with pytest.raises(ValueError, match=r"basis of grads\[0\] shares memory with grads\[0\]"):
        gradproj.project_(u.view(1, 8), u.view(8, 1))


def test_each_basis_is_checked_once_but_against_every_grad():
    good, bad = orthonormal(8, 2), torch.zeros(8, 2, dtype=torch.int32)
    gs = [torch.randn(4, 8) for _ in range(3)]
    with pytest.raises(TypeError, match=r"basis of grads\[2\] must be a floating-point"):
        gradproj.project_(gs, [good, good, bad])
    with pytest.raises(ValueError, match=r"basis of grads\[2\] has 8 rows.*needs 6"):
        gradproj.project_([gs[0], gs[1], torch.randn(4, 6)], good)
    w_bad = torch.tensor([0.5, 2.0])
    with pytest.raises(ValueError, match=r"weights of grads\[1\] must lie in \[0, 1\]"):
        gradproj.project_(gs[:2], [good, _Basis(good, w_bad)])


class _Basis:
    def __init__(self, basis, weights):
        self.basis, self.weights = basis, weights


def test_a_weights_sequence_keeps_a_shared_basis_in_one_bucket(monkeypatch):
    seen = []
    group = ops.buckets.group

    def spy(*args, **kwargs):
        out = group(*args, **kwargs)
        seen.append(len(out))
        return out

    monkeypatch.setattr(ops.buckets, "group", spy)
    u = orthonormal(8, 2)
    gs = [torch.randn(4, 8) for _ in range(5)]
    want = [g - (g @ u) * torch.tensor([0.25, 1.0]) @ u.T for g in gs]
    gradproj.project_(gs, u, weights=[0.25, 1.0])
    assert seen == [1]  # a tensor made from the list once, not one per grad (5 launches)
    for g, w in zip(gs, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


def test_validation_happens_before_any_write():
    good, bad = torch.randn(4, 8), torch.randn(4, 6)
    before = good.clone()
    with pytest.raises(ValueError):
        gradproj.project_([good, bad], [orthonormal(8, 2), orthonormal(8, 2)])
    assert torch.equal(good, before)


def test_object_with_basis_and_weights_attributes():
    class Subspace:
        def __init__(self, basis, weights):
            self.basis, self.weights = basis, weights

    u, w = orthonormal(8, 2), torch.tensor([0.5, 1.0])
    g = torch.randn(3, 8)
    expected = g.clone()
    gradproj.project_(expected, u, weights=w)
    gradproj.project_(g, Subspace(u, w))
    assert torch.equal(g, expected)
    with pytest.raises(ValueError, match="carries its own weights"):
        gradproj.project_(g, Subspace(u, w), weights=w)


def test_anchored_errors():
    p, u = torch.randn(4, 8), orthonormal(8, 2)
    with pytest.raises(ValueError, match="got 1 params but 2 anchors"):
        ops.project_anchored_([p], [ops.anchor(p, u)] * 2, u)
    with pytest.raises(
        ValueError, match=r"anchor of grads\[0\] must be a contiguous torch.float32"
    ):
        ops.project_anchored_([p], [torch.zeros(4, 3)], u)
    with pytest.raises(ValueError, match=r"anchor of grads\[0\].*non-contiguous"):
        ops.project_anchored_([p], [torch.zeros(2, 4).T], u)
    with pytest.raises(TypeError, match=r"anchor of grads\[0\] must be a tensor"):
        ops.project_anchored_([p], [None], u)


def test_under_no_grad_on_leaf_parameters():
    w = torch.nn.Parameter(torch.randn(4, 8))
    gradproj.project_(w, orthonormal(8, 2))  # in place on a leaf that requires grad
    assert w.requires_grad


# ---------------------------------------------------------------- kernel-ready bases


def _column_major(d: int, k: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(d, k, generator=gen, dtype=torch.float64))[0].float()
    assert not q.is_contiguous()  # torch.linalg.qr's Q is column-major
    return q


def test_a_column_major_basis_is_made_contiguous_once_and_reused():
    """Every call used to copy a non-contiguous basis afresh, which the CUDA extension's
    packed-basis cache (keyed by storage and version) could never hit."""
    from gradproj import buckets

    u = _column_major(24, 5)
    grads = [torch.randn(7, 24), torch.randn(3, 24)]
    first = buckets.group(grads, [(u, None)] * 2, "input")[0].basis
    again = buckets.group(grads, [(u, None)] * 2, "input")[0].basis
    assert first is again and first.is_contiguous() and torch.equal(first, u)
    f64 = buckets.group([g.double() for g in grads], [(u, None)] * 2, "input")[0].basis
    assert f64.dtype == torch.float64 and f64 is not first and torch.equal(f64, u.double())
    assert buckets.kernel_basis(f64, torch.float64) is f64  # kernel-ready already: itself
    u.mul_(-1.0)  # an in-place write: the next call sees the new values
    flipped = buckets.group(grads, [(u, None)] * 2, "input")[0].basis
    assert flipped is not first and torch.equal(flipped, u)
    # the result is the projection with the current basis
    g = torch.randn(7, 24)
    out = g.clone()
    gradproj.project_(out, u)
    assert torch.allclose(out, g - (g @ u) @ u.T, atol=1e-6)


def test_kernel_bases_are_forgotten_with_their_basis_and_hold_no_graph():
    import gc

    from gradproj import buckets

    u = _column_major(16, 3).requires_grad_()
    copy = buckets.kernel_basis(u, torch.float32)
    assert copy.grad_fn is None and not copy.requires_grad
    key = (id(u), torch.float32)
    assert key in buckets._KERNEL_BASES
    del u, copy
    gc.collect()
    assert key not in buckets._KERNEL_BASES
    with torch.inference_mode():
        v = _column_major(16, 3)
    assert torch.equal(buckets.kernel_basis(v, torch.float32), v)  # no version counter: a copy
    assert (id(v), torch.float32) not in buckets._KERNEL_BASES


def test_projected_adamw_reuses_the_kernel_basis_across_steps():
    from gradproj import buckets

    u = _column_major(24, 4, seed=2)
    p = torch.nn.Parameter(torch.randn(6, 24))
    opt = gradproj.ProjectedAdamW([p], bases={p: u}, lr=1e-2)
    p0 = p.detach().clone()
    seen = []
    real = buckets.kernel_basis

    def spy(basis, dtype):
        out = real(basis, dtype)
        seen.append(out)
        return out

    buckets.kernel_basis = spy
    try:
        for _ in range(3):
            p.grad = torch.randn_like(p)
            opt.step()
    finally:
        buckets.kernel_basis = real
    assert len(seen) == 3 and seen[0] is seen[1] is seen[2] and seen[0].is_contiguous()
    assert (p.detach() - p0).abs().max() > 1e-3  # it moved, and never along span(U)
    assert ((p.detach() - p0) @ u).abs().max() < 1e-6
