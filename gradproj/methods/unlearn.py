"""Training-loop integration of the gradient surgery (seed 001, DoCo).

DoCo unlearns a concept with one loss while a second loss retains related
concepts; per parameter tensor, the part of the unlearning gradient that
conflicts with the retain gradient is removed before the optimizer steps.
DoCo's own step (``DoCo/gradient_clip.py:3-35``, called at ``train.py:1250-1251``)::

    g_r ← clip(∇L_retain),  g_u ← clip(∇L_unlearn)   (each to global norm 1 over the tuned tensors)
    g_u ← g_u − λ cos(g_u, g_r) ĝ_r                   (per tensor, only where cos < 0; λ = 1)
    p.grad = g_u                                       (g_r only sets the direction)

:func:`surgery_backward` does that (``max_grad_norm=1``, ``variant="cosine"``,
``retain_weight=0``) and the additive form ``g_u' + retain_weight·g_r`` the
earlier versions of this module used, for any optimizer, including
``ProjectedOptimizer`` and ``ProjectedAdamW`` (which then also project the
update), and adds no host synchronization: the per-tensor conflict test and the
clipping run on the device. :func:`unlearn_concept` is the whole recipe, with
DoCo's adversarial objective (:mod:`gradproj.methods.domain_correction`) or the
concept-ablation one.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from gradproj.methods.domain_correction import (
    PatchGANDiscriminator,
    concept_anchor_x0,
    discriminator_loss,
    generator_loss,
)
from gradproj.ops import surgery_


def _noised(noise_scheduler, x0: torch.Tensor, generator: torch.Generator | None):
    """``(x_t, ε, t)``: ``ε ~ N(0, I)`` and ``t`` uniform, drawn on the CPU from ``generator``."""
    noise = torch.randn(x0.shape, generator=generator).to(x0)
    steps = noise_scheduler.config.num_train_timesteps
    t = torch.randint(steps, (x0.shape[0],), generator=generator).to(x0.device)
    return noise_scheduler.add_noise(x0, noise, t), noise, t


def diffusion_loss(
    unet: torch.nn.Module,
    noise_scheduler,
    x0: torch.Tensor,
    context: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The ε-prediction loss ``E ‖ε_θ(√ᾱ_t x₀ + √(1−ᾱ_t) ε, t, c) − ε‖²`` on one batch.

    ``x0 (n, C, H, W)``, ``context (n, L, d)`` (or ``(1, L, d)``, broadcast); ``t``
    uniform over the scheduler's training steps, ``ε ~ N(0, I)``, both drawn from
    ``generator`` on the CPU (so a run is reproducible on any device).
    """
    if x0.dim() != 4:
        raise ValueError(f"x0 must be (n, C, H, W), got {tuple(x0.shape)}")
    if context.dim() != 3 or context.shape[0] not in (1, x0.shape[0]):
        raise ValueError(
            f"context must be (n, L, d) or (1, L, d) with n = {x0.shape[0]}, "
            f"got {tuple(context.shape)}"
        )
    noisy, noise, t = _noised(noise_scheduler, x0, generator)
    n = x0.shape[0]
    pred = unet(noisy, t, encoder_hidden_states=context.expand(n, *context.shape[1:])).sample
    return torch.nn.functional.mse_loss(pred, noise)


def _clip_to_global_norm_(grads: list[torch.Tensor], max_norm: float) -> None:
    """``clip_grad_norm_`` on bare gradients: all scaled by ``min(1, max_norm/(‖g‖ + 1e-6))``.

    ``‖g‖`` is the norm of all of them together (DoCo clips through
    ``accelerator.clip_grad_norm_``, ``train.py:1225-1236``); the factor stays on
    the device.
    """
    total = torch.nn.utils.get_total_norm(grads)
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.to(g.dtype))


def surgery_backward(
    loss_unlearn: torch.Tensor,
    loss_retain: torch.Tensor,
    params: Iterable[torch.Tensor],
    *,
    strength: float = 1.0,
    variant: str = "projection",
    retain_weight: float = 1.0,
    max_grad_norm: float | None = None,
    retain_graph: bool = False,
    backend: str | None = None,
) -> None:
    """Accumulate ``g_u' + retain_weight·g_r`` into ``p.grad`` for every parameter in ``params``.

    ``g_u = ∂loss_unlearn/∂p`` and ``g_r = ∂loss_retain/∂p`` come from
    ``torch.autograd.grad``; with ``max_grad_norm`` each is first scaled to at
    most that global norm over ``params`` (separately, as DoCo's ``norm_grad``
    after each backward, ``DoCo/gradient_clip.py:8-17``); ``g_u'`` is ``g_u``
    after :func:`gradproj.surgery_` with ``strength``/``variant`` (per tensor,
    only where ``g_u·g_r < 0``). ``retain_weight=0`` steps on ``g_u'`` alone:
    DoCo's step is ``variant="cosine", retain_weight=0, max_grad_norm=1``.
    Parameters that one loss does not reach get a zero gradient from it (they
    cannot conflict). Like ``loss.backward()``, the result is added to an
    existing ``p.grad`` (gradient accumulation works), and the graphs are freed
    unless ``retain_graph``.
    """
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("params holds no tensor that requires grad")
    for name, loss in (("loss_unlearn", loss_unlearn), ("loss_retain", loss_retain)):
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ValueError(f"{name} must be a scalar tensor, got {getattr(loss, 'shape', loss)}")
    if max_grad_norm is not None and not max_grad_norm > 0:
        raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm}")
    # Both graphs may share the forward pass of one model, so the first
    # backward must keep it for the second.
    g_u = torch.autograd.grad(loss_unlearn, params, retain_graph=True, allow_unused=True)
    g_r = torch.autograd.grad(loss_retain, params, retain_graph=retain_graph, allow_unused=True)
    g_u = [torch.zeros_like(p) if g is None else g for p, g in zip(params, g_u, strict=True)]
    g_r = [torch.zeros_like(p) if g is None else g for p, g in zip(params, g_r, strict=True)]
    if max_grad_norm is not None:
        _clip_to_global_norm_(g_u, max_grad_norm)
        _clip_to_global_norm_(g_r, max_grad_norm)
    surgery_(g_u, g_r, strength=strength, variant=variant, backend=backend)
    with torch.no_grad():
        for p, u, r in zip(params, g_u, g_r, strict=True):
            total = u.add_(r, alpha=retain_weight) if retain_weight else u
            if p.grad is None:
                p.grad = total
            else:
                p.grad.add_(total)


PARAM_SETS = ("cross-attention-kv", "cross-attention", "all")


def unlearning_params(unet: torch.nn.Module, which: str = "cross-attention-kv") -> list:
    """The parameters an unlearning run tunes.

    ``"cross-attention-kv"`` (default): every ``attn2.to_k`` / ``attn2.to_v`` weight,
    the only layers that read the text (as in concept ablation's "kv" mode and the
    layers :func:`gradproj.diffusers.protect` guards); ``"cross-attention"``: every
    parameter of the ``attn2`` modules; ``"all"``: the whole model.
    """
    if which not in PARAM_SETS:
        raise ValueError(f"params must be one of {PARAM_SETS}, got {which!r}")
    named = list(unet.named_parameters())
    if which == "all":
        return [p for _, p in named]
    if which == "cross-attention":
        chosen = [p for n, p in named if ".attn2." in n]
    else:
        chosen = [p for n, p in named if ".attn2.to_k." in n or ".attn2.to_v." in n]
    if not chosen:
        raise ValueError(f"the model has no cross-attention (attn2) parameters for {which!r}")
    return chosen


def ablation_loss(
    unet: torch.nn.Module,
    teacher: torch.nn.Module,
    noise_scheduler,
    x0: torch.Tensor,
    concept_context: torch.Tensor,
    anchor_context: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The concept-ablation loss: make the concept prompt predict what the anchor prompt did.

    ``E ‖ε_θ(x_t, t, c_concept) − sg(ε_θ₀(x_t, t, c_anchor))‖²`` with
    ``x_t = √ᾱ_t x₀ + √(1−ᾱ_t) ε`` and ``θ₀`` the frozen ``teacher`` (the model
    before unlearning). Its minimum maps the concept prompt's whole denoising
    trajectory, hence its output distribution, onto the anchor's: the target
    DoCo's adversarial domain correction aims at, given pointwise instead of
    through a learned critic (Kumari et al. 2023, model-based variant).
    """
    noisy, _, t = _noised(noise_scheduler, x0, generator)
    with torch.no_grad():
        target = teacher(noisy, t, encoder_hidden_states=anchor_context).sample
    pred = unet(noisy, t, encoder_hidden_states=concept_context).sample
    return torch.nn.functional.mse_loss(pred, target)


def preservation_loss(
    unet: torch.nn.Module,
    teacher: torch.nn.Module,
    noise_scheduler,
    x0: torch.Tensor,
    context: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``E ‖ε_θ(x_t, t, c) − sg(ε_θ₀(x_t, t, c))‖²``: keep what the model did for ``c``.

    The retain loss of :func:`unlearn_concept` by default. Unlike the diffusion
    loss (which keeps *training* the model, and on a model that is not converged
    moves every prediction, the concept's included, far more than the unlearning
    loss does: measured, the ablation loss rose 7× during 120 steps), it is zero
    at the start and only pulls back what the unlearning disturbs.
    """
    return ablation_loss(unet, teacher, noise_scheduler, x0, context, context, generator=generator)


OBJECTIVES = ("adversarial", "ablation")
STEPS = ("doco", "additive")
# gradproj's recipe before issue 16: ``unlearn_concept(..., **PREVIOUS_RECIPE)`` reproduces
# its runs bit for bit (tests/test_unlearn.py).
PREVIOUS_RECIPE: dict = {
    "objective": "ablation",
    "step": "additive",
    "variant": "projection",
    "max_grad_norm": None,
    "retain_weight": 1.0,
    "retain_loss": "preserve",
    "weight_decay": 0.0,
}


def unlearn_concept(
    unet: torch.nn.Module,
    noise_scheduler,
    *,
    images: torch.Tensor,
    concept_contexts: torch.Tensor,
    anchor_contexts: torch.Tensor,
    retain_images: torch.Tensor,
    retain_contexts: torch.Tensor,
    steps: int = 100,
    lr: float = 1e-3,
    batch_size: int = 32,
    objective: str = "adversarial",
    warmup_steps: int | None = None,
    disc_lr: float = 1e-4,
    disc_betas: tuple[float, float] = (0.5, 0.999),
    disc_blocks: int | None = None,
    discriminator: torch.nn.Module | None = None,
    surgery: bool = True,
    step: str = "doco",
    strength: float = 1.0,
    variant: str = "cosine",
    max_grad_norm: float | None = 1.0,
    retain_weight: float = 0.1,
    retain_loss: str = "diffusion",
    weight_decay: float = 1e-2,
    params: str = "cross-attention-kv",
    generator: torch.Generator | None = None,
    backend: str | None = None,
) -> list[dict[str, float]]:
    """Unlearn a concept from a trained model, in place; return the per-step losses.

    The recipe of seed 001, DoCo as its authors ran it by default (``train.py``
    and the README's commands of yongliang-wu/DoCo); ``images`` ``(n, C, H, W)``:
    row ``i`` is noised and read once with ``concept_contexts[i]``, the prompt
    that carries the concept, and once by the frozen pre-unlearning model with
    ``anchor_contexts[i]``, the same prompt without it.

    - ``objective="adversarial"`` (DoCo): the first ``warmup_steps`` steps train
      only the critic (``train.py:1239``: DoCo's ``--warm_up``, 500 by default,
      1000 of 2000 steps in the README's commands, counted with ``>`` so one more;
      ``None``: half of ``steps``); every step trains ``D`` on
      :func:`~gradproj.methods.domain_correction.discriminator_loss` (Adam
      ``disc_lr``, ``disc_betas``: ``DoCo/gan.py:37-44``; ``--dlr`` is 1e-2 in
      ``train.py:373-377`` but the README runs 5e-4 for a style, 1e-4 for an
      object and nudity) after the model's update on
      :func:`~gradproj.methods.domain_correction.generator_loss`. ``D`` is
      ``discriminator`` (trained in place) or a
      :class:`~gradproj.methods.domain_correction.PatchGANDiscriminator` with
      ``disc_blocks`` blocks (``None``: :meth:`~PatchGANDiscriminator.blocks_for`
      the image side), initialised from ``generator``.
      ``objective="ablation"``: :func:`ablation_loss` at every step, no critic.
    - retain loss on ``retain_images`` with their ``retain_contexts`` (what must
      keep working): ``retain_loss="diffusion"`` :func:`diffusion_loss`, DoCo's
      prior-preservation loss (``train.py:1181, 1243-1246``); ``"preserve"``
      :func:`preservation_loss`, the model's own pre-unlearning predictions.
    - ``surgery=True``: the gradients combined by :func:`surgery_backward`, each
      first clipped to global norm ``max_grad_norm`` (``None``: not clipped;
      ``train.py:441-442``: 1), ``g_u ← g_u − λ cos(g_u, g_r) ĝ_r`` (``variant``
      ``"cosine"``, ``λ = strength``; ``"projection"``: ``λ(g_u·ĝ_r)ĝ_r``) where
      they conflict, then ``step="doco"``: the optimizer steps on ``g_u`` alone
      (``DoCo/gradient_clip.py:21-34``), ``step="additive"``: on
      ``g_u + retain_weight·g_r``. ``surgery=False``: ``∇(L_u + retain_weight·L_r)``
      clipped to ``max_grad_norm``, DoCo's path without ``--gradient_clip``
      (``train.py:1247, 1252-1255``: ``retain_weight`` 0.1 there), the baseline
      the surgery is measured against.
    - AdamW (``lr``, ``weight_decay``; ``train.py:998-1006``: betas (0.9, 0.999),
      weight decay 1e-2; Adam when ``weight_decay=0``) on the
      :func:`unlearning_params` set ``params`` (DoCo's ``cross-attn`` group is
      ``"cross-attention-kv"``, ``train.py:67-72``); the other parameters stay
      frozen (their ``requires_grad`` is restored afterwards).

    The recipe before issue 16 is :data:`PREVIOUS_RECIPE` (``objective="ablation",
    step="additive", variant="projection", max_grad_norm=None, retain_weight=1.0,
    retain_loss="preserve", weight_decay=0.0``). Log keys: ``unlearn`` and
    ``retain`` (NaN on warm-up steps), and ``disc`` (``L_D``) for the adversarial
    objective. One host read per step (the logged losses, after the updates),
    none inside it.

    DoCo's own loop also lets ``L_G``'s gradient reach ``D``'s parameters
    (``train.py:1240``: ``D`` is not frozen there, and ``optimizer_D`` is zeroed
    only after its step, ``train.py:1293-1295``), which adds ``BCE(D(x̂_c), 0)``
    to every post-warm-up critic step; here ``D`` learns from ``L_D`` alone.
    """
    if images.dim() != 4 or retain_images.dim() != 4:
        raise ValueError(
            f"images and retain_images must be (n, C, H, W), got {tuple(images.shape)} "
            f"and {tuple(retain_images.shape)}"
        )
    for name, ctx in (("concept_contexts", concept_contexts), ("anchor_contexts", anchor_contexts)):
        if ctx.dim() != 3 or ctx.shape[0] != images.shape[0]:
            raise ValueError(
                f"{name} must be (n, L, d) with n = images.shape[0] = {images.shape[0]}, "
                f"got {tuple(ctx.shape)}"
            )
    if retain_contexts.dim() != 3 or retain_contexts.shape[0] != retain_images.shape[0]:
        raise ValueError(
            f"retain_contexts must be (n, L, d) with n = retain_images.shape[0] = "
            f"{retain_images.shape[0]}, got {tuple(retain_contexts.shape)}"
        )
    if retain_loss not in ("preserve", "diffusion"):
        raise ValueError(f"retain_loss must be 'preserve' or 'diffusion', got {retain_loss!r}")
    if steps < 0 or batch_size < 1:
        raise ValueError(f"steps must be ≥ 0 and batch_size ≥ 1, got {steps} and {batch_size}")
    _check_recipe(
        objective=objective,
        step=step,
        variant=variant,
        warmup_steps=warmup_steps,
        disc_lr=disc_lr,
        disc_betas=disc_betas,
        disc_blocks=disc_blocks,
        discriminator=discriminator,
        max_grad_norm=max_grad_norm,
        retain_weight=retain_weight,
        weight_decay=weight_decay,
        lr=lr,
    )
    adversarial = objective == "adversarial"
    if warmup_steps is None:
        warmup_steps = steps // 2 if adversarial else 0
    import copy

    teacher = copy.deepcopy(unet).eval().requires_grad_(False)
    tuned = unlearning_params(unet, params)
    was = [(p, p.requires_grad) for p in unet.parameters()]
    unet.requires_grad_(False)
    for p in tuned:
        p.requires_grad_(True)
    if weight_decay:
        opt = torch.optim.AdamW(tuned, lr=lr, weight_decay=weight_decay)
    else:
        opt = torch.optim.Adam(tuned, lr=lr)
    disc = disc_opt = None
    if adversarial:
        disc = discriminator
        if disc is None:
            blocks = disc_blocks or PatchGANDiscriminator.blocks_for(min(images.shape[-2:]))
            # Seeded from `generator`, so that a run is reproducible, without
            # touching the global RNG.
            seed = int(torch.randint(2**62, (1,), generator=generator))
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                disc = PatchGANDiscriminator(images.shape[1], blocks)
            disc = disc.to(images.device)
        disc.train()
        disc_opt = torch.optim.Adam(disc.parameters(), lr=disc_lr, betas=tuple(disc_betas))

    def retain(j: torch.Tensor) -> torch.Tensor:
        if retain_loss == "preserve":
            return preservation_loss(
                unet, teacher, noise_scheduler, retain_images[j], retain_contexts[j],
                generator=generator,
            )  # fmt: skip
        return diffusion_loss(
            unet, noise_scheduler, retain_images[j], retain_contexts[j], generator=generator
        )

    def update(loss_u: torch.Tensor, loss_r: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        if surgery:
            surgery_backward(
                loss_u,
                loss_r,
                tuned,
                strength=strength,
                variant=variant,
                retain_weight=0.0 if step == "doco" else retain_weight,
                max_grad_norm=max_grad_norm,
                backend=backend,
            )
        else:
            (loss_u + retain_weight * loss_r).backward()
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(tuned, max_grad_norm)
        opt.step()

    log: list[dict[str, float]] = []
    nan = torch.full((), float("nan"), device=images.device)
    try:
        for k in range(steps):
            i = torch.randint(images.shape[0], (batch_size,), generator=generator)
            j = torch.randint(retain_images.shape[0], (batch_size,), generator=generator)
            if not adversarial:
                loss_u = ablation_loss(
                    unet,
                    teacher,
                    noise_scheduler,
                    images[i],
                    concept_contexts[i],
                    anchor_contexts[i],
                    generator=generator,
                )
                loss_r = retain(j)
                update(loss_u, loss_r)
                values = torch.stack([loss_u.detach(), loss_r.detach()]).tolist()
                log.append(dict(zip(("unlearn", "retain"), values, strict=True)))
                continue
            train_model = k >= warmup_steps
            noisy, _, t = _noised(noise_scheduler, images[i], generator)
            with torch.set_grad_enabled(train_model):
                x_c, x_a = concept_anchor_x0(
                    unet, teacher, noise_scheduler, noisy, t, concept_contexts[i],
                    anchor_contexts[i],
                )  # fmt: skip
            loss_u = loss_r = nan
            if train_model:
                disc.requires_grad_(False)  # L_G trains the model, not the critic
                loss_u = generator_loss(disc, x_c)
                disc.requires_grad_(True)
                loss_r = retain(j)
                update(loss_u, loss_r)
            disc_opt.zero_grad(set_to_none=True)
            loss_d = discriminator_loss(disc, x_c, x_a)
            loss_d.backward()
            disc_opt.step()
            values = torch.stack([loss_u.detach(), loss_r.detach(), loss_d.detach()])
            log.append(dict(zip(("unlearn", "retain", "disc"), values.tolist(), strict=True)))
    finally:
        for p, flag in was:
            p.requires_grad_(flag)
    return log


def _check_recipe(
    *,
    objective,
    step,
    variant,
    warmup_steps,
    disc_lr,
    disc_betas,
    disc_blocks,
    discriminator,
    max_grad_norm,
    retain_weight,
    weight_decay,
    lr,
) -> None:
    """The ValueErrors of :func:`unlearn_concept`'s recipe arguments, each naming its parameter."""
    from gradproj.reference import SURGERY_VARIANTS

    for name, value, allowed in (
        ("objective", objective, OBJECTIVES),
        ("step", step, STEPS),
        ("variant", variant, SURGERY_VARIANTS),
    ):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    if objective == "ablation":
        for name, value in (("warmup_steps", warmup_steps), ("discriminator", discriminator)):
            if value not in (None, 0):
                raise ValueError(f"{name} applies to objective='adversarial' only, got {value!r}")
    if warmup_steps is not None and (not isinstance(warmup_steps, int) or warmup_steps < 0):
        raise ValueError(f"warmup_steps must be an int ≥ 0 or None, got {warmup_steps!r}")
    if disc_blocks is not None and (not isinstance(disc_blocks, int) or disc_blocks < 1):
        raise ValueError(f"disc_blocks must be an int ≥ 1 or None, got {disc_blocks!r}")
    for name, value in (("lr", lr), ("disc_lr", disc_lr)):
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value}")
    if max_grad_norm is not None and not max_grad_norm > 0:
        raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm}")
    if len(disc_betas) != 2 or not all(0.0 <= b < 1.0 for b in disc_betas):
        raise ValueError(f"disc_betas must be two numbers in [0, 1), got {disc_betas!r}")
    for name, value in (("retain_weight", retain_weight), ("weight_decay", weight_decay)):
        if not value >= 0:
            raise ValueError(f"{name} must be ≥ 0, got {value}")
