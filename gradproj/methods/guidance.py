"""``gradproj.methods.guidance``: Anti-Memorization Guidance (AMG) at sampling time.

AMG (Chen, Liu & Xu, *Towards Memorization-Free Diffusion Models*, CVPR 2024,
arXiv:2404.00922) changes the classifier-free-guided noise of each sampling step
when a memorization detector finds that the step's clean-image estimate is too
close to a training image. With ``ε_u = ε(x_t)``, ``ε_c = ε(x_t, y)``, the CFG
scale ``s₀`` and the plain CFG noise ``ε_cfg = ε_u + s₀ (ε_c − ε_u)``:

- the detector reads ``x̂₀ = (x_t − √(1−ᾱ_t) ε_cfg) / √ᾱ_t`` (through an optional
  ``decode``, e.g. the VAE of a latent model) and returns its similarity ``σ_t``
  to the nearest training image and that image's row ``N``;
- **despecification**: ``G_spe = −s₁ (ε_c − ε_u)``, ``s₁ = max(min(c₁σ_t, s₀ − 1), 0)``
  (the prompt's pull is weakened, never below the conditional model itself);
- **caption deduplication**: ``G_dup = −s₂ (ε(x_t, y_N) − ε_u)``, with ``y_N`` the
  caption of the nearest neighbour and ``s₂ = max(min(c₂σ_t, s₀ − 1 − s₁), 0)``
  (so that ``s₀ − s₁ − s₂ ≥ 1``);
- **dissimilarity**: ``G_sim = c₃ √(1−ᾱ_t) ∇_{x_t} σ_t`` (classifier guidance on
  ``−c₃σ_t`` in noise form: adding it to ``ε`` moves ``x̂₀`` down the gradient of
  the similarity). The gradient runs through ``x̂₀`` *and* the UNet (the noise
  prediction depends on ``x_t``) unless ``grad_through_unet=False``, which treats
  ``ε_cfg`` as constant: ``∇σ ≈ (∂σ/∂x̂₀) / √ᾱ_t``, no backward through the UNet.

The guided noise, per sample, is ``ε̃ = ε_cfg + G_spe + G_dup + G_sim`` where the
sample's ``σ_t > λ`` (the detector's ``threshold`` unless overridden) and
``ε̃ = ε_cfg`` elsewhere; the switch is a mask (``torch.where``), never a Python
branch on tensor values, so a batch runs as one batch.

Defaults (``c₁ = c₂ = c₃ = 5``). The hyperparameter table of the paper could not
be read from the reference material available when this was written; the values
are those of the public AMG re-implementation by Messina et al. (2025,
``polimi-ispl/anti-memorization-tta``, ``make_despec_fn(c1=5.0, c2=5.0,
c3=5.0)``), whose ``s₁, s₂`` clamps match the formulas above. With a cosine-type
similarity in ``[0, 1]`` and ``s₀ = 7.5`` they mean: once memorization is
flagged, ``c₁σ_t`` removes most of the prompt's guidance and ``s₂`` takes the rest
down to 1. That re-implementation (and the paper, per its summaries) use a
time-dependent "parabolic" threshold; here the threshold is the detector's single
``threshold`` (a schedule can be had with a detector whose threshold the caller
updates). Check them against the paper's table before quoting results.

Two ways to sample with it:

- :func:`sample_with_guidance`: the demo's pixel-space DDIM sampler
  (:func:`gradproj.lab.world.sample` with AMG), which also returns how many steps fired
  per sample;
- :func:`amg_pipeline`: a context manager that puts an :class:`AMGUNet` wrapper in
  ``pipe.unet`` of a diffusers ``StableDiffusionPipeline`` (or any pipeline with
  the same ``[uncond; cond]`` CFG batch and ``ε_u + s₀(ε_c − ε_u)`` combination).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = [
    "AMGStep",
    "AMGUNet",
    "AntiMemorizationGuidance",
    "SimilarityDetector",
    "amg_pipeline",
    "anti_memorization_noise",
    "sample_with_guidance",
]

DEFAULT_C1 = 5.0
DEFAULT_C2 = 5.0
DEFAULT_C3 = 5.0


@runtime_checkable
class SimilarityDetector(Protocol):
    """What AMG needs of a memorization detector (duck-typed).

    ``similarity(x0_hat)`` takes a batch ``(n, C, H, W)`` of clean-image estimates
    and returns ``(sim, index)``: ``sim (n,)``, differentiable w.r.t. ``x0_hat``,
    higher = closer to the nearest training image; ``index (n,)`` (long) that
    image's row in the training set. ``threshold``: memorization is flagged where
    ``sim > threshold``.
    """

    threshold: float

    def similarity(self, x0_hat: Tensor) -> tuple[Tensor, Tensor]: ...


def _check_scale(scale: float) -> float:
    scale = float(scale)
    if not math.isfinite(scale) or scale < 1:
        raise ValueError(f"scale (the CFG scale s₀) must be a finite number ≥ 1, got {scale}")
    return scale


def _check_coefficients(c1: float, c2: float, c3: float) -> None:
    for name, c in (("c1", c1), ("c2", c2), ("c3", c3)):
        if not math.isfinite(float(c)) or float(c) < 0:
            raise ValueError(f"{name} must be a finite number ≥ 0, got {c}")


def _check_threshold(threshold: float) -> float:
    threshold = float(threshold)
    if math.isnan(threshold):
        raise ValueError("threshold must be a number (+inf switches AMG off), got nan")
    return threshold


def _per_sample(value: Tensor | float, n: int, like: Tensor, name: str) -> Tensor:
    """``value`` as a tensor broadcastable over ``like`` (n, ...): scalar or (n,)."""
    v = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    if v.dim() == 0:
        return v
    if v.shape != (n,):
        raise ValueError(f"{name} must be a scalar or have shape ({n},), got {tuple(v.shape)}")
    return v.view(n, *([1] * (like.dim() - 1)))


def anti_memorization_noise(
    eps_uncond: Tensor,
    eps_cond: Tensor,
    eps_neighbour: Tensor | None,
    sim: Tensor,
    grad_sim: Tensor | None,
    alpha_bar_t: Tensor | float,
    *,
    scale: float,
    c1: float = DEFAULT_C1,
    c2: float = DEFAULT_C2,
    c3: float = DEFAULT_C3,
    threshold: float,
) -> Tensor:
    """The AMG noise of one step, batched: ``where(σ > λ, ε_cfg + G_spe + G_dup + G_sim, ε_cfg)``.

    ``ε_cfg = ε_u + s₀(ε_c − ε_u)`` (computed in exactly this order, so a sample
    that does not fire gets the plain CFG noise bit for bit), and per sample

    - ``s₁ = max(min(c₁σ, s₀ − 1), 0)``, ``G_spe = −s₁ (ε_c − ε_u)``;
    - ``s₂ = max(min(c₂σ, s₀ − 1 − s₁), 0)``, ``G_dup = −s₂ (ε_N − ε_u)``;
    - ``G_sim = c₃ √(1 − ᾱ_t) ∇σ``.

    Args:
        eps_uncond, eps_cond: ``ε(x_t)`` and ``ε(x_t, y)``, shape ``(n, ...)``.
        eps_neighbour: ``ε(x_t, y_N)`` (same shape), or ``None`` to leave out ``G_dup``.
        sim: ``σ_t`` per sample, shape ``(n,)``.
        grad_sim: ``∇_{x_t} σ_t`` (same shape as ``eps_cond``), or ``None`` to leave
            out ``G_sim``.
        alpha_bar_t: ``ᾱ_t``, a scalar or ``(n,)``, in ``(0, 1]``.
        scale: the CFG scale ``s₀ ≥ 1``.
        c1, c2, c3: the AMG coefficients (``≥ 0``).
        threshold: ``λ``; a sample fires where ``σ > λ`` (``+inf``: never).
    """
    scale = _check_scale(scale)
    _check_coefficients(c1, c2, c3)
    threshold = _check_threshold(threshold)
    if eps_cond.shape != eps_uncond.shape:
        raise ValueError(
            f"eps_cond {tuple(eps_cond.shape)} and eps_uncond {tuple(eps_uncond.shape)} differ"
        )
    if eps_neighbour is not None and eps_neighbour.shape != eps_cond.shape:
        raise ValueError(
            f"eps_neighbour {tuple(eps_neighbour.shape)} must match eps_cond "
            f"{tuple(eps_cond.shape)}"
        )
    if grad_sim is not None and grad_sim.shape != eps_cond.shape:
        raise ValueError(
            f"grad_sim {tuple(grad_sim.shape)} must match eps_cond {tuple(eps_cond.shape)}"
        )
    n = eps_cond.shape[0]
    if sim.shape != (n,):
        raise ValueError(f"sim must have shape ({n},), got {tuple(sim.shape)}")
    ab = _per_sample(alpha_bar_t, n, eps_cond, "alpha_bar_t")
    if bool(((ab <= 0) | (ab > 1)).any()):
        raise ValueError("alpha_bar_t must lie in (0, 1]")
    return _amg_noise(
        eps_uncond, eps_cond, eps_neighbour, sim, grad_sim, ab, scale, c1, c2, c3, threshold
    )


def _amg_noise(
    eps_uncond: Tensor,
    eps_cond: Tensor,
    eps_neighbour: Tensor | None,
    sim: Tensor,
    grad_sim: Tensor | None,
    ab: Tensor,
    scale: float,
    c1: float,
    c2: float,
    c3: float,
    threshold: float,
) -> Tensor:
    """:func:`anti_memorization_noise` without the argument checks (no host sync)."""
    n = eps_cond.shape[0]
    eps_cfg = eps_uncond + scale * (eps_cond - eps_uncond)
    shape = (n, *([1] * (eps_cond.dim() - 1)))
    s = sim.to(eps_cond.dtype).view(shape)
    s1 = (c1 * s).clamp(max=scale - 1).clamp(min=0)
    out = eps_cfg - s1 * (eps_cond - eps_uncond)
    if eps_neighbour is not None:
        s2 = torch.minimum(c2 * s, (scale - 1) - s1).clamp(min=0)
        out = out - s2 * (eps_neighbour - eps_uncond)
    if grad_sim is not None:
        out = out + c3 * (1 - ab).sqrt() * grad_sim
    fired = (sim > threshold).view(shape)
    return torch.where(fired, out, eps_cfg)


class AMGStep(NamedTuple):
    """One guided step: the noise to hand the scheduler and what the detector saw."""

    eps: Tensor  # (n, ...) guided noise
    fired: Tensor  # (n,) bool: σ_t > λ
    sim: Tensor  # (n,) σ_t (detached)
    index: Tensor  # (n,) nearest training row
    eps_uncond: Tensor  # (n, ...) ε(x_t), detached
    eps_cond: Tensor  # (n, ...) ε(x_t, y), detached


# eps_fn(x) -> (eps_uncond, eps_cond); neighbour_fn(x, index) -> eps_neighbour
EpsFn = Callable[[Tensor], tuple[Tensor, Tensor]]
NeighbourFn = Callable[[Tensor, Tensor], Tensor]


@dataclass
class AntiMemorizationGuidance:
    """AMG's configuration and its batched step.

    Attributes:
        detector: a :class:`SimilarityDetector` (``similarity``, ``threshold``).
        neighbour_contexts: encoder states of the training captions, ``(n_train, L, d)``;
            ``y_N``'s states are ``neighbour_contexts[index]``. ``None`` leaves out
            caption deduplication (e.g. unconditional / class-conditional models).
        c1, c2, c3: the coefficients of ``s₁``, ``s₂`` and ``G_sim`` (module docstring).
        threshold: ``λ``; ``None`` reads ``detector.threshold`` at every step.
        decode: maps ``x̂₀`` to what the detector reads (e.g.
            ``lambda z: vae.decode(z / vae.config.scaling_factor).sample`` for a
            latent model); ``None``: the detector reads ``x̂₀`` itself (latents, for
            a latent model). Must be differentiable for ``G_sim``.
        grad_through_unet: ``∇σ`` through the UNet as well as ``x̂₀`` (the paper's
            ``∇_{x_t}σ_t``; one extra backward per step) or, if ``False``, with the
            noise prediction held constant (``(∂σ/∂x̂₀)/√ᾱ_t``; no backward through
            the UNet, much cheaper).
        skip_idle: if ``True``, one host sync per step (``fired.any()``) skips the
            gradient and the neighbour forward when no sample of the batch fires;
            the result is the same. Off by default: no host sync in the step.
    """

    detector: Any
    neighbour_contexts: Tensor | None = None
    c1: float = DEFAULT_C1
    c2: float = DEFAULT_C2
    c3: float = DEFAULT_C3
    threshold: float | None = None
    decode: Callable[[Tensor], Tensor] | None = None
    grad_through_unet: bool = True
    skip_idle: bool = False

    def __post_init__(self) -> None:
        if not callable(getattr(self.detector, "similarity", None)):
            raise TypeError("detector must have a similarity(x0_hat) -> (sim, index) method")
        _check_coefficients(self.c1, self.c2, self.c3)
        if self.threshold is None and not hasattr(self.detector, "threshold"):
            raise TypeError("detector has no threshold attribute; pass threshold=")
        if self.threshold is not None:
            _check_threshold(self.threshold)
        if self.neighbour_contexts is not None and self.neighbour_contexts.dim() != 3:
            raise ValueError(
                "neighbour_contexts must have shape (n_train, L, d), got "
                f"{tuple(self.neighbour_contexts.shape)}"
            )

    @property
    def lam(self) -> float:
        """The threshold ``λ`` in force."""
        return _check_threshold(
            self.detector.threshold if self.threshold is None else self.threshold
        )

    def step(
        self,
        eps_fn: EpsFn,
        neighbour_fn: NeighbourFn | None,
        x_t: Tensor,
        alpha_bar_t: Tensor | float,
        *,
        scale: float,
    ) -> AMGStep:
        """The guided noise for ``x_t`` given the model as two callables (any CFG layout).

        ``eps_fn(x) -> (ε_u, ε_c)`` runs the batched CFG forward; ``neighbour_fn(x,
        index) -> ε(x, y_N)`` the neighbour forward (``None``: no ``G_dup``).
        """
        scale = _check_scale(scale)
        lam = self.lam
        n = x_t.shape[0]
        ab = _per_sample(alpha_bar_t, n, x_t, "alpha_bar_t")
        want_grad = self.c3 > 0
        with torch.enable_grad():
            x = x_t.detach().requires_grad_(want_grad)
            if want_grad and self.grad_through_unet:
                eps_u, eps_c = eps_fn(x)
            else:
                with torch.no_grad():
                    eps_u, eps_c = eps_fn(x.detach())
            eps_cfg = eps_u + scale * (eps_c - eps_u)
            x0 = (x - (1 - ab).sqrt() * eps_cfg) / ab.sqrt()
            seen = self.decode(x0) if self.decode is not None else x0
            sim, index = self.detector.similarity(seen)
            if sim.shape != (n,) or index.shape != (n,):
                raise ValueError(
                    f"detector.similarity must return (sim, index) of shape ({n},), got "
                    f"{tuple(sim.shape)} and {tuple(index.shape)}"
                )
            fired = sim.detach() > lam
            busy = bool(fired.any()) if self.skip_idle else True
            grad = None
            if want_grad and busy:
                if sim.requires_grad:
                    (grad,) = torch.autograd.grad(sim.sum(), x)
                else:
                    grad = torch.zeros_like(x)
        eps_u, eps_c = eps_u.detach(), eps_c.detach()
        eps_n = None
        if neighbour_fn is not None and self.neighbour_contexts is not None and busy:
            with torch.no_grad():
                eps_n = neighbour_fn(x_t.detach(), index.detach())
        if not busy:
            eps = eps_u + scale * (eps_c - eps_u)
        else:
            eps = _amg_noise(
                eps_u, eps_c, eps_n, sim.detach(), grad, ab, scale, self.c1, self.c2, self.c3, lam
            )
        return AMGStep(eps, fired, sim.detach(), index.detach(), eps_u, eps_c)

    def guided_noise(
        self,
        unet,
        x_t: Tensor,
        t: Tensor | int,
        context: Tensor,
        null_context: Tensor,
        alpha_bar_t: Tensor | float,
        *,
        scale: float,
    ) -> AMGStep:
        """The guided noise for a batch of a ``UNet2DConditionModel``-like ``unet``.

        One batched forward on ``[cond; uncond]`` (the layout of
        :func:`gradproj.lab.world.sample`), one on ``y_N``'s states, and (for ``G_sim``)
        one backward, whatever the batch size. ``context`` ``(n or 1, L, d)``,
        ``null_context`` ``(1 or n, L, d)``; the UNet must treat samples
        independently (eval mode, no batch norm) for ``∇σ`` of ``sum σ`` to be
        per-sample.
        """
        n = x_t.shape[0]
        if context.dim() != 3 or context.shape[0] not in (1, n):
            raise ValueError(
                f"context must have shape ({n} or 1, L, d), got {tuple(context.shape)}"
            )
        if null_context.dim() != 3 or null_context.shape[0] not in (1, n):
            raise ValueError(
                f"null_context must have shape (1 or {n}, L, d), got {tuple(null_context.shape)}"
            )
        both = torch.cat(
            [
                context.expand(n, *context.shape[-2:]),
                null_context.expand(n, *null_context.shape[-2:]),
            ]
        )

        def eps_fn(x: Tensor) -> tuple[Tensor, Tensor]:
            eps_c, eps_u = unet(torch.cat([x, x]), t, both).sample.chunk(2)
            return eps_u, eps_c

        def neighbour_fn(x: Tensor, index: Tensor) -> Tensor:
            return unet(
                x, t, self.neighbour_contexts[index.to(self.neighbour_contexts.device)]
            ).sample

        return self.step(eps_fn, neighbour_fn, x_t, alpha_bar_t, scale=scale)


def sample_with_guidance(
    unet,
    noise_scheduler,
    context: Tensor,
    null_context: Tensor,
    noise: Tensor,
    *,
    steps: int,
    scale: float,
    amg: AntiMemorizationGuidance,
) -> tuple[Tensor, Tensor]:
    """:func:`gradproj.lab.world.sample` with AMG: DDIM from ``noise``, CFG scale ``scale``.

    Returns ``(samples, fired)``: samples ``(n, C, H, W)`` clamped to ``[-1, 1]`` and
    ``fired (n,)`` (long), the number of steps at which each sample's ``σ_t``
    exceeded the threshold. With a threshold no sample exceeds (``+inf``) the
    samples equal :func:`gradproj.lab.world.sample`'s bit for bit. ``ᾱ_t`` is the
    scheduler's ``alphas_cumprod[t]``.
    """
    from diffusers import DDIMScheduler

    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    scale = _check_scale(scale)
    ddim = DDIMScheduler.from_config(noise_scheduler.config)
    ddim.set_timesteps(steps)
    alphas = ddim.alphas_cumprod.to(device=noise.device, dtype=noise.dtype)
    n = noise.shape[0]
    x = noise.clone()
    fired = torch.zeros(n, dtype=torch.long, device=noise.device)
    for t in ddim.timesteps:
        out = amg.guided_noise(unet, x, t, context, null_context, alphas[t], scale=scale)
        fired += out.fired.long()
        with torch.no_grad():
            x = ddim.step(out.eps, t, x).prev_sample
    return x.clamp(-1, 1), fired


class AMGUNet(torch.nn.Module):
    """A UNet wrapper that makes a diffusers CFG pipeline sample with AMG.

    The pipeline calls it with the CFG batch ``[x; x]`` and encoder states
    ``[uncond; cond]`` and then forms ``ε_u + s₀(ε_c − ε_u)`` itself. The wrapper
    runs the real UNet on that batch (with autograd for ``G_sim``), computes the
    AMG noise ``ε̃`` and returns ``[ε_u; ε_c']`` with ``ε_c' = ε_u + (ε̃ − ε_u)/s₀``
    where the sample fired and ``ε_c' = ε_c`` where it did not, so the pipeline's
    own combination yields ``ε̃`` (up to rounding) or, bit for bit, its plain
    output. Batches that are not CFG batches (``s₀ ≤ 1``) pass through unchanged.

    Assumptions (checked by :func:`amg_pipeline`): ε-prediction; a scheduler
    with ``alphas_cumprod`` indexed by the timestep and an identity
    ``scale_model_input`` (DDIM, DDPM, PNDM, DPM-Solver…, not Euler-type
    ``σ``-schedulers); ``guidance_rescale == 0``. ``scale_fn`` returns the
    pipeline's current ``s₀``. ``fired_counts`` accumulates per-sample fire counts
    of the last call sequence (reset with :meth:`reset`).
    """

    def __init__(
        self,
        unet: torch.nn.Module,
        amg: AntiMemorizationGuidance,
        alphas_cumprod: Tensor,
        scale_fn: Callable[[], float],
    ) -> None:
        super().__init__()
        self.inner = unet
        self.amg = amg
        self.alphas_cumprod = alphas_cumprod
        self.scale_fn = scale_fn
        self.fired_counts: Tensor | None = None

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("inner"), name)

    def reset(self) -> None:
        self.fired_counts = None

    def forward(self, sample: Tensor, timestep, encoder_hidden_states: Tensor, *args, **kwargs):
        return_dict = kwargs.pop("return_dict", True)
        scale = float(self.scale_fn())
        m = sample.shape[0]
        if scale <= 1 or m % 2 or encoder_hidden_states.shape[0] != m:
            return self.inner(
                sample, timestep, encoder_hidden_states, *args, **kwargs, return_dict=return_dict
            )
        if args:
            raise TypeError("AMGUNet takes the UNet's extra inputs as keywords only")
        n = m // 2
        t = timestep
        ab = self.alphas_cumprod.to(sample.device, sample.dtype)[
            torch.as_tensor(t, device=sample.device).long()
        ]
        cond_kwargs = {k: _cond_half(v, m) for k, v in kwargs.items()}

        def eps_fn(x: Tensor) -> tuple[Tensor, Tensor]:
            out = self.inner(
                torch.cat([x, x]), t, encoder_hidden_states, **kwargs, return_dict=False
            )[0]
            eps_u, eps_c = out.chunk(2)
            return eps_u, eps_c

        def neighbour_fn(x: Tensor, index: Tensor) -> Tensor:
            states = self.amg.neighbour_contexts[index.to(self.amg.neighbour_contexts.device)]
            states = states.to(encoder_hidden_states.device, encoder_hidden_states.dtype)
            tt = t if not (torch.is_tensor(t) and t.dim() and t.shape[0] == m) else t[n:]
            return self.inner(x, tt, states, **cond_kwargs, return_dict=False)[0]

        if ab.dim():  # one timestep per CFG batch in these pipelines
            ab = ab.reshape(-1)[n:]
        out = self.amg.step(eps_fn, neighbour_fn, sample[:n], ab, scale=scale)
        fired = out.fired.view(n, *([1] * (sample.dim() - 1)))
        eps_c = torch.where(
            fired, out.eps_uncond + (out.eps - out.eps_uncond) / scale, out.eps_cond
        )
        counts = out.fired.long()
        self.fired_counts = counts if self.fired_counts is None else self.fired_counts + counts
        noise = torch.cat([out.eps_uncond, eps_c])
        return (noise,) if not return_dict else _unet_output(noise)


def _unet_output(noise: Tensor):
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

    return UNet2DConditionOutput(sample=noise)


def _cond_half(v: Any, m: int) -> Any:
    """The cond half of a CFG-batched extra input (tensors and dicts of tensors)."""
    if torch.is_tensor(v) and v.dim() and v.shape[0] == m:
        return v[m // 2 :]
    if isinstance(v, dict):
        return {k: _cond_half(x, m) for k, x in v.items()}
    return v


@contextlib.contextmanager
def amg_pipeline(pipe, amg: AntiMemorizationGuidance) -> Iterator[AMGUNet]:
    """Sample a diffusers CFG pipeline with AMG inside the ``with`` block.

    Puts an :class:`AMGUNet` in ``pipe.unet`` (bypassing the pipeline's config
    bookkeeping; restored on exit) and yields it (``.fired_counts``)::

        with amg_pipeline(pipe, amg) as wrapped:
            images = pipe(prompts, guidance_scale=7.5, generator=g).images
        print(wrapped.fired_counts)
    """
    scheduler = pipe.scheduler
    if getattr(scheduler, "alphas_cumprod", None) is None:
        raise ValueError("amg_pipeline needs a scheduler with alphas_cumprod (DDIM, DDPM, …)")
    if getattr(scheduler.config, "prediction_type", "epsilon") != "epsilon":
        raise ValueError(
            "amg_pipeline supports prediction_type='epsilon' only, got "
            f"{scheduler.config.prediction_type!r}"
        )
    if float(getattr(scheduler, "init_noise_sigma", 1.0)) != 1.0:
        raise ValueError(
            "amg_pipeline needs a variance-preserving scheduler with identity scale_model_input "
            f"(init_noise_sigma 1), got {type(scheduler).__name__}"
        )

    def scale_fn() -> float:
        if float(getattr(pipe, "_guidance_rescale", 0.0) or 0.0) > 0:
            raise ValueError("amg_pipeline does not support guidance_rescale > 0")
        return float(pipe.guidance_scale)

    original = pipe.unet
    wrapped = AMGUNet(original, amg, scheduler.alphas_cumprod, scale_fn)
    object.__setattr__(pipe, "unet", wrapped)
    try:
        yield wrapped
    finally:
        object.__setattr__(pipe, "unet", original)
