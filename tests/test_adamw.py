"""ProjectedAdamW against the float64 reference, step by step, on every backend that runs here.

Each step, the reference (``gradproj.reference.projected_adamw`` in float64) is fed
the optimizer's state from just before the step and the same gradients, and the
new p, m, v (v̂max) and anchors are compared. Shapes are odd on purpose (rows
not a multiple of the kernel's BLOCK_R, D not a multiple of BLOCK_D, k < 16) and
small, for the Triton interpreter.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradproj import ConceptSubspace, ProjectedAdamW, backends, reference
from gradproj.optim import subspace_drift

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
            assert subspace_drift(p, p0[id(p)], basis, side=side) <= 1e-6


def test_without_bases_it_is_torch_adamw_bit_for_bit():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 16), nn.Tanh(), nn.Linear(16, 4))
    twin = nn.Sequential(nn.Linear(24, 16), nn.Tanh(), nn.Linear(16, 4))
    twin.load_state_dict(model.state_dict())
    ours = ProjectedAdamW(model.parameters(), lr=1e-2, weight_decay=0.1, bases={}, amsgrad=True)
    theirs = torch.optim.AdamW(twin.parameters(), lr=1e-2, weight_decay=0.1, amsgrad=True)
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
