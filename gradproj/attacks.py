"""Attacks that try to pull a concept back out of a trained diffusion model.

``embedding_search`` is the embedding-space adversary of "Finding Dori" (seed
003): it never changes the model; it optimizes a conditioning input so that
the model's own denoising loss on images that show the concept is as small as
possible, then one samples with what it found. If the model learned to draw
the concept from *any* direction it can read, the search finds that direction.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def embedding_search(
    unet: nn.Module,
    noise_scheduler,
    images: torch.Tensor,
    init: torch.Tensor,
    *,
    steps: int = 50,
    lr: float = 5e-2,
    batch_size: int = 32,
    encode: Callable[[torch.Tensor], torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Optimize an embedding ``e`` to minimize the diffusion loss on ``images``; return it.

    With ``x₀`` drawn from ``images (n, C, H, W)`` (what the model should be made
    to produce: the concept's training images), ``ε ~ N(0, I)`` and ``t`` uniform::

        e* = argmin_e  E ‖ ε_θ(√ᾱ_t x₀ + √(1 − ᾱ_t) ε, t, c(e)) − ε ‖²

    by ``steps`` Adam steps (learning rate ``lr``) from ``init``, the model frozen.
    ``c(e) = encode(e)`` when ``encode`` is given (e.g. token embeddings through a
    text encoder, as seed 003 searches), else ``c(e) = e``: the search runs
    directly in the space the cross-attention reads, ``init (L × d)`` — the
    strongest text-side adversary, since every prompt's encoding lies in it.

    ``unet(noisy, t, encoder_hidden_states=c).sample`` must predict ε (a diffusers
    ``UNet2DConditionModel``); ``noise_scheduler`` must offer ``add_noise`` and
    ``config.num_train_timesteps`` (``DDPMScheduler``). The model's parameters
    get no gradient (they are put back to their ``requires_grad`` afterwards).
    Returns ``e*`` detached, shaped like ``init``.
    """
    if images.dim() != 4:
        raise ValueError(f"images must be (n, C, H, W), got {tuple(images.shape)}")
    if steps < 0:
        raise ValueError(f"steps must be ≥ 0, got {steps}")
    emb = init.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([emb], lr=lr)
    frozen = [(p, p.requires_grad) for p in unet.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    n_t = noise_scheduler.config.num_train_timesteps
    try:
        for _ in range(steps):
            idx = torch.randint(
                images.shape[0], (min(batch_size, images.shape[0]),), generator=generator
            )
            x0 = images[idx]
            noise = torch.randn(x0.shape, generator=generator)
            t = torch.randint(n_t, (x0.shape[0],), generator=generator)
            noisy = noise_scheduler.add_noise(x0, noise, t)
            cond = encode(emb) if encode is not None else emb
            cond = cond.expand(x0.shape[0], *cond.shape[-2:])
            pred = unet(noisy, t, encoder_hidden_states=cond).sample
            loss = torch.nn.functional.mse_loss(pred, noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)
    return emb.detach()
