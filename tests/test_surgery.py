"""``surgery_``: every backend against the float64 reference, the conflict boundary, errors.

Tolerance: the coefficient ``c = λ d/‖g_r‖²`` is a ratio of fp32 sums over the
whole tensor (relative error ~1e-6 at these sizes), and the result is rounded
once to the grad's dtype, so ``|out − ref| ≤ half-ulp·|ref| + 1e-5·max(|g_u|, |c g_r|)``.
"""

from __future__ import annotations

import pytest
import torch

import gradproj
from gradproj import reference as R

from .test_project import HALF_ULP, runnable

SURGERY = runnable("surgery_bucket_")
IDS = [f"{d}-{b}" for d, b in SURGERY]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def pairs(shapes, dtype, device, conflict: bool, seed: int = 0):
    """Pairs with a chosen sign of ``g_u·g_r``: g_r = ±(a·g_u) + noise."""
    gen = torch.Generator().manual_seed(seed)
    us, rs = [], []
    for shape in shapes:
        u = torch.randn(shape, generator=gen)
        r = (-1.0 if conflict else 1.0) * 0.5 * u + 0.3 * torch.randn(shape, generator=gen)
        us.append(u.to(device, dtype))
        rs.append(r.to(device, dtype))
    return us, rs


def check(out: torch.Tensor, ref: torch.Tensor, x: torch.Tensor, backend: str) -> None:
    ulp = HALF_ULP[out.dtype]
    if out.dtype == torch.bfloat16 and backend == "triton" and out.device.type == "cpu":
        ulp *= 2  # the Triton interpreter truncates fp32 -> bf16 (tests/test_project.py)
    scale = x.double().abs().max().item()
    bound = 1.01 * ulp * ref.abs() + 1e-5 * scale
    diff = (out.double() - ref).abs()
    assert bool((diff <= bound).all()), f"max diff {diff.max().item():.3g} ({out.dtype}, {backend})"


SHAPES = [(3, 5), (37, 129), (7,), (2, 3, 3, 3), (20000,)]  # odd, 1-D, conv, > one chunk


@pytest.mark.parametrize(("device", "backend"), SURGERY, ids=IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", ["projection", "cosine"])
@pytest.mark.parametrize("symmetric", [False, True], ids=["one-sided", "symmetric"])
@pytest.mark.parametrize("conflict", [True, False], ids=["conflict", "agree"])
def test_matches_float64_reference(device, backend, dtype, variant, symmetric, conflict):
    us, rs = pairs(SHAPES, dtype, device, conflict)
    us0, rs0 = [u.clone() for u in us], [r.clone() for r in rs]
    gradproj.surgery_(us, rs, strength=0.7, variant=variant, symmetric=symmetric, backend=backend)
    for u, r, u0, r0 in zip(us, rs, us0, rs0, strict=True):
        ref_u, ref_r = R.surgery(
            u0.double(), r0.double(), strength=0.7, variant=variant, symmetric=symmetric
        )
        check(u, ref_u, torch.cat([u0.flatten(), r0.flatten()]), backend)
        check(r, ref_r, torch.cat([u0.flatten(), r0.flatten()]), backend)
        if not conflict:
            assert torch.equal(u, u0) and torch.equal(r, r0)
        elif not symmetric:
            assert torch.equal(r, r0)


@pytest.mark.parametrize(("device", "backend"), SURGERY, ids=IDS)
def test_projection_with_full_strength_removes_the_conflict(device, backend):
    us, rs = pairs([(64, 33)], torch.float32, device, conflict=True)
    assert (us[0] * rs[0]).sum() < 0
    gradproj.surgery_(us, rs, backend=backend)
    cos = (us[0] * rs[0]).sum() / (us[0].norm() * rs[0].norm())
    assert abs(cos.item()) < 1e-5


@pytest.mark.parametrize(("device", "backend"), SURGERY, ids=IDS)
def test_boundary_cases_change_nothing_and_never_nan(device, backend):
    u = torch.tensor([[1.0, 0.0], [0.0, 0.0]], device=device)
    orthogonal = torch.tensor([[0.0, 2.0], [0.0, 0.0]], device=device)  # cos exactly 0
    zero = torch.zeros(2, 2, device=device)
    cases = [(u.clone(), orthogonal.clone()), (u.clone(), zero.clone()), (zero.clone(), u.clone())]
    for gu, gr in cases:
        gu0, gr0 = gu.clone(), gr.clone()
        gradproj.surgery_([gu], [gr], symmetric=True, variant="cosine", backend=backend)
        assert torch.equal(gu, gu0) and torch.equal(gr, gr0)
        gradproj.surgery_([gu], [gr], symmetric=True, backend=backend)
        assert torch.equal(gu, gu0) and torch.equal(gr, gr0)


@pytest.mark.parametrize(("device", "backend"), SURGERY, ids=IDS)
def test_many_tensors_mixed_conflicts_and_none(device, backend):
    """The per-tensor decision: conflicting and agreeing pairs in one call, None skipped."""
    gen = torch.Generator().manual_seed(4)
    us, rs, flags = [], [], []
    for i in range(12):
        u = torch.randn(5 + i, 7, generator=gen)
        sign = -1.0 if i % 3 else 1.0
        us.append(u.to(device))
        rs.append((sign * u + 0.1 * torch.randn(u.shape, generator=gen)).to(device))
        flags.append(sign < 0)
    us.insert(4, None)
    rs.insert(4, torch.randn(3, device=device))
    us0 = [None if u is None else u.clone() for u in us]
    gradproj.surgery_(us, rs, backend=backend)
    for u, u0, r in zip(us, us0, rs, strict=True):
        if u is None:
            continue
        ref, _ = R.surgery(u0.double(), r.double())
        check(u, ref, u0, backend)


@pytest.mark.parametrize(("device", "backend"), SURGERY, ids=IDS)
def test_non_contiguous_pairs(device, backend):
    base_u = torch.randn(20, 30, device=device)
    base_r = -base_u + 0.2 * torch.randn(20, 30, device=device)
    u, r = base_u[:, ::3], base_r.T.contiguous().T[:, ::3]
    u0, r0 = u.clone(), r.clone()
    untouched = base_u[:, 1::3].clone()
    gradproj.surgery_([u], [r], backend=backend)
    check(u, R.surgery(u0.double(), r0.double())[0], u0, backend)
    assert torch.equal(base_u[:, 1::3], untouched)


@pytest.mark.parametrize(("device", "backend"), SURGERY, ids=IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("off_u", "off_r"), [(0, 0), (1, 0), (0, 3), (4, 8)])
@pytest.mark.parametrize("symmetric", [False, True], ids=["one-sided", "symmetric"])
def test_views_at_any_offset(device, backend, dtype, off_u, off_r, symmetric):
    """Slices that start ``off`` elements into their storage: the CUDA kernels take whole
    chunks of views aligned to 16 bytes (fp32) or 8 (16-bit) as vectors, and the rest
    (an offset of 1 or 3, a pair's ragged last chunk) element by element. 3 whole chunks
    of 4096 and a ragged one; the elements around each view stay as they were."""
    n = 3 * 4096 + 77
    (u1,), (r1,) = pairs([(n,)], dtype, device, conflict=True, seed=5)
    base_u, base_r = (torch.randn(n + 16, device=device).to(dtype) for _ in range(2))
    u, r = base_u[off_u : off_u + n], base_r[off_r : off_r + n]
    u.copy_(u1)
    r.copy_(r1)
    u0, r0 = u.clone(), r.clone()
    around_u = torch.cat([base_u[:off_u], base_u[off_u + n :]]).clone()
    around_r = torch.cat([base_r[:off_r], base_r[off_r + n :]]).clone()
    gradproj.surgery_([u], [r], strength=0.7, symmetric=symmetric, backend=backend)
    ref_u, ref_r = R.surgery(u0.double(), r0.double(), strength=0.7, symmetric=symmetric)
    x = torch.cat([u0, r0])
    check(u, ref_u, x, backend)
    check(r, ref_r, x, backend)
    assert not torch.equal(u, u0)
    assert torch.equal(r, r0) != symmetric
    assert torch.equal(torch.cat([base_u[:off_u], base_u[off_u + n :]]), around_u)
    assert torch.equal(torch.cat([base_r[:off_r], base_r[off_r + n :]]), around_r)


@pytest.mark.parametrize(("device", "backend"), SURGERY, ids=IDS)
def test_deterministic(device, backend):
    us, rs = pairs([(300, 200), (50000,)], torch.float32, device, conflict=True)
    a = [u.clone() for u in us]
    b = [u.clone() for u in us]
    gradproj.surgery_(a, rs, backend=backend)
    gradproj.surgery_(b, rs, backend=backend)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_errors():
    u, r = torch.randn(3, 4), torch.randn(3, 4)
    with pytest.raises(ValueError, match="got 2 unlearn gradients but 1 retain"):
        gradproj.surgery_([u, u.clone()], [r])
    with pytest.raises(
        ValueError, match=r"pair 0: g_unlearn has shape \(3, 4\), g_retain \(4, 3\)"
    ):
        gradproj.surgery_(u, r.T.contiguous())
    with pytest.raises(ValueError, match=r"pair 0 \('to_k'\): g_unlearn is torch.float32"):
        gradproj.surgery_(u, r.double(), names=["to_k"])
    with pytest.raises(TypeError, match=r"g_retain\[0\] must be a floating-point"):
        gradproj.surgery_(u, r.int())
    with pytest.raises(ValueError, match="variant must be one of"):
        gradproj.surgery_(u, r, variant="pcgrad")
    with pytest.raises(TypeError, match="strength must be a Python number"):
        gradproj.surgery_(u, r, strength=torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"g_retain\[0\] shares memory with g_unlearn\[0\]"):
        gradproj.surgery_(u, u)
