"""Training-loop integration of the gradient surgery (seed 001, DoCo).

DoCo unlearns a concept with one loss while a second loss retains related
concepts; per parameter tensor, the part of the unlearning gradient that
conflicts with the retain gradient is removed before the two are combined::

    g_u, g_r = ∇L_unlearn, ∇L_retain              (two backward passes)
    g_u ← surgery(g_u, g_r)                        (gradproj.surgery_, per tensor)
    p.grad += g_u + retain_weight · g_r

:func:`surgery_backward` does exactly that for any optimizer, including
``ProjectedOptimizer`` and ``ProjectedAdamW`` (which then also project the
update), and adds no host synchronization: the per-tensor conflict test runs on
the device.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

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


def surgery_backward(
    loss_unlearn: torch.Tensor,
    loss_retain: torch.Tensor,
    params: Iterable[torch.Tensor],
    *,
    strength: float = 1.0,
    variant: str = "projection",
    retain_weight: float = 1.0,
    retain_graph: bool = False,
    backend: str | None = None,
) -> None:
    """Accumulate ``g_u' + retain_weight·g_r`` into ``p.grad`` for every parameter in ``params``.

    ``g_u = ∂loss_unlearn/∂p`` and ``g_r = ∂loss_retain/∂p`` come from
    ``torch.autograd.grad``; ``g_u'`` is ``g_u`` after :func:`gradproj.surgery_`
    with ``strength``/``variant`` (per tensor, only where ``g_u·g_r < 0``).
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
    # Both graphs may share the forward pass of one model, so the first
    # backward must keep it for the second.
    g_u = torch.autograd.grad(loss_unlearn, params, retain_graph=True, allow_unused=True)
    g_r = torch.autograd.grad(loss_retain, params, retain_graph=retain_graph, allow_unused=True)
    g_u = [torch.zeros_like(p) if g is None else g for p, g in zip(params, g_u, strict=True)]
    g_r = [torch.zeros_like(p) if g is None else g for p, g in zip(params, g_r, strict=True)]
    surgery_(g_u, g_r, strength=strength, variant=variant, backend=backend)
    with torch.no_grad():
        for p, u, r in zip(params, g_u, g_r, strict=True):
            total = u.add_(r, alpha=retain_weight)
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
    surgery: bool = True,
    strength: float = 1.0,
    variant: str = "projection",
    retain_weight: float = 1.0,
    retain_loss: str = "preserve",
    params: str = "cross-attention-kv",
    generator: torch.Generator | None = None,
    backend: str | None = None,
) -> list[dict[str, float]]:
    """Unlearn a concept from a trained model, in place; return the per-step losses.

    The recipe of seed 001 (DoCo) with the concept-ablation objective:

    - unlearning loss :func:`ablation_loss` on ``images`` (``(n, C, H, W)``; row
      ``i`` is noised and read once with ``concept_contexts[i]``, the prompt that
      carries the concept, and once by the frozen pre-unlearning model with
      ``anchor_contexts[i]``, the same prompt without it);
    - retain loss on ``retain_images`` with their ``retain_contexts`` (what must
      keep working): ``retain_loss="preserve"`` (default) :func:`preservation_loss`,
      the model's own pre-unlearning predictions as targets; ``"diffusion"``
      :func:`diffusion_loss`, the training loss (DoCo's relearning on real data);
    - ``surgery=True``: the two gradients combined by :func:`surgery_backward`
      (``g_u ← g_u − λ(g_u·ĝ_r)ĝ_r`` per tensor where they conflict, then
      ``g_u + retain_weight·g_r``); ``surgery=False``: plain
      ``∇(L_u + retain_weight·L_r)``, the baseline the surgery is measured against;
    - Adam (``lr``) on the :func:`unlearning_params` set ``params``; the other
      parameters stay frozen (their ``requires_grad`` is restored afterwards).

    One host read per step (the logged losses, after the update), none inside it.
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
    import copy

    teacher = copy.deepcopy(unet).eval().requires_grad_(False)
    tuned = unlearning_params(unet, params)
    was = [(p, p.requires_grad) for p in unet.parameters()]
    unet.requires_grad_(False)
    for p in tuned:
        p.requires_grad_(True)
    opt = torch.optim.Adam(tuned, lr=lr)
    log: list[dict[str, float]] = []
    try:
        for _ in range(steps):
            i = torch.randint(images.shape[0], (batch_size,), generator=generator)
            j = torch.randint(retain_images.shape[0], (batch_size,), generator=generator)
            loss_u = ablation_loss(
                unet,
                teacher,
                noise_scheduler,
                images[i],
                concept_contexts[i],
                anchor_contexts[i],
                generator=generator,
            )
            if retain_loss == "preserve":
                loss_r = preservation_loss(
                    unet,
                    teacher,
                    noise_scheduler,
                    retain_images[j],
                    retain_contexts[j],
                    generator=generator,
                )
            else:
                loss_r = diffusion_loss(
                    unet, noise_scheduler, retain_images[j], retain_contexts[j], generator=generator
                )
            opt.zero_grad(set_to_none=True)
            if surgery:
                surgery_backward(
                    loss_u,
                    loss_r,
                    tuned,
                    strength=strength,
                    variant=variant,
                    retain_weight=retain_weight,
                    backend=backend,
                )
            else:
                (loss_u + retain_weight * loss_r).backward()
            opt.step()
            log.append({"unlearn": loss_u.detach().item(), "retain": loss_r.detach().item()})
    finally:
        for p, flag in was:
            p.requires_grad_(flag)
    return log
