"""AMG (gradproj.methods.guidance) against direct float64 implementations of its formulas."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from gradproj.methods import detectors as G_det
from gradproj.methods import guidance as G

pytest.importorskip("diffusers")


@pytest.fixture(autouse=True)
def _one_thread():
    """One thread: these models are tiny and the test machine is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class NearestCosine:
    """Stand-in detector: cosine similarity to the nearest of a fixed set of images."""

    def __init__(self, images: torch.Tensor, threshold: float) -> None:
        self.ref = F.normalize(images.flatten(1), dim=1)
        self.threshold = threshold

    def similarity(self, x0_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = F.normalize(x0_hat.flatten(1), dim=1)
        return (f @ self.ref.to(f.dtype).T).max(dim=1)

    def neighbours(self, x0_hat: torch.Tensor, k: int) -> torch.Tensor:
        f = F.normalize(x0_hat.flatten(1), dim=1)
        return (f @ self.ref.to(f.dtype).T).sort(dim=1, descending=True, stable=True).indices[:, :k]


# ---------------------------------------------------------------- the formulas


def _reference_noise(eu, ec, en, sim, grad, ab, s0, c1, c2, c3, lam):
    """Per sample, in float64, with Python scalars for s₁ and s₂."""
    out = []
    for i in range(ec.shape[0]):
        u, c = eu[i].double(), ec[i].double()
        cfg = u + s0 * (c - u)
        sig = float(sim[i])
        if not sig > lam:
            out.append(cfg)
            continue
        s1 = max(min(c1 * sig, s0 - 1), 0.0)
        e = cfg - s1 * (c - u)
        if en is not None:
            s2 = max(min(c2 * sig, s0 - 1 - s1), 0.0)
            e = e - s2 * (en[i].double() - u)
        if grad is not None:
            a = float(ab[i]) if torch.is_tensor(ab) and ab.dim() else float(ab)
            e = e + c3 * math.sqrt(1 - a) * grad[i].double()
        out.append(e)
    return torch.stack(out)


@pytest.mark.parametrize("scale", [1.0, 2.0, 7.5])
def test_noise_formula_matches_float64(scale):
    g = torch.Generator().manual_seed(0)
    n = 8
    eu, ec, en, grad = (torch.randn(n, 4, 5, 5, generator=g, dtype=torch.float64) for _ in range(4))
    # σ spans both clamps of s₁ (c₁σ < 0 → 0, c₁σ > s₀ − 1 → s₀ − 1) and both sides of λ
    sim = torch.tensor([-0.5, 0.05, 0.2, 0.35, 0.5, 0.9, 1.0, 3.0], dtype=torch.float64)
    ab = torch.rand(n, generator=g, dtype=torch.float64) * 0.98 + 0.01
    kw = {"c1": 5.0, "c2": 3.0, "c3": 2.0}
    for lam in (0.3, -1.0, float("inf")):
        got = G.anti_memorization_noise(eu, ec, en, sim, grad, ab, scale=scale, threshold=lam, **kw)
        want = _reference_noise(eu, ec, en, sim, grad, ab, scale, 5.0, 3.0, 2.0, lam)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    # scalar ᾱ, no neighbour term, no gradient term
    got = G.anti_memorization_noise(eu, ec, None, sim, None, 0.3, scale=scale, threshold=0.3, **kw)
    want = _reference_noise(eu, ec, None, sim, None, 0.3, scale, 5.0, 3.0, 2.0, 0.3)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    # below the threshold: the plain CFG noise, bit for bit (float32 too)
    e32u, e32c = eu.float(), ec.float()
    off = G.anti_memorization_noise(
        e32u, e32c, en.float(), sim.float(), grad.float(), ab.float(), scale=scale, threshold=9.0
    )
    assert torch.equal(off, e32u + scale * (e32c - e32u))
    if scale == 1.0:  # s₀ = 1: s₁ = s₂ = 0, only G_sim is left
        got = G.anti_memorization_noise(eu, ec, en, sim, grad, ab, scale=1.0, threshold=0.3, **kw)
        fired = (sim > 0.3).view(-1, 1, 1, 1)
        torch.testing.assert_close(
            got, ec + fired * 2.0 * (1 - ab).sqrt().view(-1, 1, 1, 1) * grad, rtol=0, atol=1e-12
        )


def test_noise_formula_rejects_bad_input():
    x = torch.zeros(2, 3)
    sim = torch.zeros(2)
    kw = {"threshold": 0.5}
    with pytest.raises(ValueError, match="scale"):
        G.anti_memorization_noise(x, x, x, sim, x, 0.5, scale=0.5, **kw)
    with pytest.raises(ValueError, match="threshold"):
        G.anti_memorization_noise(x, x, x, sim, x, 0.5, scale=2.0, threshold=float("nan"))
    with pytest.raises(ValueError, match="c2"):
        G.anti_memorization_noise(x, x, x, sim, x, 0.5, scale=2.0, c2=-1.0, **kw)
    with pytest.raises(ValueError, match="sim"):
        G.anti_memorization_noise(x, x, x, torch.zeros(3), x, 0.5, scale=2.0, **kw)
    with pytest.raises(ValueError, match="eps_neighbour"):
        G.anti_memorization_noise(x, x, torch.zeros(2, 4), sim, x, 0.5, scale=2.0, **kw)
    with pytest.raises(ValueError, match="alpha_bar_t"):
        G.anti_memorization_noise(x, x, x, sim, x, 0.0, scale=2.0, **kw)
    with pytest.raises(ValueError, match="alpha_bar_t"):
        G.anti_memorization_noise(x, x, x, sim, x, torch.ones(3) / 2, scale=2.0, **kw)
    with pytest.raises(TypeError, match="similarity"):
        G.AntiMemorizationGuidance(detector=object())
    with pytest.raises(ValueError, match="neighbour_contexts"):
        G.AntiMemorizationGuidance(NearestCosine(x, 0.5), neighbour_contexts=torch.zeros(2, 3))


# ------------------------------------------------------- the full step, tiny model


def _tiny_unet(in_channels: int = 3, sample_size: int = 8):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=in_channels,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=4,
    ).eval()


@pytest.mark.parametrize("through_unet", [True, False])
def test_guided_step_matches_per_sample_float64(through_unet):
    unet = _tiny_unet().double().requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    n, s0, c1, c2, c3 = 5, 4.0, 5.0, 5.0, 50.0
    x = torch.randn(n, 3, 8, 8, generator=g, dtype=torch.float64)
    ctx = torch.randn(n, 7, 32, generator=g, dtype=torch.float64)
    null = torch.randn(1, 7, 32, generator=g, dtype=torch.float64)
    neighbours = torch.randn(6, 7, 32, generator=g, dtype=torch.float64)
    train = torch.randn(6, 3, 8, 8, generator=g, dtype=torch.float64)
    t, ab = torch.tensor(500), 0.4
    det = NearestCosine(train, threshold=0.0)

    def reference(i):  # each term on its own, one sample, its own autograd call
        xi = x[i : i + 1].clone().requires_grad_(True)
        ec = unet(xi, t, ctx[i : i + 1]).sample
        eu = unet(xi, t, null).sample
        cfg = eu + s0 * (ec - eu)
        if not through_unet:
            cfg = cfg.detach()
        x0 = (xi - math.sqrt(1 - ab) * cfg) / math.sqrt(ab)
        sim, idx = det.similarity(x0)
        (grad,) = torch.autograd.grad(sim.sum(), xi)
        with torch.no_grad():
            en = unet(x[i : i + 1], t, neighbours[idx]).sample
        sig = float(sim.detach())
        ec, eu, cfg = ec.detach(), eu.detach(), (eu + s0 * (ec - eu)).detach()
        if not sig > det.threshold:
            return cfg[0], sig
        s1 = max(min(c1 * sig, s0 - 1), 0.0)
        s2 = max(min(c2 * sig, s0 - 1 - s1), 0.0)
        g_spe = -s1 * (ec - eu)
        g_dup = -s2 * (en - eu)
        g_sim = c3 * math.sqrt(1 - ab) * grad
        return (cfg + g_spe + g_dup + g_sim)[0], sig

    sims = torch.tensor([reference(i)[1] for i in range(n)], dtype=torch.float64)
    # λ halfway between two middle σ's: some samples fire, some do not, no near-ties
    mid = sims.sort().values[n // 2 - 1 : n // 2 + 1]
    det.threshold = float(mid.mean())
    want = torch.stack([reference(i)[0] for i in range(n)])
    amg = G.AntiMemorizationGuidance(
        det, neighbours, variant="paper", c1=c1, c2=c2, c3=c3, grad_through_unet=through_unet
    )
    out = amg.guided_noise(unet, x, t, ctx, null, ab, scale=s0)
    assert out.fired.tolist() == (sims > det.threshold).tolist()
    assert 0 < int(out.fired.sum()) < n
    torch.testing.assert_close(out.sim, sims.double(), rtol=0, atol=1e-12)
    torch.testing.assert_close(out.eps, want, rtol=0, atol=1e-10)
    # the gradient term is not negligible: dropping it changes the result
    amg0 = G.AntiMemorizationGuidance(det, neighbours, variant="paper", c1=c1, c2=c2, c3=0.0)
    assert (amg0.guided_noise(unet, x, t, ctx, null, ab, scale=s0).eps - want).abs().max() > 1e-3
    # skip_idle gives the same numbers
    amg.skip_idle = True
    torch.testing.assert_close(
        amg.guided_noise(unet, x, t, ctx, null, ab, scale=s0).eps, want, rtol=0, atol=1e-10
    )


# ------------------------------------------------ the official schedule (AMG-sd)


def test_official_schedule_constants_and_checks():
    sch = G.OfficialSchedule()
    t = torch.tensor([0.0, 500.0, 1000.0], dtype=torch.float64)
    # ddim.py asy(t, 0.3, 0.4, 0.005, 0) = 0.3 − (0.3 − 0.4) e^{−0.005 t}
    want = torch.tensor(
        [0.3 + 0.1 * math.exp(-0.005 * v) for v in (0, 500, 1000)], dtype=torch.float64
    )
    torch.testing.assert_close(sch.threshold(t), want, rtol=0, atol=1e-15)
    sim = torch.tensor([0.3, 0.5, 0.9], dtype=torch.float64)
    want = [
        100 * (s - 0.3) * math.exp((1000 - v) / 170)
        for s, v in zip((0.3, 0.5, 0.9), (0, 500, 1000), strict=True)
    ]
    torch.testing.assert_close(sch.sim_coefficient(sim, t), torch.tensor(want, dtype=torch.float64))
    for bad in ({"spe_full": 0.0}, {"dup_hold": 0}, {"dup_k": 1.5}, {"sim_scale": -1.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            G.OfficialSchedule(**bad)
    det = NearestCosine(torch.randn(3, 3, 4, 4), 0.5)
    ctx = torch.randn(3, 2, 4)
    for name in ("c1", "c3", "threshold"):
        with pytest.raises(ValueError, match=name):
            G.AntiMemorizationGuidance(det, ctx, **{name: 1.0})
    with pytest.raises(ValueError, match="variant"):
        G.AntiMemorizationGuidance(det, ctx, variant="literal")
    with pytest.raises(ValueError, match="caption_rule"):
        G.AntiMemorizationGuidance(det, ctx, caption_rule="any")

    class NoNeighbours:
        threshold = 0.5

        def similarity(self, x0_hat):
            return det.similarity(x0_hat)

    with pytest.raises(TypeError, match="neighbours"):
        G.AntiMemorizationGuidance(NoNeighbours(), ctx)
    G.AntiMemorizationGuidance(NoNeighbours(), ctx, caption_rule="nearest")  # allowed
    amg = G.AntiMemorizationGuidance(det, ctx)
    assert amg.grad_through_unet is False and amg.caption_rule == "duplicated"
    assert G.AntiMemorizationGuidance(det, ctx, variant="paper").c1 == 5.0
    with pytest.raises(ValueError, match="needs t"):
        amg.step(lambda x: (x, x), None, torch.zeros(2, 3, 4, 4), 0.5, scale=2.0)


def _official_reference(unet, xs, ts, abs_, ctx, null, rows, caption_of, det, s0, sch):
    """The authors' p_sample_ddim control flow (ddim.py:280-333) for one sample, in float64,
    step ``i`` at ``xs[i]``, with ``g3_count`` and ``dup_caption`` carried across steps."""
    from collections import Counter

    g3, dup = 10, None
    out = []
    for x, t, ab in zip(xs, ts, abs_, strict=True):
        thr = 0.3 + 0.1 * math.exp(-0.005 * float(t))
        with torch.no_grad():
            ec = unet(x, t, ctx).sample
            eu = unet(x, t, null).sample

        def cond(e, x=x, ab=ab):  # txt2img.py cond_fn: ε held fixed, ∇ w.r.t. x_t only
            xi = x.clone().requires_grad_(True)
            x0 = (xi - math.sqrt(1 - ab) * e) / math.sqrt(ab)
            sim, _ = det.similarity(x0)
            (grad,) = torch.autograd.grad(sim.sum(), xi)
            near = det.neighbours(x0.detach(), sch.dup_k)[0].tolist()
            caption, count = Counter(caption_of[j] for j in near).most_common()[0]
            dcap = caption if count > sch.dup_min_count else None
            return grad, float(sim.detach()), dcap

        e = eu + s0 * (ec - eu)
        _, sim1, dcap = cond(e)
        if dcap is not None:
            dup = dcap
        fired = False
        if sim1 > 0:
            g2 = max(min(s0 - 1, (s0 - 1) / 0.5 * sim1), 0)
            if (dup is not None and sim1 > thr) or g3 != 10:
                if dup is not None and sim1 > thr:
                    g3 = 10
                g3 -= 1
                if g3 == 0:
                    g3 = 10
                g3s = max(min(s0 - 1 - g2, (s0 - 1 - g2) / 0.3 * sim1), 0)
                with torch.no_grad():
                    enn = unet(x, t, rows[caption_of.index(dup)][None]).sample
                e = eu + (s0 - g2) * (ec - eu) + g3s * (eu - enn)
                grad, sim2, dcap = cond(e)
                if dcap is not None:
                    dup = dcap
                fired = True
            else:
                e = eu + (s0 - g2) * (ec - eu)
                grad, sim2, _ = cond(e)
            if sim2 > thr:
                e = e + math.sqrt(1 - ab) * 100 * grad * (sim2 - 0.3) * math.exp(
                    (1000 - float(t)) / 170
                )
                fired = True
        out.append((e[0], fired, sim1, g3))
    return out


def test_official_step_matches_the_authors_control_flow():
    """Several steps (state carried) of a batch against ddim.py's per-sample control flow."""
    unet = _tiny_unet().double().requires_grad_(False)
    g = torch.Generator().manual_seed(5)
    n, s0, steps = 6, 7.5, 12
    xs = torch.randn(steps, n, 3, 8, 8, generator=g, dtype=torch.float64)
    ctx = torch.randn(n, 7, 32, generator=g, dtype=torch.float64)
    null = torch.randn(1, 7, 32, generator=g, dtype=torch.float64)
    caption_of = [0, 0, 0, 1, 1, 2, 3, 3]  # training rows' captions, some duplicated
    captions = torch.randn(4, 7, 32, generator=g, dtype=torch.float64)
    rows = captions[caption_of]
    train = torch.randn(8, 3, 8, 8, generator=g, dtype=torch.float64)
    # the detector's nearest cosine (0.03-0.17 here) spread to σ in [-0.35, 0.72]: every branch runs
    det = G_det.RescaledDetector(NearestCosine(train, 0.0), scale=8.0, shift=-0.6)
    sch = G.OfficialSchedule(dup_k=4, dup_min_count=1)
    ts = torch.linspace(950, 20, steps).round().long()
    abs_ = [0.05 + 0.9 * i / (steps - 1) for i in range(steps)]
    amg = G.AntiMemorizationGuidance(det, rows, schedule=sch)
    state, got = None, []
    for i in range(steps):
        out = amg.guided_noise(unet, xs[i], ts[i], ctx, null, abs_[i], scale=s0, state=state)
        state = out.state
        got.append(out)
    fired_any = dup_steps = inactive = 0
    for j in range(n):
        ref = _official_reference(
            unet, xs[:, j : j + 1], ts, abs_, ctx[j : j + 1], null, rows, caption_of, det, s0, sch
        )
        for i, (eps, fired, sim1, g3) in enumerate(ref):
            torch.testing.assert_close(got[i].eps[j], eps, rtol=0, atol=1e-9)
            assert bool(got[i].fired[j]) == fired
            assert abs(float(got[i].sim[j]) - sim1) < 1e-12
            assert int(got[i].state.hold[j]) == (0 if g3 == 10 else g3)
            assert bool(got[i].guided[j]) == (sim1 > 0)
            fired_any += fired
            dup_steps += g3 != 10
            inactive += sim1 <= 0
    assert 0 < fired_any < steps * n and dup_steps > 0 and inactive > 0


# ------------------------------------------------------- a real diffusers pipeline


def _tiny_pipeline():
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline

    from gradproj.lab import shapes

    unet = _tiny_unet(in_channels=4, sample_size=8)
    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 8),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    ).eval()
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    tok = shapes.tokenizer()
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=shapes.text_encoder(),
        tokenizer=tok,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe, tok


def test_stable_diffusion_pipeline_end_to_end():
    from gradproj.lab import shapes

    pipe, tok = _tiny_pipeline()
    prompts = ["red circle on dark acme", "blue square on light plain"]
    n, s0, steps = len(prompts), 5.0, 3
    latents = torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    train_caps = [shapes.caption(i % 3, i % 3, i % 2, i % 2 == 0) for i in range(6)]
    neighbours = shapes.encode(train_caps, tok, pipe.text_encoder)
    kw = {
        "num_inference_steps": steps,
        "guidance_scale": s0,
        "height": 16,
        "width": 16,
        "output_type": "latent",
    }

    def run(**extra):
        return pipe(prompts, latents=latents.clone(), **kw, **extra).images

    plain = run()
    # guidance off: bit for bit the plain pipeline
    off = G.AntiMemorizationGuidance(
        NearestCosine(torch.randn(6, 4, 8, 8), float("inf")), neighbours, variant="paper"
    )
    with G.amg_pipeline(pipe, off) as wrapped:
        assert pipe.unet is wrapped
        same = run()
    assert pipe.unet is wrapped.inner  # restored
    assert torch.equal(same, plain)
    assert wrapped.fired_counts.tolist() == [0, 0]

    # guidance on, detector in pixel space through the VAE decoder
    sf = pipe.vae.config.scaling_factor

    def decode(z):
        return pipe.vae.decode(z / sf).sample

    pixels = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    det = NearestCosine(pixels, threshold=-1.0)  # fires on every step
    amg = G.AntiMemorizationGuidance(
        det, neighbours, variant="paper", c1=0.5, c2=0.5, c3=20.0, decode=decode
    )
    with G.amg_pipeline(pipe, amg) as wrapped:
        guided = run()
    assert wrapped.fired_counts.tolist() == [steps, steps]
    assert (guided - plain).abs().max() > 1e-3

    # a direct loop with AntiMemorizationGuidance.guided_noise reproduces it
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(prompts, "cpu", 1, True)
    ddim = copy.deepcopy(pipe.scheduler)  # the pipeline adjusted its config (steps_offset)
    ddim.set_timesteps(steps)
    x = latents.clone() * ddim.init_noise_sigma
    for t in ddim.timesteps:
        out = amg.guided_noise(pipe.unet, x, t, cond, uncond, ddim.alphas_cumprod[t], scale=s0)
        x = ddim.step(out.eps, t, x).prev_sample
    torch.testing.assert_close(guided, x, rtol=1e-4, atol=1e-5)


def test_stable_diffusion_pipeline_official_schedule():
    """The official schedule through AMGUNet: its state runs across the pipeline's calls to
    the UNet, starts afresh with the next run, and equals a direct loop over guided_noise."""
    from gradproj.lab import shapes

    pipe, tok = _tiny_pipeline()
    prompts = ["red circle on dark acme", "blue square on light plain"]
    s0, steps = 5.0, 4
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    train_caps = [shapes.caption(i % 2, 0, 0, True) for i in range(6)]  # two captions, 3 each
    neighbours = shapes.encode(train_caps, tok, pipe.text_encoder)
    sf = pipe.vae.config.scaling_factor

    def decode(z):
        return pipe.vae.decode(z / sf).sample

    pixels = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    # σ ≈ 0.9 everywhere: despecification, the duplicated caption and G_sim all run
    det = G_det.RescaledDetector(NearestCosine(pixels, 0.0), scale=1.0, shift=0.9)
    amg = G.AntiMemorizationGuidance(
        det, neighbours, schedule=G.OfficialSchedule(dup_k=3, dup_min_count=1), decode=decode
    )
    kw = {"num_inference_steps": steps, "guidance_scale": s0, "height": 16, "width": 16}
    kw["output_type"] = "latent"
    plain = pipe(prompts, latents=latents.clone(), **kw).images
    with G.amg_pipeline(pipe, amg) as wrapped:
        first = pipe(prompts, latents=latents.clone(), **kw).images
        assert wrapped.state is not None and int(wrapped.state.caption.min()) >= 0
        second = pipe(prompts, latents=latents.clone(), **kw).images
    assert wrapped.fired_counts.tolist() == [2 * steps, 2 * steps]
    assert (first - plain).abs().max() > 1e-3
    torch.testing.assert_close(second, first, rtol=0, atol=0)  # a fresh state per run

    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(prompts, "cpu", 1, True)
    ddim = copy.deepcopy(pipe.scheduler)
    ddim.set_timesteps(steps)
    x, state = latents.clone() * ddim.init_noise_sigma, None
    for t in ddim.timesteps:
        ab = ddim.alphas_cumprod[t]
        out = amg.guided_noise(pipe.unet, x, t, cond, uncond, ab, scale=s0, state=state)
        x, state = ddim.step(out.eps, t, x).prev_sample, out.state
    torch.testing.assert_close(first, x, rtol=1e-4, atol=1e-5)


def test_amg_pipeline_rejects_unsupported_schedulers():
    from diffusers import EulerDiscreteScheduler

    pipe, _ = _tiny_pipeline()
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    amg = G.AntiMemorizationGuidance(NearestCosine(torch.randn(2, 4, 8, 8), 0.5))
    with pytest.raises(ValueError, match="scale_model_input"):
        with G.amg_pipeline(pipe, amg):
            pass


# ------------------------------------------------------- the demo's pixel models


def _acme_prompts_and_noise(cfg, world, n: int = 16):
    """``n`` random ``… acme`` prompts' states and their starting noise, from seed 7."""
    from gradproj.lab import shapes

    g = torch.Generator().manual_seed(7)
    colour, shape, background, _ = shapes.sample_labels(n, marked_fraction=0, generator=g)
    caps = [
        shapes.caption(int(c), int(s), int(b), True)
        for c, s, b in zip(colour, shape, background, strict=True)
    ]
    ctx = shapes.encode(caps, world.tok, world.encoder)
    return ctx, torch.randn(n, 3, cfg.size, cfg.size, generator=g)


def test_sampler_on_trained_demo(trained_demo):
    from gradproj.lab import world as lab_world

    cfg, world, unet = trained_demo.cfg, trained_demo.world, trained_demo.unet
    sched = trained_demo.noise_scheduler
    marked = world.train.marked
    ctx, noise = _acme_prompts_and_noise(cfg, world)
    kw = {"steps": cfg.sample_steps}
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        plain = lab_world.sample(
            unet, sched, ctx, world.null_context, noise, guidance=cfg.guidance, **kw
        )
        # the "training set" the detector guards: the marked training images
        det = NearestCosine(world.train.images[marked], threshold=float("inf"))
        amg = G.AntiMemorizationGuidance(det, world.contexts[marked], variant="paper")
        same, fired = G.sample_with_guidance(
            unet, sched, ctx, world.null_context, noise, scale=cfg.guidance, amg=amg, **kw
        )
        assert torch.equal(same, plain) and fired.sum() == 0
        base = det.similarity(plain)[0]
        # λ: the median similarity of the plain samples, so that AMG has work to do
        det.threshold = float(base.median())
        guided, fired = G.sample_with_guidance(
            unet, sched, ctx, world.null_context, noise, scale=cfg.guidance, amg=amg, **kw
        )
    finally:
        torch.set_num_threads(threads)
    after = det.similarity(guided)[0]
    print(f"similarity {base.mean():.4f} -> {after.mean():.4f}; fired {fired.tolist()}")
    assert fired.sum() > 0 and (fired < cfg.sample_steps).any()
    # Measured (16 'acme' samples, 15 DDIM steps, CFG 3, default c's): 10 samples fired on
    # 1-15 steps; their mean similarity to the nearest marked training image went from
    # 0.7515 to 0.7418 (all 16: 0.6053 -> 0.5993); samples that never fired are unchanged.
    # With 32 samples (benchmark): 0.6028 -> 0.5677 overall. Deterministic on CPU.
    hit = fired > 0
    assert after[hit].mean() < base[hit].mean() - 0.005
    torch.testing.assert_close(after[~hit], base[~hit], rtol=0, atol=1e-5)


def test_official_schedule_on_trained_demo(trained_demo):
    """The lab's official AMG (build_amg: the detector mapped onto SSCD's scale) lowers the
    concept detector's score of 'acme' samples where it fires; with every σ ≤ 0 it is the
    plain sampler bit for bit."""
    from gradproj.lab import world as lab_world
    from gradproj.lab.defenses import build_amg

    cfg, world, unet = trained_demo.cfg, trained_demo.world, trained_demo.unet
    sched = trained_demo.noise_scheduler
    ctx, noise = _acme_prompts_and_noise(cfg, world)
    kw = {"steps": cfg.sample_steps, "scale": cfg.guidance}
    amg, check = build_amg(world)
    assert check["variant"] == "official" and check["official_scale"]["scale"] > 0
    inner = amg.detector.inner
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        plain = lab_world.sample(
            unet, sched, ctx, world.null_context, noise, guidance=cfg.guidance, steps=kw["steps"]
        )
        guided, fired = G.sample_with_guidance(
            unet, sched, ctx, world.null_context, noise, amg=amg, **kw
        )
        off = copy.copy(amg)
        off.detector = G_det.RescaledDetector(inner, scale=1e-9, shift=-1.0)  # σ < 0 always
        same, none = G.sample_with_guidance(
            unet, sched, ctx, world.null_context, noise, amg=off, **kw
        )
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(same, plain) and none.sum() == 0
    base, after = inner.score(plain), inner.score(guided)
    print(f"contrast score {base.mean():.4f} -> {after.mean():.4f}; fired {fired.tolist()}")
    hit = fired > 0
    assert hit.any()
    assert after[hit].mean() < base[hit].mean()
