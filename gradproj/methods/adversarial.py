"""Adversarial fine-tuning (the defense of seed 003, "Finding Dori").

DoRI (:func:`gradproj.methods.attacks.embedding_search`) shows that suppressing one
prompt leaves other embeddings that still retrieve a memorized concept, so the
defense trains against the attack itself. Each round:

1. **attack** the *current* model: ``c* = embedding_search(θ, concept_images, init)``,
   the embedding under which ``θ`` denoises the concept's images best;
2. **remove** what it found: ``finetune_steps`` optimizer steps on

   ``L = L_remove + λ·L_retain`` with
   ``L_remove = E ‖ε_θ(x_t(s), t, c) − ε‖²`` over surrogate images ``s`` read with
   every trigger found so far (and the concept's own prompts, when given), and
   ``L_retain = E ‖ε_θ(x_t(r), t, c_r) − ε‖²`` over ordinary data ``(r, c_r)``

   (``x_t(x) = √ᾱ_t x + √(1−ᾱ_t) ε``, ``λ = retain_weight``): the triggers are
   made to produce the surrogates, a harmless stand-in for the concept's
   images, instead of the concept, while the retain loss holds the model's
   other behaviour in place.

**The paper vs here.** The paper (Kowalczuk et al. 2025, Sec. "adversarial
fine-tuning") alternates DoRI searches for the memorized images' triggers with
updates of *all* UNet parameters that map those triggers (and the memorized
prompts) to *surrogate* images instead of the memorized ones, and uses
non-memorized data so utility is kept; its target is a handful of memorized
LAION images in Stable Diffusion, one trigger per image. What is done here:

- the target is a *concept* (the demo's mark) over many images, so one trigger
  per round is searched over all of them (the demo's evaluation attack does the
  same), from a fixed start, exactly as the evaluation's attacker will. The inner
  search is the paper's DoRI (its inner loop runs DoRI, 50 steps, for each memorized
  image), so its defaults are the attack's: Adam lr 0.1, 50 steps, 8 noise/timestep
  pairs a step per image (:func:`gradproj.methods.attacks.embedding_search`); the
  start is the caller's ``attack_init`` (the lab: the same concept prompt the
  evaluation's DoRI starts from, :func:`gradproj.lab.measure.attack_init`);
- triggers of earlier rounds stay in the removal set (a trigger bank), so a
  later round cannot bring an earlier trigger back;
- the surrogates are given, not generated: in the demo each marked training
  image's surrogate is its unmarked twin (same shape, colour, background and
  jitter; the stamp pixels set to the background), so "remove" means exactly
  "draw this image without the mark";
- utility is kept by an explicit retain loss (the plain diffusion loss on
  ordinary captioned data, with the null caption mixed in so the
  unconditional branch used by classifier-free guidance stays trained);
- the tuned parameters are selectable (default all, as in the paper).
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import torch
from torch import nn

from gradproj.methods.attacks import embedding_search
from gradproj.methods.unlearn import diffusion_loss


def _check_images(name: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty (n, C, H, W) tensor, got {_shape(x)}")


def _shape(x) -> object:
    return tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__


def _tuned_params(unet: nn.Module, params: str | Iterable[torch.Tensor]) -> list[torch.Tensor]:
    if isinstance(params, str):
        from gradproj.methods.unlearn import unlearning_params

        return unlearning_params(unet, params)
    chosen = list(params)
    own = {id(p) for p in unet.parameters()}
    if not chosen or any(id(p) not in own for p in chosen):
        raise ValueError("params must be a non-empty set of the unet's own parameters")
    return chosen


def adversarial_finetune(
    unet: nn.Module,
    noise_scheduler,
    *,
    concept_images: torch.Tensor,
    surrogate_images: torch.Tensor,
    retain_images: torch.Tensor,
    retain_contexts: torch.Tensor,
    attack_init: torch.Tensor,
    concept_contexts: torch.Tensor | None = None,
    rounds: int = 4,
    attack_steps: int = 50,
    attack_lr: float = 0.1,
    attack_batch: int = 8,
    attack_pairs_per_image: int = 8,
    finetune_steps: int = 25,
    lr: float = 1e-3,
    batch_size: int = 16,
    retain_weight: float = 1.0,
    params: str | Iterable[torch.Tensor] = "all",
    generator: torch.Generator | None = None,
) -> list[dict[str, float]]:
    """Alternate DoRI and a removal fine-tuning, in place; return one log row per round.

    ``concept_images (n, C, H, W)``: what must not come back (the attack's
    target); ``surrogate_images`` (same shape): row ``i`` is what ``concept_images[i]``
    should become (the triggers and ``concept_contexts[i]`` are trained toward
    them); ``concept_contexts (n, L, d)`` (optional): the concept's own prompts,
    so the prompt itself is also removed; ``retain_images (m, C, H, W)`` with
    ``retain_contexts (m, L, d)``: ordinary data whose diffusion loss is kept;
    ``attack_init (L, d)``: where every round's search starts.

    Each round: ``attack_steps`` of :func:`gradproj.methods.attacks.embedding_search`
    (``attack_lr``; ``attack_batch`` images a step, ``attack_pairs_per_image`` noise and
    timestep pairs each; paper defaults, those of its DoRI attack) on the current model, then
    ``finetune_steps`` Adam steps (``lr``) on ``params`` (``"all"``,
    ``"cross-attention"``, ``"cross-attention-kv"`` as in
    :func:`gradproj.methods.unlearn.unlearning_params`, or an iterable of the unet's
    parameters) of ``L_remove + retain_weight · L_retain`` (module docstring),
    each step on ``batch_size`` surrogate rows read with triggers from the bank,
    ``batch_size`` more read with their concept prompts (if given) and
    ``batch_size`` retain rows. ``requires_grad`` of every parameter is restored
    afterwards. Log row: ``round``, ``attack_loss_start`` / ``attack_loss_end``
    (mean minibatch loss of the search's first / last 5 steps),
    ``removal_loss`` / ``retain_loss`` (means over the round's fine-tuning
    steps) and ``seconds``.
    """
    _check_images("concept_images", concept_images)
    _check_images("surrogate_images", surrogate_images)
    _check_images("retain_images", retain_images)
    if surrogate_images.shape != concept_images.shape:
        raise ValueError(
            f"surrogate_images must have concept_images' shape {tuple(concept_images.shape)}, "
            f"got {tuple(surrogate_images.shape)}"
        )
    if retain_contexts.dim() != 3 or retain_contexts.shape[0] != retain_images.shape[0]:
        raise ValueError(
            f"retain_contexts must be (m, L, d) with m = retain_images.shape[0] = "
            f"{retain_images.shape[0]}, got {_shape(retain_contexts)}"
        )
    context_shape = tuple(retain_contexts.shape[1:])
    if attack_init.dim() == 3 and attack_init.shape[0] == 1:
        attack_init = attack_init[0]
    if tuple(attack_init.shape) != context_shape:
        raise ValueError(f"attack_init must be (L, d) = {context_shape}, got {_shape(attack_init)}")
    if concept_contexts is not None and (
        concept_contexts.dim() != 3
        or concept_contexts.shape[0] != concept_images.shape[0]
        or tuple(concept_contexts.shape[1:]) != context_shape
    ):
        raise ValueError(
            f"concept_contexts must be (n, L, d) = ({concept_images.shape[0]}, "
            f"{', '.join(map(str, context_shape))}), got {_shape(concept_contexts)}"
        )
    for name, value in (("rounds", rounds), ("attack_steps", attack_steps)):
        if value < 1:
            raise ValueError(f"{name} must be ≥ 1, got {value}")
    if finetune_steps < 0:
        raise ValueError(f"finetune_steps must be ≥ 0, got {finetune_steps}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    if not lr > 0 or retain_weight < 0:
        raise ValueError(f"lr must be > 0 and retain_weight ≥ 0, got {lr} and {retain_weight}")

    tuned = _tuned_params(unet, params)
    was = [(p, p.requires_grad) for p in unet.parameters()]
    opt = torch.optim.Adam(tuned, lr=lr)
    device = concept_images.device
    triggers: list[torch.Tensor] = []
    log: list[dict[str, float]] = []

    def rows(n: int) -> torch.Tensor:
        return torch.randint(n, (batch_size,), generator=generator).to(device)

    try:
        for r in range(rounds):
            started = time.perf_counter()
            # 1. the attack, on the current model (embedding_search freezes it).
            losses: list[float] = []
            triggers.append(
                embedding_search(
                    unet,
                    noise_scheduler,
                    concept_images,
                    attack_init,
                    steps=attack_steps,
                    lr=attack_lr,
                    batch_size=attack_batch,
                    pairs_per_image=attack_pairs_per_image,
                    generator=generator,
                    losses=losses,
                )
            )
            bank = torch.stack(triggers)  # (k, L, d)
            # 2. remove what it found, keep the rest.
            unet.requires_grad_(False)
            for p in tuned:
                p.requires_grad_(True)
            removal, retain = [], []
            for _ in range(finetune_steps):
                i = rows(surrogate_images.shape[0])
                x, ctx = surrogate_images[i], bank[rows(bank.shape[0])]
                if concept_contexts is not None:
                    j = rows(surrogate_images.shape[0])
                    x = torch.cat([x, surrogate_images[j]])
                    ctx = torch.cat([ctx, concept_contexts[j]])
                loss_remove = diffusion_loss(unet, noise_scheduler, x, ctx, generator=generator)
                k = rows(retain_images.shape[0])
                loss_retain = diffusion_loss(
                    unet, noise_scheduler, retain_images[k], retain_contexts[k], generator=generator
                )
                opt.zero_grad(set_to_none=True)
                (loss_remove + retain_weight * loss_retain).backward()
                opt.step()
                removal.append(loss_remove.detach().item())
                retain.append(loss_retain.detach().item())
            for p, flag in was:
                p.requires_grad_(flag)
            head, tail = losses[:5], losses[-5:]
            log.append(
                {
                    "round": float(r),
                    "attack_loss_start": sum(head) / len(head),
                    "attack_loss_end": sum(tail) / len(tail),
                    "removal_loss": sum(removal) / max(len(removal), 1),
                    "retain_loss": sum(retain) / max(len(retain), 1),
                    "seconds": time.perf_counter() - started,
                }
            )
    finally:
        for p, flag in was:
            p.requires_grad_(flag)
        for p in tuned:
            p.grad = None
    return log
