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
    n = x0.shape[0]
    noise = torch.randn(x0.shape, generator=generator).to(x0)
    t = torch.randint(noise_scheduler.config.num_train_timesteps, (n,), generator=generator)
    t = t.to(x0.device)
    noisy = noise_scheduler.add_noise(x0, noise, t)
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
