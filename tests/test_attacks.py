"""embedding_search and DoRI: the search lowers the diffusion loss, leaves the model as it was,
and on the trained demo model raises the mark (extraction) rate."""

import pytest
import torch

from gradproj.methods.attacks import embedding_search
from tests.tiny_pipelines import tiny_unet

diffusers = pytest.importorskip("diffusers")


def _loss(unet, scheduler, images, ctx, seed=3):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(images.shape, generator=g)
    t = torch.randint(1000, (images.shape[0],), generator=g)
    with torch.no_grad():
        pred = unet(scheduler.add_noise(images, noise, t), t, ctx.expand(images.shape[0], -1, -1))
    return float(torch.nn.functional.mse_loss(pred.sample, noise))


def test_search_lowers_the_loss_and_does_not_touch_the_model():
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8,
        attention_head_dim=4,
        norm_num_groups=4,
    )
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000)
    images = torch.rand(6, 3, 8, 8) * 2 - 1
    init = torch.zeros(3, 8)
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    found = embedding_search(
        unet, scheduler, images, init, steps=30, lr=0.3, generator=torch.Generator().manual_seed(1)
    )
    assert found.shape == init.shape and not found.requires_grad
    assert _loss(unet, scheduler, images, found) < _loss(unet, scheduler, images, init)
    for n, p in unet.named_parameters():
        assert torch.equal(p, before[n]) and p.requires_grad and p.grad is None, n


def test_bad_images_are_rejected():
    with pytest.raises(ValueError, match=r"images must be \(n, C, H, W\)"):
        embedding_search(torch.nn.Identity(), None, torch.zeros(3, 8, 8), torch.zeros(2, 4))


# --- the paper's draw (8 noise/timestep pairs per image), the earlier one, the starts ---


def _earlier_search(unet, scheduler, images, init, *, steps, lr, batch_size, generator):
    """gradproj's search before pairs_per_image existed, written out as it was: the oracle
    the ``pairs_per_image=1`` path must reproduce bit for bit."""
    emb = init.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([emb], lr=lr)
    losses = []
    for _ in range(steps):
        idx = torch.randint(
            images.shape[0], (min(batch_size, images.shape[0]),), generator=generator
        )
        x0 = images[idx]
        noise = torch.randn(x0.shape, generator=generator).to(x0)
        t = torch.randint(1000, (x0.shape[0],), generator=generator)
        pred = unet(
            scheduler.add_noise(x0, noise, t),
            t,
            encoder_hidden_states=emb.expand(x0.shape[0], -1, -1),
        ).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return emb.detach(), losses


@pytest.mark.parametrize("n_images", [1, 6])
def test_previous_settings_reproduce_the_earlier_search_bit_for_bit(n_images):
    unet = tiny_unet(8).requires_grad_(False)
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000)
    images = torch.rand(n_images, 3, 8, 8, generator=torch.Generator().manual_seed(2)) * 2 - 1
    init = torch.randn(3, 8, generator=torch.Generator().manual_seed(3))
    want, want_losses = _earlier_search(
        unet,
        scheduler,
        images,
        init,
        steps=4,
        lr=0.1,
        batch_size=8,
        generator=torch.Generator().manual_seed(9),
    )
    losses = []
    got = embedding_search(
        unet,
        scheduler,
        images,
        init,
        steps=4,
        lr=0.1,
        batch_size=8,
        pairs_per_image=1,
        losses=losses,
        generator=torch.Generator().manual_seed(9),
    )
    assert torch.equal(got, want) and losses == want_losses


def test_pairs_per_image_loss_is_the_mean_over_the_same_draws():
    unet = tiny_unet(8).requires_grad_(False)
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000)
    images = torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(2)) * 2 - 1
    init = torch.randn(3, 8, generator=torch.Generator().manual_seed(3))
    losses = []
    embedding_search(
        unet,
        scheduler,
        images,
        init,
        steps=1,
        batch_size=2,
        pairs_per_image=3,
        losses=losses,
        generator=torch.Generator().manual_seed(4),
    )
    # The documented draw order: indices (B,), noise (B·P, C, H, W), timesteps (B·P,);
    # row b·P + p is pair p of image b. Each pair's loss on its own, then their mean.
    g = torch.Generator().manual_seed(4)
    idx = torch.randint(5, (2,), generator=g)
    noise = torch.randn(6, 3, 8, 8, generator=g)
    t = torch.randint(1000, (6,), generator=g)
    per_pair = []
    with torch.no_grad():
        for b in range(2):
            for p in range(3):
                r = slice(3 * b + p, 3 * b + p + 1)
                x_t = scheduler.add_noise(images[idx[b]][None], noise[r], t[r])
                pred = unet(x_t, t[r], encoder_hidden_states=init[None]).sample
                per_pair.append(torch.nn.functional.mse_loss(pred, noise[r]).item())
    assert len(set(t.tolist())) > 1  # independent pairs, not one timestep per image
    assert losses[0] == pytest.approx(sum(per_pair) / 6, rel=1e-5)


def test_one_image_is_a_batch_of_one_with_eight_pairs_by_default():
    unet = tiny_unet(8).requires_grad_(False)
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000)
    image = torch.rand(1, 3, 8, 8) * 2 - 1
    seen = []

    def record(_module, args, kwargs):
        seen.append((args[0].shape[0], args[1].clone()))

    handle = unet.register_forward_pre_hook(record, with_kwargs=True)
    try:
        embedding_search(
            unet,
            scheduler,
            image,
            torch.zeros(3, 8),
            steps=2,
            generator=torch.Generator().manual_seed(0),
        )
        assert [rows for rows, _ in seen] == [8, 8]  # B = min(8, 1) = 1 image, P = 8 pairs
        assert all(len(set(t.tolist())) > 1 for _, t in seen)
        seen.clear()
        embedding_search(
            unet,
            scheduler,
            image,
            torch.zeros(3, 8),
            steps=2,
            pairs_per_image=1,
            generator=torch.Generator().manual_seed(0),
        )
        assert [rows for rows, _ in seen] == [1, 1]  # the earlier settings: one pair a step
    finally:
        handle.remove()


def _lab_text_side():
    from gradproj.lab import shapes

    return shapes.tokenizer(), shapes.text_encoder()


def _encoding(tok, enc, prompt):
    """The prompt's (unmasked, as the pipelines encode) last hidden state ``(L, d)``."""
    ids = tok([prompt], padding="max_length", max_length=7, return_tensors="pt")
    with torch.no_grad():
        return enc(ids["input_ids"]).last_hidden_state[0]


def test_each_start_is_where_the_search_begins():
    from gradproj.methods.attacks import TokenEmbeddingEncoder, dori_attack

    tok, enc = _lab_text_side()
    unet = tiny_unet(32).requires_grad_(False)
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000)
    images = torch.rand(2, 3, 8, 8) * 2 - 1
    prompt = "red circle on dark acme"
    kw = {"text_encoder": enc, "tokenizer": tok, "steps": 0}
    exact = {"rtol": 0, "atol": 0}
    # "prompt" (default): the mitigated prompt's encoding.
    r = dori_attack(unet, scheduler, images, prompt=prompt, **kw)
    torch.testing.assert_close(r.initial, _encoding(tok, enc, prompt), **exact)
    torch.testing.assert_close(r.embedding, r.initial, **exact)
    # "null": the empty prompt's encoding, whatever prompt is given.
    r = dori_attack(unet, scheduler, images, start="null", prompt=prompt, **kw)
    torch.testing.assert_close(r.initial, _encoding(tok, enc, ""), **exact)
    # "gaussian": N(0, σ²), the first draw of the generator.
    for std in (1.0, 0.25):
        r = dori_attack(
            unet,
            scheduler,
            images,
            start="gaussian",
            gaussian_std=std,
            generator=torch.Generator().manual_seed(7),
            **kw,
        )
        want = std * torch.randn(7, 32, generator=torch.Generator().manual_seed(7))
        torch.testing.assert_close(r.initial, want, **exact)
        assert abs(float(r.initial.std()) - std) < 0.2 * std  # 224 draws
    other = dori_attack(
        unet, scheduler, images, start="gaussian", generator=torch.Generator().manual_seed(8), **kw
    ).initial
    assert not torch.equal(other, r.initial / 0.25)  # another seed, another start
    # The Gaussian comes first; the search then continues on the same generator.
    g = torch.Generator().manual_seed(7)
    r = dori_attack(
        unet,
        scheduler,
        images,
        start="gaussian",
        text_encoder=enc,
        tokenizer=tok,
        steps=2,
        generator=g,
    )
    g = torch.Generator().manual_seed(7)
    start = torch.randn(7, 32, generator=g)
    torch.testing.assert_close(
        r.embedding, embedding_search(unet, scheduler, images, start, steps=2, generator=g), **exact
    )
    # init overrides start.
    init = torch.ones(7, 32)
    r = dori_attack(unet, scheduler, images, init=init, start="gaussian", steps=0)
    torch.testing.assert_close(r.initial, init, **exact)
    # Token-embedding space: the start's token rows, encoding to that prompt's encoding.
    for start, text in (("prompt", prompt), ("null", "")):
        r = dori_attack(
            unet, scheduler, images, space="token_embeddings", start=start, prompt=prompt, **kw
        )
        ref = TokenEmbeddingEncoder.from_prompt(enc, tok, text)
        torch.testing.assert_close(r.initial, ref.init, **exact)
        torch.testing.assert_close(r.context[0], _encoding(tok, enc, text), **exact)


def test_bad_attack_arguments_name_the_parameter():
    from gradproj.methods.attacks import dori_attack

    tok, enc = _lab_text_side()
    unet = tiny_unet(32)
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000)
    images = torch.rand(2, 3, 8, 8)
    kw = {"text_encoder": enc, "tokenizer": tok}
    with pytest.raises(ValueError, match="start must be one of"):
        dori_attack(unet, scheduler, images, start="empty", **kw)
    with pytest.raises(ValueError, match="start='prompt' needs prompt"):
        dori_attack(unet, scheduler, images, **kw)
    with pytest.raises(ValueError, match="gaussian_std must be > 0"):
        dori_attack(unet, scheduler, images, start="gaussian", gaussian_std=0.0, **kw)
    with pytest.raises(ValueError, match="pairs_per_image must be ≥ 1"):
        dori_attack(unet, scheduler, images, prompt="red", pairs_per_image=0, **kw)
    with pytest.raises(ValueError, match="pairs_per_image must be ≥ 1"):
        embedding_search(unet, scheduler, images, torch.zeros(7, 32), pairs_per_image=0)


# --- DoRI on the trained demo model (session fixture ``trained_demo``) ---

N_SAMPLES, SAMPLE_STEPS = 48, 10


def _demo_sampler(trained_demo, unet=None):
    from gradproj.lab import world as lab_world

    unet = trained_demo.unet if unet is None else unet
    noise = torch.randn(N_SAMPLES, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    null = trained_demo.world.null_context

    def sample(context):
        return lab_world.sample(
            unet,
            trained_demo.noise_scheduler,
            context,
            null,
            noise,
            steps=SAMPLE_STEPS,
            guidance=trained_demo.cfg.guidance,
        )

    return sample


def _mark_rate(images):
    from gradproj.lab import probes

    return float(probes.detect_mark(images).float().mean())


def test_dori_lowers_its_loss_and_raises_extraction_on_the_demo_model(trained_demo):
    from gradproj.lab import probes
    from gradproj.methods.attacks import dori_attack

    world, unet = trained_demo.world, trained_demo.unet
    marked = world.train.images[world.train.marked]
    sample = _demo_sampler(trained_demo)
    null_rate = _mark_rate(sample(world.null_context))
    rates, traces = [], []
    for seed in (0, 1, 2):
        result = dori_attack(
            unet,
            trained_demo.noise_scheduler,
            marked,
            init=world.null_context,
            pairs_per_image=1,  # the earlier settings, which the figures below were measured with
            sample=sample,
            is_extracted=lambda x: probes.read(world.probe, x)["marked"],
            eval_images=32 if seed == 0 else 0,
            generator=torch.Generator().manual_seed(seed),
        )
        assert len(result.losses) == 50 and result.context.shape == (1, 7, 32)
        assert result.samples.shape == (N_SAMPLES, 3, 16, 16)
        rates.append(result.extraction_rate)
        if result.eval_losses:
            traces.append(result.eval_losses)
    trace = traces[0]
    first, last = sum(trace[:5]) / 5, sum(trace[-5:]) / 5
    print(
        f"\nnull-prompt mark rate {null_rate:.3f}; DoRI rates {rates}; loss {first:.4f}->{last:.4f}"
    )
    # measured (pytest, 2 threads): fixed-draw loss 0.0831 -> 0.0815 (the concept is a 4x4
    # stamp, 6% of the pixels); null prompt 0.31; DoRI (paper defaults) 0.60 / 0.31 / 0.50
    # by search seed, mean 0.47 (one search at lr 0.1 / batch 8 is noisy, their mean less so).
    assert len(trace) == 51 and last < first - 0.001
    assert sum(rates) / len(rates) > null_rate + 0.08


def test_token_embedding_space_works_on_the_demo_text_encoder(trained_demo):
    from gradproj.lab import shapes
    from gradproj.methods.attacks import TokenEmbeddingEncoder, dori_attack

    world = trained_demo.world
    prompt = "red circle on dark plain"
    # The lab's models read masked states (shapes.encode), so the lab asks for the mask.
    enc = TokenEmbeddingEncoder.from_prompt(world.encoder, world.tok, prompt, attention_mask=True)
    assert enc.init.shape == (7, 32)
    # The hooked forward reproduces the encoder on the real prompt exactly.
    torch.testing.assert_close(enc(enc.init), shapes.encode([prompt], world.tok, world.encoder))
    # A padded prompt: by default the mask follows the encoder's config, as diffusers'
    # pipelines do (CLIP: none), so the padding states are the unmasked ones.
    short = "red circle"
    ids = world.tok([short], padding="max_length", max_length=7, return_tensors="pt")
    with torch.no_grad():
        unmasked = world.encoder(ids["input_ids"]).last_hidden_state
        default = TokenEmbeddingEncoder.from_prompt(world.encoder, world.tok, short)
        masked = TokenEmbeddingEncoder.from_prompt(
            world.encoder, world.tok, short, attention_mask=True
        )
        torch.testing.assert_close(default(default.init), unmasked, rtol=0, atol=0)
        torch.testing.assert_close(
            masked(masked.init), shapes.encode([short], world.tok, world.encoder)
        )
        assert not torch.allclose(masked(masked.init), unmasked)
    before = {n: p.detach().clone() for n, p in world.encoder.named_parameters()}
    flags = {n: p.requires_grad for n, p in world.encoder.named_parameters()}
    result = dori_attack(
        trained_demo.unet,
        trained_demo.noise_scheduler,
        world.train.images[world.train.marked],
        space="token_embeddings",
        text_encoder=world.encoder,
        tokenizer=world.tok,
        prompt=prompt,
        attention_mask=True,
        steps=30,
        pairs_per_image=1,
        eval_images=32,
        generator=torch.Generator().manual_seed(0),
    )
    assert result.embedding.shape == (7, 32) and result.context.shape == (1, 7, 32)
    assert result.samples is None and result.extraction_rate is None
    trace = result.eval_losses
    assert sum(trace[-5:]) / 5 < sum(trace[:5]) / 5
    torch.testing.assert_close(result.context, enc(result.embedding))
    for n, p in world.encoder.named_parameters():
        assert torch.equal(p, before[n]) and p.requires_grad == flags[n] and p.grad is None, n


def test_dori_errors(trained_demo):
    from gradproj.methods.attacks import TokenEmbeddingEncoder, dori_attack

    unet, ns, world = trained_demo.unet, trained_demo.noise_scheduler, trained_demo.world
    images = world.train.images[:4]
    with pytest.raises(ValueError, match="space must be one of"):
        dori_attack(unet, ns, images, init=world.null_context, space="pixels")
    with pytest.raises(ValueError, match="sample and is_extracted must be given together"):
        dori_attack(unet, ns, images, init=world.null_context, sample=lambda c: c)
    with pytest.raises(ValueError, match="needs text_encoder and tokenizer"):
        dori_attack(unet, ns, images, space="token_embeddings")
    with pytest.raises(ValueError, match="needs init, or text_encoder and tokenizer"):
        dori_attack(unet, ns, images)
    with pytest.raises(ValueError, match="needs init, or text_encoder and tokenizer"):
        dori_attack(unet, ns, images, start="null")
    with pytest.raises(ValueError, match=r"init must be a context"):
        dori_attack(unet, ns, images, init=torch.zeros(32))
    with pytest.raises(ValueError, match=r"init must be the token embeddings \(L, d_tok\)"):
        dori_attack(
            unet,
            ns,
            images,
            init=torch.zeros(3, 32),
            space="token_embeddings",
            text_encoder=world.encoder,
            tokenizer=world.tok,
        )
    with pytest.raises(ValueError, match="eval_images must be ≥ 0"):
        dori_attack(unet, ns, images, init=world.null_context, eval_images=-1)
    with pytest.raises(ValueError, match="batch_size must be ≥ 1"):
        dori_attack(unet, ns, images, init=world.null_context, batch_size=0)
    with pytest.raises(TypeError, match="get_input_embeddings"):
        TokenEmbeddingEncoder(torch.nn.Linear(2, 2), torch.zeros(1, 7, dtype=torch.long))
    with pytest.raises(ValueError, match=r"embeddings must be \(L, d_tok\)"):
        TokenEmbeddingEncoder.from_prompt(world.encoder, world.tok, "red")(torch.zeros(3, 32))
