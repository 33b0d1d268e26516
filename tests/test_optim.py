"""ProjectedOptimizer and ProjectedAdamW: the guarantee, the Optimizer contract, saving, AMP.

The guarantee under test: after T steps, ``‖(W_T − W_0) U‖ ≤ bound · ‖W_0‖`` for
every protected weight (``weight_drift``). Every guarantee test also checks that
the weights really moved, so a no-op optimizer cannot pass.
"""

from __future__ import annotations

import contextlib
import io

import pytest
import torch
from torch import nn

from gradproj import ConceptSubspace, ProjectedAdamW, ProjectedOptimizer
from gradproj.drift import weight_drift

IN, HIDDEN, OUT, K = 32, 48, 8, 4
STEPS = 100

# fp32 bound of the issue: 1e-6·‖W_0‖. Measured 3e-8 … 6e-8 for every inner
# optimizer below (one fp32 rounding of W per step, not accumulated: the anchor
# pulls W U back to C each step).
FP32_BOUND = 1e-6
# bf16 parameters: the projected W* satisfies W* U = C in fp32, then is rounded to
# bf16 when stored; ‖(round(W*) − W*) U‖ ≤ ‖round(W*) − W*‖ ≤ u·‖W_T‖ with the
# bf16 unit roundoff u = 2⁻⁸, and (anchored) it does not accumulate over steps.
# Measured 3e-4 … 1.1e-3 · ‖W_0‖ after 100 steps.
BF16_UNIT_ROUNDOFF = 2.0**-8

INNER = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=1e-2),
    "sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, nesterov=True),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=1e-2),
    "adagrad": lambda ps: torch.optim.Adagrad(ps, lr=1e-2),
    "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=1e-2),
}


def make_model(dtype: torch.dtype = torch.float32) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, IN), nn.Tanh(), nn.Linear(IN, OUT)
    ).to(dtype)


def make_basis(d: int = IN, k: int = K, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(d, k, generator=gen, dtype=torch.float64))[0].float()


def protected(model: nn.Sequential) -> list[torch.Tensor]:
    """Two weights with input dim IN, sharing one basis (so they share one bucket)."""
    return [model[0].weight, model[4].weight]


def make_optimizer(name: str, model: nn.Module, bases: dict, mode: str = "update"):
    if name == "projected_adamw":
        return ProjectedAdamW(model.parameters(), lr=1e-2, weight_decay=1e-2, bases=bases)
    return ProjectedOptimizer(INNER[name](model.parameters()), bases, mode=mode)


def batches(n: int, dtype: torch.dtype = torch.float32, seed: int = 2):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        yield (
            torch.randn(16, IN, generator=gen).to(dtype),
            torch.randn(16, OUT, generator=gen).to(dtype),
        )


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (model(x) - y).float().pow(2).mean()


def train(model, opt, data) -> None:
    for x, y in data:
        opt.zero_grad()
        loss_of(model, x, y).backward()
        opt.step()


def drifts(model, w0s, basis) -> list[tuple[float, float]]:
    """``(‖ΔW U‖/‖W_0‖, ‖ΔW‖/‖W_0‖)`` per protected weight."""
    out = []
    for w, w0 in zip(protected(model), w0s, strict=True):
        moved = ((w.detach().double() - w0.double()).norm() / w0.double().norm()).item()
        out.append((weight_drift(w, w0, basis), moved))
    return out


# --------------------------------------------------------------- the guarantee


@pytest.mark.parametrize("name", [*INNER, "projected_adamw"])
def test_update_mode_keeps_the_guarantee_fp32(name):
    model, basis = make_model(), make_basis()
    w0s = [w.detach().clone() for w in protected(model)]
    opt = make_optimizer(name, model, {w: basis for w in protected(model)})
    train(model, opt, batches(STEPS))
    for along, moved in drifts(model, w0s, basis):
        assert moved > 1e-3, "the weights did not move: the test would be vacuous"
        assert along <= FP32_BOUND, f"{name}: ‖ΔW U‖/‖W_0‖ = {along:.3g}"


@pytest.mark.parametrize("name", [*INNER, "projected_adamw"])
def test_update_mode_keeps_the_guarantee_bf16(name):
    model, basis = make_model(torch.bfloat16), make_basis()
    w0s = [w.detach().clone() for w in protected(model)]
    opt = make_optimizer(name, model, {w: basis for w in protected(model)})
    train(model, opt, batches(STEPS, torch.bfloat16))
    for w, w0, (along, moved) in zip(protected(model), w0s, drifts(model, w0s, basis), strict=True):
        assert moved > 1e-3
        grown = (w.detach().double().norm() / w0.double().norm()).item()  # ‖W_T‖/‖W_0‖
        bound = BF16_UNIT_ROUNDOFF * max(1.0, grown)
        assert along <= bound, f"{name}: ‖ΔW U‖/‖W_0‖ = {along:.3g} > {bound:.3g}"


@pytest.mark.parametrize("name", ["sgd", "sgd_momentum"])
def test_grad_mode_keeps_the_guarantee_for_sgd(name):
    model, basis = make_model(), make_basis()
    w0s = [w.detach().clone() for w in protected(model)]
    opt = make_optimizer(name, model, {w: basis for w in protected(model)}, mode="grad")
    train(model, opt, batches(STEPS))
    for along, moved in drifts(model, w0s, basis):
        assert moved > 1e-3
        assert along <= FP32_BOUND  # measured ≈ 9e-8: rounding accumulates, slowly


@pytest.mark.parametrize("name", ["adamw", "adam", "adagrad", "rmsprop"])
def test_grad_mode_breaks_the_guarantee_for_adaptive_optimizers(name):
    """Keeps gradproj.optim's docstring honest: measured ‖ΔW U‖/‖W_0‖ after 100
    steps in grad mode, AdamW 5.7e-2, Adam 5.8e-2, Adagrad 2.7e-2, RMSprop 2.9e-1
    (update mode: < 6e-8)."""
    model, basis = make_model(), make_basis()
    w0s = [w.detach().clone() for w in protected(model)]
    opt = make_optimizer(name, model, {w: basis for w in protected(model)}, mode="grad")
    train(model, opt, batches(STEPS))
    for along, _ in drifts(model, w0s, basis):
        assert along > 1e-2, f"{name} in grad mode: {along:.3g}; update the docs if this changed"


def test_grad_mode_projects_the_gradient():
    model, basis = make_model(), make_basis()
    opt = ProjectedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0), {model[0].weight: basis}, mode="grad"
    )
    x, y = next(batches(1))
    loss_of(model, x, y).backward()
    raw = model[0].weight.grad.clone()
    opt.step()
    expected = raw - raw @ basis @ basis.T
    torch.testing.assert_close(model[0].weight.grad, expected, rtol=0, atol=1e-6)
    assert (model[0].weight.grad @ basis).abs().max() < 1e-6 < (raw @ basis).abs().max()


def test_soft_weights_and_concept_subspaces():
    """A ConceptSubspace with weights: w = 1 keeps the guarantee on its directions,
    w = 0 leaves the others free."""
    model, basis = make_model(), make_basis()
    concept = ConceptSubspace(basis, torch.tensor([1.0, 1.0, 0.0, 0.0]))
    w0 = model[0].weight.detach().clone()
    opt = ProjectedOptimizer(
        torch.optim.AdamW(model.parameters(), lr=1e-2), {model[0].weight: concept}
    )
    train(model, opt, batches(30))
    assert weight_drift(model[0].weight, w0, basis[:, :2]) <= FP32_BOUND
    assert weight_drift(model[0].weight, w0, basis[:, 2:]) > 1e-3


@pytest.mark.parametrize("side", ["output", "flat"])
def test_other_sides(side):
    model = make_model()
    w = model[2].weight  # (IN × HIDDEN)
    basis = make_basis(IN if side == "output" else w.numel(), K)
    w0 = w.detach().clone()
    opt = ProjectedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), {w: basis}, side=side)
    train(model, opt, batches(20))
    assert weight_drift(w, w0, basis, side=side) <= FP32_BOUND


# ------------------------------------------------------------ bad input, clearly


def test_errors_at_construction():
    model = make_model()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    named = dict(model.named_parameters())
    with pytest.raises(ValueError, match=r"'0.weight'.*has 16 rows.*needs 32"):
        ProjectedOptimizer(inner, {"0.weight": make_basis(16, 2)}, named_parameters=model)
    other = nn.Linear(IN, 4)
    with pytest.raises(ValueError, match="not in the optimizer"):
        ProjectedOptimizer(inner, {other.weight: make_basis()})
    with pytest.raises(ValueError, match=r"'0.weight'.*not orthonormal"):
        ProjectedOptimizer(inner, {named["0.weight"]: 2 * make_basis()}, named_parameters=model)
    with pytest.raises(ValueError, match="no named_parameters"):
        ProjectedOptimizer(inner, {"0.weight": make_basis()})
    with pytest.raises(ValueError, match=r"no parameter named '0\.wieght'"):
        ProjectedOptimizer(inner, {"0.wieght": make_basis()}, named_parameters=model)
    with pytest.raises(TypeError, match="never matched to parameters by position"):
        ProjectedOptimizer(inner, [make_basis()])
    with pytest.raises(ValueError, match=r"'0.bias'.*at least 2 dims"):
        ProjectedOptimizer(inner, {"0.bias": make_basis(HIDDEN)}, named_parameters=model)
    with pytest.raises(ValueError, match="mode must be"):
        ProjectedOptimizer(inner, {}, mode="weights")
    with pytest.raises(ValueError, match=r"'0.weight'.*given a basis twice"):
        b = make_basis()
        ProjectedOptimizer(inner, {"0.weight": b, named["0.weight"]: b}, named_parameters=model)
    bad = ConceptSubspace(make_basis(), torch.tensor([1.0, 2.0, 0.0, 0.0]), check=False)
    with pytest.raises(ValueError, match=r"'0.weight'.*\[0, 1\]"):
        ProjectedOptimizer(inner, {"0.weight": bad}, named_parameters=model)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[0\].*has 16 rows"):
        ProjectedOptimizer(inner, {named["0.weight"]: make_basis(16, 2)})
    with pytest.raises(ValueError, match="has 16 rows"):
        ProjectedAdamW(model.parameters(), bases={model[0].weight: make_basis(16, 2)})


# --------------------------------------------------------- the Optimizer contract


def test_is_an_optimizer_sharing_the_inner_state():
    model = make_model()
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
    opt = ProjectedOptimizer(inner, {model[0].weight: make_basis()})
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is inner.param_groups
    assert opt.state is inner.state and opt.defaults is inner.defaults
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    train(model, opt, batches(4))
    for _ in range(4):
        sched.step()
    assert inner.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5**2)
    extra = nn.Parameter(torch.zeros(3))
    opt.add_param_group({"params": [extra]})
    assert inner.param_groups[-1]["params"][0] is extra
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    calls = []
    opt.register_step_post_hook(lambda o, a, k: calls.append(o))
    opt.step()
    assert calls == [opt]


@pytest.mark.parametrize("mode", ["update", "grad"])
def test_closure_runs_first_and_its_loss_is_returned(mode):
    model, basis = make_model(), make_basis()
    w0 = model[0].weight.detach().clone()
    opt = ProjectedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), {model[0].weight: basis}, mode=mode
    )
    x, y = next(batches(1))

    def closure():
        opt.zero_grad()
        loss = loss_of(model, x, y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.grad_fn is not None  # computed with grad
    assert not torch.equal(model[0].weight, w0)  # it stepped with the closure's grads
    assert weight_drift(model[0].weight, w0, basis) <= FP32_BOUND


@pytest.mark.parametrize("name", ["adamw", "projected_adamw"])
def test_params_without_grad_are_left_alone(name):
    model, basis = make_model(), make_basis()
    frozen_w = model[4].weight.detach().clone()
    opt = make_optimizer(name, model, {w: basis for w in protected(model)})
    for i, (x, y) in enumerate(batches(6)):
        opt.zero_grad()
        # the last layer gets a grad only on even steps
        h = model[:4](x)
        out = model[4](h) if i % 2 == 0 else h[:, :OUT]
        (out - y).pow(2).mean().backward()
        if i == 1:  # after a grad-less step the layer is exactly where it was
            frozen_w = model[4].weight.detach().clone()
        opt.step()
        if i == 1:
            assert torch.equal(model[4].weight, frozen_w)
    assert weight_drift(model[4].weight, frozen_w, basis) <= FP32_BOUND


@pytest.mark.parametrize("mode", ["update", "grad"])
def test_gradient_accumulation_matches_the_full_batch(mode):
    """4 micro-batches accumulated then one step == one step on the whole batch."""
    basis = make_basis()
    results = []
    for micro in (1, 4):
        model = make_model()
        opt = ProjectedOptimizer(
            torch.optim.SGD(model.parameters(), lr=1e-1, momentum=0.9),
            {model[0].weight: basis},
            mode=mode,
        )
        for x, y in batches(5):
            opt.zero_grad()
            for xs, ys in zip(x.chunk(micro), y.chunk(micro), strict=True):
                (loss_of(model, xs, ys) / micro).backward()
            opt.step()
        results.append(model[0].weight.detach().clone())
    # fp32 sums in another order: a few ulps of the grads per step. (Not Adam: its
    # per-element normalization amplifies those ulps where v is tiny.)
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- save / resume


def _roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("name", ["adam", "projected_adamw"])
def test_state_dict_roundtrip_resumes_bit_identically(name):
    basis = make_basis()
    model = make_model()
    opt = make_optimizer(name, model, {w: basis for w in protected(model)})
    data = list(batches(10))
    train(model, opt, data[:5])
    saved_model = _roundtrip(model.state_dict())
    saved_opt = _roundtrip(opt.state_dict())
    assert "gradproj" in saved_opt and saved_opt["gradproj"]["anchors"]
    train(model, opt, data[5:])

    resumed = make_model()
    resumed.load_state_dict(saved_model)
    opt2 = make_optimizer(name, resumed, {w: basis.clone() for w in protected(resumed)})
    opt2.load_state_dict(saved_opt)
    train(resumed, opt2, data[5:])
    for a, b in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


def test_load_state_dict_checks_the_bases():
    model = make_model()
    opt = ProjectedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), {model[0].weight: make_basis()}
    )
    train(model, opt, batches(1))
    sd = _roundtrip(opt.state_dict())
    model2 = make_model()
    other = ProjectedOptimizer(
        torch.optim.SGD(model2.parameters(), lr=0.1),
        {model2[0].weight: make_basis(seed=7)},
        named_parameters=model2,
    )
    with pytest.raises(ValueError, match=r"'0\.weight': the basis in the state dict"):
        other.load_state_dict(sd)
    moved = ProjectedOptimizer(
        torch.optim.SGD(model2.parameters(), lr=0.1), {model2[4].weight: make_basis()}
    )
    with pytest.raises(ValueError, match="protects the parameters at indices"):
        moved.load_state_dict(sd)
    grad_mode = ProjectedOptimizer(
        torch.optim.SGD(model2.parameters(), lr=0.1), {model2[0].weight: make_basis()}, mode="grad"
    )
    with pytest.raises(ValueError, match="mode='update'"):
        grad_mode.load_state_dict(sd)


# ------------------------------------------------------------------ GradScaler


@pytest.mark.parametrize("how", ["update", "grad", "update_fused_inner", "projected_adamw"])
def test_grad_scaler_skips_inf_steps_and_projects_once(how):
    """A run under GradScaler with an inf batch inserted equals the plain run without it,
    bit for bit: the skipped step leaves params, anchors and optimizer state untouched,
    and unscaling by a power of two is exact, so nothing is projected twice. A fused
    inner AdamW (which could take the scale itself) is unscaled and skipped the same way."""
    basis = make_basis()
    data = list(batches(6))

    def make(model):
        if how == "projected_adamw":
            return ProjectedAdamW(model.parameters(), lr=1e-2, bases={model[0].weight: basis})
        fused = how == "update_fused_inner"
        inner = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused)
        mode = "update" if fused else how
        return ProjectedOptimizer(inner, {model[0].weight: basis}, mode=mode)

    plain = make_model()
    train(plain, make(plain), data)

    model = make_model()
    opt = make(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    bad_x = data[0][0].clone()
    bad_x[0, 0] = float("inf")
    for i, (x, y) in enumerate([*data[:3], (bad_x, data[0][1]), *data[3:]]):
        opt.zero_grad()
        scaler.scale(loss_of(model, x, y)).backward()
        before = [p.detach().clone() for p in model.parameters()]
        scaler.step(opt)
        scaler.update()
        if i == 3:
            assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
            assert scaler.get_scale() == 2.0**11
    for a, b in zip(plain.parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- no host sync


@contextlib.contextmanager
def no_host_reads():
    """Make every read of a tensor value on the host raise (what a device sync would be)."""
    names = ["item", "__bool__", "__float__", "__int__", "__index__", "tolist", "numpy"]
    saved = {n: getattr(torch.Tensor, n) for n in names}

    def refuse(self, *args, **kwargs):
        raise AssertionError("a tensor value was read on the host inside step()")

    try:
        for n in names:
            setattr(torch.Tensor, n, refuse)
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)


def test_no_host_reads_detector_works():
    model = make_model()
    adam = torch.optim.Adam(model.parameters())  # its CPU path reads `step` on the host
    x, y = next(batches(1))
    loss_of(model, x, y).backward()
    with no_host_reads(), pytest.raises(AssertionError, match="read on the host"):
        adam.step()


@pytest.mark.parametrize("mode", ["update", "grad"])
def test_step_reads_no_tensor_values(mode):
    model, basis = make_model(), make_basis()
    opt = ProjectedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        {w: basis for w in protected(model)},
        mode=mode,
    )
    proj_adamw = ProjectedAdamW(protected(model), bases={w: basis for w in protected(model)})
    for _ in range(2):  # the first step also creates anchors and state
        x, y = next(batches(1))
        opt.zero_grad()
        loss_of(model, x, y).backward()
        with no_host_reads():
            opt.step()
            proj_adamw.step()


@pytest.mark.parametrize("name", ["adamw", "projected_adamw"])
def test_channels_last_conv_weight(name):
    """A conv weight (out, in, kh, kw) is protected on its unfolded input (in·kh·kw). In
    channels_last it has no (out × in·kh·kw) view: ProjectedAdamW falls back to AdamW +
    the anchored projection, which copies to and fro; the guarantee is the same."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3).to(memory_format=torch.channels_last)
    assert not conv.weight.is_contiguous()
    basis = make_basis(3 * 3 * 3, 5)
    w0 = conv.weight.detach().clone()
    opt = make_optimizer(name, conv, {conv.weight: basis})
    gen = torch.Generator().manual_seed(4)
    for _ in range(20):
        opt.zero_grad()
        conv(torch.randn(2, 3, 8, 8, generator=gen)).pow(2).mean().backward()
        opt.step()
    assert ((conv.weight.detach() - w0).norm() / w0.norm()).item() > 1e-3
    assert weight_drift(conv.weight, w0, basis) <= FP32_BOUND
