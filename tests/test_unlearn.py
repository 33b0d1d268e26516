"""surgery_backward: two losses, per-tensor surgery, combined into p.grad for any optimizer."""

from __future__ import annotations

import pytest
import torch

from gradproj import reference as R
from gradproj.methods.unlearn import surgery_backward


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


@pytest.mark.parametrize("surgery", [False, True])
def test_unlearn_concept_tunes_only_its_params_and_lowers_the_ablation_loss(surgery):
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
        retain_weight=0.0, generator=torch.Generator().manual_seed(1),
    )  # fmt: skip
    assert len(log) == 30 and all(set(r) == {"unlearn", "retain"} for r in log)
    assert ablation() < 0.5 * start
    for n, p in unet.named_parameters():
        moved = not torch.equal(p, before[n])
        assert moved == (id(p) in tuned), n
        assert p.requires_grad  # restored


def test_surgery_changes_the_update_only_where_gradients_conflict():
    """Same seeds: the two recipes differ exactly when some tuned tensor's g_u·g_r < 0.

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
            retain_weight=1.0, retain_loss="diffusion", generator=torch.Generator().manual_seed(1),
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
    """On the plain demo model: the recipe's contract, measured on a fixed draw.

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
        unet, sched, world, steps=120, lr=3e-3, surgery=True,
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
