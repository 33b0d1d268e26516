"""Attacks that try to pull a concept back out of a trained diffusion model.

DoRI ("Finding Dori", seed 003: Kowalczuk, Hintersdorf, Struppek et al. 2025)
never changes the model: it optimizes a conditioning input so that the model's
own denoising loss on images that show the concept is as small as possible,
then one samples with what it found. If the model learned to draw the concept
from *any* direction it can read, the search finds that direction.

- :func:`embedding_search` is the one implementation of the search (the demo's
  evaluation, :func:`dori_attack` and :func:`gradproj.methods.adversarial.adversarial_finetune`
  all call it);
- :func:`dori_attack` wraps it with the paper's defaults (Adam, lr 0.1, batch 8,
  50 steps), a choice of search space (the encoder output the cross-attention
  reads, or the prompt's token embeddings run through the text encoder), and
  the measurement: sample with the found embedding and report the share of
  samples a judge calls extracted;
- :class:`TokenEmbeddingEncoder` makes the token-embedding space searchable on
  any ``transformers`` ``CLIPTextModel``.

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


def embedding_search(
    unet: nn.Module,
    noise_scheduler,
    images: torch.Tensor,
    init: torch.Tensor,
    *,
    steps: int = 50,
    lr: float = 0.1,
    batch_size: int = 8,
    encode: Callable[[torch.Tensor], torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
    losses: list[float] | None = None,
    callback: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Optimize an embedding ``e`` to minimize the diffusion loss on ``images``; return it.

    With ``x₀`` drawn from ``images (n, C, H, W)`` (what the model should be made
    to produce: the concept's training images), ``ε ~ N(0, I)`` and ``t`` uniform::

        e* = argmin_e  E ‖ε_θ(√ᾱ_t x₀ + √(1 − ᾱ_t) ε, t, c(e)) − ε‖²

    by ``steps`` Adam steps (learning rate ``lr``, a fresh minibatch of
    ``batch_size`` images, noises and timesteps each step) from ``init``, the
    model frozen. The defaults are the paper's (Adam, lr 0.1, batch 8, 50 steps).
    ``c(e) = encode(e)`` when ``encode`` is given (e.g. a
    :class:`TokenEmbeddingEncoder`: token embeddings through the text encoder),
    else ``c(e) = e``: the search runs directly in the space the cross-attention
    reads, ``init (L × d)`` — the strongest text-side adversary, since every
    prompt's encoding lies in it.

    ``unet(noisy, t, encoder_hidden_states=c).sample`` must predict ε (a diffusers
    ``UNet2DConditionModel``); ``noise_scheduler`` must offer ``add_noise`` and
    ``config.num_train_timesteps`` (``DDPMScheduler``). Indices, noise and
    timesteps are drawn from ``generator`` on the CPU and moved to ``images``'
    device, so a run is reproducible on any device. The model's parameters (and
    those of ``encode`` if it is an ``nn.Module``) get no gradient; their
    ``requires_grad`` flags are put back afterwards. If ``losses`` is a list, the
    minibatch loss of every step (before that step's update) is appended to it;
    ``callback(step, e)`` is called after every update (``e`` the live tensor:
    read it under ``torch.no_grad()``, do not modify it). Returns ``e*`` detached,
    shaped like ``init``.
    """
    if images.dim() != 4:
        raise ValueError(f"images must be (n, C, H, W), got {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise ValueError("images must hold at least one image, got 0")
    if steps < 0:
        raise ValueError(f"steps must be ≥ 0, got {steps}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
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
            x0 = images[idx.to(device)]
            noise = torch.randn(x0.shape, generator=generator).to(x0)
            t = torch.randint(n_t, (x0.shape[0],), generator=generator).to(device)
            noisy = noise_scheduler.add_noise(x0, noise, t)
            cond = encode(emb) if encode is not None else emb
            cond = cond.expand(x0.shape[0], *cond.shape[-2:])
            pred = unet(noisy, t, encoder_hidden_states=cond).sample
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
    token embeddings); ``context (1, L, d)``: what the cross-attention reads;
    ``losses``: the minibatch diffusion loss of every step; ``eval_losses``: the
    loss on one fixed draw (images, noise, timesteps), at the start and after
    every step (empty unless ``eval_images`` was given), a paired, low-variance
    trace of the same objective; ``samples`` and
    ``extraction_rate`` (share of samples the judge calls extracted): ``None``
    unless a sampler and judge were given.
    """

    embedding: torch.Tensor
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
    init: torch.Tensor | None = None,
    space: str = "encoder_output",
    text_encoder: nn.Module | None = None,
    tokenizer=None,
    prompt: str = "",
    attention_mask: bool | None = None,
    steps: int = 50,
    lr: float = 0.1,
    batch_size: int = 8,
    sample: Callable[[torch.Tensor], torch.Tensor] | None = None,
    is_extracted: Callable[[torch.Tensor], torch.Tensor] | None = None,
    eval_images: int = 0,
    eval_seed: int = 0,
    generator: torch.Generator | None = None,
) -> DoriResult:
    """The DoRI attack: find an embedding that makes the frozen model denoise
    ``images`` best (:func:`embedding_search`), then sample with it and judge.

    ``images (n, C, H, W)``: the target (the memorized images, or every training
    image showing the concept). The search space:

    - ``"encoder_output"``: optimize the context ``c (L, d)`` itself, starting
      from ``init`` or, when ``init`` is ``None``, from the encoding of
      ``prompt`` by ``text_encoder``/``tokenizer`` (``""``: the null prompt);
    - ``"token_embeddings"``: optimize the prompt's token embeddings ``e (L, d_tok)``
      (``init`` overrides the start), ``c = TextEncoder(e)``; needs
      ``text_encoder`` (any ``CLIPTextModel``) and ``tokenizer``.

    ``attention_mask`` is how ``prompt`` is encoded (:meth:`TokenEmbeddingEncoder.from_prompt`:
    by default as diffusers' pipelines do).

    Paper defaults: Adam, ``lr`` 0.1, ``batch_size`` 8, ``steps`` 50. Given both
    ``sample`` (``context (1, L, d) → images``, e.g. DDIM with guidance from fixed
    noise) and ``is_extracted`` (``images → bool (m,)``, e.g. a replication
    detector: SSCD similarity above a threshold in the paper, the mark detector
    in the demo), the result also holds the samples and
    ``extraction_rate = mean(is_extracted(samples))``.

    The minibatch losses (``result.losses``) swing with the random timesteps far
    more than the search moves them (on the demo the concept is a 4×4 stamp, 6%
    of the pixels). ``eval_images > 0`` also records ``result.eval_losses``: the
    loss of the first ``eval_images`` rows of ``images`` under one fixed noise
    and timestep draw (``eval_seed``), before the search and after every step
    (one extra forward pass per step).
    """
    if space not in SPACES:
        raise ValueError(f"space must be one of {SPACES}, got {space!r}")
    if (sample is None) != (is_extracted is None):
        raise ValueError("sample and is_extracted must be given together (or neither)")
    encode: Callable[[torch.Tensor], torch.Tensor] | None = None
    if space == "token_embeddings":
        if text_encoder is None or tokenizer is None:
            raise ValueError("space='token_embeddings' needs text_encoder and tokenizer")
        encode = TokenEmbeddingEncoder.from_prompt(
            text_encoder, tokenizer, prompt, attention_mask=attention_mask
        )
        start = encode.init if init is None else init
        if start.shape != encode.init.shape:
            raise ValueError(
                f"init must be the token embeddings (L, d_tok) = {tuple(encode.init.shape)}, "
                f"got {tuple(start.shape)}"
            )
    elif init is not None:
        start = init[0] if init.dim() == 3 and init.shape[0] == 1 else init
        if start.dim() != 2:
            raise ValueError(f"init must be a context (L, d) or (1, L, d), got {tuple(init.shape)}")
    else:
        if text_encoder is None or tokenizer is None:
            raise ValueError("space='encoder_output' needs init, or text_encoder and tokenizer")
        prompt_encoder = TokenEmbeddingEncoder.from_prompt(
            text_encoder, tokenizer, prompt, attention_mask=attention_mask
        )
        with torch.no_grad():
            start = prompt_encoder(prompt_encoder.init)[0]
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

        callback(-1, start)
    losses: list[float] = []
    found = embedding_search(
        unet,
        noise_scheduler,
        images,
        start,
        steps=steps,
        lr=lr,
        batch_size=batch_size,
        encode=encode,
        generator=generator,
        losses=losses,
        callback=callback,
    )
    with torch.no_grad():
        context = encode(found) if encode is not None else found[None]
    result = DoriResult(
        embedding=found,
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
