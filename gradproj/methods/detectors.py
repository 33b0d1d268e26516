"""Memorization detectors for text-to-image diffusion models, and their validation.

Two signals, both from the literature on diffusion memorization:

- **nearest-neighbour similarity of the predicted clean image** (the per-sample
  test of Anti-Memorization Guidance, Chen, Liu & Xu, CVPR 2024, arXiv 2404.00922):
  at a sampling step the model's estimate of the clean image is
  ``x̂₀ = (x_t − √(1−ᾱ_t) ε̂) / √ᾱ_t`` (:func:`predicted_x0`); it is compared with
  every training image in a feature space ``f`` and its similarity to the nearest
  one, ``s(x̂₀) = max_j sim(f(x̂₀), f(x_j))``, above a threshold ``λ`` says
  "memorized" (:class:`MemorizationDetector`). The similarity is differentiable
  in ``x̂₀``: AMG's guidance steps along ``−∇_{x̂₀} s``.
- **text-conditional noise-prediction magnitude** (Wen, Liu, Chen & Lyu, ICLR 2024,
  "Detecting, Explaining, and Mitigating Memorization in Diffusion Models"):
  ``‖ε_θ(x_t, t, c) − ε_θ(x_t, t, ∅)‖₂`` per sample (:func:`noise_magnitude`),
  averaged over the first few sampling steps per prompt; memorized prompts pull
  the prediction far from the unconditional one from the very first step.

Feature spaces (any callable ``(n, C, H, W) → (n, F)`` plugs in):

- :func:`pixel_features` with ``metric="l2"``: the *normalized ℓ₂ distance* of
  Carlini et al. ("Extracting Training Data from Diffusion Models", 2023), which
  seed 002 uses on CIFAR-10: ``ℓ₂(a, b) = ‖a − b‖₂ / √D`` (root-mean-square pixel
  difference, ``D = C·H·W``). The similarity is its negative,
  ``sim = −‖a − b‖₂ / √D`` (0 for an exact copy, higher = more memorized), so one
  convention (higher = more memorized) holds for every metric;
- :class:`ProbeFeatures` with ``metric="cosine"``: the trunk features of any
  trained network with a ``features`` method (the lab's :class:`gradproj.lab.probes.Probe`:
  no hub weights are available here; AMG uses SSCD on Stable Diffusion),
  ``sim = ⟨f(a), f(b)⟩ / (‖f(a)‖ ‖f(b)‖)``.

Validation lives in the lab (:mod:`gradproj.lab.testbed`): a memorization
testbed with duplicated secret images, on which each detector's ROC AUC is measured.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

FeatureFn = Callable[[Tensor], Tensor]

METRICS = ("cosine", "l2")
# Default thresholds λ (similarity > λ ⇒ memorized). Nominal, not calibrated on a
# trained model: "l2" −0.1 is an RMS pixel distance of 0.1 on the [-1, 1] scale (5% of
# the range: a replica up to sampling noise); "cosine" 0.99 in the probe's feature
# space. Calibrate on known-fresh samples with MemorizationDetector.calibrate.
DEFAULT_THRESHOLDS = {"cosine": 0.99, "l2": -0.1}


# --------------------------------------------------------------------------- basics


def _check_tensor(name: str, x: Any, dims: int | None = None) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if dims is not None and x.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D, got shape {tuple(x.shape)}")
    return x


def predicted_x0(x_t: Tensor, eps: Tensor, alpha_bar_t: float | Tensor) -> Tensor:
    """The clean-image estimate ``x̂₀ = (x_t − √(1−ᾱ_t) ε) / √ᾱ_t``.

    ``x_t`` and ``eps``: ``(n, ...)`` of one shape; ``alpha_bar_t`` (``ᾱ_t``, in
    ``(0, 1]``): a Python number, a 0-d tensor, or an ``(n,)`` tensor (one per
    sample). Inverts ``x_t = √ᾱ_t x₀ + √(1−ᾱ_t) ε`` for ``x₀``; differentiable.
    """
    _check_tensor("x_t", x_t)
    _check_tensor("eps", eps)
    if eps.shape != x_t.shape:
        raise ValueError(
            f"eps must have the shape of x_t {tuple(x_t.shape)}, got {tuple(eps.shape)}"
        )
    a = torch.as_tensor(alpha_bar_t, dtype=x_t.dtype, device=x_t.device)
    if a.dim() == 1:
        if x_t.dim() == 0 or a.shape[0] != x_t.shape[0]:
            raise ValueError(
                f"alpha_bar_t of shape {tuple(a.shape)} must have one entry per sample "
                f"(x_t has {x_t.shape[0] if x_t.dim() else 0})"
            )
        a = a.reshape(-1, *([1] * (x_t.dim() - 1)))
    elif a.dim() != 0:
        raise ValueError(f"alpha_bar_t must be a scalar or (n,), got shape {tuple(a.shape)}")
    if bool(((a <= 0) | (a > 1)).any()):
        raise ValueError("alpha_bar_t must lie in (0, 1]")
    return (x_t - (1 - a).sqrt() * eps) / a.sqrt()


def pixel_features(images: Tensor) -> Tensor:
    """Pixels as features: ``(n, C, H, W) → (n, C·H·W)`` (the flattened image)."""
    return images.flatten(1)


class ProbeFeatures:
    """The trunk features of a trained network with a ``features`` method: ``(n, C, H, W) → (n, F)``
    (e.g. the lab's :class:`gradproj.lab.probes.Probe`).

    Inputs are clamped to ``[-1, 1]`` first (the range the probe was trained on;
    ``x̂₀`` early in sampling leaves it). Differentiable in the input: no
    ``torch.no_grad`` here (AMG's guidance needs ``∇_{x̂₀}``); the probe's own
    parameters should be frozen (``train_probe`` returns them so).
    """

    def __init__(self, probe: torch.nn.Module) -> None:
        if not hasattr(probe, "features"):
            raise TypeError(
                f"probe must be a module with a features method, got {type(probe).__name__}"
            )
        self.probe = probe

    def __call__(self, images: Tensor) -> Tensor:
        p = next(self.probe.parameters())
        x = images.clamp(-1, 1)
        if x.dtype != p.dtype or x.device != p.device:  # e.g. float64 gradcheck
            self.probe = self.probe.to(dtype=x.dtype, device=x.device)
        return self.probe.features(x)

    def __repr__(self) -> str:
        return "ProbeFeatures(probe)"


def probe_features(probe: torch.nn.Module) -> ProbeFeatures:
    """The learned feature extractor of :class:`ProbeFeatures` (a function-style alias)."""
    return ProbeFeatures(probe)


# --------------------------------------------------------------------------- detector


class ThresholdDetector:
    """What every nearest-neighbour detector shares: a differentiable ``similarity``,
    its detached ``score``, a ``threshold`` and its calibration.

    Subclasses define ``similarity(x0_hat) -> (s (n,), index (n,))`` and set
    ``threshold``; a sample is flagged where ``s > threshold``, the rule AMG fires on
    (:mod:`gradproj.methods.guidance`). Strict because :meth:`calibrate` puts the
    threshold on a quantile of real scores: where scores tie (duplicated or
    near-identical images give equal nearest-neighbour similarities), ``≥`` would flag
    every tied image — on the lab's held-out real images 37 % instead of the 5 % asked for.
    """

    threshold: float

    def similarity(self, x0_hat: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def score(self, x0_hat: Tensor) -> Tensor:
        """The similarity alone, detached: ``similarity(x0_hat)[0]`` without autograd."""
        with torch.no_grad():
            return self.similarity(x0_hat)[0]

    def is_memorized(self, x0_hat: Tensor) -> Tensor:
        """``s(x̂₀) > threshold`` per sample (bool ``(n,)``)."""
        return self.score(x0_hat) > self.threshold

    def calibrate(self, fresh_x0: Tensor, *, fpr: float = 0.05) -> float:
        """Set ``threshold`` to the ``1 − fpr`` quantile of the scores of known-fresh
        images (so about a share ``fpr`` of them are flagged); return it."""
        if not 0 <= fpr < 1:
            raise ValueError(f"fpr must lie in [0, 1), got {fpr}")
        s = self.score(fresh_x0).double()
        self.threshold = float(torch.quantile(s, 1 - fpr))
        return self.threshold


class MemorizationDetector(ThresholdDetector):
    """Nearest-training-neighbour similarity of ``x̂₀`` with a threshold (seed 002's test).

    ``s(x̂₀) = max_j sim(f(x̂₀), f(x_j))`` over the training images ``x_j``;
    memorized when ``s > threshold``. Metrics (higher = more similar):

    - ``"cosine"``: ``⟨f(a), f(b)⟩ / (‖f(a)‖ ‖f(b)‖)`` in ``[-1, 1]`` (default
      for learned features);
    - ``"l2"``: ``−‖f(a) − f(b)‖₂ / √F``, the negated normalized ℓ₂ distance of
      Carlini et al. (with :func:`pixel_features`: the RMS pixel difference, seed
      002's CIFAR-10 measure); at most 0, 0 for an exact copy.

    ``features``: any callable ``(n, C, H, W) → (n, F)`` (default
    :func:`pixel_features`); ``metric`` defaults to ``"l2"`` with pixel features
    and ``"cosine"`` otherwise; ``threshold`` to :data:`DEFAULT_THRESHOLDS`.
    Training features are computed once, in batches of ``batch_size``; queries
    compare against them ``batch_size`` training rows at a time.
    """

    def __init__(
        self,
        train_images: Tensor,
        *,
        features: FeatureFn | None = None,
        metric: str | None = None,
        threshold: float | None = None,
        batch_size: int = 1024,
    ) -> None:
        _check_tensor("train_images", train_images, dims=4)
        if train_images.shape[0] == 0:
            raise ValueError("train_images must hold at least one image, got 0")
        if features is None:
            features = pixel_features
        if not callable(features):
            raise TypeError(f"features must be callable, got {type(features).__name__}")
        if metric is None:
            metric = "l2" if features is pixel_features else "cosine"
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.features = features
        self.metric = metric
        self.threshold: float = float(
            DEFAULT_THRESHOLDS[metric] if threshold is None else threshold
        )
        self.batch_size = batch_size
        self.image_shape = tuple(train_images.shape[1:])
        with torch.no_grad():
            feats = [
                self._features(train_images[i : i + batch_size], "train_images")
                for i in range(0, train_images.shape[0], batch_size)
            ]
        self.train_features = torch.cat(feats)  # (N, F)
        self._train_unit = torch.nn.functional.normalize(self.train_features, dim=1)

    @classmethod
    def from_probe(
        cls, train_images: Tensor, probe: torch.nn.Module, **kwargs: Any
    ) -> MemorizationDetector:
        """The learned-feature detector: :class:`ProbeFeatures` of ``probe``, cosine metric."""
        return cls(train_images, features=ProbeFeatures(probe), **kwargs)

    def __len__(self) -> int:
        return self.train_features.shape[0]

    def _features(self, images: Tensor, name: str) -> Tensor:
        f = self.features(images)
        if not isinstance(f, Tensor) or f.dim() != 2 or f.shape[0] != images.shape[0]:
            got = tuple(f.shape) if isinstance(f, Tensor) else type(f).__name__
            raise ValueError(
                f"features must map {name} of shape {tuple(images.shape)} to "
                f"({images.shape[0]}, F), got {got}"
            )
        return f

    def _check_query(self, x0_hat: Tensor) -> None:
        _check_tensor("x0_hat", x0_hat, dims=4)
        if tuple(x0_hat.shape[1:]) != self.image_shape:
            raise ValueError(
                f"x0_hat must be (n, {', '.join(map(str, self.image_shape))}) like the "
                f"training images, got {tuple(x0_hat.shape)}"
            )

    def similarity(self, x0_hat: Tensor) -> tuple[Tensor, Tensor]:
        """``(s, j)``: the similarity ``s (n,)`` of each ``x̂₀`` to its nearest training
        image and that image's index ``j (n,)`` (long).

        The neighbour is found without autograd, ``batch_size`` training rows at a
        time (for ``"l2"`` through ``‖a‖² + ‖b‖² − 2⟨a, b⟩``); ``s`` is then
        recomputed exactly for the chosen pair, with autograd, so
        ``∂s/∂x̂₀`` is the gradient of ``sim(f(x̂₀), f(x_j))`` at the argmax (the
        gradient of the max wherever it is unique). Ties go to the lowest index.
        """
        self._check_query(x0_hat)
        q = self._features(x0_hat, "x0_hat")  # (n, F), with autograd
        if q.shape[1] != self.train_features.shape[1]:
            raise ValueError(
                f"features gave {q.shape[1]} features for x0_hat but "
                f"{self.train_features.shape[1]} for the training images"
            )
        train = self.train_features.to(device=q.device, dtype=q.dtype)
        index = self._nearest(q.detach(), train)
        b = train[index]
        if self.metric == "cosine":
            sim = torch.nn.functional.cosine_similarity(q, b, dim=1, eps=1e-12)
        else:
            sim = -torch.linalg.vector_norm(q - b, dim=1) / math.sqrt(q.shape[1])
        return sim, index

    @torch.no_grad()
    def neighbours(self, x0_hat: Tensor, k: int) -> Tensor:
        """The ``k`` most similar training rows of each ``x̂₀``, nearest first: ``(n, k)`` long.

        What AMG's official duplicated-caption rule reads (the captions of the
        nearest training images); no autograd. Ties go to the lowest index.
        """
        self._check_query(x0_hat)
        if not isinstance(k, int) or not 1 <= k <= len(self):
            raise ValueError(f"k must be an int in [1, {len(self)}] (the training rows), got {k!r}")
        q = self._features(x0_hat, "x0_hat")
        train = self.train_features.to(device=q.device, dtype=q.dtype)
        if self.metric == "cosine":
            q = torch.nn.functional.normalize(q, dim=1)
            train = self._train_unit.to(device=q.device, dtype=q.dtype)
        scores = []
        for start in range(0, train.shape[0], self.batch_size):
            chunk = train[start : start + self.batch_size]
            if self.metric == "cosine":
                scores.append(q @ chunk.T)
            else:  # −squared distance, up to the ‖q‖² shared by a row
                scores.append(2 * q @ chunk.T - (chunk * chunk).sum(1))
        # a stable sort keeps ties in index order (topk does not promise it)
        return torch.cat(scores, 1).sort(dim=1, descending=True, stable=True).indices[:, :k]

    @torch.no_grad()
    def _nearest(self, q: Tensor, train: Tensor) -> Tensor:
        """Index of the most similar training row for every query row (chunked)."""
        if self.metric == "cosine":
            q = torch.nn.functional.normalize(q, dim=1)
            train = self._train_unit.to(device=q.device, dtype=q.dtype)
        best_val, best_idx = None, None
        for start in range(0, train.shape[0], self.batch_size):
            chunk = train[start : start + self.batch_size]
            if self.metric == "cosine":
                score = q @ chunk.T
            else:  # −squared distance, up to the ‖q‖² shared by a row
                score = 2 * q @ chunk.T - (chunk * chunk).sum(1)
            val, idx = score.max(1)
            idx = idx + start
            if best_val is None:
                best_val, best_idx = val, idx
            else:
                better = val > best_val  # strict: ties keep the lower index
                best_val = torch.where(better, val, best_val)
                best_idx = torch.where(better, idx, best_idx)
        return best_idx

    def __repr__(self) -> str:
        return (
            f"MemorizationDetector(n_train={len(self)}, features={self.features!r}, "
            f"metric={self.metric!r}, threshold={self.threshold})"
        )


class ContrastDetector(ThresholdDetector):
    """Nearest-neighbour contrast: similarity to the nearest *concept* training image
    minus similarity to the nearest *other* training image (both detectors' metric).

    Seed 002's detector asks "is x̂₀ close to some training image?"; in a world where
    every image has near-twins with and without the concept that is true of almost
    every sample (the lab measured AUC 0.66 on generated samples). The contrast asks
    "is it closer to the concept's images than to the rest?" (a 1-NN classifier;
    measured AUC 0.98 there). Same interface as :class:`MemorizationDetector`;
    ``index`` is the nearest concept image's.
    """

    def __init__(
        self, concept: MemorizationDetector, other: MemorizationDetector, threshold: float = 0.0
    ) -> None:
        self.concept, self.other, self.threshold = concept, other, threshold

    def similarity(self, x0_hat: Tensor) -> tuple[Tensor, Tensor]:
        near, index = self.concept.similarity(x0_hat)
        return near - self.other.similarity(x0_hat)[0], index

    def neighbours(self, x0_hat: Tensor, k: int) -> Tensor:
        """The ``k`` nearest *concept* training rows (:meth:`MemorizationDetector.neighbours`)."""
        return self.concept.neighbours(x0_hat, k)

    def __repr__(self) -> str:
        return f"ContrastDetector(threshold={self.threshold})"


class RescaledDetector(ThresholdDetector):
    """A detector's similarity on another scale: ``s' = a·s + b`` (``a > 0``), same ranking.

    AMG's official constants are in the units of the authors' SSCD cosine
    similarity (:class:`gradproj.methods.guidance.OfficialSchedule`); a detector
    with other units is mapped onto that scale. :meth:`from_anchors` maps two
    reference scores to two target values, e.g. a calibrated threshold to 0.3
    (the schedule's floor) and the typical score of real concept images to 0.5
    (SSCD's usual "copy" level, where the official despecification saturates).
    ``threshold`` is the inner one mapped; ``neighbours`` is the inner detector's.
    """

    def __init__(self, inner: Any, scale: float, shift: float) -> None:
        if not callable(getattr(inner, "similarity", None)):
            raise TypeError("inner must have a similarity(x0_hat) -> (sim, index) method")
        scale, shift = float(scale), float(shift)
        if not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"scale must be a finite number > 0, got {scale}")
        if not math.isfinite(shift):
            raise ValueError(f"shift must be finite, got {shift}")
        self.inner, self.scale, self.shift = inner, scale, shift
        self.threshold = scale * float(getattr(inner, "threshold", math.nan)) + shift

    @classmethod
    def from_anchors(
        cls, inner: Any, low: float, high: float, *, to: tuple[float, float] = (0.3, 0.5)
    ) -> RescaledDetector:
        """Map score ``low`` to ``to[0]`` and ``high`` to ``to[1]`` (``high > low``)."""
        low, high = float(low), float(high)
        if not (math.isfinite(low) and math.isfinite(high) and high > low):
            raise ValueError(f"the anchors must be finite with high > low, got {low} and {high}")
        if not to[1] > to[0]:
            raise ValueError(f"to must be increasing, got {to}")
        scale = (to[1] - to[0]) / (high - low)
        return cls(inner, scale, to[0] - scale * low)

    def similarity(self, x0_hat: Tensor) -> tuple[Tensor, Tensor]:
        sim, index = self.inner.similarity(x0_hat)
        return sim * self.scale + self.shift, index

    def neighbours(self, x0_hat: Tensor, k: int) -> Tensor:
        return self.inner.neighbours(x0_hat, k)

    def __repr__(self) -> str:
        return f"RescaledDetector({self.inner!r}, scale={self.scale:.6g}, shift={self.shift:.6g})"


# --------------------------------------------------------------------------- noise signal


def noise_magnitude(
    unet: torch.nn.Module,
    x_t: Tensor,
    t: int | Tensor,
    context: Tensor,
    null_context: Tensor,
) -> Tensor:
    """Wen et al.'s signal ``‖ε_θ(x_t, t, c) − ε_θ(x_t, t, ∅)‖₂`` per sample, ``(n,)``.

    ``x_t (n, C, H, W)``; ``t``: an int, a 0-d or an ``(n,)`` tensor;
    ``context``/``null_context``: ``(n, L, d)`` or ``(1, L, d)``. One batched forward
    of ``[x_t; x_t]`` with ``[c; ∅]``. Runs under the caller's grad mode.
    """
    _check_tensor("x_t", x_t, dims=4)
    _check_tensor("context", context, dims=3)
    _check_tensor("null_context", null_context, dims=3)
    n = x_t.shape[0]
    for name, c in (("context", context), ("null_context", null_context)):
        if c.shape[0] not in (1, n):
            raise ValueError(
                f"{name} must be (n, L, d) or (1, L, d) with n = {n}, got {tuple(c.shape)}"
            )
    if context.shape[1:] != null_context.shape[1:]:
        raise ValueError(
            f"context {tuple(context.shape)} and null_context {tuple(null_context.shape)} "
            "must agree in (L, d)"
        )
    t = torch.as_tensor(t, device=x_t.device)
    if t.dim() == 1 and t.shape[0] != n:
        raise ValueError(f"t must be a scalar or (n,) with n = {n}, got shape {tuple(t.shape)}")
    if t.dim() > 1:
        raise ValueError(f"t must be a scalar or (n,), got shape {tuple(t.shape)}")
    both = torch.cat([context.expand(n, -1, -1), null_context.expand(n, -1, -1)])
    tt = torch.cat([t, t]) if t.dim() == 1 else t
    eps_c, eps_0 = unet(torch.cat([x_t, x_t]), tt, both).sample.chunk(2)
    return torch.linalg.vector_norm((eps_c - eps_0).flatten(1), dim=1)


@torch.no_grad()
def sample_with_signals(
    unet: torch.nn.Module,
    noise_scheduler,
    context: Tensor,
    null_context: Tensor,
    noise: Tensor,
    *,
    steps: int,
    guidance: float,
    x0_steps: tuple[int, ...] = (),
) -> dict[str, Any]:
    """DDIM sampling with classifier-free guidance (as :func:`gradproj.lab.world.sample`),
    recording the detectors' inputs on the way, at no extra forward.

    Returns ``{"samples": (n, C, H, W) in [-1, 1], "magnitude": (steps, n)``
    ``‖ε_c − ε_∅‖₂`` at every step, ``"x0": {k: x̂₀ (n, C, H, W)}`` for every step
    index ``k`` in ``x0_steps`` (0 = first step; computed from the guided
    ``ε̂ = ε_∅ + s (ε_c − ε_∅)`` that the sampler follows, clamped to ``[-1, 1]``
    like the scheduler's own estimate), ``"timesteps": (steps,)}``.
    """
    from diffusers import DDIMScheduler

    ddim = DDIMScheduler.from_config(noise_scheduler.config)
    ddim.set_timesteps(steps)
    for k in x0_steps:
        if not 0 <= k < steps:
            raise ValueError(f"x0_steps entries must lie in [0, {steps}), got {k}")
    n = noise.shape[0]
    context = context.expand(n, *context.shape[-2:])
    both = torch.cat([context, null_context.expand(n, *null_context.shape[-2:])])
    alphas = ddim.alphas_cumprod
    x = noise.clone()
    mags, x0 = [], {}
    for k, t in enumerate(ddim.timesteps):
        eps_c, eps_0 = unet(torch.cat([x, x]), t, both).sample.chunk(2)
        mags.append(torch.linalg.vector_norm((eps_c - eps_0).flatten(1), dim=1))
        eps = eps_0 + guidance * (eps_c - eps_0)
        if k in x0_steps:
            x0[k] = predicted_x0(x, eps, float(alphas[int(t)])).clamp(-1, 1)
        x = ddim.step(eps, t, x).prev_sample
    return {
        "samples": x.clamp(-1, 1),
        "magnitude": torch.stack(mags),
        "x0": x0,
        "timesteps": ddim.timesteps.clone(),
    }


def prompt_noise_score(magnitude: Tensor, first: int = 3) -> Tensor:
    """Wen et al.'s per-prompt score: ``‖ε_c − ε_∅‖₂`` averaged over the first
    ``first`` sampling steps; ``magnitude (steps, n)`` from :func:`sample_with_signals`."""
    _check_tensor("magnitude", magnitude, dims=2)
    if not 1 <= first <= magnitude.shape[0]:
        raise ValueError(f"first must lie in [1, {magnitude.shape[0]}], got {first}")
    return magnitude[:first].mean(0)


# --------------------------------------------------------------------------- ROC AUC


def roc_auc(scores: Tensor | Any, labels: Tensor | Any) -> float:
    """Exact ROC AUC: ``P(score of a positive > score of a negative) + ½ P(tie)``.

    The Mann–Whitney ``U`` of the positives over ``n₊ n₋``, from average ranks
    (ties share their mean rank), in float64. ``labels``: bool or 0/1, positive =
    memorized; higher score = more memorized. Raises on empty input, length
    mismatch, non-finite scores or labels of one class only.
    """
    s = torch.as_tensor(scores).detach().double().flatten().cpu()
    y = torch.as_tensor(labels).detach().flatten().cpu()
    if s.numel() == 0:
        raise ValueError("scores must not be empty")
    if y.numel() != s.numel():
        raise ValueError(f"labels ({y.numel()}) and scores ({s.numel()}) differ in length")
    if not bool(torch.isfinite(s).all()):
        raise ValueError("scores must be finite")
    if y.dtype != torch.bool:
        if not bool(((y == 0) | (y == 1)).all()):
            raise ValueError("labels must be bool or 0/1")
        y = y == 1
    n_pos = int(y.sum())
    n_neg = y.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(
            f"labels must hold both classes, got {n_pos} positive and {n_neg} negative"
        )
    _, inverse, counts = torch.unique(s, sorted=True, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()  # rank of the last member of each tie group (1-based)
    avg_rank = ends - (counts.double() - 1) / 2
    rank_sum = float(avg_rank[inverse][y].sum())
    u = rank_sum - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)
