"""The CUDA emulator of the tests (``tests/cuda_emulation.py``, ``csrc/cuda_emu``) on its own.

First the small kernels of ``csrc/cuda_emu/selftest.cpp``: barriers and warp
collectives give CUDA's results in every scheduling order, a missing barrier gives a
wrong one in some order, and every way a kernel can go wrong (a deadlock, a barrier or
a shuffle some threads skip, an exception, a fault) is a ``RuntimeError`` naming the
kernel and the thread, never a hang, after which the emulator runs on. Then the
kernels of ``csrc/cuda``: bit-identical results in every scheduling order (their sums
have a fixed order, so a difference is a race), grids smaller than the work (the
grid-stride loops), and a device whose shared memory opt-in is below what a launch needs.
The kernels' numerics are tested where every backend is (tests/test_project.py, ...).
"""

from __future__ import annotations

import itertools
import math
import os
import re
import subprocess
import sys
import textwrap
import zlib

import pytest
import torch

from . import cuda_emulation as emu

pytestmark = pytest.mark.skipif(
    not (emu.enabled() and emu.toolchain_present()),
    reason="the CUDA emulator is off (GRADPROJ_CUDA_EMULATION=0) or has no compiler / ninja",
)

SCHEDULES = ["forward", "reverse", "shuffle", "lowest", "highest", "random"]


def selftest(name, x=None, *, blocks=1, threads=256, smem=0, arg=0, out_numel=None):
    emu.load()
    if x is None:
        x = torch.randn(blocks * threads)
    n = blocks * threads if out_numel is None else out_numel
    return torch.ops.gradproj_emu.selftest(name, x, blocks, threads, smem, arg, n)


# ---------------------------------------------------------------- the emulator


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_barrier_orders_shared_memory_in_every_schedule(schedule, monkeypatch):
    monkeypatch.setenv("GRADPROJ_EMU_SCHEDULE", schedule)
    x = torch.randn(3 * 256)
    out = selftest("exchange", x, blocks=3, arg=1)
    assert torch.equal(out, x.view(3, 256).roll(-1, dims=1).flatten())


def test_a_missing_barrier_gives_a_wrong_result(monkeypatch):
    x = torch.randn(3 * 256)
    expected = x.view(3, 256).roll(-1, dims=1).flatten()
    for schedule in ("forward", "reverse"):  # a thread reads its neighbour's slot too early
        monkeypatch.setenv("GRADPROJ_EMU_SCHEDULE", schedule)
        assert not torch.equal(selftest("exchange", x, blocks=3, arg=0), expected), schedule


def _warp_ops_reference(x: torch.Tensor, width: int) -> torch.Tensor:
    """CUDA's documented results of the intrinsics of selftest.cpp's warp_ops."""
    out = torch.zeros(x.numel(), 7)
    for i in range(x.numel()):
        w0, lane = i - i % 32, i % 32
        seg = lane - lane % width

        def at(j, lane=lane, w0=w0):
            return x[w0 + j] if j is not None else x[w0 + lane]

        xor = lane ^ 5
        out[i, 0] = at(xor if xor < seg + width else None)
        out[i, 1] = at(seg + 3 % width)
        out[i, 2] = at(lane - 2 if lane - 2 >= seg else None)
        out[i, 3] = at(lane + 2 if lane + 2 < seg + width else None)
        out[i, 4] = float(sum(1 << j for j in range(16) if x[w0 + j] > 0))
        out[i, 5] = float(bool(x[w0 + 31] > 0))
        out[i, 6] = 1.0
    return out.flatten()


@pytest.mark.parametrize("width", [32, 8])
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_warp_intrinsics_match_cuda(width, schedule, monkeypatch):
    monkeypatch.setenv("GRADPROJ_EMU_SCHEDULE", schedule)
    x = torch.randn(64)
    out = selftest("warp_ops", x, threads=64, arg=width, out_numel=64 * 7)
    assert torch.equal(out, _warp_ops_reference(x, width))
    sums = selftest("warp_sum", x, threads=64)
    assert torch.allclose(sums, x.view(2, 32).sum(1).repeat_interleave(32), atol=1e-5)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize(
    ("kernel", "arg", "message"),
    [
        ("deadlock", 0, r"deadlock, no thread can go on.*threads 0-15 wait at __shfl_xor_sync"),
        (
            "skip_barrier",
            5,
            r"thread \(5, 0, 0\).*returned while \d+ threads wait at __syncthreads",
        ),
        ("partial_shuffle", 0, r"returned while lanes|deadlock"),
        ("mask_mismatch", 0, r"with mask 0x0000ffff while lanes|returned while lanes"),
        ("throws", 7, r"thread \(7, 0, 0\) \(warp 0, lane 7\) threw .*: thread 7 refuses"),
    ],
)
def test_a_broken_kernel_raises_never_hangs(kernel, arg, message, schedule, monkeypatch):
    monkeypatch.setenv("GRADPROJ_EMU_SCHEDULE", schedule)
    with pytest.raises(RuntimeError, match=message) as info:
        selftest(kernel, arg=arg)
    assert f"selftest::(anonymous namespace)::{kernel}(" in str(info.value)  # the kernel, named
    assert "block (0, 0, 0)" in str(info.value)
    x = torch.randn(256)  # the emulator runs on
    assert torch.equal(selftest("exchange", x, arg=1), x.roll(-1))


@pytest.mark.parametrize(
    ("arg", "smem"),
    [(0, 0), (1, 1000), (2, 0)],
    ids=["bad-address", "past-dynamic-smem", "stack-overflow"],
)
def test_a_fault_in_a_kernel_raises(arg, smem):
    with pytest.raises(RuntimeError, match=r"thread \(3, 0, 0\).*faulted \(SIGSEGV"):
        selftest("faults", arg=arg, smem=smem)
    x = torch.randn(256)
    assert torch.equal(selftest("exchange", x, arg=1), x.roll(-1))


def test_dynamic_shared_memory_starts_poisoned():
    assert selftest("poison", smem=1024).isnan().all()


def test_launch_configuration_is_checked():
    with pytest.raises(RuntimeError, match="invalid configuration argument"):
        selftest("exchange", threads=2048)
    with pytest.raises(RuntimeError, match=r"60000 bytes of dynamic shared memory.*allows 49152"):
        selftest("poison", smem=-60000)  # above 48 KiB without the kernel's attribute
    with pytest.raises(RuntimeError, match="cudaFuncSetAttribute: invalid argument"):
        selftest("poison", smem=300 * 1024)  # above the device's opt-in limit


def _tf32(x: torch.Tensor) -> torch.Tensor:
    """Round to tf32 (10 stored bits), to nearest, ties away from zero (cvt.rna.tf32.f32)."""
    bits = x.view(torch.int32)
    sign = bits & torch.iinfo(torch.int32).min
    mag = (bits & 0x7FFFFFFF) + 0x1000
    return (sign | (mag & 0x7FFFE000)).view(torch.float32)


def test_tensor_core_tile_is_the_documented_mma():
    """mma.sync m16n8k8 tf32 (csrc/cuda/mma.cuh's emulation): fragments loaded as PTX's
    ISA documents them give D = C + A B. mma.cuh's 3xTF32 split: hi is x rounded to
    tf32 (nearest, ties away, as cvt.rna.tf32.f32), hi + lo is x exactly, and a NaN or
    infinite x leaves a NaN lo."""
    gen = torch.Generator().manual_seed(5)
    a, b, c = (torch.randn(n, generator=gen) for n in (128, 64, 128))
    a, b = _tf32(a), _tf32(b)
    out = selftest("mma_tile", torch.cat([a, b, c]), threads=32, out_numel=128)
    want = c.double().view(16, 8) + a.double().view(16, 8) @ b.double().view(8, 8)
    assert (out.double().view(16, 8) - want).abs().max() < 1e-5
    # halfway cases go away from zero, others to the nearest tf32 value
    x = torch.tensor([1 + 2.0**-11, 1 + 3 * 2.0**-12, -(1 + 2.0**-11), 1 + 2.0**-12 - 2.0**-20])
    cuda_nan = torch.tensor([0x7FFFFFFF], dtype=torch.int32).view(torch.float32)
    special = torch.cat([torch.tensor([float("nan"), float("inf"), -float("inf")]), cuda_nan])
    x = torch.cat([x, torch.randn(312, generator=gen), special])
    hi, lo = selftest("mma_tile", x, threads=32, arg=1, out_numel=640).view(320, 2).unbind(1)
    assert hi[:4].tolist() == [1 + 2.0**-10, 1 + 2.0**-10, -(1 + 2.0**-10), 1.0]
    finite = x.isfinite()
    assert torch.equal(hi[finite], _tf32(x[finite]))
    assert torch.equal(hi[finite].double() + lo[finite].double(), x[finite].double())
    assert lo[~finite].isnan().all()
    # what the tensor cores read of hi and lo (their tf32 bits): within 2^-21 |x|
    seen = _trunc(hi[finite]).double() + _trunc(lo[finite]).double()
    assert ((seen - x[finite].double()).abs() <= 2.0**-21 * x[finite].double().abs()).all()


def test_truncated_split_is_exact_and_within_its_bound():
    """mma.cuh's split_truncated (16-bit results' operands): hi is x truncated to tf32,
    hi + lo is x exactly, |lo| < 2^-10 |x|, what the
    tensor cores read of the pair is within 2^-20 |x| of x, and a NaN or infinite x leaves
    a NaN lo."""
    gen = torch.Generator().manual_seed(6)
    # the worst cases: a mantissa of all ones below tf32's bits, and above them
    x = torch.tensor([1 + (2.0**13 - 1) * 2.0**-23, -(2 - 2.0**-23), 1.0, 2.0**-126])
    cuda_nan = torch.tensor([0x7FFFFFFF], dtype=torch.int32).view(torch.float32)
    special = torch.cat([torch.tensor([float("nan"), float("inf"), -float("inf")]), cuda_nan])
    scales = 10.0 ** torch.randint(-6, 6, (312,), generator=gen)
    x = torch.cat([x, torch.randn(312, generator=gen) * scales, special])
    hi, lo = selftest("mma_tile", x, threads=32, arg=2, out_numel=640).view(320, 2).unbind(1)
    finite = x.isfinite()
    xf, hf, lf = x[finite].double(), hi[finite], lo[finite]
    assert torch.equal(hf, _trunc(x[finite]))
    assert torch.equal(hf.double() + lf.double(), xf)
    assert (lf.double().abs() < 2.0**-10 * xf.abs()).all()
    err = (_trunc(hf).double() + _trunc(lf).double() - xf).abs()
    assert (err <= 2.0**-20 * xf.abs()).all()
    assert err.max() > 0  # the bound is not vacuous: some pairs lose low bits of lo
    assert lo[~finite].isnan().all()


def _trunc(x: torch.Tensor) -> torch.Tensor:
    """x's tf32 bits, as the tensor cores read an operand (the low 13 bits cleared)."""
    return (x.view(torch.int32) & -0x2000).view(torch.float32)


def _ulps(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """|got - want| in units of the last place of want rounded to fp32."""
    want = want.float()
    step = (torch.nextafter(want, torch.tensor(float("inf"))) - want).double()
    return ((got.double() - want.double()) / step).abs()


def _adamw_float64(ps, gs, ms, vs, steps, cs, u, w, **hyper) -> list:
    """gradproj.reference.projected_adamw of each param in float64 (not maximizing)."""
    from gradproj import reference

    lr, betas, eps = hyper["lr"], (hyper["beta1"], hyper["beta2"]), hyper["eps"]
    return [
        reference.projected_adamw(
            *(t.double() for t in (p, g, m, v)), int(s.item()), c.double(), u.double(),
            lr=lr, betas=betas, eps=eps, weight_decay=hyper["weight_decay"],
            weights=w.double(), maximize=False,
        )
        for p, g, m, v, s, c in zip(ps, gs, ms, vs, steps, cs, strict=True)
    ]  # fmt: skip


def _assert_streams_close(got, want, tol: float, where: str = "") -> None:
    """AdamW's streams p, m, v and c (in that order) finite and within tol of their float64
    values, relative to each stream's largest magnitude (at least 1e-2)."""
    for name, t, e in zip("pmvc", got, want, strict=True):
        assert torch.isfinite(t).all(), f"{where}{name}: not finite"
        scale = max(e.abs().max().item(), 1e-2)
        err = (t.double() - e).abs().max().item()
        assert err <= tol * scale, f"{where}{name}: {err} > {tol} * {scale}"


def test_sfu_approximations_stay_within_their_documented_ulps():
    """cuda_emu.h models sqrt.approx.f32 and __fdividef at their bounds (2 ulps here): the
    correctly rounded result moved by 0-2 ulps, as the operands' hash picks, so the kernels
    that take them (adamw.cu [fast update]) are tested against the error a GPU may give;
    zero, infinity and NaN exact; sqrt of a negative NaN; __fdividef 0 past |y| = 2^126."""
    gen = torch.Generator().manual_seed(2)
    n = 512  # threads = 2 n: a block of 1024
    num = torch.cat([torch.rand(n - 4, generator=gen) * 10.0 ** torch.randint(-30, 30, (n - 4,),
                     generator=gen), torch.tensor([0.0, -1.0, float("inf"), 1.0])])  # fmt: skip
    den = torch.cat(
        [torch.randn(n - 4, generator=gen).exp(), torch.tensor([2.0, 2.0, 2.0, 2.0**127])]
    )
    out = selftest("sfu", torch.cat([num, den]), threads=2 * n, out_numel=2 * n).view(n, 2)

    sqrt, quot = out[:-4, 0], out[:-4, 1]
    for got, want in ((sqrt, num[:-4].double().sqrt()), (quot, num[:-4].double() / den[:-4])):
        err = _ulps(got, want)
        assert err.max() <= 2.5, err.max()  # 2 ulps, and the reference's own half ulp
        assert (err > 1).float().mean() > 0.2  # moved: the model is not exact
    assert out[-4, 0] == 0 and out[-3, 0].isnan() and out[-2, 0] == float("inf")
    assert out[-4, 1] == 0 and out[-1, 1] == 0  # 0 / 2, and 1 / 2^127 (the SFU's range)


def test_flushed_sfu_forms_flush_and_stay_within_their_ulps():
    """cuda_emu.h's sqrt.approx.ftz and rcp.approx.ftz (adamw.cu [flushed root]): a
    subnormal operand is 0 (its root 0, its reciprocal inf), a reciprocal past 2^126 is 0,
    normal operands within 2 ulps (sqrt) and 1 ulp (rcp) of the correctly rounded result,
    so x rcp(y) within 4 of x / y (rcp's error is relative, up to 1.5 2^-23 with its own
    rounding, 3 ulps of a quotient at the bottom of its binade; the product's half ulp)."""
    gen = torch.Generator().manual_seed(3)
    n = 512
    tiny = torch.finfo(torch.float32).tiny
    num = torch.cat([torch.rand(n - 4, generator=gen) * 10.0 ** torch.randint(-30, 30, (n - 4,),
                     generator=gen), torch.tensor([tiny / 4, tiny, 1.0, 1.0])])  # fmt: skip
    den = torch.cat([torch.randn(n - 4, generator=gen).exp(),
                     torch.tensor([2.0, 2.0, tiny / 8, 2.0**127])])  # fmt: skip
    out = selftest("sfu_ftz", torch.cat([num, den]), threads=2 * n, out_numel=2 * n).view(n, 2)

    sqrt, quot = out[:-4, 0], out[:-4, 1]
    assert _ulps(sqrt, num[:-4].double().sqrt()).max() <= 2.5
    err = _ulps(quot, num[:-4].double() / den[:-4])
    assert err.max() <= 4.0, err.max()
    assert (err > 0.5).float().mean() > 0.2  # moved: the model is not exact
    assert out[-4, 0] == 0 and out[-3, 0] > 0  # flushed; the least normal's root
    assert out[-2, 1] == float("inf") and out[-1, 1] == 0  # 1 / (a subnormal); 1 / 2^127


def test_grid_stride_loops_cover_the_work():
    out = selftest("grid_stride", torch.zeros(1), blocks=2, threads=64, arg=1000, out_numel=1000)
    assert torch.equal(out, torch.arange(1, 1001, dtype=torch.float32))


# ---------------------------------------------------------------- csrc/cuda's kernels


def _orthonormal(d: int, k: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(d, k, generator=gen, dtype=torch.float64))[0]
    return q.float().contiguous()  # the ops take a contiguous basis (gradproj.ops makes it so)


def _project(shape, side, k, dtype=torch.float32, soft=False, anchored=False):
    """One call of the project ops on fresh inputs; the tensors it wrote."""
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, side, k)).encode()))
    g = torch.randn(shape, generator=gen).to(dtype)
    view = {"input": g, "output": g.t(), "flat": g.flatten()}[side]
    d = view.shape[-1]
    u = _orthonormal(d, k, seed=1)
    w = torch.rand(k, generator=gen) if soft else None
    if anchored:
        rows = 1 if side == "flat" else view.shape[0]
        c = torch.randn(rows, k, generator=gen)
        emu.project_anchored_bucket_([view], [c], u, w, side)
        return [g, c]
    emu.project_bucket_([view], u, w, side)
    return [g]


def _project_bucket(counts, d, side, k, dtype, anchored):
    """One call of the project ops with soft weights on a bucket of ``len(counts)`` tensors
    (``counts[i]`` rows of ``d``; side "output": transposed views); the tensors it wrote."""
    gen = torch.Generator().manual_seed(zlib.crc32(repr((counts, d, side, k)).encode()))
    shapes = [(n, d) if side == "input" else (d, n) for n in counts]
    gs = [torch.randn(shape, generator=gen).to(dtype) for shape in shapes]
    views = gs if side == "input" else [g.t() for g in gs]
    u = _orthonormal(d, k, seed=1)
    w = torch.rand(k, generator=gen)
    if anchored:
        cs = [torch.randn(n, k, generator=gen) for n in counts]
        emu.project_anchored_bucket_(views, cs, u, w, side)
        return gs + cs
    emu.project_bucket_(views, u, w, side)
    return gs


def _adamw(shape, side, dtype=torch.float32, amsgrad=False, k=4):
    gen = torch.Generator().manual_seed(7)
    p, g, m = (torch.randn(shape, generator=gen).to(dtype) for _ in range(3))
    v = torch.rand(shape, generator=gen).to(dtype)
    vmax = v.clone() if amsgrad else None
    views = [{"input": t, "output": t.t(), "flat": t.flatten()}[side] for t in (p, g, m, v)]
    d = views[0].shape[-1]
    rows = 1 if side == "flat" else views[0].shape[0]
    c = torch.randn(rows, k, generator=gen)
    vm = None if vmax is None else [vmax.t() if side == "output" else vmax]
    emu.projected_adamw_bucket_(
        [views[0]], [views[1]], [views[2]], [views[3]], vm, [torch.tensor(3.0)], [c],
        _orthonormal(d, k, seed=2), torch.rand(k, generator=gen), side,
        lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2, maximize=False,
    )  # fmt: skip
    return [p, m, v, c] + ([] if vmax is None else [vmax])


def _surgery(numels, dtype=torch.float32):
    gen = torch.Generator().manual_seed(3)
    us = [torch.randn(n, generator=gen).to(dtype) for n in numels]
    rs = [(-0.5 * u.float() + 0.3 * torch.randn(u.shape, generator=gen)).to(dtype) for u in us]
    emu.surgery_bucket_(us, rs, 0.7, "cosine", True)
    return us + rs


# Every launch shape of the engines: rows on tensor cores (mma_rows.cuh: every k,
# d <= 1280; fp32 at k <= 8 (one k-step); plain and anchored with soft weights, 16-bit,
# 8 and 10 blocks a warp, 16-bit rows on 16 warps (3 blocks a warp, the last two warps
# short; buckets of six tensors over 5-6 tiles a CTA: the row cache's slots written
# again), a basis taken a block of columns a launch, AdamW's too), rows fused (wider than
# 1280: U^T resident, and staged per chunk: k = 40 at d = 2000 is 320 KiB), rows split
# (d > 4096), transposed views (the block policies past 1280 columns: fused, split past
# d = 2048, AdamW's past 1024), flat (one and several segments), anchored with soft
# weights, projected AdamW (rows on tensor cores and not, cols, amsgrad; cols on 16 warps:
# strided, in row pairs), surgery (one chunk and several; whole chunks of 16-bit pairs as
# packs); the FMA engine's chunks of 1, 2 and 4 coefficients (k = 1 to 4: fused, split,
# flat, transposed views, AdamW's).
REAL_CASES = {
    "rows-resident": lambda: _project((5, 1300), "input", 7),
    "rows-mma": lambda: _project((45, 260), "input", 40),
    "rows-mma-fp32-one-step": lambda: _project((37, 129), "input", 7),
    "rows-mma-anchored-soft": lambda: _project((45, 260), "input", 12, soft=True, anchored=True),
    "rows-mma-bf16": lambda: _project((20, 1000), "input", 24, torch.bfloat16),
    "rows-mma-16-warps": lambda: _project((45, 700), "input", 20, torch.float16, True, True),
    "rows-mma-row-cache": lambda: _project_bucket(
        [4, 18, 40, 2, 130, 56], 700, "input", 20, torch.float16, True
    ),
    "rows-mma-row-cache-pairs": lambda: _project_bucket(
        [4, 18, 40, 2, 130, 56], 700, "output", 20, torch.bfloat16, False
    ),
    "rows-mma-wide": lambda: _project((20, 1100), "input", 24, soft=True, anchored=True),
    "rows-mma-fp32-16-warps": lambda: _project((45, 700), "input", 40, soft=True, anchored=True),
    "cols-mma-fp32-16-warps": lambda: _project((1000, 45), "output", 20, soft=True),
    "rows-mma-column-blocks": lambda: _project((40, 768), "input", 160, soft=True, anchored=True),
    "rows-mma-pairs-fp16": lambda: _project((45, 260), "input", 40, torch.float16, soft=True),
    "rows-chunked-bf16": lambda: _project((6, 2000), "input", 40, torch.bfloat16),
    "rows-split-fp16": lambda: _project((5, 5000), "input", 9, torch.float16),
    "cols-fused": lambda: _project((1300, 10), "output", 7),
    "cols-soft": lambda: _project((300, 40), "output", 5, soft=True),
    "cols-split-bf16": lambda: _project((2100, 12), "output", 5, torch.bfloat16),
    "flat-split-anchored": lambda: _project((3, 3000), "flat", 3, soft=True, anchored=True),
    "flat-split-k1": lambda: _project((3, 3000), "flat", 1, soft=True, anchored=True),
    "rows-resident-k1-bf16": lambda: _project((5, 1300), "input", 1, torch.bfloat16),
    "cols-split-k1": lambda: _project((2100, 12), "output", 1, soft=True, anchored=True),
    "flat-split-k2-bf16": lambda: _project((3, 3000), "flat", 2, torch.bfloat16, soft=True),
    "rows-resident-k4": lambda: _project((5, 1300), "input", 4, soft=True, anchored=True),
    "rows-split-k3-fp16": lambda: _project((5, 5000), "input", 3, torch.float16),
    "anchored-soft": lambda: _project((5, 1300), "input", 7, soft=True, anchored=True),
    "adamw-rows-bf16": lambda: _adamw((9, 70), "input", torch.bfloat16),
    "adamw-rows-mma": lambda: _adamw((45, 260), "input", k=12),
    "adamw-rows-mma-bf16": lambda: _adamw((40, 256), "input", torch.bfloat16, k=20),
    "adamw-rows-mma-column-blocks": lambda: _adamw((40, 768), "input", k=160),
    "adamw-rows-mma-row-cache": lambda: _adamw((250, 768), "input", torch.bfloat16, k=20),
    "adamw-cols-amsgrad": lambda: _adamw((70, 9), "output", amsgrad=True),
    "adamw-flat-k1": lambda: _adamw((3, 3000), "flat", k=1),
    "adamw-cols-split": lambda: _adamw((1100, 12), "output"),
    "adamw-cols-16-warps": lambda: _adamw((700, 12), "output", k=12),
    "adamw-cols-16-warps-pairs": lambda: _adamw((700, 12), "output", torch.bfloat16, k=12),
    "surgery": lambda: _surgery([7, 70000]),
    "surgery-bf16-packs": lambda: _surgery([3 * 4096, 9000], torch.bfloat16),
}


@pytest.mark.parametrize("schedule", ["reverse", "shuffle", "lowest", "highest", "random"])
@pytest.mark.parametrize("case", list(REAL_CASES))
def test_kernels_give_the_same_bits_in_every_schedule(case, schedule, monkeypatch):
    monkeypatch.setenv("GRADPROJ_EMU_SCHEDULE", "forward")
    expected = REAL_CASES[case]()
    monkeypatch.setenv("GRADPROJ_EMU_SCHEDULE", schedule)
    got = REAL_CASES[case]()
    for e, g in zip(expected, got, strict=True):
        assert torch.equal(e, g)


# [small k] (tile.cuh): the FMA engine takes k < 8 in chunks of 1, 2 or 4 coefficients.
# Every such chunk size on each of its launch forms (flat split, rows fused past the
# tensor-core kernel's 1280 columns, rows split past 4096, transposed views split past
# 2048), plain with soft weights and anchored, against float64; k = 5 takes chunks of 8.
@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
@pytest.mark.parametrize(
    ("shape", "side"),
    [((3, 3000), "flat"), ((5, 1300), "input"), ((3, 5000), "input"), ((2100, 12), "output")],
)
@pytest.mark.parametrize("anchored", [False, True], ids=["plain", "anchored"])
def test_fma_engine_small_k_matches_float64(shape, side, k, anchored):
    from gradproj import reference as R

    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, side, k)).encode()))
    g = torch.randn(shape, generator=gen)
    view_of = {"input": lambda t: t, "output": lambda t: t.t(), "flat": lambda t: t.flatten()}
    d = view_of[side](g).shape[-1]
    u = _orthonormal(d, k, seed=5)
    w = torch.rand(k, generator=gen)
    out = g.clone()
    view = view_of[side](out)
    rows = view.reshape(1, -1) if side == "flat" else view
    if anchored:
        c = torch.randn(rows.shape[0], k, generator=gen)
        c_out = c.clone()
        emu.project_anchored_bucket_([view], [c_out], u, w, side)
        x = view_of[side](g).reshape(rows.shape).double()
        want, c_want = R.project_anchored(x, c.double(), u.double(), weights=w.double())
        torch.testing.assert_close(c_out.double(), c_want, rtol=0, atol=1e-5)
    else:
        emu.project_bucket_([view], u, w, side)
        x = view_of[side](g).reshape(rows.shape).double()
        want = R.project(x, u.double(), weights=w.double())
    assert "mma_rows_kernel<" not in emu.last_kernel(), emu.last_kernel()
    kc = 1 if k == 1 else 2 if k == 2 else 4 if k <= 4 else 8
    assert re.search(r"Mode\)\d, (\d)>", emu.last_kernel()).group(1) == str(kc)
    got = rows.double()
    assert (got - want).abs().max() <= 1e-5 * max(1.0, want.abs().max().item())


# [stacked] (mma_rows.cuh): 16-bit projections of a launch of at most 8 columns stage U
# split, hi and lo as the fragment layout's two groups, one MMA a k-step forming both
# products. Against float64: 8 warps (d = 260, and 10 blocks a warp at 1100) and 16
# (d = 700; d = 1000 at 4 blocks a warp, whose [row cache] warp 0 looks up a tile at a time
# in eight slots: kLookupTiles), plain with soft weights and anchored, transposed views in
# row pairs. The launch's shared memory is the stacked layout's (kp = 16), as the model's
# twin sizes it.
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(
    ("shape", "side", "k", "anchored"),
    [
        ((45, 260), "input", 1, False),
        ((45, 260), "input", 8, True),
        ((45, 700), "input", 5, True),
        ((70, 1000), "input", 6, False),
        ((700, 46), "output", 8, False),
        ((20, 1100), "input", 3, True),
    ],
)
def test_stacked_basis_matches_float64(dtype, shape, side, k, anchored):
    from gradproj import reference as R

    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, side, k, anchored)).encode()))
    g = torch.randn(shape, generator=gen).to(dtype)
    view_of = {"input": lambda t: t, "output": lambda t: t.t()}[side]
    x = view_of(g).double()
    d = x.shape[-1]
    u = _orthonormal(d, k, seed=9)
    w = torch.rand(k, generator=gen)
    out = g.clone()
    if anchored:
        c = torch.randn(x.shape[0], k, generator=gen)
        c_out = c.clone()
        emu.project_anchored_bucket_([view_of(out)], [c_out], u, w, side)
        want, c_want = R.project_anchored(x, c.double(), u.double(), weights=w.double())
        torch.testing.assert_close(c_out.double(), c_want, rtol=0, atol=1e-4)
    else:
        emu.project_bucket_([view_of(out)], u, w, side)
        want = R.project(x, u.double(), weights=w.double())
    kernel = emu.last_kernel()
    stacked = re.search(r"mma_rows_kernel<.*, false, (8|16), true, false>\(", kernel)
    assert stacked, kernel
    warps = int(stacked.group(1))
    pmc = emu.perf_model_cuda()
    assert emu.last_smem() == pmc._mma_smem(-(-d // 16), 16, False, warps, 16)
    err = (view_of(out).double() - want).abs().max()
    assert err <= TOL[dtype] * max(1.0, want.abs().max().item())


def test_kernels_run_on_grids_smaller_than_their_work():
    # tensor cores: 19 tiles of 16 rows; the FMA engine (rows wider than 1280) its own tiles
    for shape, tensor_cores in (((300, 768), True), ((120, 1300), False)):
        before = emu.stats()
        _project(shape, "input", 7)
        launches, blocks, _ = (a - b for a, b in zip(emu.stats(), before, strict=True))
        assert ("mma_rows_kernel<" in emu.last_kernel()) == tensor_cores, emu.last_kernel()
        assert launches == 1 and blocks <= 6  # 3 SMs x 2 blocks: each block loops over tiles


def test_the_grid_is_the_fewest_blocks_that_take_as_many_rounds():
    """launch.cuh [grid] balanced_grid: 4 tiles on 3 SMs of one tensor-core block each
    (bf16 k = 32 at d = 768 stages 2 x 96 KiB) run in 2 rounds either way, so 2 blocks take
    them (each stages the basis once: 3 did); at two blocks an SM (fp32 k = 8) 8 tiles keep
    6 blocks, 2 an SM, not 4 (which would put 2 on one SM and 1 on the others)."""
    pmc = emu.perf_model_cuda()
    cases = (((64, 768), torch.bfloat16, 32, 2), ((128, 768), torch.float32, 8, 6))
    for shape, dtype, k, want in cases:
        before = emu.stats()
        out = _project(shape, "input", k, dtype)[0]
        launches, blocks, _ = (a - b for a, b in zip(emu.stats(), before, strict=True))
        assert "mma_rows_kernel<" in emu.last_kernel()
        per_sm = min(2, (227 * 1024 + 1024) // emu.last_smem())  # the emulator's occupancy
        assert launches == 1 and blocks == want == pmc.balanced_grid(3 * per_sm, shape[0] // 16, 3)
        # and the rows are right
        gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, "input", k)).encode()))
        g = torch.randn(shape, generator=gen).to(dtype).double()
        u = _orthonormal(shape[1], k, seed=1).double()
        ref = g - g @ u @ u.T
        assert (out.double() - ref).abs().max() <= TOL[dtype] * max(1.0, ref.abs().max().item())


def test_a_device_below_the_shared_memory_a_launch_needs_refuses_it():
    """At a 99 KiB opt-in (sm_86) a 4096-wide row stages 128 KiB of U^T: the launch
    helper's check refuses it; 1024-wide rows fit and are right. The tensor-core kernel
    takes a basis above the opt-in (d = 1000, k = 40: 172 KiB) a block of columns a
    launch, 16, 16 and 8 ([columns]); at d = 768 k = 128, six (five of 24, one of 8)."""
    script = textwrap.dedent(
        """
        import torch
        from tests import cuda_emulation as emu

        def run(d, k=8):
            g = torch.randn(4, d)
            u = torch.linalg.qr(torch.randn(d, k, dtype=torch.float64))[0].float().contiguous()
            out = g.clone()
            emu.project_bucket_([out], u, None, "input")
            ref = g.double() - g.double() @ u.double() @ u.double().T
            return (out.double() - ref).abs().max()

        assert run(1024) < 1e-5
        for d, k, launches in ((1000, 40, 3), (768, 128, 6)):
            before = emu.stats()[0]
            assert run(d, k) < 1e-5
            assert emu.stats()[0] - before == launches, (d, k)
            assert "mma_rows_kernel<" in emu.last_kernel()
        # 16-bit rows whose U does not fit twice (2 x 96 KiB): U staged unsplit, on 16
        # warps ([16 warps]: their partial sums fit beside it)
        g = torch.randn(40, 768).bfloat16()
        u = torch.linalg.qr(torch.randn(768, 20, dtype=torch.float64))[0].float().contiguous()
        want = g.double() - g.double() @ u.double() @ u.double().T
        emu.project_bucket_([g], u, None, "input")
        assert ", 3, false, 16, false, false>(" in emu.last_kernel(), emu.last_kernel()
        assert (g.double() - want).abs().max() <= 2.0**-7 * want.abs().max()
        # k = 16: U once in pairs' order ([raw pairs]: 69 KiB, where pairs take 117)
        g = torch.randn(40, 768).bfloat16()
        u = torch.linalg.qr(torch.randn(768, 16, dtype=torch.float64))[0].float().contiguous()
        want = g.double() - g.double() @ u.double() @ u.double().T
        # (the [row cache]: a projection's eight slots of 16 rows, 24 bytes a row; then
        # [async staging]'s mbarrier, 16 bytes)
        emu.project_bucket_([g], u, None, "input")
        assert ", 3, true, 16, false, true>(" in emu.last_kernel(), emu.last_kernel()
        assert emu.last_smem() == 4 * (48 * 2 * 128 + 16 * 16 * 16 + 16 * 32) + 8 * 16 * 24 + 16
        assert (g.double() - want).abs().max() <= 2.0**-7 * want.abs().max()
        assert run(260, 40) < 1e-5  # 43 KiB: tensor cores
        try:
            run(4096)
        except RuntimeError as e:
            assert "sm_80 or newer is required" in str(e), e
        else:
            raise AssertionError("a 128 KiB launch ran at a 99 KiB opt-in")
        """
    )
    env = {**os.environ, "GRADPROJ_EMU_SMEM_OPTIN": "99K"}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=emu.ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]


# ---------------------------------------------------------------- transposed views

# Transposed views (side="output") of d <= 1024 run the tensor-core rows kernel with
# strided rows (every k); the others the FMA rows kernel with a block policy: 4 view rows a
# group, G's row j read as one vector holding element j of all four. These shapes take
# every path of both against float64: whole aligned blocks, a ragged last block or tile
# (rows % 4, % 16), a view offset by one column (misaligned: the element path), d not a
# multiple of 4, the block policy's fused launch (1280 < d <= 2048: wider than the
# tensor-core kernel) and its split launches (project_ beyond d = 2048, projected AdamW
# beyond 1024).
TRANSPOSED = {
    "aligned": ((768, 64), (0, 64)),
    "ragged-rows": ((300, 37), (0, 37)),
    "misaligned": ((300, 40), (1, 37)),
    "odd-d": ((301, 16), (0, 16)),
    "wide": ((1500, 20), (0, 20)),
    "split": ((2100, 12), (0, 12)),
}
TOL = {torch.float32: 1e-5, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


def _pair_rows(*views: torch.Tensor) -> bool:
    """mma_rows.cuh pair_rows, as both launchers check it: 16-bit transposed views whose rows
    2i and 2i + 1 lie in one 32-bit word at every column (mma_rows.cuh [row pairs])."""
    return all(
        v.element_size() == 2
        and v.stride(0) == 1
        and v.shape[0] % 2 == 0
        and v.stride(1) % 2 == 0
        and v.data_ptr() % 4 == 0
        for v in views
    )


def _adamw_kernel_tail(dtype: torch.dtype, k: int, nb: int, warps: int, row_pairs: bool) -> str:
    """The end of the name of AdamW's tensor-core kernel of one launch of k columns: NB,
    the layout and the warps. 16-bit rows of k > 8 whose k padded to 16 is k padded to 8
    take [raw pairs] (mma_rows.cuh kRawPairsAt) at most 4 blocks a warp on 8 warps, row
    pairs on 16; the others the fragments."""
    raw = dtype != torch.float32 and k > 8 and -(-k // 16) * 16 == -(-k // 8) * 8
    raw = raw and (nb <= 4 if warps == 8 else row_pairs)
    flag = "true" if raw else "false"
    return f", {nb}, {flag}, {warps}, false, {flag}>("


def _expect_engine(d: int, k: int, dtype: torch.dtype, adamw: bool = False, pairs=False) -> None:
    """The engine project.cu / adamw.cu chose for transposed views of this basis: tensor cores
    up to kMaxRowD at every k, except 16-bit AdamW views that do not pair their rows ([row
    pairs]; AdamW's up to d = 768), on the block policy up to k = 32."""
    fp32 = dtype == torch.float32
    pairs = pairs and not fp32 and d <= (768 if adamw else 1024)
    tensor_cores = d <= (1024 if adamw else 1280)  # mma_rows.cuh kMaxRowD
    tensor_cores = tensor_cores and (fp32 or pairs or not adamw or k > 32)
    kernel = emu.last_kernel()
    assert ("mma_rows_kernel<" in kernel) == tensor_cores, kernel
    if tensor_cores:
        assert ("PairPolicy<" in kernel) == pairs, kernel


@pytest.mark.parametrize("k", [6, 20])
@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("case", list(TRANSPOSED))
def test_transposed_views_match_float64(case, dtype, k):
    (m, n), (c0, c1) = TRANSPOSED[case]
    gen = torch.Generator().manual_seed(zlib.crc32(case.encode()))
    g = torch.randn(m, n, generator=gen).to(dtype)
    u = _orthonormal(m, k, seed=4)
    w = torch.rand(k, generator=gen)
    view = g[:, c0:c1].t()  # (view rows = columns of G) x d
    x = view.double()
    want = x - ((x @ u.double()) * w.double()) @ u.double().t()
    untouched = torch.cat([g[:, :c0], g[:, c1:]], dim=1)
    emu.project_bucket_([view], u, w, "output")
    _expect_engine(m, k, dtype, pairs=_pair_rows(view))
    scale = want.abs().max().item()
    assert (view.double() - want).abs().max().item() <= TOL[dtype] * scale
    assert torch.equal(torch.cat([g[:, :c0], g[:, c1:]], dim=1), untouched)


@pytest.mark.parametrize("k", [4, 12, 40, 200])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "shape", [(300, 12), (301, 9), (300, 37), (1100, 12), (700, 12), (700, 13), (1000, 13)]
)
def test_projected_adamw_on_transposed_views_matches_the_reference(shape, dtype, k):
    """k = 40: 16-bit views on tensor cores (fp32 at every k); k = 200 at d = 300 takes two
    launches (104 + 96 columns: the AdamW step, then the projection), at d = 1100 the FMA
    engine staging Uᵀ a chunk at a time; d = 700 and 1000 on 16 warps ([16 warps]: strided
    rows, and 16-bit rows in pairs where the views' rows pair up, 12, not 13, to 768; fp32
    views of 1000 columns on 8)."""
    from gradproj import backends

    gen = torch.Generator().manual_seed(11)
    p, g, m = (torch.randn(shape, generator=gen).to(dtype) for _ in range(3))
    v = torch.rand(shape, generator=gen).to(dtype)
    d = shape[0]
    c = torch.randn(shape[1], k, generator=gen)
    u = _orthonormal(d, k, seed=5)
    w = torch.rand(k, generator=gen)
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2, maximize=False)
    ref = [t.clone() for t in (p, m, v, c)]
    backends.get("reference").op("projected_adamw_bucket_")(
        [ref[0].t()], [g.t()], [ref[1].t()], [ref[2].t()], None, [torch.tensor(3.0)],
        [ref[3]], u, w, "output", **hyper,
    )  # fmt: skip
    before = emu.stats()[0]
    emu.projected_adamw_bucket_(
        [p.t()], [g.t()], [m.t()], [v.t()], None, [torch.tensor(3.0)], [c], u, w, "output",
        **hyper,
    )  # fmt: skip
    launches = emu.stats()[0] - before - 1  # the rows' (adamw.cu's [bias] kernel first)
    _expect_engine(d, k, dtype, adamw=True, pairs=_pair_rows(p.t()))
    if "mma_rows_kernel<" in emu.last_kernel() and 512 < d <= 1024 and k <= 40:  # one launch
        # fp32 views past 768 columns: 8 warps of 8 blocks (on 16 warps of 4 they spilled)
        fp32_wide = dtype == torch.float32 and d > 768
        nb = 3 if d <= 768 else 4
        want = _adamw_kernel_tail(dtype, k, nb, 16, "PairPolicy<" in emu.last_kernel())
        if fp32_wide:
            want = ", 8, false, 8, false, false>("
        assert want in emu.last_kernel(), emu.last_kernel()
    # fp32: the projection's sums of k products err like √k (max |Δp| at d = 300, one
    # launch: 1.3e-6 at k = 12, 2.6e-6 at 100, 4.8e-6 at 168; two launches at 200: 4.2e-6).
    # bf16: p is rounded once a launch (a block of basis columns each, mma_rows.cuh
    # [columns]: 5 at k = 200, d = 1000) and the reference's once, half an ulp each
    tol = {
        torch.float32: 1e-6 * math.sqrt(max(k, 12) / 12),
        torch.bfloat16: max(2.0**-7, (launches + 1) * 2.0**-9),
    }[dtype]
    for got, want in zip((p, m, v, c), ref, strict=True):
        scale = max(want.abs().max().item(), 1.0)
        assert (got.double() - want.double()).abs().max().item() <= tol * scale


# [row pairs] A bucket of 16-bit transposed views whose rows pair up (even row counts, each
# view 4-byte aligned with an even column stride) in one launch: 6 + 10 + 22 = 38 view rows,
# so tiles of 16 straddle the views and the last is ragged. d = 256: whole tiles (the pair
# loads and stores); d = 262: a warp's last block ragged and d % 4 != 0 (the element paths,
# rows mapped to MMA rows as the pairs map them); d = 700: 16 warps of 3 blocks ([16 warps]:
# AdamW's load their own tile a block at a time), warp 14's last block ragged, warp 15 none.
ROW_PAIRS = {"whole": 256, "ragged": 262, "sixteen-warps": 700}


def _pair_views(d: int, dtype: torch.dtype, gen: torch.Generator, offset: int = 0):
    """Transposed views of 6, 10 and 22 rows: columns [offset, offset + n) of (d, n + 4) G."""
    gs = [torch.randn(d, n + 4, generator=gen).to(dtype) for n in (6, 10, 22)]
    return gs, [g[:, offset : offset + n].t() for g, n in zip(gs, (6, 10, 22), strict=True)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k", [8, 24])
@pytest.mark.parametrize("case", list(ROW_PAIRS))
def test_row_pairs_match_float64(case, k, dtype):
    """Plain (soft weights) and anchored (soft weights, anchors off the rows, so a row
    finished with another row's anchor misses) against float64; the views start at column
    2 of G (4-byte aligned: pairs). At column 1 (2-byte aligned) the launch keeps one row a
    lane, and so does a bucket with one view of an odd number of rows."""
    d = ROW_PAIRS[case]
    gen = torch.Generator().manual_seed(d + k)
    u = _orthonormal(d, k, seed=12)
    w = torch.rand(k, generator=gen)
    u64, w64 = u.double(), w.double()
    for anchored in (False, True):
        gs, views = _pair_views(d, dtype, gen, offset=2)
        xs = [v.double() for v in views]
        cs = [torch.randn(v.shape[0], k, generator=gen) for v in views]
        deltas = [x @ u64 - (c.double() if anchored else 0.0) for x, c in zip(xs, cs, strict=True)]
        want = [x - (dl * w64) @ u64.t() for x, dl in zip(xs, deltas, strict=True)]
        untouched = [torch.cat([g[:, :2], g[:, -2:]], dim=1) for g in gs]
        if anchored:
            want_c = [c.double() + (1 - w64) * dl for c, dl in zip(cs, deltas, strict=True)]
            emu.project_anchored_bucket_(views, cs, u, w, "output")
        else:
            emu.project_bucket_(views, u, w, "output")
        assert "PairPolicy<" in emu.last_kernel(), emu.last_kernel()
        for i, (v, e) in enumerate(zip(views, want, strict=True)):
            err = (v.double() - e).abs().max().item()
            assert err <= TOL[dtype] * e.abs().max().item(), (anchored, i, err)
        for g, before in zip(gs, untouched, strict=True):
            assert torch.equal(torch.cat([g[:, :2], g[:, -2:]], dim=1), before)
        if anchored:
            for c, e in zip(cs, want_c, strict=True):
                assert (c.double() - e).abs().max().item() <= 1e-5 * e.abs().max().item()
    # not pairs: a view 2-byte aligned, or one of an odd number of rows in the bucket
    _, views = _pair_views(d, dtype, gen, offset=1)
    emu.project_bucket_(views, u, w, "output")
    assert "mma_rows_kernel<" in emu.last_kernel() and "PairPolicy<" not in emu.last_kernel()
    _, views = _pair_views(d, dtype, gen)
    views[1] = views[1][:9]
    emu.project_bucket_(views, u, w, "output")
    assert "mma_rows_kernel<" in emu.last_kernel() and "PairPolicy<" not in emu.last_kernel()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", list(ROW_PAIRS))
def test_row_pairs_adamw_matches_float64(case, dtype):
    """adamw.cu's transposed 16-bit views on tensor cores in row pairs (AdamWPairPolicy: p,
    g, m, v loaded as pairs, m and v stored as pairs), k = 12 (below the block policy's 32),
    soft weights, a step count per param, against gradproj.reference.projected_adamw in
    float64. p, m and v are columns [2, n + 2) of their G, the gradients columns [4, n + 4)
    of a wider one (their own strides and offset)."""

    d, k = ROW_PAIRS[case], 12
    gen = torch.Generator().manual_seed(d)
    u = _orthonormal(d, k, seed=13)
    w = torch.rand(k, generator=gen)
    ps, ms, vs, gs, cs, steps = ([] for _ in range(6))
    for i, n in enumerate((6, 10, 22)):
        base = (0.1 * torch.randn(d, n + 2, generator=gen)).to(dtype)
        ps.append(base[:, 2:].t())
        gs.append(torch.randn(d, n + 6, generator=gen).to(dtype)[:, 4 : 4 + n].t())
        ms.append((0.01 * torch.randn(d, n + 2, generator=gen)).to(dtype)[:, 2:].t())
        vs.append((0.01 * torch.rand(d, n + 2, generator=gen)).to(dtype)[:, 2:].t())
        cs.append(torch.randn(n, k, generator=gen))
        steps.append(torch.tensor(float(3 + i)))
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2)
    want = _adamw_float64(ps, gs, ms, vs, steps, cs, u, w, **hyper)
    emu.projected_adamw_bucket_(ps, gs, ms, vs, None, steps, cs, u, w, "output", **hyper,
                                maximize=False)  # fmt: skip
    assert "AdamWPairPolicy<" in emu.last_kernel(), emu.last_kernel()
    nb, warps = (3, 16) if d > 512 else (2 if d <= 256 else 3 if d <= 384 else 4, 8)
    assert _adamw_kernel_tail(dtype, k, nb, warps, True) in emu.last_kernel(), emu.last_kernel()
    tol = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}[dtype]
    for i, (got, exp) in enumerate(zip(zip(ps, ms, vs, cs, strict=True), want, strict=True)):
        _assert_streams_close(got, (exp[0], exp[1], exp[2], exp[4]), tol, f"param {i} ")


# ---------------------------------------------------------------- tensor-core rows


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("cols", [770, 768])
def test_tensor_core_rows_match_float64(dtype, cols):
    """mma_rows.cuh on a 770-column view of 772-column rows (vector loads, a ragged last
    vector; 16-bit rows prefetch the next tile's vectors) and on whole rows, 200 rows:
    13 tiles of 16 on the emulator's 6 resident CTAs, so each CTA runs several."""
    gen = torch.Generator().manual_seed(cols)
    g = torch.randn(200, 772, generator=gen).to(dtype)
    u = _orthonormal(cols, 20, seed=6)
    w = torch.rand(20, generator=gen)
    view = g[:, :cols]
    x = view.double()
    want = x - ((x @ u.double()) * w.double()) @ u.double().t()
    untouched = g[:, cols:].clone()
    emu.project_bucket_([view], u, w, "input")
    assert "mma_rows_kernel<" in emu.last_kernel()
    # 16-bit rows: U staged split in coefficient pairs ([pairs]: 2 x 96 KiB fit 227 KiB),
    # 16 warps of 4 blocks at 770 (49 blocks), of 3 at 768 ([16 warps]); fp32: 8 warps of
    # 8 blocks at 770, of 6 at 768 (two such CTAs fit the emulated H100's shared memory)
    if dtype == torch.float32:
        launched = f", {8 if cols == 770 else 6}, false, 8, false, false>("
    else:
        launched = f", {4 if cols == 770 else 3}, true, 16, false, false>("
    assert launched in emu.last_kernel(), emu.last_kernel()
    scale = x.abs().max().item()
    assert (view.double() - want).abs().max().item() <= TOL[dtype] * scale
    assert torch.equal(g[:, cols:], untouched)


@pytest.mark.parametrize(
    ("side", "anchored", "d", "k", "nb"),
    [
        ("input", True, 700, 40, 3),
        ("input", False, 1000, 40, 4),
        ("output", False, 700, 20, 3),
        ("output", True, 1000, 20, 4),
    ],
)
def test_tensor_core_fp32_rows_on_sixteen_warps(side, anchored, d, k, nb):
    """[16 warps] fp32 rows of 513-1024 columns on a CTA of 16 warps (3 or 4 blocks a
    warp, one staged basis): transposed views (strided loads) always, contiguous rows
    where two 8-warp CTAs do not fit the SM's shared memory beside their bases (k = 40:
    2 x 126 KiB and more, past the emulated H100's 228 KiB); plain with soft weights and
    anchored, 45 rows (a ragged last tile), against float64; the anchors of a hard
    projection stay."""
    gen = torch.Generator().manual_seed(d + anchored)
    g = torch.randn((45, d) if side == "input" else (d, 45), generator=gen)
    view = g if side == "input" else g.t()
    u = _orthonormal(d, k, seed=7)
    x = view.double()
    if anchored:
        c = torch.randn(45, k, generator=gen)
        c_in = c.clone()
        want = x - (x @ u.double() - c.double()) @ u.double().t()
        emu.project_anchored_bucket_([view], [c], u, None, side)
        assert torch.equal(c, c_in)
    else:
        w = torch.rand(k, generator=gen)
        want = x - ((x @ u.double()) * w.double()) @ u.double().t()
        emu.project_bucket_([view], u, w, side)
    vector = "true" if side == "input" else "false"
    policy = f"ProjectPolicy<float, {vector}>, {nb}, false, 16, false, false>("
    assert policy in emu.last_kernel(), emu.last_kernel()
    assert (view.double() - want).abs().max().item() <= TOL[torch.float32] * x.abs().max().item()


@pytest.mark.parametrize(("d", "k"), [(768, 768), (768, 256), (300, 300)])
def test_tensor_core_fp32_rows_keep_fp32_sums_on_truncating_mmas(d, k):
    """The emulator's MMA truncates its sum as the tensor cores do (cuda_emu.h). With x as
    the accumulator of every k-step, d = 768 at k = 768 drifted 3.4e-5 relative here and
    2.4e-5 on an H200 (measured, 2026-12-04); each k-step's and each block's MMAs now
    start from zero and are added in fp32 (mma.cuh [sums]): measured here 1.7e-6 at
    k = 768, against the same sums in fp32 (bound: 8 ulps of max |x| per √(k / 8))."""
    gen = torch.Generator().manual_seed(d + k)
    g = torch.randn(64, d, generator=gen)
    u = _orthonormal(d, k, seed=9)
    w = torch.rand(k, generator=gen)
    x = g.double()
    want = x - ((x @ u.double()) * w.double()) @ u.double().t()
    emu.project_bucket_([g], u, w, "input")
    assert "mma_rows_kernel<" in emu.last_kernel()
    err = (g.double() - want).abs().max().item() / x.abs().max().item()
    assert err <= 8 * 2.0**-24 * math.sqrt(k / 8), err


# [fp32 pairs] fp32 projection rows whose U fits shared memory twice without losing the
# SM's resident warps, where k padded to 16 is k padded to 8: (d, k, side, the launch's NB,
# pairs, warps) on the emulated H100 (227 KiB a block, 228 an SM). 260 columns, k = 32: two
# CTAs of 8 warps (83 KiB each); 768, k = 32: one CTA of 16 (215 KiB; the fragments ran two
# of 8); 768, k = 16: two CTAs of 8 (109 KiB each); 1000, k = 16: one of 16, 4 blocks a warp
# (147 KiB; the fragments ran two of 8); 200, k = 12 (padded to 16 either way): two of 8, 2
# blocks a warp; 700 transposed, k = 16: two CTAs of 8 (101 KiB; the fragments ran 16);
# 768, k = 24: the padding to 32 would add a k-step (fragments, two CTAs of 8 as before);
# 768, k = 40: 48, too wide twice (fragments, 16 warps); 260, k = 8: none at k <= 8.
FP32_PAIRS = [
    (260, 32, "input", 3, True, 8),
    (768, 32, "input", 3, True, 16),
    (768, 16, "input", 6, True, 8),
    (1000, 16, "input", 4, True, 16),
    (200, 12, "input", 2, True, 8),
    (700, 16, "output", 6, True, 8),
    (768, 24, "input", 6, False, 8),
    (768, 40, "input", 3, False, 16),
    (260, 8, "input", 3, False, 8),
]


@pytest.mark.parametrize(("d", "k", "side", "nb", "pairs", "warps"), FP32_PAIRS)
def test_tensor_core_fp32_pairs_match_float64(d, k, side, nb, pairs, warps):
    """[fp32 pairs] fp32 projection rows on U staged split (mma_rows.cuh [pairs]: neither
    pass splits U), x split in pass 1 as the fragments split it, each block's and k-step's
    MMAs from zero ([sums]), where run_columns finds the SM keeps its resident warps; the
    model's twin (perf_model_cuda.mma_launches) picks the same kernel. Soft weights, 45 rows
    (a ragged last tile), against float64 with the [sums] bound; anchored rows keep the
    fragments (as [pairs])."""
    gen = torch.Generator().manual_seed(d * k)
    g = torch.randn((45, d) if side == "input" else (d, 45), generator=gen)
    view = g if side == "input" else g.t()
    u = _orthonormal(d, k, seed=12)
    w = torch.rand(k, generator=gen)
    x, u64, w64 = view.double(), u.double(), w.double()
    want = x - ((x @ u64) * w64) @ u64.t()
    again = g.clone()  # for the anchored call below
    emu.project_bucket_([view], u, w, side)
    vector = "true" if side == "input" else "false"
    tail = f"ProjectPolicy<float, {vector}>, {nb}, {str(pairs).lower()}, {warps}, false, false>("
    assert tail in emu.last_kernel(), emu.last_kernel()
    launches = emu.perf_model_cuda().op_launches(
        f"project_ {side}", "fp32", k, d=d, smem_optin=emu.smem_optin()
    )
    assert tail in launches[0].kernel + "(", launches[0].kernel
    err = (view.double() - want).abs().max().item() / x.abs().max().item()
    assert err <= 8 * 2.0**-24 * math.sqrt(k / 8), err
    # anchored at the rows' own coefficients: the same projection, on the fragments
    c = (x @ u64).float()
    view2 = again if side == "input" else again.t()
    emu.project_anchored_bucket_([view2], [c], u, w, side)
    layout = re.search(r"ProjectPolicy<float, \w+>, (\d+), (\w+), (\d+),", emu.last_kernel())
    assert layout is not None and layout.group(2) == "false", emu.last_kernel()
    x0 = x - ((x @ u64 - c.double()) * w64) @ u64.t()
    assert (view2.double() - x0).abs().max().item() <= TOL[torch.float32] * x0.abs().max().item()


def test_fp32_pairs_keep_an_a100s_two_ctas():
    """[fp32 pairs] at an A100's shared memory (163 KiB a block, 164 an SM): 260 columns at
    k = 32 take two 8-warp CTAs of the fragments (U split twice, 83 KiB, does not fit two),
    768 at k = 32 one 16-warp CTA of the fragments (twice U is 192 KiB); 260 at k = 16 fits
    two CTAs split (47 KiB each). The model's twin agrees."""
    script = textwrap.dedent(
        """
        import torch
        from tests import cuda_emulation as emu

        pmc = emu.perf_model_cuda()
        for d, k, layout in ((260, 32, "3, false, 8"), (768, 32, "3, false, 16"),
                             (260, 16, "3, true, 8")):
            g = torch.randn(20, d)
            u = torch.linalg.qr(torch.randn(d, k, dtype=torch.float64))[0].float().contiguous()
            want = g.double() - g.double() @ u.double() @ u.double().T
            emu.project_bucket_([g], u, None, "input")
            tail = f"ProjectPolicy<float, true>, {layout}, false, false>("
            assert tail in emu.last_kernel(), (d, k, emu.last_kernel())
            model = pmc.op_launches("project_ input", "fp32", k, d=d, smem_optin=emu.smem_optin())
            assert tail in model[0].kernel + "(", (d, k, model[0].kernel)
            assert (g.double() - want).abs().max() <= 1e-5 * want.abs().max()
        """
    )
    env = {**os.environ, "GRADPROJ_EMU_SMEM_OPTIN": "163K"}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=emu.ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]


def test_tensor_cores_can_be_switched_off(monkeypatch):
    """GRADPROJ_CUDA_TENSOR_CORES=0 sends rows the tensor cores take to the FMA engine
    (tile.cuh), the projection's and AdamW's, read at each call; the results agree."""
    gen = torch.Generator().manual_seed(5)
    g = torch.randn(40, 768, generator=gen)
    u = _orthonormal(768, 32, seed=3)
    on, off = g.clone(), g.clone()
    emu.project_bucket_([on], u, None, "input")
    assert "mma_rows_kernel<" in emu.last_kernel()
    monkeypatch.setenv("GRADPROJ_CUDA_TENSOR_CORES", "0")
    emu.project_bucket_([off], u, None, "input")
    assert "rows_kernel<" in emu.last_kernel() and "mma_rows" not in emu.last_kernel()
    assert (on - off).abs().max().item() <= 1e-5 * g.abs().max().item()
    adamw_off = _adamw((40, 768), "input", k=32)
    assert "mma_rows" not in emu.last_kernel(), emu.last_kernel()
    monkeypatch.setenv("GRADPROJ_CUDA_TENSOR_CORES", "1")
    adamw_on = _adamw((40, 768), "input", k=32)
    assert "mma_rows_kernel<" in emu.last_kernel()
    for a, b in zip(adamw_on, adamw_off, strict=True):
        assert (a - b).abs().max().item() <= 1e-5 * max(b.abs().max().item(), 1.0)


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("anchored", [False, True], ids=["plain", "anchored"])
def test_tensor_core_rows_take_a_large_basis_a_block_of_columns_a_launch(dtype, anchored):
    """k = 160 at d = 768 (480 KiB of basis, the emulator's device allows 227 KiB): three
    launches of 56, 56 and 48 columns (mma_rows.cuh [columns]), each with its columns'
    soft weights and anchors, against the one-shot formula in float64: x − U (w ⊙ (Uᵀx −
    C)) and C + (1 − w) ⊙ (Uᵀx − C). The anchored rows start off their anchors, so a
    launch that read another block's anchors or weights, or skipped a block, misses."""
    gen = torch.Generator().manual_seed(160)
    g = torch.randn(45, 768, generator=gen).to(dtype)
    u = _orthonormal(768, 160, seed=10)
    w = torch.rand(160, generator=gen)
    x, u64, w64 = g.double(), u.double(), w.double()
    c = torch.randn(45, 160, generator=gen) if anchored else None
    delta = x @ u64 - (c.double() if anchored else 0.0)
    want = x - (delta * w64) @ u64.t()
    before = emu.stats()[0]
    if anchored:
        want_c = c.double() + (1 - w64) * delta
        emu.project_anchored_bucket_([g], [c], u, w, "input")
        # 16-bit: a later launch's Uⱼᵀx sees the rows as the earlier launches stored them;
        # their rounding e moves it by |uᵀe| ≤ ‖e‖₂ ≤ half an ulp of ‖x‖₂ per launch before
        half_ulp = {torch.float32: 0.0, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[dtype]
        bound = 1e-5 * want_c.abs().max().item() + 2 * half_ulp * x.norm(dim=1, keepdim=True)
        assert ((c.double() - want_c).abs() <= bound).all()
    else:
        emu.project_bucket_([g], u, w, "input")
    assert emu.stats()[0] - before == 3
    assert "mma_rows_kernel<" in emu.last_kernel()
    # 16-bit rows are rounded once a launch: three half ulps of the largest at most
    tol = {torch.float32: 1e-5, torch.bfloat16: 3 * 2.0**-8, torch.float16: 3 * 2.0**-11}[dtype]
    scale = want.abs().max().item()
    assert (g.double() - want).abs().max().item() <= tol * scale


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k", [12, 24, 32, 40])
def test_tensor_core_pairs_match_float64(dtype, k):
    """16-bit rows without anchors whose basis fits shared memory twice take it staged
    split, hi and lo, in coefficient pairs (mma_rows.cuh [pairs]; k padded to a multiple
    of 16: 12 -> 16, 24 -> 32, 40 -> 48), with soft weights, against float64: d = 260 (a
    warp's last block ragged), 45 rows (a ragged last tile). Anchored rows take U once in
    the pairs' order where its padding to 16 adds nothing to the fragments' padding to 8
    (12, 32: [raw pairs]), else unsplit in fragments."""
    gen = torch.Generator().manual_seed(k)
    g = torch.randn(45, 260, generator=gen).to(dtype)
    u = _orthonormal(260, k, seed=11)
    w = torch.rand(k, generator=gen)
    x, u64, w64 = g.double(), u.double(), w.double()
    want = x - ((x @ u64) * w64) @ u64.t()
    anchored = g.clone()
    emu.project_bucket_([g], u, w, "input")
    assert ", true, 8, false, false>(" in emu.last_kernel(), emu.last_kernel()
    assert (g.double() - want).abs().max().item() <= TOL[dtype] * want.abs().max().item()
    c = (x @ u64).float()  # anchors at the rows themselves: the same projection
    emu.project_anchored_bucket_([anchored], [c], u, w, "input")
    raw = -(-k // 16) * 16 == -(-k // 8) * 8  # [raw pairs]: no k-step added by the padding
    assert f", {str(raw).lower()}, 8, false, {str(raw).lower()}>(" in emu.last_kernel()
    x0 = x - ((x @ u64 - c.double()) * w64) @ u64.t()
    assert (anchored.double() - x0).abs().max().item() <= TOL[dtype] * x0.abs().max().item()


def _project_soft_rows(rows, u, w, c, side):
    """The projection of ``rows`` with soft weights ``w`` (anchored at ``c`` unless None), in
    place; the anchors checked against float64. Returns (float64 rows wanted, the kernel)."""
    x, u64, w64 = rows.double(), u.double(), w.double()
    delta = x @ u64 - (0.0 if c is None else c.double())
    want = x - (delta * w64) @ u64.t()
    if c is None:
        emu.project_bucket_([rows], u, w, side)
    else:
        want_c = c.double() + (1 - w64) * delta
        emu.project_anchored_bucket_([rows], [c], u, w, side)
        bound = 1e-5 * (want_c.abs().max().item() + x.norm(dim=1, keepdim=True))
        assert ((c.double() - want_c).abs() <= bound).all()
    return want, emu.last_kernel()


# [16 warps] 16-bit rows of 513-1024 columns on a CTA of 16 warps: d = 520 (33 blocks:
# warps 0-10 hold 3 each, 11-15 none), 700 (44: warp 14 holds 2, warp 15 none), 768 (3
# each), 1000 (63: 4 blocks a warp, warp 15 holds 3), 1024 (4 each); rows, transposed views
# in row pairs (38 view rows: ProjectPairPolicy; 16 warps up to 768, then 8) and strided ones
# (37: ProjectPolicy<T, false>); plain with soft weights (U split in pairs where it fits
# twice: d <= 768), and anchored with soft weights (U unsplit; lanes 16-31 add 8 warps'
# partial sums, lanes 0-15 the other 8 and finish the coefficients).
@pytest.mark.parametrize("layout", ["rows", "pairs", "strided"])
@pytest.mark.parametrize("anchored", [False, True], ids=["plain", "anchored-soft"])
@pytest.mark.parametrize("d", [520, 700, 768, 1000, 1024])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_tensor_core_sixteen_warps_match_float64(dtype, d, anchored, layout):
    gen = torch.Generator().manual_seed(d)
    k = 24
    n = 38 if layout == "pairs" else 37  # tiles of 16, the last ragged
    if layout == "rows":
        rows = torch.randn(n, d, generator=gen).to(dtype)
    else:
        rows = torch.randn(d, n, generator=gen).to(dtype).t()
    u = _orthonormal(d, k, seed=13)
    w = torch.rand(k, generator=gen)
    c = torch.randn(n, k, generator=gen) if anchored else None
    want, kernel = _project_soft_rows(rows, u, w, c, "input" if layout == "rows" else "output")
    policy = {"rows": "ProjectPolicy<", "pairs": "ProjectPairPolicy<", "strided": "ProjectPolicy<"}
    assert policy[layout] in kernel and (", false>," in kernel) == (layout == "strided"), kernel
    # row pairs take 16 warps up to 768 columns, 8 warps of 8 blocks beyond
    nb, warps = (3, 16) if d <= 768 else (8, 8) if layout == "pairs" else (4, 16)
    pairs = not anchored and d <= 768  # U twice: 2 x 96 KiB fit 227 KiB at 768, not 2 x 128
    assert f", {nb}, {'true' if pairs else 'false'}, {warps}, false, false>(" in kernel, kernel
    assert (rows.double() - want).abs().max().item() <= TOL[dtype] * want.abs().max().item()


# [row cache] Buckets of six tensors (a tile's rows from several of them, tensors shorter
# than a tile) over 10-11 tiles a CTA (the emulator's 3 SMs: 3 CTAs of 16 warps or of 8 at
# one an SM, 6 of fp32's 8 warps at two), so each CTA's tiles take the projections' eight
# slots in turn, two tiles a lookup by the last warp, and write them again: 16 warps (rows;
# row pairs), 8 warps of 10 blocks loading their own tile (strided rows past 1024:
# kBatchLoad), fp32 rows without prefetch. Plain and anchored, soft weights (the anchors
# come from the cache too).
@pytest.mark.parametrize(
    ("dtype", "d", "layout", "kernel_args"),
    [
        (torch.float16, 700, "rows", ", 3, {pairs}, 16, false, false>("),
        (torch.bfloat16, 700, "pairs", ", 3, {pairs}, 16, false, false>("),
        (torch.bfloat16, 1100, "strided", ", 10, false, 8, false, false>("),
        (torch.float32, 260, "rows", ", 3, false, 8, false, false>("),
    ],
)
@pytest.mark.parametrize("anchored", [False, True], ids=["plain", "anchored-soft"])
def test_tensor_core_row_cache_over_many_tiles_and_tensors(dtype, d, layout, kernel_args, anchored):
    gen = torch.Generator().manual_seed(d + anchored)
    k = 24
    counts = [8, 36, 80, 4, 260, 112]  # 500 rows: 32 tiles, the last ragged (even: pairs)
    if dtype == torch.float32:
        counts = [2 * n for n in counts]  # 63 tiles over 6 CTAs
    if layout == "rows":
        views = [torch.randn(n, d, generator=gen).to(dtype) for n in counts]
    else:
        views = [torch.randn(d, n, generator=gen).to(dtype).t() for n in counts]
    x = [v.double() for v in views]
    u = _orthonormal(d, k, seed=21)
    w = torch.rand(k, generator=gen)
    u64, w64 = u.double(), w.double()
    side = "input" if layout == "rows" else "output"
    if anchored:
        cs = [torch.randn(n, k, generator=gen) for n in counts]
        deltas = [xi @ u64 - c.double() for xi, c in zip(x, cs, strict=True)]
        want_cs = [c.double() + (1 - w64) * dl for c, dl in zip(cs, deltas, strict=True)]
        emu.project_anchored_bucket_(views, cs, u, w, side)
        for xi, c, want_c in zip(x, cs, want_cs, strict=True):
            bound = 1e-5 * (want_c.abs().max().item() + xi.norm(dim=1, keepdim=True))
            assert ((c.double() - want_c).abs() <= bound).all()
    else:
        deltas = [xi @ u64 for xi in x]
        emu.project_bucket_(views, u, w, side)
    kernel = emu.last_kernel()
    # [pairs] U split where it fits twice (d = 700): 16-bit rows without anchors
    assert kernel_args.format(pairs="false" if anchored else "true") in kernel, kernel
    assert ("PairPolicy<" in kernel) == (layout == "pairs"), kernel
    for v, xi, dl in zip(views, x, deltas, strict=True):
        want = xi - (dl * w64) @ u64.t()
        assert (v.double() - want).abs().max().item() <= TOL[dtype] * want.abs().max().item()


# [wide] Rows of 1024 < d <= 1280 (SD's 1280-channel blocks) on tensor cores, 10 blocks a
# warp: d = 1280 whole, d = 1100 with warp 6 holding 9 blocks and warp 7 none. k = 12: 16-bit
# rows without anchors stage U split ([pairs], 2 x 160 KiB fit 227 KiB); k = 40 unsplit.
# Rows, and transposed views (strided rows; 16-bit view rows that pair up take
# ProjectPolicy, not ProjectPairPolicy, past 1024).
@pytest.mark.parametrize("layout", ["rows", "views"])
@pytest.mark.parametrize("anchored", [False, True], ids=["plain", "anchored-soft"])
@pytest.mark.parametrize("k", [12, 40])
@pytest.mark.parametrize("d", [1280, 1100])
@pytest.mark.parametrize("dtype", list(TOL))
def test_tensor_core_wide_rows_match_float64(dtype, d, k, anchored, layout):
    gen = torch.Generator().manual_seed(d + k)
    n = 38  # rows: tiles of 16, the last ragged
    if layout == "rows":
        g = torch.randn(n, d, generator=gen).to(dtype)
        rows = g
    else:
        g = torch.randn(d, n, generator=gen).to(dtype)
        rows = g.t()
    u = _orthonormal(d, k, seed=12)
    w = torch.rand(k, generator=gen)
    c = torch.randn(n, k, generator=gen) if anchored else None
    want, kernel = _project_soft_rows(rows, u, w, c, "input" if layout == "rows" else "output")
    assert "mma_rows_kernel<" in kernel and "PairPolicy" not in kernel, kernel
    # anchored: U once in pairs' order ([raw pairs]: k = 12 pads to 16 either way; 40 to 48
    # would add a k-step to the fragments' 40); fp32 rows keep the fragments ([fp32 pairs]:
    # two CTAs of them fit the SM's shared memory, one split)
    pairs = dtype != torch.float32 and k == 12
    raw = pairs and anchored
    assert f", 10, {str(pairs).lower()}, 8, false, {str(raw).lower()}>(" in kernel, kernel
    scale = want.abs().max().item()
    assert (rows.double() - want).abs().max().item() <= TOL[dtype] * scale


@pytest.mark.parametrize("k", [1, 8, 32])
def test_tensor_core_rows_keep_the_anchored_guarantee(k):
    """100 anchored fp32 steps on the tensor-core kernel (3xTF32; k <= 8 one k-step): the
    protected coefficients stay within the issue's 1e-6 ‖W₀‖ (measured in the emulator,
    k = 1 / 8 / 32: 1.3e-8 / 3.0e-8 / 6.3e-8; the fp32 FMA engine at k = 8: 2.1e-8)."""
    gen = torch.Generator().manual_seed(0)
    w0 = 0.05 * torch.randn(64, 256, generator=gen)
    u = _orthonormal(256, k, seed=7)
    c = (w0.double() @ u.double()).float()
    w = w0.clone()
    worst = 0.0
    for _ in range(100):
        w += 5e-4 * torch.randn(w.shape, generator=gen)
        emu.project_anchored_bucket_([w], [c], u, None, "input")
        drift = ((w.double() - w0.double()) @ u.double()).norm() / w0.double().norm()
        worst = max(worst, drift.item())
    assert "mma_rows_kernel<" in emu.last_kernel()
    assert worst <= 1e-6, worst


def test_tensor_core_rows_are_not_launched_before_sm_80():
    """On a device below sm_80 (no tf32 MMAs; the build there traps in mma_tf32) the
    launcher declines and the FMA engine projects: the same rows give other bits than
    on sm_90 (3xTF32 against fp32 FMAs), both within fp32 rounding of float64."""
    script = textwrap.dedent(
        """
        import sys
        import torch
        from tests import cuda_emulation as emu

        gen = torch.Generator().manual_seed(3)
        g = torch.randn(40, 256, generator=gen)
        u = torch.linalg.qr(torch.randn(256, 24, generator=gen, dtype=torch.float64))[0]
        u = u.float().contiguous()
        out = g.clone()
        emu.project_bucket_([out], u, None, "input")
        ref = g.double() - g.double() @ u.double() @ u.double().T
        assert (out.double() - ref).abs().max() < 1e-5
        torch.save(out, sys.argv[1])
        """
    )
    outs = []
    for cc in ("90", "75"):
        path = os.path.join(emu.build_dir(), f"cc{cc}.pt")
        env = {**os.environ, "GRADPROJ_EMU_CC": cc}
        done = subprocess.run(
            [sys.executable, "-c", script, path],
            cwd=emu.ROOT, env=env, capture_output=True, text=True,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        outs.append(torch.load(path))
    assert not torch.equal(outs[0], outs[1])


# ---------------------------------------------------------------- projected AdamW on tensor cores

ADAMW_MMA = {
    # name: (dtype, k, [(rows, d) of each param], soft weights, maximize, launches)
    # one tile and a ragged last tile; d = 260: a warp's last block ragged (not whole)
    "fp32-ragged": (torch.float32, 12, [(45, 260)], True, False, 1),
    # two params in one tile (the table lookup per row), maximize
    "fp32-two-params": (torch.float32, 32, [(37, 256), (5, 256)], False, True, 1),
    # fp32 with 8 blocks a warp (d = 1000): each row's vectors loaded in two batches
    "fp32-wide": (torch.float32, 16, [(20, 1000)], False, False, 1),
    # 16-bit, 4 blocks a warp: the next tile's p, g, m, v prefetched (4 tiles on the
    # emulator's 3 CTAs: one CTA prefetches across tiles), the last tile ragged
    "bf16-prefetch": (torch.bfloat16, 32, [(50, 512)], True, True, 1),
    # [16 warps] rows of 513-768 columns: 16 warps of 3 blocks, each loading its own
    # tile's p, g, m, v (no prefetch): 768 (3 blocks each, 4 tiles, maximize), 700 (warp
    # 14's last block ragged, warp 15 none), 520 (warps 0-10 hold 3, 11 none past d: two
    # params, a ragged tile)
    "bf16-16-warps": (torch.bfloat16, 32, [(50, 768)], True, True, 1),
    "bf16-16-warps-700": (torch.bfloat16, 12, [(45, 700)], False, False, 1),
    "fp16-16-warps-520": (torch.float16, 20, [(37, 520), (5, 520)], True, False, 1),
    # fp32: p, g, m, v loaded a block at a time
    "fp32-16-warps-700": (torch.float32, 20, [(37, 700), (5, 700)], True, True, 1),
    # 16-bit, d = 1000 ([16 warps]: 4 blocks a warp, two at a time; warp 15 holds 3)
    "bf16-wide": (torch.bfloat16, 24, [(40, 1000)], True, False, 1),
    "fp16-small-k": (torch.float16, 3, [(33, 96), (2, 96)], False, False, 1),
    # a basis larger than the 227 KiB of shared memory ([columns]): the step with columns
    # [0, 56), then project.cu's anchored projection of p with [56, 112) and [112, 160)
    "fp32-column-blocks": (torch.float32, 160, [(37, 768), (5, 768)], True, True, 3),
    "bf16-column-blocks": (torch.bfloat16, 128, [(40, 768)], True, False, 2),
    # [wide] fp32 rows past AdamW's 1024 that the projection's kernel takes (d <= 1280):
    # the step alone (the FMA engine with no basis columns), then project.cu's anchored
    # projection of p on tensor cores, 10 blocks a warp; two params, a ragged tile
    "fp32-wide-step-then-project": (torch.float32, 12, [(37, 1100), (5, 1100)], True, True, 2),
    "fp32-1280-step-then-project": (torch.float32, 40, [(20, 1280)], False, False, 2),
    # [wide] 16-bit rows past 1024 in the AdamW kernel itself, 10 blocks a warp (x' in
    # registers, p, g, m, v loaded 5 blocks at a time): warp 6 holding 9 blocks, warp 7
    # none (d = 1100), two params, a ragged tile; and d = 1280 whole
    "bf16-wide-10-blocks": (torch.bfloat16, 12, [(37, 1100), (5, 1100)], True, True, 1),
    "fp16-1280": (torch.float16, 24, [(20, 1280)], False, False, 1),
    "bf16-1280-k1": (torch.bfloat16, 1, [(33, 1280)], True, False, 1),
    # [row cache] six params (a tile's rows from several, each its own step: its bias
    # corrections cached with its rows) over 5-6 tiles a CTA (bf16: 16 tiles on 16 warps)
    # and 10-11 (fp32: 32 tiles), so each of the cache's slots is written again
    "bf16-row-cache": (
        torch.bfloat16,
        20,
        [(n, 768) for n in (4, 18, 40, 2, 130, 56)],
        True,
        False,
        1,
    ),
    "fp32-row-cache": (
        torch.float32,
        12,
        [(n, 260) for n in (8, 36, 80, 4, 260, 112)],
        True,
        True,
        1,
    ),
}


@pytest.mark.parametrize("case", list(ADAMW_MMA))
def test_tensor_core_adamw_matches_float64(case):
    """adamw.cu's rows on mma_rows.cuh (AdamWPolicy: x' formed from p, g, m, v when its
    tile starts, m and v stored then, x' projected on tensor cores, p stored) against
    gradproj.reference.projected_adamw in float64 from the same inputs, param by param."""
    from gradproj import reference

    dtype, k, shapes, soft, maximize, launches = ADAMW_MMA[case]
    gen = torch.Generator().manual_seed(zlib.crc32(case.encode()))
    d = shapes[0][1]
    u = _orthonormal(d, k, seed=8)
    w = torch.rand(k, generator=gen) if soft else None
    ps, gs, ms, vs, cs = ([] for _ in range(5))
    for rows, _ in shapes:
        ps.append((0.1 * torch.randn(rows, d, generator=gen)).to(dtype))
        gs.append(torch.randn(rows, d, generator=gen).to(dtype))
        ms.append((0.01 * torch.randn(rows, d, generator=gen)).to(dtype))
        vs.append((0.01 * torch.rand(rows, d, generator=gen)).to(dtype))
        cs.append(torch.randn(rows, k, generator=gen))
    steps = [torch.tensor(float(3 + i)) for i in range(len(shapes))]
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2)
    w64 = None if w is None else w.double()
    want = [
        reference.projected_adamw(
            *(t.double() for t in (p, g, m, v)),
            int(s.item()),
            c.double(),
            u.double(),
            lr=1e-2,
            betas=(0.9, 0.999),
            eps=1e-8,
            weight_decay=1e-2,
            weights=w64,
            maximize=maximize,
        )
        for p, g, m, v, s, c in zip(ps, gs, ms, vs, steps, cs, strict=True)
    ]
    before = emu.stats()
    emu.projected_adamw_bucket_(
        ps, gs, ms, vs, None, steps, cs, u, w, "input", **hyper, maximize=maximize
    )
    assert emu.stats()[0] - before[0] == launches + 1  # and adamw.cu's [bias] kernel
    last = "AdamWPolicy" if launches == 1 else "ProjectPolicy"
    assert "mma_rows_kernel<" in emu.last_kernel() and last in emu.last_kernel()
    assert (", 10, " in emu.last_kernel()) == (d > 1024), emu.last_kernel()
    if launches == 1:  # [16 warps] AdamW's own kernel: rows of 513-1024 columns (fp32: 768)
        sixteen = 512 < d <= (768 if dtype == torch.float32 else 1024)
        nb = 3 if d <= 768 else 4
        kernel = emu.last_kernel()
        assert (f", {nb}, false, 16, false, false>(" in kernel) == sixteen, kernel
    # 16-bit p is rounded once per launch: bf16-column-blocks' two roundings are at most
    # a full ulp of the largest value, 2^-7 of it
    tol = {torch.float32: 1e-6, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}[dtype]
    for i, (got, exp) in enumerate(zip(zip(ps, ms, vs, cs, strict=True), want, strict=True)):
        _assert_streams_close(got, (exp[0], exp[1], exp[2], exp[4]), tol, f"param {i} ")


# [raw pairs] AdamW's 16-bit rows (mma_rows.cuh kRawPairsAt): side, d, k and the kernel's
# NB and warps. Row pairs on 16 warps and on 8 (4 blocks), contiguous rows on 8 (3 blocks at
# 300 columns: 8 warps of 3 cover up to 384, mma_rows.cuh run_columns), strided on 8.
ADAMW_RAW_PAIRS = {
    "pairs-16-warps": ("output", 700, 32, 3, 16),
    "pairs-8-warps": ("output", 400, 16, 4, 8),
    "rows": ("input", 300, 32, 3, 8),
    "rows-k12": ("input", 136, 12, 2, 8),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", list(ADAMW_RAW_PAIRS))
def test_adamw_raw_pairs_keep_the_anchors_to_float64(case, dtype):
    """AdamW's 16-bit rows on [raw pairs] split U and x' truncated (docs/gpu.md
    [adamw-raw-pairs]): the coefficients within 2^-19 of their products' sum, so the soft
    weights' anchors c + (1 - w) (U^T x' - c) stay within 1e-5 of float64 (the other
    AdamW tests allow a 16-bit ulp, 2^-7: dropping x's lo, an error of 2^-11, passes
    those); p, m and v within their own rounding."""

    side, d, k, nb, warps = ADAMW_RAW_PAIRS[case]
    gen = torch.Generator().manual_seed(zlib.crc32(case.encode()))
    u = _orthonormal(d, k, seed=21)
    w = 0.5 * torch.rand(k, generator=gen)  # anchors move by at least half the coefficient
    ps, gs, ms, vs, cs = ([] for _ in range(5))
    for n in (18, 40):
        base = [torch.randn(d, n, generator=gen) for _ in range(4)]
        p, g, m, v = (0.1 * base[0], base[1], 0.01 * base[2], 0.01 * base[3].abs())
        if side == "output":  # transposed views whose rows pair up
            p, g, m, v = (t.to(dtype).t() for t in (p, g, m, v))
        else:
            p, g, m, v = (t.t().contiguous().to(dtype) for t in (p, g, m, v))
        for lst, t in zip((ps, gs, ms, vs), (p, g, m, v), strict=True):
            lst.append(t)
        cs.append(torch.randn(n, k, generator=gen))
    steps = [torch.tensor(4.0), torch.tensor(7.0)]
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2)
    want = _adamw_float64(ps, gs, ms, vs, steps, cs, u, w, **hyper)
    c_before = [c.double() for c in cs]
    emu.projected_adamw_bucket_(ps, gs, ms, vs, None, steps, cs, u, w, side, **hyper,
                                maximize=False)  # fmt: skip
    kernel = emu.last_kernel()
    policy = "AdamWPairPolicy<" if side == "output" else "AdamWPolicy<"
    assert policy in kernel and f", {nb}, true, {warps}, false, true>(" in kernel, kernel
    tol = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}[dtype]  # an ulp: p, m, v
    for i, (got, exp) in enumerate(zip(zip(ps, ms, vs, cs, strict=True), want, strict=True)):
        for name, t, e in zip("pmv", got[:3], exp[:3], strict=True):
            err = (t.double() - e).abs().max().item()
            assert err <= tol * max(e.abs().max().item(), 1e-2), (i, name, err)
        c64 = exp[4]
        assert (c64 - c_before[i]).abs().max().item() > 0.1  # the anchors moved
        err = (cs[i].double() - c64).abs().max().item()
        assert err <= 1e-5 * c64.abs().max().item(), (i, err)


# eps against the tensor-core AdamW's flushed root (adamw.cu [flushed root], fast_root):
# at beta2 = 0.999 it takes eps >= 2^-37 / sqrt(1e-3) = 2.30e-10, a smaller eps the
# row-tile engine (AdamWRowsPolicy; transposed views: the block policy).
FLUSHED_ROOT_EPS = {"1e-8": (1e-8, True), "2.4e-10": (2.4e-10, True),
                    "2.2e-10": (2.2e-10, False), "0": (0.0, False)}  # fmt: skip


@pytest.mark.parametrize("side", ["input", "output"])
@pytest.mark.parametrize("eps", list(FLUSHED_ROOT_EPS))
def test_tensor_core_adamw_takes_only_the_eps_its_flushed_root_keeps(eps, side):
    """The tensor-core AdamW flushes a subnormal v^ to 0 and divides by rcp.approx.ftz:
    the same den wherever fast_root(h) holds. Every eps below its bound takes the row-tile
    engine, which keeps subnormals: with eps = 0, v = 1e-40 (subnormal) and g = 0 the step
    is lr m^ / sqrt(v^) (about 1e12 here), where the flushed root would divide by 0. fp32
    and bf16 (the pairs kernel for transposed views) at k = 12 against float64."""
    from gradproj import reference

    eps_value, tensor_cores = FLUSHED_ROOT_EPS[eps]
    for dtype in (torch.float32, torch.bfloat16):
        gen = torch.Generator().manual_seed(zlib.crc32(f"{eps}{side}{dtype}".encode()))
        d, k, rows = 136, 12, 24
        u = _orthonormal(d, k, seed=9)
        p = (0.1 * torch.randn(rows, d, generator=gen)).to(dtype)
        g = torch.randn(rows, d, generator=gen).to(dtype)
        m = (0.01 * torch.randn(rows, d, generator=gen)).to(dtype)
        v = (0.01 * torch.rand(rows, d, generator=gen)).to(dtype)
        g[3, :40], v[3, :40], m[3, :40] = 0.0, 1e-40, 1e-3  # v^ subnormal, m^ not
        assert v[3, 0].item() != 0 and abs(v[3, 0].item()) < torch.finfo(torch.float32).tiny
        c = torch.randn(rows, k, generator=gen)
        step = torch.tensor(2.0)
        p64, m64, v64, _, c64 = reference.projected_adamw(
            *(t.double() for t in (p, g, m, v)), 2, c.double(), u.double(), lr=1e-2,
            betas=(0.9, 0.999), eps=eps_value, weight_decay=1e-2, weights=None, maximize=False,
        )  # fmt: skip
        view = (lambda t: t) if side == "input" else (lambda t: t.t().contiguous().t())
        ps, gs, ms, vs = ([view(t)] for t in (p, g, m, v))
        emu.projected_adamw_bucket_(ps, gs, ms, vs, None, [step], [c], u, None, side, lr=1e-2,
                                    beta1=0.9, beta2=0.999, eps=eps_value, weight_decay=1e-2,
                                    maximize=False)  # fmt: skip
        kernel = emu.last_kernel()
        assert ("mma_rows_kernel<" in kernel) == tensor_cores, kernel
        if tensor_cores:
            assert "AdamWPolicy<" in kernel or "AdamWPairPolicy<" in kernel, kernel
        else:
            rows_policy = "AdamWRowsPolicy<" if side == "input" else "AdamWBlockPolicy<"
            assert rows_policy in kernel, kernel
        # fp32: at eps = 0 row 3's step is 1e12 times the others and its projection's fp32
        # sums carry that (2.5e-6 of it in the row-tile engine); the flushed root gives inf
        tol = {torch.float32: 1e-5, torch.bfloat16: 2.0**-7}[dtype]
        _assert_streams_close((ps[0], ms[0], vs[0], c), (p64, m64, v64, c64), tol, f"{dtype} ")


def test_wide_adamw_step_then_project_keeps_amsgrad():
    """[wide] amsgrad's fifth stream (v^) is the step's: fp32 rows of d = 1100 take the step
    alone (the FMA engine, amsgrad) and then the projection of p on tensor cores, against
    the reference in float64 from the same inputs."""
    from gradproj import backends

    gen = torch.Generator().manual_seed(12)
    p, g, m = (torch.randn(37, 1100, generator=gen) for _ in range(3))
    v = torch.rand(37, 1100, generator=gen)
    vmax = 1.5 * v
    c = torch.randn(37, 12, generator=gen)
    u = _orthonormal(1100, 12, seed=5)
    w = torch.rand(12, generator=gen)
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2, maximize=False)
    ref = [t.double() for t in (p, m, v, vmax, c)]
    backends.get("reference").op("projected_adamw_bucket_")(
        [ref[0]], [g.double()], [ref[1]], [ref[2]], [ref[3]], [torch.tensor(3.0)], [ref[4]],
        u.double(), w.double(), "input", **hyper,
    )  # fmt: skip
    before = emu.stats()[0]
    emu.projected_adamw_bucket_(
        [p], [g], [m], [v], [vmax], [torch.tensor(3.0)], [c], u, w, "input", **hyper
    )
    assert emu.stats()[0] - before == 3  # [bias], the step, the projection
    wide = "ProjectPolicy<float, true>, 10, false, 8, false, false>("
    assert wide in emu.last_kernel(), emu.last_kernel()
    for name, got, want in zip("pmvVc", (p, m, v, vmax, c), ref, strict=True):
        err = (got.double() - want).abs().max().item()
        assert err <= 1e-6 * max(want.abs().max().item(), 1.0), (name, err)


@pytest.mark.parametrize(
    ("k", "launches", "d"), [(32, 1, 256), (232, 2, 256), (32, 2, 1100), (24, 1, 600)]
)
def test_tensor_core_adamw_keeps_the_anchored_guarantee(k, launches, d):
    """100 fp32 ProjectedAdamW steps on the tensor-core kernel (3xTF32 on x' and U): the
    protected coefficients stay within the issue's 1e-6 ‖W₀‖, with the whole basis in
    shared memory (k = 32) and a block of its columns a launch (k = 232 at d = 256: 240
    KiB, two launches of 120 and 112 columns: the step, then the projection), at
    d = 1100 ([wide]: the step alone, then the projection of p on tensor cores), and at
    d = 600 on 16 warps ([16 warps])."""
    gen = torch.Generator().manual_seed(1)
    w0 = 0.05 * torch.randn(48, d, generator=gen)
    u = _orthonormal(d, k, seed=9)
    c = (w0.double() @ u.double()).float()
    p, m, v = w0.clone(), torch.zeros_like(w0), torch.zeros_like(w0)
    worst = 0.0
    for t in range(1, 101):
        g = torch.randn(w0.shape, generator=gen)
        emu.projected_adamw_bucket_(
            [p], [g], [m], [v], None, [torch.tensor(float(t))], [c], u, None, "input",
            lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2, maximize=False,
        )  # fmt: skip
        drift = ((p.double() - w0.double()) @ u.double()).norm() / w0.double().norm()
        worst = max(worst, drift.item())
    assert "mma_rows_kernel<" in emu.last_kernel()
    before = emu.stats()[0]
    emu.projected_adamw_bucket_(
        [p], [g], [m], [v], None, [torch.tensor(101.0)], [c], u, None, "input",
        lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2, maximize=False,
    )  # fmt: skip
    assert emu.stats()[0] - before == launches + 1  # and adamw.cu's [bias] kernel
    kernel = emu.last_kernel()
    assert (", 16, false, false>(" in kernel) == (d == 600) or launches == 2, kernel
    assert worst <= 1e-6, worst


# ---------------------------------------------------------------- the perf model's twin

_KERNEL = re.compile(r"mma_rows_kernel<.*?::(\w+)<[^>]*>, (\d+), (\w+), (\d+), (\w+), (\w+)>")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("side", ["input", "output"])
def test_the_model_twin_launches_what_the_launcher_launches(side, dtype):
    """benchmarks/perf_model_cuda.py predicts from the kernels its Python twin of the
    launchers says run; here the launchers themselves (the emulated device's shared memory)
    run `project_` and `ProjectedAdamW` on 4 rows (transposed views: 4 view rows, which
    pair up) at widths on 8 warps and on 16 ([16 warps]: 3 and 4 blocks a warp, AdamW's
    too) and k that fit U once, twice ([pairs]) or take a block of its columns a launch,
    and 16-bit k = 8 ([stacked]): the same engine, policy, blocks a warp, U split or not,
    warps, stacked or not, U once in pairs' order or not ([raw pairs]), and launches."""
    pmc, optin = emu.perf_model_cuda(), emu.smem_optin()
    dt = {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2, maximize=False)
    checked = 0
    for d, k, op in itertools.product((500, 768, 1000), (8, 32, 128), ("project_", "AdamW")):
        gen = torch.Generator().manual_seed(d + k)
        shape = (4, d) if side == "input" else (d, 4)
        tensors = [torch.randn(shape, generator=gen).to(dtype) for _ in range(4)]
        views = [t if side == "input" else t.t() for t in tensors]
        views[3].abs_()  # v
        u = _orthonormal(d, k, seed=3)
        before = emu.stats()[0]
        if op == "project_":
            emu.project_bucket_([views[0]], u, None, side)
            launches = pmc.op_launches(f"project_ {side}", dt, k, d=d, smem_optin=optin)
        else:
            emu.projected_adamw_bucket_(
                *([t] for t in views), None, [torch.tensor(3.0)], [torch.randn(4, k)], u, None,
                side, **hyper,
            )  # fmt: skip
            launches = pmc.op_launches(f"ProjectedAdamW {side}", dt, k, d=d, smem_optin=optin)
        got, want = emu.last_kernel(), launches[-1].kernel
        assert got.startswith("void gradproj::cuda::mma_rows::") == want.startswith("mma_rows_"), (
            d, k, op, got, want,
        )  # fmt: skip
        if want.startswith("mma_rows_"):
            ran, twin = _KERNEL.search(got).groups(), _KERNEL.search(want).groups()
            # AdamW: adamw.cu's [bias] kernel too (one thread a param: not modelled)
            ran_launches = emu.stats()[0] - before - (op == "AdamW")
            assert ran == twin and ran_launches == len(launches), (d, k, op, ran, twin)
            checked += 1
    assert checked >= 12
