"""ProjectedAdamW against the float64 reference, step by step, on every backend that runs here.

Each step, the reference (``gradproj.reference.projected_adamw`` in float64) is fed
the optimizer's state from just before the step and the same gradients, and the
new p, m, v (v̂max) and anchors are compared. Shapes are odd on purpose (rows
not a multiple of the kernel's BLOCK_R, D not a multiple of BLOCK_D, k < 16) and
small, for the Triton interpreter.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from gradproj import ConceptSubspace, ProjectedAdamW, backends, reference
from gradproj.drift import weight_drift

from .conftest import DEVICES

OP = "projected_adamw_bucket_"


def _runnable_backends() -> list[str]:
    """Registered backends that can run ``OP`` on one of the devices here."""
    return [
        name
        for name in backends.registered()
        if any(
            backends.get(name).unsupported_reason(OP, torch.device(dev), torch.float32) is None
            for dev in DEVICES
        )
    ]


BACKENDS = _runnable_backends()

# One step, compared with float64 from the same inputs. fp32: the kernels compute
# in fp32; measured max |error| 4e-8 on values up to ~0.3 (a few ulps), for both
# backends, so 1e-7 absolute (+1e-6 relative) has 2-3x headroom. bf16: p, m, v
# are stored in bf16 after an fp32 computation: one rounding, ≤ 2⁻⁸ relative.
TOL = {
    torch.float32: {"rtol": 1e-6, "atol": 1e-7},
    torch.bfloat16: {"rtol": 2.0**-8, "atol": 1e-5},
}
# Unprotected bf16 parameters take torch's AdamW, which computes in bf16: p·(1 − lr·λ),
# m, v, the denominator and p are each rounded (≤ 4 roundings, 4·2⁻⁸ = 2⁻⁶), and
# p − update cancels, so the error scales with the *old* |p| (plus lr), not the new.
TORCH_BF16_RTOL = 2.0**-6
# Unprotected fp32 parameters on CUDA take torch's fused CUDA AdamW. Measured on an H200
# (torch 2.11, 2026-12-04): its v is up to 1.287e-5 below float64 relative, which is
# 1 − fl32(0.999) = 0.00099998713 against 1 − 0.999 (1.2875e-5): it forms 1 − β₂ in fp32.
# p then moves by lr·m/√v, 0.64e-5 relative of the update. (On CPU it agrees to fp32.)
TORCH_CUDA_FP32_RTOL = 2e-5


def _basis(d: int, k: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(d, k, generator=gen, dtype=torch.float64))[0].float()


def _snapshot(opt: ProjectedAdamW, p: torch.Tensor) -> dict[str, torch.Tensor | None]:
    state = opt.state[p]
    snap = {k: v.detach().clone() for k, v in state.items()}
    snap["param"] = p.detach().clone()
    c = opt.protection.anchor_of(p)
    snap["anchor"] = None if c is None else c.clone()
    return snap


def _check_step(opt, p, before, group, basis, weights, side, dtype, interpreted):
    """Compare ``p`` and its state after a step with the reference from ``before``."""
    f64 = torch.float64
    beta1, beta2 = group["betas"]
    anchor = before["anchor"]
    if basis is not None and anchor is None:  # first step: the anchor is made from p₀
        anchor = reference.anchor(before["param"], basis, side=side).float()
    zeros = torch.zeros_like(before["param"], dtype=f64)
    exp_p, exp_m, exp_v, exp_vmax, exp_c = reference.projected_adamw(
        before["param"].to(f64),
        p.grad.to(f64),
        before.get("exp_avg", zeros).to(f64),
        before.get("exp_avg_sq", zeros).to(f64),
        int(opt.state[p]["step"].item()),
        None if anchor is None else anchor.to(f64),
        None if basis is None else basis.to(f64),
        lr=group["lr"],
        betas=(beta1, beta2),
        eps=group["eps"],
        weight_decay=group["weight_decay"],
        side=side,
        weights=None if weights is None else weights.to(f64),
        amsgrad=group["amsgrad"],
        max_exp_avg_sq=before.get("max_exp_avg_sq", zeros).to(f64),
        maximize=group["maximize"],
    )
    tol = TOL[dtype]
    if dtype == torch.bfloat16 and interpreted:
        # Triton's interpreter casts fp32 → bf16 by truncation, not round-to-nearest
        # (measured: 480 of 1024 random values differ from torch's cast, even with
        # fp_downcast_rounding="rtne"), so its stores are off by up to one ulp, 2⁻⁷.
        tol = {"rtol": 2.0**-7, "atol": 1e-5}
    if basis is None and dtype == torch.bfloat16:
        scale = before["param"].abs().max().item() + group["lr"]
        tol = {"rtol": TORCH_BF16_RTOL, "atol": TORCH_BF16_RTOL * scale}
    if basis is None and dtype == torch.float32 and p.device.type == "cuda":
        tol = {"rtol": TORCH_CUDA_FP32_RTOL, "atol": TOL[dtype]["atol"]}
    state = opt.state[p]
    torch.testing.assert_close(p.detach().to(f64), exp_p, **tol, msg=lambda m: f"param: {m}")
    torch.testing.assert_close(state["exp_avg"].to(f64), exp_m, **tol)
    torch.testing.assert_close(state["exp_avg_sq"].to(f64), exp_v, **tol)
    if group["amsgrad"]:
        torch.testing.assert_close(state["max_exp_avg_sq"].to(f64), exp_vmax, **tol)
    if basis is not None:
        c = opt.protection.anchor_of(p)
        torch.testing.assert_close(c.to(f64), exp_c, rtol=1e-5, atol=1e-6)


CASES = {
    # name: (side, amsgrad, maximize, soft weights, weight_decay)
    "input": ("input", False, False, False, 1e-2),
    "input_amsgrad_maximize": ("input", True, True, False, 1e-1),
    "input_soft": ("input", False, False, True, 1e-2),
    "output": ("output", False, False, False, 1e-2),
    "flat": ("flat", False, False, False, 1e-2),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_float64_reference_step_by_step(backend, case, dtype, device):
    reason = backends.get(backend).unsupported_reason(OP, device, dtype)
    if reason is not None:
        pytest.skip(reason)
    side, amsgrad, maximize, soft, wd = CASES[case]
    steps = 12 if backend == "triton" and device.type == "cpu" else 40
    torch.manual_seed(0)
    # Two weights sharing one basis (one bucket, two table rows), a third with its
    # own basis (a second bucket) and an unprotected bias (torch's AdamW path).
    a = nn.Parameter(torch.randn(37, 24, dtype=dtype, device=device) * 0.1)
    b = nn.Parameter(torch.randn(5, 24, dtype=dtype, device=device) * 0.1)
    c = nn.Parameter(torch.randn(9, 70, dtype=dtype, device=device) * 0.1)
    bias = nn.Parameter(torch.randn(37, dtype=dtype, device=device) * 0.1)

    def side_basis(p, k, seed):
        d = {"input": p[0].numel(), "output": p.shape[0], "flat": p.numel()}[side]
        return _basis(d, k, seed).to(device)

    if side == "input":
        u_ab = side_basis(a, 3, 1)
        bases = {a: u_ab, b: u_ab, c: side_basis(c, 5, 2)}
    else:  # output/flat bases depend on each tensor's own dims
        bases = {a: side_basis(a, 3, 1), c: side_basis(c, 5, 2)}
    weights = torch.tensor([1.0, 0.5, 0.0], device=device) if soft else None
    if soft:
        bases[a] = ConceptSubspace(bases[a], weights)
    params = [a, b, c, bias]
    opt = ProjectedAdamW(
        [{"params": [a, b, bias]}, {"params": [c], "lr": 3e-3, "betas": (0.8, 0.99)}],
        lr=1e-2,
        weight_decay=wd,
        bases=bases,
        side=side,
        amsgrad=amsgrad,
        maximize=maximize,
        backend=backend,
    )
    p0 = {id(p): p.detach().clone() for p in params}
    gen = torch.Generator().manual_seed(3)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(dtype=dtype, device=device)
        before = {id(p): _snapshot(opt, p) for p in params}
        opt.step()
        for group in opt.param_groups:
            for p in group["params"]:
                basis = bases.get(p)
                w = getattr(basis, "weights", None)
                basis = getattr(basis, "basis", basis)
                interpreted = backend == "triton" and device.type == "cpu"
                _check_step(opt, p, before[id(p)], group, basis, w, side, dtype, interpreted)
    if not soft and dtype == torch.float32:
        for p, basis in bases.items():
            assert weight_drift(p, p0[id(p)], basis, side=side) <= 1e-6


def test_without_bases_it_is_torch_fused_adamw_bit_for_bit():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 16), nn.Tanh(), nn.Linear(16, 4))
    twin = nn.Sequential(nn.Linear(24, 16), nn.Tanh(), nn.Linear(16, 4))
    twin.load_state_dict(model.state_dict())
    ours = ProjectedAdamW(model.parameters(), lr=1e-2, weight_decay=0.1, bases={}, amsgrad=True)
    theirs = torch.optim.AdamW(
        twin.parameters(), lr=1e-2, weight_decay=0.1, amsgrad=True, fused=True
    )
    gen = torch.Generator().manual_seed(1)
    for _ in range(10):
        x = torch.randn(8, 24, generator=gen)
        for m, opt in ((model, ours), (twin, theirs)):
            opt.zero_grad()
            m(x).pow(2).mean().backward()
            opt.step()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton cannot run here")
def test_triton_rejects_bases_wider_than_its_tile():
    p = nn.Parameter(torch.randn(4, 300))
    opt = ProjectedAdamW([p], bases={p: _basis(300, 257, 0)}, backend="triton")
    p.grad = torch.randn(4, 300)
    with pytest.raises(ValueError, match="k ≤ 256"):
        opt.step()


# ---------------------------------------------------------------- the Triton kernel's own paths
#
# The bucket kernel called directly (no optimizer), against the float64 reference
# bucket kernel from the same inputs, on the paths the step-by-step test above does
# not reach: the two-pass form (D > BLOCK_D), transposed views whose rows are
# 16-byte aligned (vectorized COLS layout), strided grads (STRIDED layout), flat
# tensors over several chunks, k = 256, fp16.

HYPER = {"lr": 1e-2, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 1e-2}


# Where the bucket kernels run: a GPU when there is one (conftest sets TRITON_INTERPRET
# only without one), else the interpreter on CPU tensors.
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _bucket(side, dtype, k, shapes, *, soft, amsgrad, strided_grads=False, seed=0):
    """Random bucket inputs on ``TRITON_DEVICE``: (params, grads, m, v, vmax, steps, anchors,
    basis, weights); the values do not depend on the device."""
    gen = torch.Generator().manual_seed(seed)
    dev = TRITON_DEVICE

    def mat(shape, scale=1.0):
        r, d = shape
        if side == "output":  # transposed views: unit stride along the rows
            t = torch.randn(d, r, generator=gen).to(dev).T
        else:
            t = torch.randn(r, d, generator=gen).to(dev)
        return (t * scale).to(dtype)

    ps = [mat(s, 0.1) for s in shapes]
    if strided_grads:  # every other column of a wider tensor: no unit stride at all
        gs = [torch.randn(s[1], 2 * s[0], generator=gen).to(dev).T[::2].to(dtype) for s in shapes]
    else:
        gs = [mat(s) for s in shapes]
    ms = [mat(s, 0.01) for s in shapes]
    vs = [mat(s, 0.01).abs() for s in shapes]
    vmax = [v * 1.5 for v in vs] if amsgrad else None
    if side == "flat":
        ps, gs, ms, vs = ([t.contiguous() for t in ts] for ts in (ps, gs, ms, vs))
        vmax = None if vmax is None else [t.contiguous() for t in vmax]
    d = ps[0].numel() if side == "flat" else shapes[0][1]
    basis = _basis(d, k, seed + 1).contiguous().to(dev)
    weights = torch.rand(k, generator=gen).to(dev) if soft else None
    anchors = [
        (torch.randn(1 if side == "flat" else s[0], k, generator=gen) * 0.01).to(dev)
        for s in shapes
    ]
    steps = [torch.tensor(float(3 + i), device=dev) for i in range(len(shapes))]
    return ps, gs, ms, vs, vmax, steps, anchors, basis, weights


def _check_bucket(
    side, dtype, k, shapes, *, soft=False, amsgrad=False, maximize=False, eps=None, **kw
):
    from gradproj.kernels import adamw

    hyper = HYPER if eps is None else {**HYPER, "eps": eps}

    interpreted = adamw._interpreting()

    args = _bucket(side, dtype, k, shapes, soft=soft, amsgrad=amsgrad, **kw)
    f64 = torch.float64
    # float64 copies of everything but the steps (the reference reads them as they are)
    expect = [
        ts if ts is None or i == 5 else [t.to(f64) for t in ts] for i, ts in enumerate(args[:7])
    ]
    basis, weights = args[7], args[8]
    reference.projected_adamw_bucket_(
        *expect,
        basis.to(f64),
        None if weights is None else weights.to(f64),
        side,
        **hyper,
        maximize=maximize,
    )
    adamw.projected_adamw_bucket_(*args, side, **hyper, maximize=maximize)
    # fp16: one rounding of an fp32 result, 2⁻¹¹, or one ulp (2⁻¹⁰) where the
    # interpreter truncates; bf16 likewise (see _check_step).
    tol = TOL[dtype] if dtype != torch.float16 else {"rtol": 2.0**-11, "atol": 1e-5}
    if dtype != torch.float32 and interpreted:
        tol = {"rtol": 2 * tol["rtol"], "atol": tol["atol"]}
    if dtype == torch.float32 and k > 64:
        # x' − U(a − c) sums k fp32 products: measured 1.01e-7 at k = 129 (values ~0.3)
        # with sums rounded to nearest, so 1e-7 has no headroom there. The tensor cores
        # truncate each MMA's sum instead (tests/tensor_cores.py, which the interpreter
        # uses): 2.3e-7 at k = 129 in that model (the H200 passed 2e-7 on the same inputs);
        # 4e-7 gives 1.75x over the model. k = 128 (cols-64x32) reached 2.1e-7 there, the
        # same with 16- and 64-row blocks.
        tol = {"rtol": tol["rtol"], "atol": 4e-7}
    names = ("param", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    for name, got, want in zip(names, args[:5], expect[:5], strict=True):
        if got is None or name == "grad":
            continue
        for i, (x, y) in enumerate(zip(got, want, strict=True)):
            torch.testing.assert_close(
                x.to(f64), y, **tol, msg=lambda m, name=name, i=i: f"{name}[{i}]: {m}"
            )
    for i, (c, want) in enumerate(zip(args[6], expect[6], strict=True)):
        torch.testing.assert_close(
            c.to(f64), want, rtol=1e-5, atol=1e-6, msg=lambda m, i=i: f"anchor[{i}]: {m}"
        )
    return args


needs_triton = pytest.mark.skipif("triton" not in BACKENDS, reason="Triton cannot run here")


@needs_triton
@pytest.mark.parametrize(
    ("side", "dtype", "k", "shapes", "flags"),
    [
        # D = 300 > BLOCK_D: two passes over D, ragged last chunk (fp32: pass 2 reads p
        # back; 16-bit: it recomputes x')
        ("input", torch.float32, 20, [(33, 300), (2, 300)], {"soft": True}),
        ("input", torch.bfloat16, 17, [(17, 300)], {"amsgrad": True, "maximize": True}),
        # contiguous rows, 128 < D <= 768, k up to FMA_MAX_K (32 fp32, 16 16-bit): x' in
        # registers, FMAs (FMA_CHUNKS tiles of 256 / 128 / 64 columns), rows not a multiple
        # of its 8-row block
        ("input", torch.float32, 32, [(13, 768), (6, 768)], {"soft": True}),
        ("input", torch.bfloat16, 16, [(17, 300)], {"amsgrad": True, "maximize": True}),
        ("input", torch.bfloat16, 32, [(11, 768), (6, 768)], {"soft": True}),
        ("input", torch.float16, 3, [(9, 500)], {"soft": True}),
        ("input", torch.float32, 1, [(5, 200), (3, 200)], {"amsgrad": True}),
        # D > 768: 4-row blocks of 2-3 tiles of 512 columns, rows not a multiple of 4
        ("input", torch.float32, 32, [(7, 1100), (2, 1100)], {"soft": True}),
        ("input", torch.bfloat16, 16, [(5, 1536)], {"amsgrad": True, "maximize": True}),
        ("input", torch.float16, 3, [(6, 1024)], {"soft": True}),
        # D > 1536: 2-row blocks of 2-3 tiles of 1024; D > 3072: 4 of them on 8 warps
        ("input", torch.float32, 32, [(7, 2048), (2, 2048)], {"amsgrad": True}),
        ("input", torch.bfloat16, 16, [(5, 3000)], {"soft": True}),
        ("input", torch.float32, 16, [(3, 4096), (2, 4096)], {"soft": True}),
        ("input", torch.bfloat16, 8, [(5, 3500)], {"amsgrad": True}),
        # transposed views, rows a multiple of 16 bytes: the vectorized COLS path
        ("output", torch.float32, 8, [(48, 40), (16, 40)], {"amsgrad": True}),
        # ... with 128 < D <= 768, fp32, k <= 16: the FMA form in 8-row blocks (rows not a
        # multiple of 8), and the same views unaligned (12 rows: 48 bytes) stay two-pass
        ("output", torch.float32, 16, [(44, 300), (12, 300)], {"soft": True}),
        ("output", torch.float32, 8, [(20, 768)], {"amsgrad": True, "maximize": True}),
        ("output", torch.float32, 8, [(13, 200)], {}),
        ("output", torch.float32, 20, [(64, 300), (3, 300)], {"soft": True}),
        ("output", torch.bfloat16, 5, [(48, 100)], {}),
        # ... 16-bit, k <= 8: the FMA form in 16-row blocks on 8 warps (rows not a multiple
        # of 16), and the largest k, at D = 768 too
        ("output", torch.bfloat16, 8, [(40, 300), (8, 300)], {"soft": True}),
        ("output", torch.float16, 1, [(24, 768)], {"amsgrad": True, "maximize": True}),
        # grads with no unit stride: the STRIDED layout
        ("input", torch.float32, 7, [(9, 40), (5, 40)], {"strided_grads": True}),
        ("input", torch.float16, 17, [(40, 48)], {}),
        # the widest basis, k = 256 (BLOCK_K = 256), and k = 129 (K not a multiple of 16)
        ("input", torch.float32, 256, [(5, 260)], {"soft": True}),
        ("output", torch.float32, 129, [(20, 140)], {}),
        # 16-bit, k = 65-128: 64-row blocks of 32 columns on 8 warps (the interpreter's
        # capability is 90 and its rows are never few), rows not a multiple of 64, D not one
        # of 32
        ("input", torch.bfloat16, 100, [(70, 200), (9, 200)], {"soft": True}),
        ("output", torch.float16, 128, [(80, 144)], {"amsgrad": True}),
        # ... and fp32 without amsgrad (pass 2 reads p back)
        ("input", torch.float32, 80, [(66, 150)], {"soft": True, "maximize": True}),
        ("output", torch.float32, 128, [(64, 136), (8, 136)], {}),
    ],
    ids=["rows-2pass", "rows-2pass-bf16", "fma-3x256", "fma-bf16-3x128", "fma-bf16-k32-3x256",
         "fma-fp16-2x256",
         "fma-1x256", "fma-3x512", "fma-bf16-3x512", "fma-fp16-2x512", "fma-2x1024",
         "fma-bf16-3x1024", "fma-4x1024", "fma-bf16-4x1024", "cols-aligned", "cols-fma-2x256",
         "cols-fma-3x256", "cols-unaligned-2pass", "cols-2pass",
         "cols-bf16", "cols-fma-bf16-3x128", "cols-fma-fp16-3x256", "strided-grads", "fp16",
         "k256", "cols-k129", "rows-bf16-64x32", "cols-fp16-64x32", "rows-64x32",
         "cols-64x32"],
)  # fmt: skip
def test_triton_bucket_paths_match_float64(side, dtype, k, shapes, flags):
    _check_bucket(side, dtype, k, shapes, **flags)


def test_triton_fast_sqrt_follows_eps_and_the_compile_check():
    """FAST_SQRT (the SFU's sqrt.approx.ftz) from eps = 1e-10, where its flushed subnormal v̂
    cannot move the denominator; the flat kernels' two passes agree on it (no amsgrad),
    and the rows configs where the compile check found it costlier keep sqrt_rn."""
    from gradproj.kernels import adamw

    rows = dict(adamw._rows_config(adamw._ROWS, 4, 16, 768, 90, k=8, aligned=True))
    assert adamw._fast_sqrt(1e-8, False, rows)
    assert not adamw._fast_sqrt(1e-11, False, rows)
    assert not adamw._fast_sqrt(0.0, False, None)
    assert adamw._fast_sqrt(1e-8, False, None) and not adamw._fast_sqrt(1e-8, True, None)
    wide = dict(adamw._rows_config(adamw._ROWS, 4, 16, 2048, 90, k=16, aligned=True))
    assert wide["FMA_CHUNKS"] and wide["BLOCK_D"] == 1024
    assert adamw._fast_sqrt(1e-8, False, wide) and not adamw._fast_sqrt(1e-8, True, wide)
    cols = dict(adamw._rows_config(adamw._COLS, 2, 32, 768, 90, k=32, aligned=False))
    assert (cols["BLOCK_R"], cols["BLOCK_K"], cols["FMA_CHUNKS"]) == (16, 32, 0)
    assert adamw._fast_sqrt(1e-8, False, cols)  # the tiles, not the arch, decide
    cols32 = dict(adamw._rows_config(adamw._COLS, 4, 32, 768, 90, k=32, aligned=False))
    assert cols32["RELOAD"] and adamw._fast_sqrt(1e-8, False, cols32)  # fp32 keeps it


@needs_triton
@pytest.mark.parametrize(
    ("side", "shapes", "flags"),
    [("input", [(9, 300)], {"soft": True}), ("flat", [(3, 40)], {"amsgrad": True})],
    ids=["rows", "flat"],
)
def test_triton_tiny_eps_keeps_sqrt_rn(side, shapes, flags):
    """eps below FAST_SQRT_MIN_EPS (here 1e-12, and 0) takes the IEEE square root. At eps = 0
    the kernels' masked lanes were 0/0 before they read v as 1: NaN in every row."""
    for eps in (1e-12, 0.0):
        _check_bucket(side, torch.float32, 5, shapes, eps=eps, **flags)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_flat_spans_several_chunks(dtype):
    """Flat tensors cut in fixed chunks (one ragged), three tensors: partials, reduce, apply."""
    from gradproj.kernels import adamw

    n = 2 * adamw._FLAT_CHUNK + 37
    _check_bucket("flat", dtype, 6, [(1, n)] * 3, soft=True, amsgrad=True)


@needs_triton
def test_triton_flat_is_deterministic():
    """The chunk partials are summed in a fixed order: two runs agree bit for bit."""
    from gradproj.kernels import adamw

    n = 3 * adamw._FLAT_CHUNK + 5
    first = _bucket("flat", torch.float32, 4, [(1, n)] * 2, soft=True, amsgrad=False)
    second = _bucket("flat", torch.float32, 4, [(1, n)] * 2, soft=True, amsgrad=False)
    for args in (first, second):
        adamw.projected_adamw_bucket_(*args, "flat", **HYPER, maximize=False)
    for a, b in zip(first[:7], second[:7], strict=True):
        if a is not None:
            for x, y in zip(a, b, strict=True):
                assert torch.equal(x, y)


@needs_triton
def test_triton_layout_and_alignment_from_strides():
    """The host picks the tile's fast axis from the strides, and vector hints only when aligned."""
    from gradproj.kernels import adamw

    def table_of(side, shapes, **kw):
        ps, gs, ms, vs, vmax, steps, anchors, _, _ = _bucket(
            side, torch.float32, 3, shapes, soft=False, amsgrad=False, **kw
        )
        return adamw._rows_table(ps, gs, ms, vs, vmax, steps, anchors, lambda lay, al: 16)

    assert table_of("input", [(5, 24)])[2:] == (adamw._ROWS, 4)
    assert table_of("input", [(5, 22)])[2:] == (adamw._ROWS, 1)  # 88-byte rows
    assert table_of("output", [(48, 24), (16, 24)])[2:] == (adamw._COLS, 4)
    assert table_of("output", [(37, 24)])[2:] == (adamw._COLS, 1)  # 37 rows: ragged
    assert table_of("input", [(5, 24)], strided_grads=True)[2:] == (adamw._STRIDED, 1)


@needs_triton
def test_triton_tiles_follow_the_compile_target(monkeypatch):
    """The launcher asks the active driver for its target once per device and caches it."""
    from triton.backends.compiler import GPUTarget

    from gradproj.kernels import adamw

    asked = []

    class Driver:
        def get_current_device(self):
            return 7

        def get_current_target(self):
            asked.append(1)
            return GPUTarget("cuda", 80, 32)

    monkeypatch.setattr(adamw, "_interpreting", lambda: False)
    monkeypatch.setattr(adamw, "_CAPABILITY", {})
    driver = adamw.triton.runtime.driver
    previous = getattr(driver, "_active", None)  # as scripts/gpu_compile_check.py does
    driver.set_active(Driver())
    try:
        assert adamw._capability() == 80
        assert adamw._capability() == 80
    finally:
        driver.set_active(previous)
    assert asked == [1]
    for k in (1, 8, 16, 32, 64, 128, 129, 256):
        for lay in (adamw._ROWS, adamw._COLS, adamw._STRIDED):
            for isz in (2, 4):
                cfg = adamw._rows_config(lay, isz, adamw._block_k(k, "k"), 768, 80, k=k)
                assert not cfg["RESIDENT"]  # D = 768 never fits one tensor-core tile
                # x' in registers: rows up to k = 16 (FMA_8ROW_MAX_K; with amsgrad on 4
                # warps, FMA_MAX_K: fp32 32, 16-bit 16); 16-byte aligned transposed views
                # (COLS) up to 16 fp32 / 8 16-bit, one 32-byte sector a column (fp32 8 rows
                # on 4 warps, 16-bit 16 on 8)
                fma = k <= 16 if lay == adamw._ROWS else False
                cols = lay == adamw._COLS and k <= (16 if isz == 4 else 8)
                if fma or cols:
                    # rows: 8 on 8 warps capped at 128 (FMA_8ROW_WARPS_MAXNREG), with amsgrad
                    # on 4 uncapped; views: fp32 8 rows on 4 warps, 16-bit 16 on 8 capped at
                    # 128 on sm_80 from k = 2 (FMA_COLS_16BIT_SM80_MAXNREG), else (k = 1, soft
                    # weights, amsgrad, sm_90) on 16 capped at 128
                    rows, warps, nreg = (8, 4, 255)
                    if cols and isz == 2:
                        rows, warps, nreg = 16, *adamw.FMA_COLS_16BIT_WARPS_MAXNREG
                        if k > 1:
                            warps, nreg = 8, adamw.FMA_COLS_16BIT_SM80_MAXNREG
                        wide = adamw.FMA_COLS_16BIT_WARPS_MAXNREG
                        for other in ({"weighted": True}, {"amsgrad": True}):
                            alt = adamw._rows_config(lay, isz, adamw._block_k(k, "k"), 768, 80,
                                                     k=k, **other)  # fmt: skip
                            got = (alt["BLOCK_R"], alt["num_warps"], alt["maxnreg"])
                            assert got == (16, *wide), other
                        h100 = adamw._rows_config(lay, isz, adamw._block_k(k, "k"), 768, 90, k=k)
                        assert (h100["BLOCK_R"], h100["num_warps"], h100["maxnreg"]) == (16, *wide)
                        # 3 tiles of 128 (D = 320) keep 8 warps uncapped (<= 128 registers)
                        narrow = adamw._rows_config(lay, isz, adamw._block_k(k, "k"), 320, 90, k=k)
                        assert (narrow["BLOCK_D"], narrow["FMA_CHUNKS"]) == (128, 3)
                        assert (narrow["num_warps"], narrow["maxnreg"]) == (8, 255)
                    if fma:
                        rows, warps, nreg = 8, *adamw.FMA_8ROW_WARPS_MAXNREG
                    assert (cfg["FMA_CHUNKS"], cfg["BLOCK_D"], cfg["BLOCK_R"]) == (3, 256, rows)
                    assert (cfg["num_warps"], cfg["maxnreg"]) == (warps, nreg), (lay, isz, k)
                else:
                    assert cfg["FMA_CHUNKS"] == 0
                    assert cfg["BLOCK_R"] >= 16 and cfg["BLOCK_D"] >= 16  # tl.dot's minimum
                if lay == adamw._ROWS:
                    ams = adamw._rows_config(lay, isz, adamw._block_k(k, "k"), 768, 80,
                                             k=k, amsgrad=True)  # fmt: skip
                    if k <= (32 if isz == 4 else 16):  # FMA_MAX_K
                        assert (ams["BLOCK_R"], ams["num_warps"], ams["maxnreg"]) == (8, 4, 255)
                    else:
                        assert ams["FMA_CHUNKS"] == 0
    # beyond 3 tiles of 256 on 4 warps: 4 rows of 2-3 tiles of 512, then 2 rows of 2-3 tiles
    # of 1024, then 4 of those on 8 warps (fp32 up to k = 32, 16-bit up to k = 16; with 4
    # tiles 16 and 8), none beyond 4096
    for d, tiles, warps in ((769, (4, 512, 2), 4), (1024, (4, 512, 2), 4),
                            (1025, (4, 512, 3), 4), (1536, (4, 512, 3), 4),
                            (1537, (2, 1024, 2), 4), (3072, (2, 1024, 3), 4),
                            (3073, (2, 1024, 4), 8), (4096, (2, 1024, 4), 8),
                            (4097, None, 4)):  # fmt: skip
        for isz, k in ((4, 16), (4, 17), (4, 32), (4, 33), (2, 8), (2, 9), (2, 16), (2, 17)):
            cfg = adamw._rows_config(adamw._ROWS, isz, adamw._block_k(k, "k"), d, 90, k=k)
            got = (cfg["BLOCK_R"], cfg["BLOCK_D"], cfg["FMA_CHUNKS"])
            max_k = (32 if isz == 4 else 16) if warps == 4 else (16 if isz == 4 else 8)
            if tiles is not None and k <= max_k:
                assert (got, cfg["num_warps"]) == ((tiles[0], tiles[1], tiles[2]), warps), (d, k)
            else:
                assert got[2] == 0 and cfg["BLOCK_R"] >= 16, (d, isz, k)  # tensor-core form


@needs_triton
def test_triton_rows_of_many_rows_take_64_row_blocks_on_sm90():
    """k = 65-128 on sm_90: 64 x 32 on 8 warps (wgmma's M) for a bucket of many rows, rows
    and transposed views alike, 16-bit and fp32; few rows (64-row programs fewer than the
    SMs), fp32 with amsgrad, sm_80 and other k keep 16-row blocks on 4 warps."""
    from gradproj.kernels import adamw

    for lay in (adamw._ROWS, adamw._COLS):
        for k, isz in itertools.product((65, 100, 128), (2, 4)):
            cfg = adamw._rows_config(lay, isz, adamw._block_k(k, "k"), 768, 90, k=k)
            got = (cfg["BLOCK_R"], cfg["BLOCK_D"], cfg["num_warps"])
            assert got == (64, 32, 8), (lay, k, isz)
            assert cfg["FMA_CHUNKS"] == 0 and cfg["KSPLIT"] == 1
            others = [{"few_rows": True}, {"cap": 80}]
            others += [{"amsgrad": True}] if isz == 4 else []
            for other in others:
                kw = {"few_rows": False, "amsgrad": False, **other}
                alt = adamw._rows_config(lay, isz, adamw._block_k(k, "k"), 768,
                                         kw.pop("cap", 90), k=k, **kw)  # fmt: skip
                assert (alt["BLOCK_R"], alt["num_warps"]) == (16, 4), (lay, k, isz, other)
        for k in (64, 129):
            cfg = adamw._rows_config(lay, 2, adamw._block_k(k, "k"), 768, 90, k=k)
            assert cfg["BLOCK_R"] == 16, (lay, k)
    strided = adamw._rows_config(adamw._STRIDED, 2, 128, 768, 90, k=128)
    assert strided["BLOCK_R"] == 16


@needs_triton
def test_triton_launcher_counts_the_buckets_rows(monkeypatch):
    """The launcher asks for many-row tiles by the bucket's rows against the device's SMs."""
    from gradproj.kernels import adamw

    seen = []
    real = adamw._rows_config

    def spy(*args, **kwargs):
        seen.append(kwargs["few_rows"])
        return real(*args, **kwargs)

    monkeypatch.setattr(adamw, "_rows_config", spy)
    for sms, few in ((0, False), (2, True), (1, False)):
        monkeypatch.setattr(adamw, "_sm_count", lambda device, sms=sms: sms)
        seen.clear()
        # 100 rows: few against 2 SMs (128 rows), many against 1 (64); 0 SMs: unknown
        _check_bucket("input", torch.bfloat16, 4, [(60, 40), (40, 40)])
        assert seen and set(seen) == {few}, (sms, seen)


@needs_triton
@pytest.mark.parametrize("side", ["input", "output", "flat"])
def test_triton_empty_basis_is_plain_adamw(side):
    """k = 0: no coefficient, an anchor with no address; the step is AdamW's alone."""
    _check_bucket(side, torch.float32, 0, [(7, 24), (7, 24)], amsgrad=True)


if "triton" in BACKENDS:
    import triton
    import triton.language as tl

    from gradproj.kernels.adamw import _bias_terms

    @triton.jit
    def _bias_probe(step_ptr, out_ptr, lr, log_beta1, log_beta2, weight_decay):
        """Program i: ``_bias_terms`` of step i, as (step size, 1/√(1 − β₂ᵗ), decay)."""
        i = tl.program_id(0)
        step_size, inv_sqrt_bias2, decay = _bias_terms(
            step_ptr + i, lr, log_beta1, log_beta2, weight_decay
        )
        tl.store(out_ptr + 3 * i, step_size)
        tl.store(out_ptr + 3 * i + 1, inv_sqrt_bias2)
        tl.store(out_ptr + 3 * i + 2, decay)


@needs_triton
def test_triton_bias_terms_match_float64_over_betas_and_steps():
    """The kernels' bias corrections in fp32 (``_bias_terms``: ln β from the host, −expm1 by
    its Taylor series down to t·ln β = −1, by ``tl.exp`` below) against float64's
    lr / (1 − β₁ᵗ) and 1 / √(1 − β₂ᵗ): within 1e-6 relative, from β = 0 to 1 − 10⁻⁷ and
    t = 1 to 10⁷, across the series' edge. Both ways to get it wrong fail here: 1 minus
    an fp32 βᵗ (1.4e-6 off at β = 0.95, t = 1, in the interpreter's exact exp), and the
    series cut at y⁸/8! (1.0e-6 off at β = 0.9, t = 8)."""
    import math

    from gradproj.kernels import adamw

    steps = [*range(1, 41), 99, 100, 101, 999, 1000, 1001, 10**4, 10**5, 10**6, 10**7]
    step_t = torch.tensor(steps, dtype=torch.float32, device=DEVICES[-1])
    lr, wd = 3e-4, 0.1
    worst = 0.0
    for beta in (0.0, 0.5, 0.9, 0.95, 0.99, 0.999, 0.9999, 0.99999, 1 - 1e-7):
        out = torch.empty(3 * len(steps), dtype=torch.float32, device=step_t.device)
        log_beta = adamw._log_beta(beta)
        _bias_probe[(len(steps),)](step_t, out, lr, log_beta, log_beta, wd)
        got = out.view(-1, 3).double().cpu()
        for i, t in enumerate(steps):
            bias = 1.0 if beta == 0.0 else -math.expm1(t * math.log(beta))
            want = (lr / bias, 1.0 / math.sqrt(bias))
            for g, w in zip(got[i, :2].tolist(), want, strict=True):
                worst = max(worst, abs(g - w) / w)
                assert abs(g - w) <= 1e-6 * w, (beta, t, g, w)
        assert torch.allclose(got[:, 2], torch.full_like(got[:, 2], 1.0 - lr * wd))
    assert worst > 0.0  # fp32 results: the comparison is not of float64 with itself
