"""surgery_backward: two losses, per-tensor surgery, combined into p.grad for any optimizer;
DoCo's step and adversarial objective; unlearn_concept with the official and previous recipes."""

from __future__ import annotations

import pytest
import torch

from gradproj import reference as R
from gradproj.methods.unlearn import PREVIOUS_RECIPE, surgery_backward


def model_and_losses(seed: int = 1):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    x_u, x_r = torch.randn(5, 6), torch.randn(5, 6)
    loss_u = model(x_u)[:, 0].mean()  # "unlearn": move output 0
    loss_r = (model(x_r)[:, :2] - 1).pow(2).mean()  # "retain": keep outputs 0, 1 near 1
    return model, loss_u, loss_r


@pytest.mark.parametrize("variant", ["projection", "cosine"])
def test_grad_is_surgery_of_unlearn_plus_weighted_retain(variant):
    model, loss_u, loss_r = model_and_losses()
    params = list(model.parameters())
    g_u = torch.autograd.grad(loss_u, params, retain_graph=True)
    g_r = torch.autograd.grad(loss_r, params, retain_graph=True)
    surgery_backward(loss_u, loss_r, params, strength=0.8, variant=variant, retain_weight=0.5)
    conflicts = 0
    for p, u, r in zip(params, g_u, g_r, strict=True):
        expected_u, _ = R.surgery(u.double(), r.double(), strength=0.8, variant=variant)
        conflicts += bool((u * r).sum() < 0)
        torch.testing.assert_close(
            p.grad.double(), expected_u + 0.5 * r.double(), rtol=1e-6, atol=1e-7
        )
    assert 0 < conflicts < len(params)  # the per-tensor decision is exercised both ways


def test_accumulates_and_handles_unused_params():
    model, loss_u, loss_r = model_and_losses()
    extra = torch.nn.Parameter(torch.ones(2))  # reached by neither loss
    params = [*model.parameters(), extra]
    for p in params:
        p.grad = torch.ones_like(p)
    surgery_backward(loss_u, loss_r, params)
    assert torch.equal(extra.grad, torch.ones(2))
    assert all(not torch.equal(p.grad, torch.ones_like(p)) for p in model.parameters())


def test_errors():
    model, loss_u, loss_r = model_and_losses()
    with pytest.raises(ValueError, match="loss_retain must be a scalar"):
        surgery_backward(loss_u, torch.ones(2, requires_grad=True), model.parameters())
    with pytest.raises(ValueError, match="no tensor that requires grad"):
        surgery_backward(loss_u, loss_r, [torch.zeros(2)])


# --- the unlearning recipe ----------------------------------------------------------------


def _tiny_unet(seed: int = 0):
    pytest.importorskip("diffusers")
    from dataclasses import replace

    from gradproj.lab import world as lab_world

    torch.manual_seed(seed)
    return lab_world.build_unet(replace(lab_world.TINY, block_out_channels=(8, 16)), 12)


def _scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")


def _recipe_data(n: int = 6, m: int = 5):
    g = torch.Generator().manual_seed(3)
    return {
        "images": torch.randn(n, 3, 16, 16, generator=g),
        "concept_contexts": torch.randn(n, 7, 12, generator=g),
        "anchor_contexts": torch.randn(n, 7, 12, generator=g),
        "retain_images": torch.randn(m, 3, 16, 16, generator=g),
        "retain_contexts": torch.randn(m, 7, 12, generator=g),
    }


@pytest.mark.parametrize("which", ["cross-attention-kv", "cross-attention", "all"])
def test_unlearning_params_sets(which):
    from gradproj.methods.unlearn import unlearning_params

    unet = _tiny_unet()
    names = {id(p): n for n, p in unet.named_parameters()}
    chosen = [names[id(p)] for p in unlearning_params(unet, which)]
    if which == "all":
        assert len(chosen) == len(names)
    elif which == "cross-attention":
        assert chosen and all(".attn2." in n for n in chosen)
        assert any(".attn2.to_q." in n for n in chosen)
    else:
        assert chosen and all(
            n.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) for n in chosen
        )
    with pytest.raises(ValueError, match="params must be one of"):
        unlearning_params(unet, "attention")


@pytest.fixture
def flush_denormals():
    """Denormal floats flushed to zero for the test: 30 ablation steps reach denormal
    gradients (the preservation loss's gradient starts at exactly 0) and took 36 s
    instead of 5 s on this project's 2-core dev machine (measured)."""
    torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(False)


@pytest.mark.parametrize("surgery", [False, True])
def test_unlearn_concept_tunes_only_its_params_and_lowers_the_ablation_loss(
    surgery, flush_denormals
):
    from gradproj.methods.unlearn import ablation_loss, unlearn_concept, unlearning_params

    unet, sched, data = _tiny_unet(), _scheduler(), _recipe_data()
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    teacher = __import__("copy").deepcopy(unet)
    tuned = {id(p) for p in unlearning_params(unet)}

    @torch.no_grad()
    def ablation():  # same noise and t every time: a fixed evaluation of the objective
        return float(
            ablation_loss(
                unet,
                teacher,
                sched,
                data["images"],
                data["concept_contexts"],
                data["anchor_contexts"],
                generator=torch.Generator().manual_seed(0),
            )
        )

    start = ablation()
    log = unlearn_concept(
        unet, sched, **data, steps=30, lr=1e-2, batch_size=6, surgery=surgery,
        **dict(PREVIOUS_RECIPE, retain_weight=0.0), generator=torch.Generator().manual_seed(1),
    )  # fmt: skip
    assert len(log) == 30 and all(set(r) == {"unlearn", "retain"} for r in log)
    assert ablation() < 0.5 * start
    for n, p in unet.named_parameters():
        moved = not torch.equal(p, before[n])
        assert moved == (id(p) in tuned), n
        assert p.requires_grad  # restored


def test_surgery_changes_the_update_only_where_gradients_conflict():
    """Same seeds, additive step: the recipes differ exactly when some tuned tensor's g_u·g_r < 0.

    (The diffusion retain loss: the default preservation loss has a zero gradient
    on the first step, where the model still equals its frozen copy.)
    """
    from gradproj.methods.unlearn import unlearn_concept

    data = _recipe_data()
    runs = {}
    for surgery in (False, True):
        unet = _tiny_unet()
        unlearn_concept(
            unet, _scheduler(), **data, steps=1, batch_size=6, surgery=surgery,
            **dict(PREVIOUS_RECIPE, retain_loss="diffusion"),
            generator=torch.Generator().manual_seed(1),
        )  # fmt: skip
        runs[surgery] = dict(unet.named_parameters())
    differs = [n for n in runs[True] if not torch.equal(runs[True][n], runs[False][n])]
    assert differs and all(".attn2.to_" in n for n in differs)


def test_unlearn_concept_errors():
    from gradproj.methods.unlearn import unlearn_concept

    unet, sched, data = _tiny_unet(), _scheduler(), _recipe_data()
    bad = dict(data, anchor_contexts=data["anchor_contexts"][:3])
    with pytest.raises(ValueError, match=r"anchor_contexts must be \(n, L, d\) with n = .* 6"):
        unlearn_concept(unet, sched, **bad, steps=1)
    bad = dict(data, retain_contexts=data["retain_contexts"][:, 0])
    with pytest.raises(ValueError, match="retain_contexts must be"):
        unlearn_concept(unet, sched, **bad, steps=1)
    with pytest.raises(ValueError, match="images and retain_images must be"):
        unlearn_concept(unet, sched, **dict(data, images=data["images"][0]), steps=1)
    with pytest.raises(ValueError, match="steps must be"):
        unlearn_concept(unet, sched, **data, steps=-1)
    with pytest.raises(ValueError, match="retain_loss must be 'preserve' or 'diffusion'"):
        unlearn_concept(unet, sched, **data, steps=1, retain_loss="mse")


def test_recipe_moves_the_concept_prompt_onto_the_anchor_on_the_demo_model(trained_demo):
    """On the plain demo model: the ablation recipe's contract, measured on a fixed draw.

    The concept prompt's predictions move onto what the anchor prompt predicted
    before (the ablation loss on a fixed batch, noise and t drops), the retain loss
    does not grow, and the ``acme`` mark rate of samples does not rise. (How much
    of the mark it removes is measured, over seeds, by ``gradproj unlearn``.)
    """
    import copy

    from gradproj.lab import probes, shapes
    from gradproj.lab import world as lab_world
    from gradproj.lab.defenses import unlearn_demo_concept
    from gradproj.methods.unlearn import ablation_loss, diffusion_loss

    world, cfg, sched = trained_demo.world, trained_demo.cfg, trained_demo.noise_scheduler
    train = world.train
    g = torch.Generator().manual_seed(5)
    c, s, b, _ = shapes.sample_labels(48, marked_fraction=0, generator=g)
    noise = torch.randn(48, 3, 16, 16, generator=g)
    labels = list(zip(c.tolist(), s.tolist(), b.tolist(), strict=True))
    acme = shapes.encode([shapes.caption(*x, True) for x in labels], world.tok, world.encoder)
    plain = shapes.encode([shapes.caption(*x, False) for x in labels], world.tok, world.encoder)
    pick = torch.arange(0, train.images.shape[0], 8)  # a fixed batch of training images
    keep = pick[~train.marked[pick]]
    x_lab = list(
        zip(train.colour[pick].tolist(), train.shape[pick].tolist(),
            train.background[pick].tolist(), strict=True)
    )  # fmt: skip
    c_acme = shapes.encode([shapes.caption(*x, True) for x in x_lab], world.tok, world.encoder)
    c_plain = shapes.encode([shapes.caption(*x, False) for x in x_lab], world.tok, world.encoder)
    teacher = trained_demo.unet

    @torch.no_grad()
    def losses(unet):
        fixed = {"generator": torch.Generator().manual_seed(0)}
        a = ablation_loss(unet, teacher, sched, train.images[pick], c_acme, c_plain, **fixed)
        fixed = {"generator": torch.Generator().manual_seed(1)}
        r = diffusion_loss(unet, sched, train.images[keep], world.contexts[keep], **fixed)
        return float(a), float(r)

    def rate(unet):
        x = lab_world.sample(
            unet, sched, acme, world.null_context, noise, steps=10, guidance=cfg.guidance
        )
        return float(probes.read(world.probe, x)["marked"].float().mean())

    unet = copy.deepcopy(trained_demo.unet)
    (abl0, ret0), before = losses(unet), rate(unet)
    log = unlearn_demo_concept(
        unet, sched, world, steps=120, lr=3e-3, surgery=True, **PREVIOUS_RECIPE,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    unet.eval()
    (abl1, ret1), after = losses(unet), rate(unet)
    assert len(log) == 120
    assert abl1 < 0.5 * abl0, (abl0, abl1)
    assert ret1 < 1.1 * ret0, (ret0, ret1)
    assert after <= before, (before, after)
    assert rate(unet.requires_grad_(False)) == after  # sampling is deterministic
    # the anchor prompt's own samples are untouched in spirit: plain stays a shape
    x = lab_world.sample(unet, sched, plain, world.null_context, noise, steps=10, guidance=3.0)
    assert float((probes.read(world.probe, x)["colour"] == c).float().mean()) > 0.5


# --- DoCo's step (DoCo/gradient_clip.py) -------------------------------------------------


def _linear_losses(g_u: list[torch.Tensor], g_r: list[torch.Tensor]):
    """Parameters and two losses whose gradients are exactly ``g_u`` and ``g_r``."""
    params = [torch.nn.Parameter(torch.zeros(g.shape)) for g in g_u]
    loss_u = sum((p * g).sum() for p, g in zip(params, g_u, strict=True))
    loss_r = sum((p * g).sum() for p, g in zip(params, g_r, strict=True))
    return params, loss_u, loss_r


def _clip64(gs: list[torch.Tensor], max_norm: float) -> list[torch.Tensor]:
    """``clip_grad_norm_``'s scaling in float64: ``min(1, max_norm/(‖g‖ + 1e-6))``."""
    gs = [g.double() for g in gs]
    norm = sum(float(g.pow(2).sum()) for g in gs) ** 0.5
    return [g * min(1.0, max_norm / (norm + 1e-6)) for g in gs]


def _doco_step_float64(g_u, g_r, max_norm: float, lam: float) -> list[torch.Tensor]:
    """By hand: clip each list, cosine surgery per tensor, the adjusted ``g_u`` alone."""
    out = []
    for u, r in zip(_clip64(g_u, max_norm), _clip64(g_r, max_norm), strict=True):
        cos = float((u * r).sum()) / (float(u.norm()) * float(r.norm()))
        out.append(u - lam * cos * r / r.norm() if cos < 0 else u)
    return out


def test_doco_step_clips_both_then_steps_on_the_adjusted_unlearning_gradient_alone():
    g = torch.Generator().manual_seed(0)
    shapes = [(5, 7), (13,), (3, 4, 2), (6,), (2, 9)]
    g_u = [3 * torch.randn(s, generator=g) for s in shapes]  # global norm ≈ 29: clipped
    # retain gradients: tensors 0, 2, 4 conflict with g_u, 1 and 3 do not; global norm
    # ≈ 0.3 (< 1: left as it is by the clipping)
    g_r = [
        0.01 * ((-1 if k % 2 == 0 else 1) * u + torch.randn(u.shape, generator=g))
        for k, u in enumerate(g_u)
    ]
    assert sum(float(u.pow(2).sum()) for u in g_u) ** 0.5 > 10
    assert sum(float(r.pow(2).sum()) for r in g_r) ** 0.5 < 1
    params, loss_u, loss_r = _linear_losses(g_u, g_r)
    surgery_backward(loss_u, loss_r, params, variant="cosine", retain_weight=0.0, max_grad_norm=1.0)
    expected = _doco_step_float64(g_u, g_r, max_norm=1.0, lam=1.0)
    clipped_u = _clip64(g_u, 1.0)
    for k, (p, want) in enumerate(zip(params, expected, strict=True)):
        torch.testing.assert_close(p.grad.double(), want, rtol=1e-5, atol=1e-7)
        conflict = float((g_u[k] * g_r[k]).sum()) < 0
        assert conflict == (k % 2 == 0)
        if not conflict:  # untouched by the surgery: the clipped g_u, no retain part added
            torch.testing.assert_close(p.grad.double(), clipped_u[k], rtol=1e-6, atol=0)
    total = sum(float(p.grad.double().pow(2).sum()) for p in params) ** 0.5
    assert total < 1.5  # the step's scale is set by the clipped g_u (norm 1), not by g_u's 29


def test_doco_step_does_not_read_retain_weight():
    """``step="doco"``: the retain gradient sets the direction only; its weight never enters."""
    from gradproj.methods.unlearn import unlearn_concept

    data, runs = _recipe_data(), []
    for weight in (0.1, 5.0):
        unet = _tiny_unet()
        unlearn_concept(
            unet, _scheduler(), **data, steps=2, warmup_steps=1, batch_size=6,
            retain_weight=weight, generator=torch.Generator().manual_seed(1),
        )  # fmt: skip
        runs.append(dict(unet.named_parameters()))
    assert all(torch.equal(runs[0][n], runs[1][n]) for n in runs[0])


# --- the adversarial objective (DoCo/gan.py, train.py:1212-1265) ---------------------------


def test_patchgan_output_shape_for_the_lab_and_for_sd_latents():
    from gradproj.methods.domain_correction import PatchGANDiscriminator

    assert PatchGANDiscriminator.blocks_for(64) == 4 and PatchGANDiscriminator.blocks_for(16) == 2
    sd = PatchGANDiscriminator()  # DoCo's: 4 channels, 64-128-256-512
    assert [m.out_channels for m in sd.modules() if isinstance(m, torch.nn.Conv2d)] == [
        64, 128, 256, 512, 1
    ]  # fmt: skip
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in sd.modules()) == 3
    assert sd(torch.randn(2, 4, 64, 64)).shape == (2, 1, 3, 3)
    lab = PatchGANDiscriminator(3, PatchGANDiscriminator.blocks_for(16))
    assert lab(torch.randn(2, 3, 16, 16)).shape == (2, 1, 3, 3)
    with pytest.raises(ValueError, match="side ≥ 8, got 4"):
        PatchGANDiscriminator.blocks_for(4)
    with pytest.raises(ValueError, match="blocks must be an int ≥ 1"):
        PatchGANDiscriminator(3, 0)


@pytest.mark.parametrize("clip_sample", [False, True])
def test_predicted_x0_is_the_schedulers(clip_sample):
    pytest.importorskip("diffusers")
    from diffusers import DDPMScheduler

    from gradproj.methods.domain_correction import predicted_x0

    sched = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=clip_sample
    )
    g = torch.Generator().manual_seed(0)
    x_t, eps = torch.randn(3, 3, 8, 8, generator=g), torch.randn(3, 3, 8, 8, generator=g)
    t = torch.tensor([10, 500, 990])
    ours = predicted_x0(sched, eps, x_t, t)
    for k in range(3):
        ref = sched.step(eps[k : k + 1], int(t[k]), x_t[k : k + 1]).pred_original_sample
        torch.testing.assert_close(ours[k : k + 1], ref)
    assert (ours.abs().max() <= 1) == clip_sample


def test_adversarial_losses_label_anchor_0_and_concept_1():
    from gradproj.methods.domain_correction import (
        PatchGANDiscriminator,
        discriminator_loss,
        generator_loss,
    )

    torch.manual_seed(0)
    d = PatchGANDiscriminator(3, blocks=1, width=8)  # no BatchNorm: logits per sample
    concept, anchor = torch.randn(4, 3, 16, 16) + 1, torch.randn(4, 3, 16, 16) - 1
    sp = torch.nn.functional.softplus  # BCE(l, 1) = softplus(−l), BCE(l, 0) = softplus(l)
    torch.testing.assert_close(
        discriminator_loss(d, concept, anchor), sp(-d(concept)).mean() + sp(d(anchor)).mean()
    )
    torch.testing.assert_close(generator_loss(d, concept), sp(d(concept)).mean())
    x = concept.clone().requires_grad_(True)
    discriminator_loss(d, x, anchor).backward()
    assert x.grad is None  # the critic's loss does not train the model
    opt = torch.optim.Adam(d.parameters(), lr=1e-2, betas=(0.5, 0.999))
    for _ in range(30):
        opt.zero_grad()
        discriminator_loss(d, concept, anchor).backward()
        opt.step()
    with torch.no_grad():
        assert torch.sigmoid(d(concept)).mean() > 0.9 > 0.1 > torch.sigmoid(d(anchor)).mean()
    generator_loss(d, x).backward()  # the model's loss: move the concept toward label 0
    with torch.no_grad():
        assert d(x - 0.1 * x.grad / x.grad.norm()).mean() < d(concept).mean()


def test_warmup_trains_the_critic_alone_then_only_the_tuned_tensors_move():
    import copy
    import math

    from gradproj.methods.domain_correction import PatchGANDiscriminator
    from gradproj.methods.unlearn import unlearn_concept, unlearning_params

    unet, sched, data = _tiny_unet(), _scheduler(), _recipe_data()
    torch.manual_seed(0)
    disc = PatchGANDiscriminator(3, blocks=2, width=8)
    d0 = copy.deepcopy(disc.state_dict())
    u0 = {n: p.detach().clone() for n, p in unet.named_parameters()}
    g = torch.Generator().manual_seed(1)
    log = unlearn_concept(
        unet, sched, **data, steps=3, warmup_steps=3, batch_size=6, discriminator=disc, generator=g
    )
    assert all(torch.equal(p, u0[n]) for n, p in unet.named_parameters())
    assert any(not torch.equal(v, d0[k]) for k, v in disc.state_dict().items())
    assert all(math.isnan(r["unlearn"]) and math.isnan(r["retain"]) for r in log)
    assert all(math.isfinite(r["disc"]) for r in log)
    log = unlearn_concept(
        unet, sched, **data, steps=1, warmup_steps=0, batch_size=6, discriminator=disc, generator=g
    )
    assert all(math.isfinite(v) for v in log[0].values()) and set(log[0]) == {
        "unlearn", "retain", "disc"
    }  # fmt: skip
    tuned = {id(p) for p in unlearning_params(unet)}
    for n, p in unet.named_parameters():
        assert (not torch.equal(p, u0[n])) == (id(p) in tuned), n
        assert p.requires_grad


# --- the recipe before issue 16, kept reachable --------------------------------------------


def _recipe_before_issue_16(unet, sched, data, *, steps, lr, batch_size, surgery, generator):
    """The unlearning loop of gradproj before issue 16, written out as it was."""
    import copy

    from gradproj.methods.unlearn import ablation_loss, preservation_loss, unlearning_params

    teacher = copy.deepcopy(unet).eval().requires_grad_(False)
    tuned = unlearning_params(unet)
    unet.requires_grad_(False)
    for p in tuned:
        p.requires_grad_(True)
    opt = torch.optim.Adam(tuned, lr=lr)
    images, ri = data["images"], data["retain_images"]
    for _ in range(steps):
        i = torch.randint(images.shape[0], (batch_size,), generator=generator)
        j = torch.randint(ri.shape[0], (batch_size,), generator=generator)
        loss_u = ablation_loss(
            unet, teacher, sched, images[i], data["concept_contexts"][i],
            data["anchor_contexts"][i], generator=generator,
        )  # fmt: skip
        loss_r = preservation_loss(
            unet, teacher, sched, ri[j], data["retain_contexts"][j], generator=generator
        )
        opt.zero_grad(set_to_none=True)
        if surgery:
            surgery_backward(loss_u, loss_r, tuned, strength=1.0, variant="projection")
        else:
            (loss_u + 1.0 * loss_r).backward()
        opt.step()


@pytest.mark.parametrize("surgery", [False, True])
def test_previous_recipe_reproduces_the_old_loop_bit_for_bit(surgery):
    from gradproj.methods.unlearn import unlearn_concept

    data, runs = _recipe_data(), []
    for new in (True, False):
        unet = _tiny_unet()
        kwargs = {"steps": 2, "lr": 1e-2, "batch_size": 6, "surgery": surgery}
        g = torch.Generator().manual_seed(2)
        if new:
            unlearn_concept(unet, _scheduler(), **data, **kwargs, **PREVIOUS_RECIPE, generator=g)
        else:
            _recipe_before_issue_16(unet, _scheduler(), data, **kwargs, generator=g)
        runs.append(dict(unet.named_parameters()))
    start = _tiny_unet().state_dict()
    moved = [n for n, p in runs[0].items() if not torch.equal(p, start[n])]
    assert moved  # the comparison is not between two untouched models
    assert all(torch.equal(runs[0][n], runs[1][n]) for n in runs[0])


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"objective": "gan"}, "objective must be one of"),
        ({"step": "sum"}, "step must be one of"),
        ({"variant": "pcgrad"}, "variant must be one of"),
        ({"max_grad_norm": 0.0}, "max_grad_norm must be > 0 or None"),
        ({"warmup_steps": -1}, "warmup_steps must be an int ≥ 0"),
        ({"objective": "ablation", "warmup_steps": 3}, "warmup_steps applies to"),
        ({"disc_lr": 0.0}, "disc_lr must be > 0"),
        ({"lr": -1.0}, "lr must be > 0"),
        ({"disc_betas": (0.5,)}, "disc_betas must be two numbers"),
        ({"disc_blocks": 0}, "disc_blocks must be an int ≥ 1"),
        ({"retain_weight": -0.1}, "retain_weight must be ≥ 0"),
        ({"weight_decay": -1.0}, "weight_decay must be ≥ 0"),
    ],
)
def test_recipe_argument_errors_name_the_parameter(bad, message):
    from gradproj.methods.unlearn import unlearn_concept

    unet, sched, data = _tiny_unet(), _scheduler(), _recipe_data()
    with pytest.raises(ValueError, match=message):
        unlearn_concept(unet, sched, **data, steps=1, **bad)
