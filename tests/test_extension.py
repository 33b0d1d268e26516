"""The compiled extension ``gradproj._C``: op registration, torch.compile, fallback, determinism.

Numerical correctness of the ``"cpp"`` / ``"cuda"`` backends against the float64
reference is covered by ``tests/test_project.py``, which runs every registered
backend; this file checks what is specific to the extension.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import gradproj
from gradproj import _extension, backends
from gradproj import reference as R

from .conftest import DEVICES

pytestmark = pytest.mark.skipif(
    _extension.load() is None, reason="gradproj._C is not built (pip install --no-build-isolation)"
)

EXT_DEVICES = [d for d in DEVICES if d == "cpu" or _extension.has_cuda()]


def orthonormal(d: int, k: int, device: str, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, k, generator=gen, dtype=torch.float64))
    return q.to(device=device, dtype=torch.float32).contiguous()


def bucket_inputs(device: str, dtype: torch.dtype, side: str, soft: bool, seed: int):
    """A bucket of three odd-shaped grads as the ops receive them (row views), with basis."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(37, 129), (5, 129), (64, 129)] if side != "flat" else [(3, 43)] * 3
    grads = [torch.randn(s, generator=gen).to(device=device, dtype=dtype) for s in shapes]
    if side == "input":
        matrices, d = grads, 129
    elif side == "output":  # transposed views, stride (1, in), as buckets.row_view makes them
        grads = [torch.randn(129, r, generator=gen).to(device=device, dtype=dtype) for r in (37, 5)]
        matrices, d = [g.T for g in grads], 129
    else:
        matrices, d = [g.view(-1) for g in grads], 3 * 43
    basis = orthonormal(d, 7, device, seed)
    weights = torch.rand(7, generator=gen).to(device) if soft else None
    return matrices, basis, weights


OPCHECK_CASES = [
    ("input", torch.float32, False),
    ("input", torch.bfloat16, True),
    ("output", torch.float32, True),
    ("output", torch.float16, False),
    ("flat", torch.bfloat16, True),
]


@pytest.mark.parametrize("device", EXT_DEVICES)
@pytest.mark.parametrize(("side", "dtype", "soft"), OPCHECK_CASES)
def test_opcheck_project_bucket(device, side, dtype, soft):
    matrices, basis, weights = bucket_inputs(device, dtype, side, soft, seed=1)
    torch.library.opcheck(
        torch.ops.gradproj.project_bucket_.default, (matrices, basis, weights, side)
    )


@pytest.mark.parametrize("device", EXT_DEVICES)
@pytest.mark.parametrize(("side", "dtype", "soft"), OPCHECK_CASES)
def test_opcheck_project_anchored_bucket(device, side, dtype, soft):
    matrices, basis, weights = bucket_inputs(device, dtype, side, soft, seed=2)
    rows = [1 if side == "flat" else m.shape[0] for m in matrices]
    anchors = [torch.randn(r, basis.shape[1], device=device) for r in rows]
    torch.library.opcheck(
        torch.ops.gradproj.project_anchored_bucket_.default,
        (matrices, anchors, basis, weights, side),
    )


def adamw_inputs(device: str, dtype: torch.dtype, side: str, soft: bool, amsgrad: bool, seed: int):
    """The arguments of ``projected_adamw_bucket_`` for a bucket_inputs bucket (positional part)."""
    params, basis, weights = bucket_inputs(device, dtype, side, soft, seed)
    gen = torch.Generator().manual_seed(seed + 100)

    def like(p: torch.Tensor, positive: bool = False) -> torch.Tensor:
        t = torch.empty_like(p)  # the params' strides, as the contract asks of the moments
        values = (
            torch.rand(p.shape, generator=gen) if positive else torch.randn(p.shape, generator=gen)
        )
        return t.copy_(values)

    grads = [torch.randn(p.shape, generator=gen).to(device=device, dtype=dtype) for p in params]
    exp_avgs = [like(p) for p in params]
    exp_avg_sqs = [like(p, positive=True) for p in params]
    max_exp_avg_sqs = [like(p, positive=True) for p in params] if amsgrad else []
    steps = [torch.tensor(float(i + 3), device=device) for i in range(len(params))]
    rows = [1 if side == "flat" else p.shape[0] for p in params]
    anchors = [torch.randn(r, basis.shape[1], generator=gen).to(device) for r in rows]
    return (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, anchors, basis, weights)


ADAMW_HYPER = {"lr": 1e-2, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 1e-2}


@pytest.mark.parametrize("device", EXT_DEVICES)
@pytest.mark.parametrize(("side", "dtype", "soft"), OPCHECK_CASES)
@pytest.mark.parametrize("amsgrad", [False, True], ids=["adamw", "amsgrad"])
def test_opcheck_projected_adamw_bucket(device, side, dtype, soft, amsgrad):
    args = adamw_inputs(device, dtype, side, soft, amsgrad, seed=9)
    torch.library.opcheck(
        torch.ops.gradproj.projected_adamw_bucket_.default,
        (*args, side),
        {**ADAMW_HYPER, "maximize": amsgrad},
    )


def surgery_inputs(device: str, dtype: torch.dtype, seed: int):
    """Pairs of odd sizes (one over a CPU chunk), alternately conflicting and agreeing."""
    gen = torch.Generator().manual_seed(seed)
    us, rs = [], []
    for i, n in enumerate((7, 129, 20001)):
        u = torch.randn(n, generator=gen)
        r = (-1.0) ** i * 0.5 * u + 0.3 * torch.randn(n, generator=gen)
        us.append(u.to(device, dtype))
        rs.append(r.to(device, dtype))
    return us, rs


@pytest.mark.parametrize("device", EXT_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("variant", ["projection", "cosine"])
@pytest.mark.parametrize("symmetric", [False, True], ids=["one-sided", "symmetric"])
def test_opcheck_surgery_bucket(device, dtype, variant, symmetric):
    us, rs = surgery_inputs(device, dtype, seed=10)
    torch.library.opcheck(
        torch.ops.gradproj.surgery_bucket_.default, (us, rs, 0.7, variant, symmetric)
    )


def test_compile_fullgraph_matches_eager():
    """``project_`` (backend="cpp") compiles into one graph and gives eager's exact bits."""
    basis = orthonormal(64, 4, "cpu", seed=3)
    basis_out = orthonormal(8, 2, "cpu", seed=33)
    weights = torch.tensor([1.0, 0.5, 0.25, 0.0])

    def step(g: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        gradproj.project_([g, h], basis, weights=weights, backend="cpp")
        gradproj.project_(h, basis_out, side="output", backend="cpp")
        return g * 2

    torch._dynamo.reset()
    g, h = torch.randn(16, 64), torch.randn(8, 64)
    g_eager, h_eager = g.clone(), h.clone()
    expected = step(g_eager, h_eager)
    g_comp, h_comp = g.clone(), h.clone()
    out = torch.compile(step, fullgraph=True)(g_comp, h_comp)
    assert torch.equal(out, expected)
    assert torch.equal(g_comp, g_eager)
    assert torch.equal(h_comp, h_eager)
    # ... and both did project (a kernel traced away would leave g unchanged).
    ref = R.project(g.double(), basis.double(), weights=weights.double())
    torch.testing.assert_close(g_comp.double(), ref, rtol=0, atol=2e-6 * g.abs().max().item())


def test_missing_extension_warns_once_and_falls_back(monkeypatch):
    """Without gradproj._C: one RuntimeWarning, and project_ still works through the reference."""

    def missing():
        raise ImportError("No module named 'gradproj._C'")

    monkeypatch.setattr(_extension, "_import_c", missing)
    monkeypatch.setattr(_extension, "_tried", False)
    monkeypatch.setattr(_extension, "_module", None)
    monkeypatch.delenv("GRADPROJ_BACKEND", raising=False)
    basis = orthonormal(32, 3, "cpu", seed=4)
    g = torch.randn(10, 32)
    expected = R.project(g.double(), basis.double())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            work = g.clone()
            gradproj.project_(work, basis)
    ours = [w for w in caught if "gradproj._C is not available" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    assert issubclass(ours[0].category, RuntimeWarning)
    assert "--no-build-isolation" in str(ours[0].message)
    assert backends.select("project_bucket_", torch.device("cpu"), torch.float32).name != "cpp"
    torch.testing.assert_close(work.double(), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("side", ["input", "output", "flat"])
def test_cpu_kernel_is_deterministic_across_thread_counts(side):
    """Same bits on every call, whatever the number of threads (fixed reduction order)."""
    gen = torch.Generator().manual_seed(5)
    g = torch.randn(301, 769, generator=gen)
    d = {"input": 769, "output": 301, "flat": 301 * 769}[side]
    basis = orthonormal(d, 8, "cpu", seed=5)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 1, 3):
            torch.set_num_threads(n)
            work = g.clone()
            m = {"input": work, "output": work.T, "flat": work.view(-1)}[side]
            torch.ops.gradproj.project_bucket_([m], basis, None, side)
            results.append(work)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(results[0], r) for r in results[1:])


def test_cpu_surgery_and_adamw_are_deterministic_across_thread_counts():
    """Fixed chunks, sums added in chunk order: the same bits whatever the thread count."""
    basis = orthonormal(70001, 5, "cpu", seed=11)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 1, 3):
            torch.set_num_threads(n)
            us, rs = surgery_inputs("cpu", torch.float32, seed=11)
            us, rs = [torch.cat([u, u]) for u in us], [torch.cat([r, r]) for r in rs]
            torch.ops.gradproj.surgery_bucket_(us, rs, 1.0, "projection", True)
            gen = torch.Generator().manual_seed(12)
            p, g, m = (torch.randn(70001, generator=gen) for _ in range(3))
            v, c = torch.rand(70001, generator=gen), torch.zeros(1, 5)
            torch.ops.gradproj.projected_adamw_bucket_(
                [p],
                [g],
                [m],
                [v],
                [],
                [torch.tensor(2.0)],
                [c],
                basis,
                None,
                "flat",
                **ADAMW_HYPER,
                maximize=False,
            )
            results.append([*us, *rs, p, m, v])
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other, strict=True))


def test_cpu_baseline_isa_path_matches_reference():
    """The SSE2 build of the CPU kernels (ATEN_CPU_CAPABILITY=default) is correct too."""
    script = textwrap.dedent(
        """
        import torch, gradproj._C
        from gradproj import reference as R
        torch.manual_seed(0)
        worst = 0.0
        for side, shape, d in [("input", (37, 129), 129), ("output", (129, 37), 129),
                               ("flat", (5, 43), 215)]:
            for dtype in (torch.float32, torch.bfloat16):
                q, _ = torch.linalg.qr(torch.randn(d, 7, dtype=torch.float64))
                g = torch.randn(shape).to(dtype)
                ref = R.project(g.double(), q, side=side)
                m = {"input": g, "output": g.T, "flat": g.view(-1)}[side]
                torch.ops.gradproj.project_bucket_([m], q.float().contiguous(), None, side)
                tol = 2e-6 if dtype == torch.float32 else 2.0 ** -8
                err = ((g.double() - ref).abs() - tol * ref.abs()).max().item()
                worst = max(worst, err / g.double().abs().max().item())
        print(worst)
        """
    )
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    )
    assert float(out.stdout.strip()) < 2e-6


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda m, u, w: (m, u.double(), w, "input"), "basis must be contiguous float32"),
        (lambda m, u, w: (m, u, torch.ones(3), "input"), "weights must have shape (7,)"),
        (lambda m, u, w: ([m[0][:, :100]], u, w, "input"), "matrices[0] must be 2-D (rows x 129)"),
        (lambda m, u, w: (m, u, w, "sideways"), "side must be 'input', 'output' or 'flat'"),
        (lambda m, u, w: ([m[0], m[1].double()], u, w, "input"), "matrices[1] has dtype Double"),
    ],
)
def test_op_rejects_bad_arguments_naming_them(mutate, message):
    matrices, basis, weights = bucket_inputs("cpu", torch.float32, "input", True, seed=6)
    with pytest.raises(RuntimeError, match=re.escape(message)):
        torch.ops.gradproj.project_bucket_(*mutate(matrices, basis, weights))


def test_anchored_op_rejects_wrong_anchor_shape():
    matrices, basis, weights = bucket_inputs("cpu", torch.float32, "input", False, seed=7)
    anchors = [torch.zeros(m.shape[0], 6) for m in matrices]
    with pytest.raises(RuntimeError, match=r"anchors\[0\] must have shape \(37, 7\)"):
        torch.ops.gradproj.project_anchored_bucket_(matrices, anchors, basis, weights, "input")


@pytest.mark.cuda
@pytest.mark.skipif(not _extension.has_cuda(), reason="needs gradproj._C built with CUDA and a GPU")
@pytest.mark.parametrize(("side", "dtype", "soft"), OPCHECK_CASES)
def test_cuda_ops_never_synchronize_with_the_host(side, dtype, soft):
    """Device table upload, workspaces and launches are all stream-ordered: no host sync."""
    matrices, basis, weights = bucket_inputs("cuda", dtype, side, soft, seed=8)
    rows = [1 if side == "flat" else m.shape[0] for m in matrices]
    anchors = [torch.randn(r, basis.shape[1], device="cuda") for r in rows]
    adamw_args = adamw_inputs("cuda", dtype, side, soft, amsgrad=soft, seed=8)
    us, rs = surgery_inputs("cuda", dtype, seed=8)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        torch.ops.gradproj.project_bucket_(matrices, basis, weights, side)
        torch.ops.gradproj.project_anchored_bucket_(matrices, anchors, basis, weights, side)
        torch.ops.gradproj.projected_adamw_bucket_(*adamw_args, side, **ADAMW_HYPER, maximize=False)
        torch.ops.gradproj.surgery_bucket_(us, rs, 1.0, "cosine", soft)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def test_compiled_projection_sees_a_column_major_basis_written_in_place():
    """A column-major basis is copied contiguous once per version in eager mode
    (buckets.kernel_basis); a compiled step traces the copy instead, so a basis written in
    place between runs is the one the next run projects with."""

    def column_major(seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return torch.linalg.qr(torch.randn(64, 4, generator=gen, dtype=torch.float64))[0].float()

    basis = column_major(5)
    assert not basis.is_contiguous()

    def step(g: torch.Tensor) -> torch.Tensor:
        gradproj.project_(g, basis, backend="cpp")
        return g

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    g = torch.randn(16, 64)
    for _ in range(2):
        out = compiled(g.clone())
        ref = R.project(g.double(), basis.double())
        torch.testing.assert_close(out.double(), ref, rtol=0, atol=2e-6 * g.abs().max().item())
        with torch.no_grad():
            basis.copy_(column_major(6))
