"""Every in-place entry point behaves like a torch in-place op (``gradproj/inplace.py``).

The repros of the reliability campaign, one test each, for every backend that
runs here: a write autograd could not see (wrong gradient, no error), an
inference tensor changed outside inference mode, overlapping inputs accepted,
an error raised after some inputs were already changed, and anchors built
through a full-size float32 copy of a 16-bit weight.
"""

from __future__ import annotations

import pytest
import torch

import gradproj
from gradproj import ops
from gradproj.inplace import check_no_overlap, may_overlap_internally

from .test_project import ANCHORED, PROJECT, orthonormal, runnable

SURGERY = runnable("surgery_bucket_")
ADAMW = runnable("projected_adamw_bucket_")
IDS = [f"{d}-{b}" for d, b in PROJECT]


def _snapshot(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.detach().clone() for t in tensors]


def _unchanged(before: list[torch.Tensor], *tensors: torch.Tensor) -> bool:
    return all(torch.equal(a, b.detach()) for a, b in zip(before, tensors, strict=True))


# -- 1. autograd sees the write -------------------------------------------------


@pytest.mark.parametrize(("device", "backend"), PROJECT, ids=IDS)
def test_project_between_forward_and_backward_makes_backward_raise(device, backend):
    # The campaign's repro: cpp gave x.grad off by 9.6 with no error.
    x = torch.randn(8, 40, device=device, requires_grad=True)
    y = x * 2
    z = (y**2).sum()  # saves y for backward
    version = y._version
    gradproj.project_(y, orthonormal(40, 4, device), backend=backend)
    assert y._version > version
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        z.backward()


@pytest.mark.parametrize(("device", "backend"), ANCHORED, ids=[f"{d}-{b}" for d, b in ANCHORED])
def test_project_anchored_bumps_the_param_and_anchor_versions(device, backend):
    w = torch.randn(6, 24, device=device)
    u = orthonormal(24, 3, device)
    c = ops.anchor(w, u)
    w.add_(0.1)
    before = (w._version, c._version)
    ops.project_anchored_([w], [c], u, backend=backend)
    assert w._version > before[0] and c._version > before[1]


@pytest.mark.parametrize(("device", "backend"), SURGERY, ids=[f"{d}-{b}" for d, b in SURGERY])
@pytest.mark.parametrize("symmetric", [False, True])
def test_surgery_bumps_what_it_writes(device, backend, symmetric):
    gu = torch.tensor([1.0, 0.0, 2.0], device=device)
    gr = torch.tensor([-1.0, 1.0, 0.0], device=device)  # d = -1 < 0: a conflict
    vu, vr = gu._version, gr._version
    gradproj.surgery_(gu, gr, symmetric=symmetric, backend=backend)
    assert gu._version > vu
    assert (gr._version > vr) == symmetric


@pytest.mark.parametrize(("device", "backend"), ADAMW, ids=[f"{d}-{b}" for d, b in ADAMW])
def test_projected_adamw_step_between_forward_and_backward_raises(device, backend):
    # torch's AdamW raises here; the fused kernel gave a gradient off by 4.66.
    lin = torch.nn.Linear(16, 8, device=device)
    opt = gradproj.ProjectedAdamW(
        lin.parameters(), lr=0.1, bases={lin.weight: orthonormal(16, 2, device)}, backend=backend
    )
    lin(torch.randn(4, 16, device=device)).sum().backward()
    x = torch.randn(4, 16, device=device, requires_grad=True)
    loss = (lin(x) ** 2).sum()  # saves the weight for x's gradient
    opt.step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize(("device", "backend"), PROJECT, ids=IDS)
def test_inference_tensor_outside_inference_mode_is_refused(device, backend):
    with torch.inference_mode():
        g = torch.randn(5, 12, device=device)
    u = orthonormal(12, 2, device)
    before = g.clone()
    with pytest.raises(RuntimeError, match="inference tensor"):
        gradproj.project_(g, u, backend=backend)
    assert torch.equal(g, before)
    with torch.inference_mode():  # inside inference mode torch allows it, and so do we
        gradproj.project_(g, u, backend=backend)
    assert not torch.equal(g, before)


def test_projected_adamw_refuses_an_inference_parameter():
    with torch.inference_mode():
        w = torch.randn(6, 12)
    p = torch.nn.Parameter(w.clone())  # a normal parameter, then its data swapped
    p.data = w
    p.grad = torch.randn(6, 12)
    opt = gradproj.ProjectedAdamW([p], lr=0.1, bases={p: orthonormal(12, 2)})
    with pytest.raises(RuntimeError, match="inference tensor"):
        opt.step()


# -- 2. overlap -----------------------------------------------------------------


@pytest.mark.parametrize(("device", "backend"), PROJECT, ids=IDS)
def test_overlapping_slices_of_one_buffer_are_refused(device, backend):
    g = torch.randn(8, 10, device=device)
    u = orthonormal(10, 2, device)
    before = g.clone()
    with pytest.raises(ValueError, match=r"grads\[1\] shares memory with grads\[0\]"):
        gradproj.project_([g[0:6], g[2:8]], u, backend=backend)  # rows 2-5 twice
    assert torch.equal(g, before)
    gradproj.project_([g[0:4], g[4:8]], u, backend=backend)  # disjoint slices are fine
    torch.testing.assert_close(g, before - before @ u @ u.T, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("device", "backend"), PROJECT, ids=IDS)
def test_internally_overlapping_views_are_refused(device, backend):
    buf = torch.randn(40, device=device)
    rows = buf.as_strided((6, 10), (5, 1))  # each row shares half its elements with the next
    u = orthonormal(10, 2, device)
    with pytest.raises(ValueError, match="internally overlapping"):
        gradproj.project_(rows, u, backend=backend)
    with pytest.raises(ValueError, match="internally overlapping"):
        gradproj.project_(torch.randn(1, 10, device=device).expand(4, 10), u, backend=backend)


@pytest.mark.parametrize(("device", "backend"), PROJECT, ids=IDS)
def test_basis_sharing_the_grads_memory_is_refused(device, backend):
    # The campaign saw an error of 269 on cpp: the kernel read U while writing G.
    buf = torch.zeros(12, 12, device=device)
    buf[:, :3] = orthonormal(12, 3, device)
    u = buf[:, :3]
    g = buf[3:9]
    with pytest.raises(ValueError, match=r"grads\[0\] shares memory with basis|basis .* shares"):
        gradproj.project_(g, u, backend=backend)


def test_overlap_sweep():
    buf = torch.zeros(100)
    other = torch.zeros(100)
    check_no_overlap([(buf[:50], "a"), (buf[50:], "b")], [(other, "basis")])
    check_no_overlap([(buf[70:], "a")], [(buf[:60], "u"), (buf[40:65], "w")])  # reads may share
    with pytest.raises(ValueError, match="a shares memory with u"):
        check_no_overlap([(buf[55:], "a")], [(buf[:60], "u"), (buf[10:20], "w")])
    with pytest.raises(ValueError, match="c shares memory with a"):
        check_no_overlap([(buf[:40], "a"), (buf[30:60], "c")], [(other, "r")])
    with pytest.raises(ValueError, match="r shares memory with a"):
        check_no_overlap([(buf[:30], "a")], [(buf[29:31], "r")])
    assert not may_overlap_internally(torch.randn(4, 6).T)
    assert not may_overlap_internally(torch.randn(4, 6)[:, ::2])
    assert may_overlap_internally(torch.randn(6).as_strided((3, 4), (1, 1)))


def test_surgery_refuses_an_unlearn_grad_that_aliases_the_retain_grad():
    buf = torch.randn(20)
    with pytest.raises(ValueError, match="shares memory"):
        gradproj.surgery_(buf[:12], buf[8:])
    with pytest.raises(ValueError, match="shares memory"):
        gradproj.surgery_([buf[:10], buf[5:15]], [torch.randn(10), torch.randn(10)])
    r = torch.randn(10)  # one retain gradient read by two pairs: fine (read only)
    gradproj.surgery_([buf[:10], buf[10:]], [r, r])


# -- 3. validate the whole call before the first write -----------------------------


def test_an_unsupported_dtype_late_in_the_list_changes_nothing():
    u = orthonormal(10, 2)
    grads = [torch.randn(4, 10, dtype=dt) for dt in (torch.float32, torch.bfloat16, torch.float16)]
    grads.append(torch.randn(4, 10, dtype=torch.float64))  # cpp does not take float64
    before = _snapshot(*grads)
    with pytest.raises(ValueError, match="cpp"):
        gradproj.project_(grads, u, backend="cpp")
    assert _unchanged(before, *grads)


def test_a_bad_anchor_late_in_the_list_changes_nothing():
    u = orthonormal(10, 2)
    ws = [torch.randn(4, 10) for _ in range(3)]
    anchors = [ops.anchor(w, u) for w in ws]
    for w in ws:
        w.add_(1.0)
    anchors[2] = anchors[2][:3]  # wrong shape
    before = _snapshot(*ws, *anchors[:2])
    with pytest.raises(ValueError, match=r"anchor of grads\[2\]"):
        ops.project_anchored_(ws, anchors, u)
    assert _unchanged(before, *ws, *anchors[:2])


def test_surgery_with_an_unsupported_dtype_changes_nothing():
    us = [torch.randn(6), torch.randn(6, dtype=torch.float64)]
    rs = [-u for u in us]
    before = _snapshot(*us, *rs)
    with pytest.raises(ValueError, match="cpp"):
        gradproj.surgery_(us, rs, backend="cpp")
    assert _unchanged(before, *us, *rs)


# -- 6. anchors without a full-size temporary ----------------------------------------


def _largest_allocation(fn) -> int:
    """Bytes of the largest single CPU allocation ``fn`` makes (torch's profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max((e.cpu_memory_usage for e in prof.events()), default=0)


@pytest.mark.parametrize("side", ["input", "output", "flat"])
def test_anchor_of_a_16_bit_weight_widens_it_a_slice_at_a_time(monkeypatch, side):
    # Was: a float32 copy of the whole weight (+1.2 GB for a 512 MiB bf16 weight).
    w = torch.randn(2048, 512, dtype=torch.bfloat16)  # 2 MiB; a float32 copy is 4 MiB
    d = {"input": 512, "output": 2048, "flat": w.numel()}[side]
    u = orthonormal(d, 4)
    monkeypatch.setattr(ops, "ANCHOR_CHUNK", 1 << 16)  # 256 KiB float32 slices
    c = ops.anchor(w, u, side=side)
    rows = {"input": w, "output": w.T, "flat": w.reshape(1, -1)}[side]
    torch.testing.assert_close(c.double(), rows.double() @ u.double(), rtol=1e-5, atol=1e-4)
    biggest = _largest_allocation(lambda: ops.anchor(w, u, side=side))
    assert biggest <= (1 << 16) * 4 + c.numel() * 4, f"largest allocation {biggest} B"
