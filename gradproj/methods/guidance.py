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

That is the *paper's* form (``variant="paper"``, the default before 2026-12:
constant ``c₁ = c₂ = c₃ = 5`` from the public re-implementation by Messina et al.
2025, ``polimi-ispl/anti-memorization-tta``, ``make_despec_fn(c1=5.0, c2=5.0,
c3=5.0)``; a constant threshold; ``∇σ`` through the UNet; ``y_N`` the nearest
neighbour's caption).

**The official schedule** (``variant="official"``, the default) is what the
authors' Stable Diffusion code runs (``chenchen-usyd/AMG-sd`` @ d76d4c8,
``ldm/models/diffusion/ddim.py`` ``p_sample_ddim`` and ``scripts/txt2img.py``;
constants in :class:`OfficialSchedule`, each with its line). Per sample and step,
with ``t`` on SD's 1000-step scale:

1. ``σ₁`` from the plain CFG noise (``ddim.py:282``); nothing changes where
   ``σ₁ ≤ 0`` (``ddim.py:292``);
2. despecification, always on where ``σ₁ > 0``: ``s₁ = clamp((s₀−1)σ₁/0.5, 0, s₀−1)``
   (``ddim.py:293``: ``max(min(6.5, 6.5/0.5·σ), 0)`` with ``s₀ − 1 = 6.5``);
3. caption deduplication, triggered where ``σ₁ > λ_t`` and a *duplicated caption*
   is known, then kept on for 10 steps (``ddim.py:294-302``, ``g3_count = 10``
   at ``txt2img.py:549``): ``s₂ = clamp(r σ₁/0.3, 0, r)``, ``r = s₀ − 1 − s₁``
   (``ddim.py:304``). The duplicated caption is the most frequent caption among
   the 1000 nearest training images if it occurs more than 20 times
   (``txt2img.py:90``, ``255-265``), remembered once found (``ddim.py:283-284``);
4. ``σ₂`` recomputed from the noise after steps 2–3 (``ddim.py:312``, ``326``) and,
   where ``σ₂ > λ_t``, ``G_sim = c₃ √(1−ᾱ_t) ∇σ₂`` with
   ``c₃ = 100 (σ₂ − 0.3) e^{(1000−t)/170}`` (``ddim.py:319``; the 100 is
   ``--guidance_scale``, ``txt2img.py:477``, applied at ``txt2img.py:324``), the
   gradient taken with the noise held fixed (``txt2img.py:243-246``: ``x_t`` alone
   requires grad);
5. both thresholds are ``λ_t = 0.3 + 0.1 e^{−0.005 t}`` (``ddim.py:271-278``,
   ``asy(t, 0.3, 0.4, 0.005, 0)``): stricter (0.4) near the end of sampling.

The constants are in the units of the authors' detector, the SSCD cosine
similarity (``txt2img.py:311``; 0.5 is the usual "copy" level). A detector with
other units must be mapped onto that scale (``gradproj.methods.detectors.RescaledDetector``);
the lab maps its calibrated threshold to 0.3 and the median of real concept
images to 0.5. Two departures, both because the authors' script is tied to
its setting: it guides only samples after the 21st (``ddim.py:280``,
``base_count > 20``) and runs one sample at a time; here every sample is guided
and a batch runs as one batch (each sample keeps its own state, as a run of one
would).

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
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = [
    "AMGState",
    "AMGStep",
    "AMGUNet",
    "AntiMemorizationGuidance",
    "OfficialSchedule",
    "SimilarityDetector",
    "amg_pipeline",
    "anti_memorization_noise",
    "sample_with_guidance",
]

DEFAULT_C = 5.0  # the "paper" variant's c₁ = c₂ = c₃ (module docstring)


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
    c1: float = DEFAULT_C,
    c2: float = DEFAULT_C,
    c3: float = DEFAULT_C,
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


VARIANTS = ("official", "paper")
CAPTION_RULES = ("duplicated", "nearest")


@dataclass(frozen=True)
class OfficialSchedule:
    """The constants of the authors' AMG for Stable Diffusion (``chenchen-usyd/AMG-sd`` @ d76d4c8).

    In the units of their detector (SSCD cosine similarity, ``txt2img.py:311``) and
    on SD's 1000-step timestep scale (``timesteps``; a scheduler with another
    number of training steps has its ``t`` rescaled to it):

    - ``spe_full``: ``s₁ = clamp((s₀−1)σ/spe_full, 0, s₀−1)`` (``ddim.py:293``, 6.5/0.5);
    - ``dup_full``: ``s₂ = clamp(rσ/dup_full, 0, r)``, ``r = s₀−1−s₁`` (``ddim.py:304``);
    - ``dup_hold``: steps ``G_dup`` stays on once triggered (``txt2img.py:549``,
      ``ddim.py:294-302``);
    - ``dup_k``, ``dup_min_count``: the duplicated caption is the most frequent one
      among the ``dup_k`` nearest training images when it occurs more than
      ``dup_min_count`` times (``txt2img.py:90``, ``260-263``);
    - ``sim_scale``, ``sim_offset``, ``sim_decay``:
      ``c₃ = sim_scale (σ − sim_offset) e^{(timesteps − t)/sim_decay}`` (``txt2img.py:477``,
      ``324``; ``ddim.py:319``);
    - ``threshold_floor``, ``threshold_rise``, ``threshold_rate``:
      ``λ_t = floor + rise·e^{−rate·t}`` (``ddim.py:16-17``, ``271-278``).
    """

    spe_full: float = 0.5
    dup_full: float = 0.3
    dup_hold: int = 10
    dup_k: int = 1000
    dup_min_count: int = 20
    sim_scale: float = 100.0
    sim_offset: float = 0.3
    sim_decay: float = 170.0
    threshold_floor: float = 0.3
    threshold_rise: float = 0.1
    threshold_rate: float = 0.005
    timesteps: int = 1000

    def __post_init__(self) -> None:
        for name in ("spe_full", "dup_full", "sim_decay"):
            v = float(getattr(self, name))
            if not math.isfinite(v) or v <= 0:
                raise ValueError(f"{name} must be a finite number > 0, got {v}")
        for name in ("sim_scale", "threshold_rate"):
            v = float(getattr(self, name))
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite number ≥ 0, got {v}")
        for name in ("sim_offset", "threshold_floor", "threshold_rise"):
            if not math.isfinite(float(getattr(self, name))):
                raise ValueError(f"{name} must be finite, got {getattr(self, name)}")
        for name, low in (("dup_hold", 1), ("dup_k", 1), ("dup_min_count", 0), ("timesteps", 1)):
            v = getattr(self, name)
            if not isinstance(v, int) or v < low:
                raise ValueError(f"{name} must be an int ≥ {low}, got {v!r}")

    def threshold(self, t: Tensor) -> Tensor:
        """``λ_t = floor + rise·e^{−rate·t}`` (``t`` on this schedule's scale)."""
        return self.threshold_floor + self.threshold_rise * torch.exp(-self.threshold_rate * t)

    def sim_coefficient(self, sim: Tensor, t: Tensor) -> Tensor:
        """``c₃ = sim_scale (σ − sim_offset) e^{(timesteps − t)/sim_decay}``."""
        return (
            self.sim_scale
            * (sim - self.sim_offset)
            * torch.exp((self.timesteps - t) / self.sim_decay)
        )


class AMGState(NamedTuple):
    """What the official schedule carries from one step to the next, per sample.

    ``hold (n,)``: steps ``G_dup`` stays on after this one (0: off); ``caption
    (n,)``: the training row whose caption is the duplicated caption found so far
    (−1: none yet). A sampling run starts from :meth:`fresh`.
    """

    hold: Tensor
    caption: Tensor

    @staticmethod
    def fresh(n: int, device: torch.device | str | None = None) -> AMGState:
        return AMGState(
            torch.zeros(n, dtype=torch.long, device=device),
            torch.full((n,), -1, dtype=torch.long, device=device),
        )


class AMGStep(NamedTuple):
    """One guided step: the noise to hand the scheduler and what the detector saw."""

    eps: Tensor  # (n, ...) guided noise
    fired: Tensor  # (n,) bool: a threshold-triggered term (G_dup, G_sim; paper: σ > λ) ran
    sim: Tensor  # (n,) σ_t (detached; official: σ₁, before guidance)
    index: Tensor  # (n,) nearest training row
    eps_uncond: Tensor  # (n, ...) ε(x_t), detached
    eps_cond: Tensor  # (n, ...) ε(x_t, y), detached
    guided: Tensor  # (n,) bool: eps differs from plain CFG (official: σ₁ > 0; paper: fired)
    state: AMGState | None = None  # official: the state for the next step


# eps_fn(x) -> (eps_uncond, eps_cond); neighbour_fn(x, index) -> eps_neighbour
EpsFn = Callable[[Tensor], tuple[Tensor, Tensor]]
NeighbourFn = Callable[[Tensor, Tensor], Tensor]


@dataclass
class AntiMemorizationGuidance:
    """AMG's configuration and its batched step.

    Attributes:
        detector: a :class:`SimilarityDetector` (``similarity``, ``threshold``; for
            the official duplicated-caption rule also ``neighbours(x0_hat, k) ->
            (n, k)`` rows, nearest first).
        neighbour_contexts: encoder states of the training captions, ``(n_train, L, d)``,
            row ``j`` the caption of the detector's training row ``j``; two rows with
            equal states are the same caption. ``None`` leaves out caption
            deduplication (e.g. unconditional / class-conditional models).
        variant: ``"official"`` (default: the authors' schedule, :class:`OfficialSchedule`)
            or ``"paper"`` (constant ``c₁, c₂, c₃`` and ``λ``; module docstring).
        schedule: the official schedule's constants.
        c1, c2, c3, threshold: the ``"paper"`` variant's coefficients (default 5) and
            ``λ`` (``None``: ``detector.threshold`` at every step); not used by
            ``"official"`` (passing them with it is an error).
        caption_rule: which caption ``G_dup`` steers away from: ``"duplicated"`` (the
            official rule) or ``"nearest"`` (the nearest neighbour's, the paper's
            text). Default: the variant's.
        decode: maps ``x̂₀`` to what the detector reads (e.g.
            ``lambda z: vae.decode(z / vae.config.scaling_factor).sample`` for a
            latent model); ``None``: the detector reads ``x̂₀`` itself (latents, for
            a latent model). Must be differentiable for ``G_sim``.
        grad_through_unet: ``∇σ`` through the UNet as well as ``x̂₀`` (one extra
            backward per step) or, if ``False``, with the noise prediction held
            constant (``(∂σ/∂x̂₀)/√ᾱ_t``). Default: ``False`` for ``"official"``
            (as the authors' code), ``True`` for ``"paper"``.
        skip_idle: ``"paper"`` only: if ``True``, one host sync per step
            (``fired.any()``) skips the gradient and the neighbour forward when no
            sample of the batch fires; the result is the same. Off by default: no
            host sync in the step.
    """

    detector: Any
    neighbour_contexts: Tensor | None = None
    variant: str = "official"
    schedule: OfficialSchedule = field(default_factory=OfficialSchedule)
    c1: float | None = None
    c2: float | None = None
    c3: float | None = None
    threshold: float | None = None
    caption_rule: str | None = None
    decode: Callable[[Tensor], Tensor] | None = None
    grad_through_unet: bool | None = None
    skip_idle: bool = False

    def __post_init__(self) -> None:
        if not callable(getattr(self.detector, "similarity", None)):
            raise TypeError("detector must have a similarity(x0_hat) -> (sim, index) method")
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if not isinstance(self.schedule, OfficialSchedule):
            raise TypeError(
                f"schedule must be an OfficialSchedule, got {type(self.schedule).__name__}"
            )
        official = self.variant == "official"
        if official:
            for name in ("c1", "c2", "c3", "threshold"):
                if getattr(self, name) is not None:
                    raise ValueError(
                        f"{name} belongs to variant='paper'; the official schedule's "
                        "constants are set with schedule=OfficialSchedule(...)"
                    )
            if self.skip_idle:
                raise ValueError("skip_idle belongs to variant='paper'")
        else:
            for name in ("c1", "c2", "c3"):
                if getattr(self, name) is None:
                    setattr(self, name, DEFAULT_C)
            _check_coefficients(self.c1, self.c2, self.c3)
            if self.threshold is None and not hasattr(self.detector, "threshold"):
                raise TypeError("detector has no threshold attribute; pass threshold=")
            if self.threshold is not None:
                _check_threshold(self.threshold)
        if self.grad_through_unet is None:
            self.grad_through_unet = not official
        if self.caption_rule is None:
            self.caption_rule = "duplicated" if official else "nearest"
        if self.caption_rule not in CAPTION_RULES:
            raise ValueError(
                f"caption_rule must be one of {CAPTION_RULES}, got {self.caption_rule!r}"
            )
        self._caption_of: Tensor | None = None
        self._caption_row: Tensor | None = None
        if self.neighbour_contexts is not None:
            if self.neighbour_contexts.dim() != 3:
                raise ValueError(
                    "neighbour_contexts must have shape (n_train, L, d), got "
                    f"{tuple(self.neighbour_contexts.shape)}"
                )
            if self.caption_rule == "duplicated":
                if not callable(getattr(self.detector, "neighbours", None)):
                    raise TypeError(
                        "caption_rule='duplicated' needs a detector with a neighbours(x0_hat, "
                        "k) method; pass caption_rule='nearest' for the nearest neighbour's "
                        "caption"
                    )
                # Captions are told apart by their states: rows with equal states
                # are one caption (as the authors count equal caption strings).
                flat = self.neighbour_contexts.detach().flatten(1)
                _, ids = torch.unique(flat, dim=0, return_inverse=True)
                rows = torch.arange(flat.shape[0], device=ids.device)
                first = torch.full((int(ids.max()) + 1,), flat.shape[0], device=ids.device)
                first = first.scatter_reduce(0, ids, rows, "amin")
                self._caption_of, self._caption_row = ids, first

    @property
    def lam(self) -> float:
        """The ``"paper"`` variant's threshold ``λ`` in force."""
        if self.variant != "paper":
            raise AttributeError("the official schedule's threshold is λ_t (schedule.threshold)")
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
        t: Tensor | float | None = None,
        state: AMGState | None = None,
    ) -> AMGStep:
        """The guided noise for ``x_t`` given the model as two callables (any CFG layout).

        ``eps_fn(x) -> (ε_u, ε_c)`` runs the batched CFG forward; ``neighbour_fn(x,
        index) -> ε(x, y_index)`` the neighbour forward (``None``: no ``G_dup``).
        ``"official"`` also needs ``t``, the timestep on the schedule's scale
        (scalar or ``(n,)``), and takes the previous step's ``state``
        (``None``: the first step of a run); the result's ``state`` is the next's.
        """
        scale = _check_scale(scale)
        n = x_t.shape[0]
        ab = _per_sample(alpha_bar_t, n, x_t, "alpha_bar_t")
        if self.variant == "official":
            if t is None:
                raise ValueError("variant='official' needs t, the timestep of this step")
            if state is None:
                state = AMGState.fresh(n, x_t.device)
            if state.hold.shape != (n,) or state.caption.shape != (n,):
                raise ValueError(
                    f"state must hold ({n},) tensors (one per sample), got "
                    f"{tuple(state.hold.shape)} and {tuple(state.caption.shape)}"
                )
            return self._official_step(eps_fn, neighbour_fn, x_t, ab, scale, t, state)
        return self._paper_step(eps_fn, neighbour_fn, x_t, ab, scale)

    def _detect(self, x_t: Tensor, eps: Tensor | None, ab: Tensor, eps_fn, scale, grad, busy=None):
        """``(σ, index, ∇σ or None, ε_u, ε_c, seen)`` at ``x_t``: ``x̂₀`` from ``eps``
        held fixed, or (``eps=None``) from the CFG noise of ``eps_fn``, through the
        UNet when ``grad_through_unet``. ``busy(σ) -> bool``: whether to take the
        gradient after all (``skip_idle``)."""
        with torch.enable_grad():
            x = x_t.detach().requires_grad_(grad)
            eps_u = eps_c = None
            if eps is None:
                if grad and self.grad_through_unet:
                    eps_u, eps_c = eps_fn(x)
                else:
                    with torch.no_grad():
                        eps_u, eps_c = eps_fn(x.detach())
                eps = eps_u + scale * (eps_c - eps_u)
            x0 = (x - (1 - ab).sqrt() * eps) / ab.sqrt()
            seen = self.decode(x0) if self.decode is not None else x0
            sim, index = self.detector.similarity(seen)
            n = x_t.shape[0]
            if sim.shape != (n,) or index.shape != (n,):
                raise ValueError(
                    f"detector.similarity must return (sim, index) of shape ({n},), got "
                    f"{tuple(sim.shape)} and {tuple(index.shape)}"
                )
            g = None
            if grad and (busy is None or busy(sim.detach())):
                if sim.requires_grad:
                    (g,) = torch.autograd.grad(sim.sum(), x)
                else:
                    g = torch.zeros_like(x)
        return sim.detach(), index.detach(), g, eps_u, eps_c, seen.detach()

    def _duplicated_caption(self, seen: Tensor, index: Tensor) -> Tensor:
        """Per sample, the training row of the caption ``G_dup`` steers from (−1: none)."""
        if self.caption_rule == "nearest":
            return index
        caption_of = self._caption_of.to(index.device)
        k = min(self.schedule.dup_k, caption_of.shape[0])
        rows = self.detector.neighbours(seen, k)
        if rows.shape != (seen.shape[0], k):
            raise ValueError(
                f"detector.neighbours must return ({seen.shape[0]}, {k}) rows, got "
                f"{tuple(rows.shape)}"
            )
        ids = caption_of[rows.to(index.device)]
        n_captions = self._caption_row.shape[0]
        counts = torch.zeros(ids.shape[0], n_captions, dtype=torch.long, device=ids.device)
        counts.scatter_add_(1, ids, torch.ones_like(ids))
        # Ties go to the caption met first, nearest first, as Counter.most_common
        # orders them in the authors' code.
        first = torch.full_like(counts, k)
        position = torch.arange(k, device=ids.device).expand_as(ids)
        first.scatter_reduce_(1, ids, position, "amin")
        mode = (counts * (k + 1) - first).argmax(1)
        count = counts.gather(1, mode[:, None])[:, 0]
        row = self._caption_row.to(index.device)[mode]
        return torch.where(count > self.schedule.dup_min_count, row, torch.full_like(row, -1))

    def _official_step(self, eps_fn, neighbour_fn, x_t, ab, scale, t, state) -> AMGStep:
        sch = self.schedule
        n = x_t.shape[0]
        shape = (n, *([1] * (x_t.dim() - 1)))
        t = torch.as_tensor(t, dtype=torch.float64, device=x_t.device).reshape(-1)
        lam = sch.threshold(t).to(x_t.dtype)
        dedup = neighbour_fn is not None and self.neighbour_contexts is not None
        sim1, index, _, eps_u, eps_c, seen = self._detect(x_t, None, ab, eps_fn, scale, False)
        eps_u, eps_c = eps_u.detach(), eps_c.detach()
        active = sim1 > 0
        caption = state.caption
        if dedup:
            found = self._duplicated_caption(seen, index)
            caption = torch.where(found >= 0, found, caption)
        s = sim1.to(x_t.dtype)
        s1 = ((scale - 1) * s / sch.spe_full).clamp(min=0, max=scale - 1)
        s1 = torch.where(active, s1, torch.zeros_like(s1))
        # s₁ = 0 gives the plain CFG expression, so an inactive sample is bit for bit CFG
        eps = eps_u + (scale - s1).view(shape) * (eps_c - eps_u)
        hold = state.hold
        dup_on = torch.zeros_like(active)
        if dedup:
            trigger = active & (caption >= 0) & (sim1 > lam)
            dup_on = active & (trigger | (hold > 0))
            hold = torch.where(
                trigger,
                torch.full_like(hold, sch.dup_hold - 1),
                torch.where(dup_on, hold - 1, hold),
            )
            with torch.no_grad():
                eps_n = neighbour_fn(x_t.detach(), caption.clamp(min=0))
            r = (scale - 1) - s1
            s2 = torch.minimum(r * s / sch.dup_full, r).clamp(min=0)
            eps = torch.where(dup_on.view(shape), eps + s2.view(shape) * (eps_u - eps_n), eps)
        want_grad = sch.sim_scale > 0
        sim2, _, grad, _, _, seen2 = self._detect(x_t, eps, ab, eps_fn, scale, want_grad)
        if dedup:  # the second detection's caption counts only inside G_dup (ddim.py:313-314)
            found = self._duplicated_caption(seen2, index)
            caption = torch.where(dup_on & (found >= 0), found, caption)
        sim_on = active & (sim2 > lam)
        if want_grad:
            c3 = sch.sim_coefficient(sim2.double(), t).to(x_t.dtype)
            g_sim = (c3.view(shape) * (1 - ab).sqrt()) * grad
            eps = torch.where(sim_on.view(shape), eps + g_sim, eps)
        return AMGStep(
            eps, dup_on | sim_on, sim1, index, eps_u, eps_c, active, AMGState(hold, caption)
        )

    def _paper_step(self, eps_fn, neighbour_fn, x_t, ab, scale) -> AMGStep:
        lam = self.lam
        want_grad = self.c3 > 0
        busy_fn = (lambda sim: bool((sim > lam).any())) if self.skip_idle else None
        sim, index, grad, eps_u, eps_c, _ = self._detect(
            x_t, None, ab, eps_fn, scale, want_grad, busy_fn
        )
        eps_u, eps_c = eps_u.detach(), eps_c.detach()
        fired = sim > lam
        busy = bool(fired.any()) if self.skip_idle else True
        eps_n = None
        if neighbour_fn is not None and self.neighbour_contexts is not None and busy:
            with torch.no_grad():
                eps_n = neighbour_fn(x_t.detach(), index)
        if not busy:
            eps = eps_u + scale * (eps_c - eps_u)
        else:
            eps = _amg_noise(
                eps_u, eps_c, eps_n, sim, grad, ab, scale, self.c1, self.c2, self.c3, lam
            )
        return AMGStep(eps, fired, sim, index, eps_u, eps_c, fired)

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
        state: AMGState | None = None,
        num_train_timesteps: int = 1000,
    ) -> AMGStep:
        """The guided noise for a batch of a ``UNet2DConditionModel``-like ``unet``.

        One batched forward on ``[cond; uncond]`` (the layout of
        :func:`gradproj.lab.world.sample`), one on the captions' states, and (for
        ``G_sim``) one backward, whatever the batch size. ``context`` ``(n or 1, L, d)``,
        ``null_context`` ``(1 or n, L, d)``; ``t`` the UNet's timestep, of a
        scheduler with ``num_train_timesteps`` (rescaled to the official
        schedule's); ``state``: the previous step's (official). The UNet must treat
        samples independently (eval mode, no batch norm) for ``∇σ`` of ``sum σ``
        to be per-sample.
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

        return self.step(
            eps_fn,
            neighbour_fn,
            x_t,
            alpha_bar_t,
            scale=scale,
            t=_schedule_time(t, num_train_timesteps, self.schedule),
            state=state,
        )


def _schedule_time(t: Tensor | float, num_train_timesteps: int, schedule: OfficialSchedule):
    """A scheduler's timestep on the official schedule's scale (SD's 1000 steps)."""
    t = torch.as_tensor(t, dtype=torch.float64)
    if num_train_timesteps == schedule.timesteps:
        return t
    return t * (schedule.timesteps / num_train_timesteps)


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
    ``fired (n,)`` (long), the number of steps at which a threshold-triggered term
    ran for each sample (:class:`AMGStep`). Where AMG leaves every step alone (the
    ``"paper"`` variant with ``λ = +inf``; the official one with ``σ ≤ 0``) the
    samples equal :func:`gradproj.lab.world.sample`'s bit for bit. ``ᾱ_t`` is the
    scheduler's ``alphas_cumprod[t]``; one run is one official state.
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
    state = None
    for t in ddim.timesteps:
        out = amg.guided_noise(
            unet,
            x,
            t,
            context,
            null_context,
            alphas[t],
            scale=scale,
            state=state,
            num_train_timesteps=ddim.config.num_train_timesteps,
        )
        state = out.state
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
    of the last call sequence (reset with :meth:`reset`). The official schedule's
    per-sample state runs from call to call and starts afresh when a call's
    timestep is not below the previous call's or the batch size changes (a new
    sampling run: pipelines walk the timesteps downwards).
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
        self.num_train_timesteps = alphas_cumprod.shape[0]
        self.fired_counts: Tensor | None = None
        self.state: AMGState | None = None
        self._last_t: float | None = None

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("inner"), name)

    def reset(self) -> None:
        self.fired_counts = None
        self.state = None
        self._last_t = None

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
        t_all = torch.as_tensor(t, device=sample.device, dtype=torch.float64).reshape(-1)
        t_now = t_all[n] if t_all.numel() == m else t_all[0]
        state = self.state
        if state is not None and state.hold.shape[0] != n:
            state = None
        elif state is not None:  # on the device: no host sync to tell runs apart
            new_run = t_now >= self._last_t
            state = AMGState(
                torch.where(new_run, torch.zeros_like(state.hold), state.hold),
                torch.where(new_run, torch.full_like(state.caption, -1), state.caption),
            )
        self._last_t = t_now
        out = self.amg.step(
            eps_fn,
            neighbour_fn,
            sample[:n],
            ab,
            scale=scale,
            t=_schedule_time(t_now, self.num_train_timesteps, self.amg.schedule),
            state=state,
        )
        self.state = out.state
        guided = out.guided.view(n, *([1] * (sample.dim() - 1)))
        eps_c = torch.where(
            guided, out.eps_uncond + (out.eps - out.eps_uncond) / scale, out.eps_cond
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
