"""DoCo's concept domain correction: a PatchGAN critic on the predicted clean sample.

DoCo (Wu et al., AAAI 2025; code: yongliang-wu/DoCo) unlearns a concept by making
the tuned model's predicted clean sample for the *concept* prompt indistinguishable,
for a discriminator ``D``, from what the frozen model predicts for the *anchor*
prompt on the same noisy input. With ``x_t = √ᾱ_t x₀ + √(1−ᾱ_t) ε`` and the
ε-prediction turned into ``x̂₀ = (x_t − √(1−ᾱ_t) ε̂)/√ᾱ_t``::

    x̂_c = x̂₀(ε_θ(x_t, t, c_concept))          (tuned model, with gradient)
    x̂_a = x̂₀(ε_θ₀(x_t, t, c_anchor))          (frozen copy, no gradient)
    L_D = BCE(D(sg(x̂_c)), 1) + BCE(D(x̂_a), 0)   (the critic: concept 1, anchor 0)
    L_G = BCE(D(x̂_c), 0)                       (the model: look like the anchor)

(``train.py:1212-1221`` for ``x̂₀``, ``train.py:1240-1241`` for ``L_G``,
``train.py:1259-1265`` for ``L_D``; BCE on logits, averaged over ``D``'s patch
grid.) :func:`gradproj.methods.unlearn.unlearn_concept` runs the loop.
"""

from __future__ import annotations

import torch


class PatchGANDiscriminator(torch.nn.Module):
    """DoCo's critic (``DoCo/gan.py:13-35``): ``blocks`` stride-2 convolutions, then one to a logit.

    Block ``k`` is ``Conv2d(4×4, stride 2, padding 1)`` to ``width·2ᵏ`` channels,
    ``BatchNorm2d`` (every block but the first), ``LeakyReLU(0.2)``; the head is
    ``Conv2d(4×4, stride 1, padding 1)`` to one channel: one logit per patch.
    DoCo's defaults (``blocks=4``, ``width=64``: 64-128-256-512 channels) read
    SD's 4-channel 64×64 latents as a 3×3 grid of patch logits. Each block halves
    the side (``n → ⌊n/2⌋``) and the head takes one off, so an ``n``-px input needs
    ``n/2^blocks ≥ 2``; :meth:`blocks_for` picks the count that leaves DoCo's 4×4
    map before the head.
    """

    def __init__(self, in_channels: int = 4, blocks: int = 4, width: int = 64) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("blocks", blocks), ("width", width)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int ≥ 1, got {value!r}")
        layers: list[torch.nn.Module] = []
        channels = in_channels
        for k in range(blocks):
            out = width * 2**k
            layers.append(torch.nn.Conv2d(channels, out, 4, stride=2, padding=1))
            if k > 0:
                layers.append(torch.nn.BatchNorm2d(out))
            layers.append(torch.nn.LeakyReLU(0.2))
            channels = out
        layers.append(torch.nn.Conv2d(channels, 1, 4, padding=1))
        self.model = torch.nn.Sequential(*layers)

    @staticmethod
    def blocks_for(size: int, most: int = 4) -> int:
        """The number of blocks (at most ``most``, DoCo's 4) that leaves a map of side ≥ 4.

        64 → 4 blocks (DoCo's latents: 4×4 map, 3×3 logits); the lab's 16-px images
        → 2 blocks, the same 3×3 grid of logits (4 blocks would shrink 16 px to 1 px
        before the head, which then has nothing to convolve).
        """
        if size < 8:
            raise ValueError(f"the discriminator needs images of side ≥ 8, got {size}")
        blocks = 0
        while blocks < most and size // 2 ** (blocks + 1) >= 4:
            blocks += 1
        return max(blocks, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(n, C, H, W) → (n, 1, H', W')`` patch logits."""
        return self.model(x)


def predicted_x0(
    noise_scheduler, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
) -> torch.Tensor:
    """The scheduler's predicted clean sample, per row's own timestep ``t``.

    ``ε``-prediction: ``x̂₀ = (x_t − √(1−ᾱ_t) ε̂)/√ᾱ_t``; ``v``: ``√ᾱ_t x_t − √(1−ᾱ_t) v̂``;
    ``sample``: the output itself. Clamped to ``±clip_sample_range`` when the
    scheduler's config sets ``clip_sample``, as DoCo's batched DDPM step does
    (``DoCo/scheduling_ddpm.py:394-405``): SD's scheduler config does not, the
    lab's ``DDPMScheduler`` does (its ``x̂₀`` at ``t`` near 1000 would otherwise
    be ``x_t`` scaled by up to ``1/√ᾱ ≈ 2·10⁴``).
    """
    kind = noise_scheduler.config.prediction_type
    a = noise_scheduler.alphas_cumprod.to(device=x_t.device, dtype=x_t.dtype)[t]
    a = a.view(-1, *([1] * (x_t.dim() - 1)))
    if kind == "epsilon":
        x0 = (x_t - (1 - a).sqrt() * model_output) / a.sqrt()
    elif kind == "v_prediction":
        x0 = a.sqrt() * x_t - (1 - a).sqrt() * model_output
    elif kind == "sample":
        x0 = model_output
    else:
        raise ValueError(f"the scheduler's prediction_type {kind!r} is not supported")
    if noise_scheduler.config.clip_sample:
        limit = noise_scheduler.config.clip_sample_range
        x0 = x0.clamp(-limit, limit)
    return x0


def concept_anchor_x0(
    unet: torch.nn.Module,
    teacher: torch.nn.Module,
    noise_scheduler,
    x_t: torch.Tensor,
    t: torch.Tensor,
    concept_context: torch.Tensor,
    anchor_context: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x̂_c, x̂_a)``: the tuned model's ``x̂₀`` for the concept prompt, the frozen
    model's for the anchor prompt.

    Both on the same noisy ``x_t (n, C, H, W)`` and timesteps ``t (n,)``, as DoCo
    reads its shadow UNet (``train.py:1168-1176``); ``x̂_a`` carries no gradient,
    ``x̂_c`` does when grad mode is on.
    """
    with torch.no_grad():
        eps_a = teacher(x_t, t, encoder_hidden_states=anchor_context).sample
        anchor = predicted_x0(noise_scheduler, eps_a, x_t, t)
    eps_c = unet(x_t, t, encoder_hidden_states=concept_context).sample
    return predicted_x0(noise_scheduler, eps_c, x_t, t), anchor


def generator_loss(discriminator: torch.nn.Module, concept_x0: torch.Tensor) -> torch.Tensor:
    """``L_G = BCE(D(x̂_c), 0)``: the concept's ``x̂₀`` pushed to where ``D`` puts the anchor's.

    (``train.py:1240-1241``.) Gradients reach ``D``'s parameters too when they
    require grad; :func:`~gradproj.methods.unlearn.unlearn_concept` freezes ``D``
    for this loss.
    """
    logits = discriminator(concept_x0)
    return torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits))


def discriminator_loss(
    discriminator: torch.nn.Module, concept_x0: torch.Tensor, anchor_x0: torch.Tensor
) -> torch.Tensor:
    """``L_D = BCE(D(sg(x̂_c)), 1) + BCE(D(x̂_a), 0)`` (``train.py:1259-1265``).

    Two separate calls of ``D``, as DoCo's, so each half has its own BatchNorm
    batch statistics.
    """
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    real = discriminator(anchor_x0.detach())
    fake = discriminator(concept_x0.detach())
    return bce(fake, torch.ones_like(fake)) + bce(real, torch.zeros_like(real))
