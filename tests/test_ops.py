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
