"""Attacks that try to pull a concept back out of a trained diffusion model.

DoRI ("Finding Dori", seed 003: Kowalczuk, Hintersdorf, Struppek et al. 2025)
never changes the model: it optimizes a conditioning input so that the model's
own denoising loss on images that show the concept is as small as possible,
then one samples with what it found. If the model learned to draw the concept
from *any* direction it can read, the search finds that direction.

- :func:`embedding_search` is the one implementation of the search (the demo's
  evaluation, :func:`dori_attack` and :func:`gradproj.methods.adversarial.adversarial_finetune`
  all call it);
- :func:`dori_attack` wraps it with the paper's defaults (Adam, lr 0.1, 50 steps,
  8 noise/timestep pairs a step for each image, starting at the mitigated prompt's
  embedding; the null prompt and a Gaussian draw as other starts), a choice of
  search space (the encoder output the cross-attention reads, or the prompt's
  token embeddings run through the text encoder), and the measurement: sample
  with the found embedding and report the share of samples a judge calls extracted;
- :class:`TokenEmbeddingEncoder` makes the token-embedding space searchable on
  any ``transformers`` ``CLIPTextModel``.

Sources. The paper is arXiv:2507.16880 (v1 "… Is Less Local Than Assumed", v2 "… Is
Not Local", ICML 2026 as "Finding DoRI: Discovery of Retained Images in Diffusion
Models"). Its code, github.com/sprintml/finding_dori, is not in the stores this
project can read, so no default here is checked against it. The start at the
mitigated prompt is in the v2 abstract; the optimizer, learning rate, steps, the
batch of 8 per memorized image with noise and timestep resampled every step, and
the three starts (the prompt's embedding, ``N(0, I)``, other prompts) are from the
DoRI method section as summarized in en.papernotes.org's note on the ICML paper
(the primary text past the abstract was not readable here either).

Everything is model-agnostic: the UNet is any ε-predicting
``UNet2DConditionModel`` (``unet(x_t, t, encoder_hidden_states=c).sample``), the
images are whatever it denoises (pixels for the demo; VAE latents for a latent
diffusion model), and the sampler and judge are passed in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

SPACES = ("encoder_output", "token_embeddings")
STARTS = ("prompt", "null", "gaussian")


def embedding_search(
    unet: nn.Module,
    noise_scheduler,
    images: torch.Tensor,
    init: torch.Tensor,
    *,
    steps: int = 50,
    lr: float = 0.1,
    batch_size: int = 8,
    pairs_per_image: int = 8,
    encode: Callable[[torch.Tensor], torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
    losses: list[float] | None = None,
    callback: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Optimize an embedding ``e`` to minimize the diffusion loss on ``images``; return it.

    With ``x₀`` drawn from ``images (n, C, H, W)`` (what the model should be made
    to produce: the memorized image, or a concept's training images), ``ε ~ N(0, I)``
    and ``t`` uniform on ``{0, …, T−1}``::

        e* = argmin_e  E_{x₀, ε, t} ‖ε_θ(√ᾱ_t x₀ + √(1 − ᾱ_t) ε, t, c(e)) − ε‖²

    by ``steps`` Adam steps (learning rate ``lr``) from ``init``, the model frozen.
    Each step draws a fresh minibatch of ``B = min(batch_size, n)`` images and, for
    each image, ``P = pairs_per_image`` independent ``(ε, t)`` pairs, and descends
    the mean over all ``B·P`` pairs::

        L(e) = 1/(B·P) Σ_{b<B} Σ_{p<P} mean ‖ε_θ(x_t(x_b, ε_bp, t_bp), t_bp, c(e)) − ε_bp‖²

    **DoRI's settings** (Kowalczuk, Hintersdorf, Struppek et al. 2025, "Finding Dori",
    arXiv:2507.16880, the DoRI method section): Adam, ``lr`` 0.1, 50 steps, a batch of 8
    with the noise and the timestep resampled every step, for *one* memorized image
    ``x_mem``: one image, 8 ``(ε, t)`` pairs a step, which is what the defaults give for
    ``n = 1`` (``B = min(8, 1) = 1``, ``P = 8``). The paper never searches one embedding
    over several images (each memorized image gets its own search, in the attack and in
    the adversarial fine-tuning's inner loop); for ``n > 1`` the defaults apply the
    paper's per-image draw to each of ``min(8, n)`` images, ``8·B`` UNet rows a step.
    ``pairs_per_image=1, batch_size=8`` is gradproj's earlier search (one pair per image,
    so a single image got one pair a step), kept bit for bit: the draws below are made
    in the same order, and with ``P = 1`` they are the same draws.

    ``c(e) = encode(e)`` when ``encode`` is given (e.g. a
    :class:`TokenEmbeddingEncoder`: token embeddings through the text encoder),
    else ``c(e) = e``: the search runs directly in the space the cross-attention
    reads, ``init (L × d)`` (the paper's "text embedding"), the strongest text-side
    adversary, since every prompt's encoding lies in it.

    ``unet(noisy, t, encoder_hidden_states=c).sample`` must predict ε (a diffusers
    ``UNet2DConditionModel``); ``noise_scheduler`` must offer ``add_noise`` and
    ``config.num_train_timesteps`` (``DDPMScheduler``). Each step draws from
    ``generator``, on the CPU, in this order: the image indices ``(B,)``, the noise
    ``(B·P, C, H, W)``, the timesteps ``(B·P,)``; row ``b·P + p`` is pair ``p`` of image
    ``b``. They are moved to ``images``' device, so a run is reproducible on any
    device. The model's parameters (and those of ``encode`` if it is an ``nn.Module``)
    get no gradient; their ``requires_grad`` flags are put back afterwards. If
    ``losses`` is a list, the minibatch loss of every step (before that step's
    update) is appended to it; ``callback(step, e)`` is called after every update
    (``e`` the live tensor: read it under ``torch.no_grad()``, do not modify it).
    Returns ``e*`` detached, shaped like ``init``.
    """
    if images.dim() != 4:
        raise ValueError(f"images must be (n, C, H, W), got {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise ValueError("images must hold at least one image, got 0")
    if steps < 0:
        raise ValueError(f"steps must be ≥ 0, got {steps}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    if pairs_per_image < 1:
        raise ValueError(f"pairs_per_image must be ≥ 1, got {pairs_per_image}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    emb = init.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([emb], lr=lr)
    modules = [unet] + ([encode] if isinstance(encode, nn.Module) else [])
    frozen = [(p, p.requires_grad) for m in modules for p in m.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    n_t = noise_scheduler.config.num_train_timesteps
    device = images.device
    try:
        for step in range(steps):
            idx = torch.randint(
                images.shape[0], (min(batch_size, images.shape[0]),), generator=generator
            )
            x0 = images[idx.to(device)].repeat_interleave(pairs_per_image, dim=0)
            noise = torch.randn(x0.shape, generator=generator).to(x0)
            t = torch.randint(n_t, (x0.shape[0],), generator=generator).to(device)
            noisy = noise_scheduler.add_noise(x0, noise, t)
            cond = encode(emb) if encode is not None else emb
            cond = cond.expand(x0.shape[0], *cond.shape[-2:])
            pred = unet(noisy, t, encoder_hidden_states=cond).sample
            # Every pair has the same number of elements, so the element mean is the
            # mean over pairs of each pair's loss.
            loss = torch.nn.functional.mse_loss(pred, noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if losses is not None:
                losses.append(loss.detach().item())
            if callback is not None:
                callback(step, emb)
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)
    return emb.detach()


class TokenEmbeddingEncoder(nn.Module):
    """``e (L, d_tok) ↦ c (1, L, d)``: token embeddings through a CLIP text encoder.

    The text encoder's own forward is run on the prompt's ``input_ids`` with a
    forward hook on its input-embedding table (``get_input_embeddings()``) that
    replaces the looked-up rows by ``e``; position embeddings, the causal
    self-attention layers and the final layer norm then act exactly as for a
    real prompt, and the last hidden state is what the UNet's cross-attention
    reads. The hook, not an ``inputs_embeds`` argument, is what makes this work
    on any ``CLIPTextModel``: in ``transformers`` 5.x ``CLIPTextModel.forward``
    takes only ``input_ids`` (its embeddings module takes ``inputs_embeds``, but
    the model's layers moved between versions), while every version looks its
    tokens up through ``get_input_embeddings()``.

    ``init`` holds the prompt's own token embeddings ``(L, d_tok)``, the natural
    start of a search. :func:`embedding_search` keeps the encoder frozen while
    it searches (it switches off ``requires_grad`` of an ``encode`` module's
    parameters and restores them afterwards).
    """

    def __init__(
        self,
        text_encoder: nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if not hasattr(text_encoder, "get_input_embeddings"):
            raise TypeError(
                "text_encoder must be a transformers text model with get_input_embeddings(), "
                f"got {type(text_encoder).__name__}"
            )
        ids = input_ids if input_ids.dim() == 2 else input_ids[None]
        if ids.dim() != 2 or ids.shape[0] != 1:
            raise ValueError(f"input_ids must be (L,) or (1, L), got {tuple(input_ids.shape)}")
        self.text_encoder = text_encoder
        self.register_buffer("input_ids", ids, persistent=False)
        mask = None if attention_mask is None else attention_mask.reshape(1, -1)
        self.register_buffer("attention_mask", mask, persistent=False)
        with torch.no_grad():
            self.init = text_encoder.get_input_embeddings()(ids)[0].detach().clone()

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        if embeddings.shape != self.init.shape:
            raise ValueError(
                f"embeddings must be (L, d_tok) = {tuple(self.init.shape)}, "
                f"got {tuple(embeddings.shape)}"
            )
        table = self.text_encoder.get_input_embeddings()
        handle = table.register_forward_hook(lambda _m, _i, _o: embeddings[None])
        try:
            out = self.text_encoder(input_ids=self.input_ids, attention_mask=self.attention_mask)
        finally:
            handle.remove()
        return out.last_hidden_state

    @classmethod
    def from_prompt(
        cls,
        text_encoder: nn.Module,
        tokenizer,
        prompt: str,
        *,
        max_length: int | None = None,
        attention_mask: bool | None = None,
    ) -> TokenEmbeddingEncoder:
        """Tokenize ``prompt`` as a diffusion pipeline does (padded to ``max_length``,
        default the tokenizer's ``model_max_length``) and wrap ``text_encoder``.

        ``attention_mask``: ``None`` (default) passes the tokenizer's mask only when the
        encoder's config sets ``use_attention_mask``, as diffusers' pipelines do (CLIP's
        does not: the padding positions' states are the unmasked ones the UNet reads);
        ``True`` for a model conditioned on masked states (gradproj's lab)."""
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
        ids = tokenizer(
            [prompt],
            padding="max_length",
            truncation=True,
            max_length=max_length or tokenizer.model_max_length,
            return_tensors="pt",
        )
        if attention_mask is None:
            config = getattr(text_encoder, "config", None)
            attention_mask = bool(getattr(config, "use_attention_mask", False))
        return cls(
            text_encoder, ids["input_ids"], ids.get("attention_mask") if attention_mask else None
        )


@dataclass
class DoriResult:
    """What :func:`dori_attack` found and measured.

    ``embedding``: the optimized variable (``(L, d)`` encoder output or ``(L, d_tok)``
    token embeddings); ``initial``: where the search started (same shape);
    ``context (1, L, d)``: what the cross-attention reads;
    ``losses``: the minibatch diffusion loss of every step; ``eval_losses``: the
    loss on one fixed draw (images, noise, timesteps), at the start and after
    every step (empty unless ``eval_images`` was given), a paired, low-variance
    trace of the same objective; ``samples`` and
    ``extraction_rate`` (share of samples the judge calls extracted): ``None``
    unless a sampler and judge were given.
    """

    embedding: torch.Tensor
    initial: torch.Tensor
    context: torch.Tensor
    space: str
    losses: list[float] = field(default_factory=list)
    eval_losses: list[float] = field(default_factory=list)
    samples: torch.Tensor | None = None
    extracted: torch.Tensor | None = None
    extraction_rate: float | None = None


def dori_attack(
    unet: nn.Module,
    noise_scheduler,
    images: torch.Tensor,
    *,
    start: str = "prompt",
    prompt: str | None = None,
    init: torch.Tensor | None = None,
    space: str = "encoder_output",
    text_encoder: nn.Module | None = None,
    tokenizer=None,
    attention_mask: bool | None = None,
    gaussian_std: float = 1.0,
    steps: int = 50,
    lr: float = 0.1,
    batch_size: int = 8,
    pairs_per_image: int = 8,
    sample: Callable[[torch.Tensor], torch.Tensor] | None = None,
    is_extracted: Callable[[torch.Tensor], torch.Tensor] | None = None,
    eval_images: int = 0,
    eval_seed: int = 0,
    generator: torch.Generator | None = None,
) -> DoriResult:
    """The DoRI attack: find an embedding that makes the frozen model denoise
    ``images`` best (:func:`embedding_search`), then sample with it and judge.

    ``images (n, C, H, W)``: the target (the memorized image, or every training
    image showing the concept). The search space:

    - ``"encoder_output"``: optimize the context ``c (L, d)`` itself (the paper's
      text embedding ``y_adv``);
    - ``"token_embeddings"``: optimize token embeddings ``e (L, d_tok)``,
      ``c = TextEncoder(e)`` (:class:`TokenEmbeddingEncoder`).

    Both need ``text_encoder`` (any ``CLIPTextModel``) and ``tokenizer``, except an
    ``"encoder_output"`` search given ``init``. Where the search starts (``init``, if
    given, overrides ``start``):

    - ``"prompt"`` (default): the encoding of ``prompt``, the *mitigated* prompt, the
      one the defended model is given (for a memorized image, its training caption;
      for an unlearned concept, a concept prompt). The paper attacks exactly this:
      "small perturbations to the text embeddings of previously mitigated prompts can
      re-trigger data replication" (arXiv:2507.16880 v2, abstract); its DoRI starts
      ``y_adv⁽⁰⁾`` at that prompt's embedding. ``prompt`` is required;
    - ``"null"``: the encoding of the empty prompt ``""``;
    - ``"gaussian"``: ``y⁽⁰⁾ ~ N(0, gaussian_std² I)``, drawn from ``generator``
      (before the search's own draws) with the shape of the prompt's encoding. The
      paper's random start is ``N(0, I)`` (its embedding-level locality experiment:
      DoRI from 100 random ``y_adv⁽⁰⁾ ~ N(0, I)`` per image), so ``gaussian_std``
      defaults to 1; in ``"token_embeddings"`` space pass a σ matched to the token
      table (CLIP's rows have std ≈ 0.01–0.02), not 1.

    In ``"token_embeddings"`` space the encoder runs on the input ids (and mask) of
    the prompt the start comes from: ``prompt`` for ``"prompt"``, ``""`` for
    ``"null"``, ``prompt`` (else ``""``) for ``"gaussian"`` and for ``init``; so the
    ``"prompt"`` and ``"null"`` starts encode to exactly those prompts' encodings.
    ``attention_mask`` is how a prompt is encoded (:meth:`TokenEmbeddingEncoder.from_prompt`:
    by default as diffusers' pipelines do).

    Paper defaults (DoRI method section): Adam, ``lr`` 0.1, 50 ``steps``, 8 noise and
    timestep pairs per step for the one memorized image (``pairs_per_image`` 8;
    ``batch_size`` images per step, 1 when ``n = 1``; :func:`embedding_search` states
    how ``n > 1`` is treated). The earlier gradproj settings are ``start="null",
    pairs_per_image=1`` (``batch_size`` 8). Given both ``sample``
    (``context (1, L, d) → images``, e.g. DDIM with guidance from fixed noise) and
    ``is_extracted`` (``images → bool (m,)``, e.g. a replication detector: SSCD
    similarity above a threshold in the paper, the mark detector in the demo), the
    result also holds the samples and ``extraction_rate = mean(is_extracted(samples))``.

    The minibatch losses (``result.losses``) swing with the random timesteps far
    more than the search moves them (on the demo the concept is a 4×4 stamp, 6%
    of the pixels). ``eval_images > 0`` also records ``result.eval_losses``: the
    loss of the first ``eval_images`` rows of ``images`` under one fixed noise
    and timestep draw (``eval_seed``), before the search and after every step
    (one extra forward pass per step).
    """
    if space not in SPACES:
        raise ValueError(f"space must be one of {SPACES}, got {space!r}")
    if start not in STARTS:
        raise ValueError(f"start must be one of {STARTS}, got {start!r}")
    if start == "gaussian" and init is None and not gaussian_std > 0:
        raise ValueError(f"gaussian_std must be > 0, got {gaussian_std}")
    if (sample is None) != (is_extracted is None):
        raise ValueError("sample and is_extracted must be given together (or neither)")
    needs_encoder = space == "token_embeddings" or init is None
    if needs_encoder and (text_encoder is None or tokenizer is None):
        if space == "token_embeddings":
            raise ValueError("space='token_embeddings' needs text_encoder and tokenizer")
        raise ValueError("space='encoder_output' needs init, or text_encoder and tokenizer")
    if start == "prompt" and init is None and prompt is None:
        raise ValueError(
            "start='prompt' needs prompt (the mitigated prompt, the one the defended model "
            "is given); or pass start='null', start='gaussian' or init"
        )
    source = "" if start == "null" and init is None else (prompt or "")
    encode: Callable[[torch.Tensor], torch.Tensor] | None = None
    first: torch.Tensor | None = None  # the source prompt, encoded; shapes init and the Gaussian
    if needs_encoder:
        prompt_encoder = TokenEmbeddingEncoder.from_prompt(
            text_encoder, tokenizer, source, attention_mask=attention_mask
        )
        if space == "token_embeddings":
            encode, first = prompt_encoder, prompt_encoder.init
        else:
            with torch.no_grad():
                first = prompt_encoder(prompt_encoder.init)[0]
    if init is not None:
        if space == "token_embeddings":
            start_emb = init
            if start_emb.shape != first.shape:
                raise ValueError(
                    f"init must be the token embeddings (L, d_tok) = {tuple(first.shape)}, "
                    f"got {tuple(start_emb.shape)}"
                )
        else:
            start_emb = init[0] if init.dim() == 3 and init.shape[0] == 1 else init
            if start_emb.dim() != 2:
                raise ValueError(
                    f"init must be a context (L, d) or (1, L, d), got {tuple(init.shape)}"
                )
    elif start == "gaussian":
        draw = torch.randn(first.shape, generator=generator, dtype=first.dtype)
        start_emb = (gaussian_std * draw).to(first.device)
    else:
        start_emb = first
    if eval_images < 0:
        raise ValueError(f"eval_images must be ≥ 0, got {eval_images}")
    eval_losses: list[float] = []
    callback = None
    if eval_images > 0:
        x_e = images[:eval_images]
        g_e = torch.Generator().manual_seed(eval_seed)
        eps_e = torch.randn(x_e.shape, generator=g_e).to(x_e)
        t_e = torch.randint(
            noise_scheduler.config.num_train_timesteps, (x_e.shape[0],), generator=g_e
        )
        t_e = t_e.to(x_e.device)
        noisy_e = noise_scheduler.add_noise(x_e, eps_e, t_e)

        def callback(_step: int, emb: torch.Tensor) -> None:
            with torch.no_grad():
                c = encode(emb) if encode is not None else emb
                c = c.expand(x_e.shape[0], *c.shape[-2:])
                pred = unet(noisy_e, t_e, encoder_hidden_states=c).sample
                eval_losses.append(torch.nn.functional.mse_loss(pred, eps_e).item())

        callback(-1, start_emb)
    losses: list[float] = []
    found = embedding_search(
        unet,
        noise_scheduler,
        images,
        start_emb,
        steps=steps,
        lr=lr,
        batch_size=batch_size,
        pairs_per_image=pairs_per_image,
        encode=encode,
        generator=generator,
        losses=losses,
        callback=callback,
    )
    with torch.no_grad():
        context = encode(found) if encode is not None else found[None]
    result = DoriResult(
        embedding=found,
        initial=start_emb.detach().clone(),
        context=context.detach(),
        space=space,
        losses=losses,
        eval_losses=eval_losses,
    )
    if sample is not None and is_extracted is not None:
        result.samples = sample(result.context)
        result.extracted = torch.as_tensor(is_extracted(result.samples)).bool().reshape(-1)
        result.extraction_rate = float(result.extracted.float().mean())
    return result
