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
- :class:`ProbeFeatures` with ``metric="cosine"``: the 32-d trunk features of a
  :class:`gradproj.probes.Probe` trained on the project's own data (no hub
  weights are available here; AMG uses SSCD on Stable Diffusion),
  ``sim = ⟨f(a), f(b)⟩ / (‖f(a)‖ ‖f(b)‖)``.

Validation (:func:`validate_detectors`): the demo's world has only 72 captions
and images that differ by ±1 px jitter, so memorized and fresh samples are made
on purpose: a **memorization testbed** (:func:`build_testbed`) takes the demo's
training data, removes every image of a few caption combos and puts back, for
each, ONE *secret* image (a seeded random smooth colour pattern, unlike any
shape) duplicated many times under that caption — caption and image
duplication, the two causes seed 002 names. A small demo UNet is trained on it;
samples of the secret captions are *memorized* (label by construction; how many
truly replicate their secret is reported too) and samples of the ordinary
captions are *fresh*. Each detector's ROC AUC (:func:`roc_auc`) is measured on
that labelled set.

Caveat of this world: every ordinary image has near-duplicates in the training
set by construction (27 jitters per caption), so a *well-trained* model's fresh
samples also sit close to a training image in pixel space, and a class-trained
probe maps all images of a caption to nearly one feature; the secrets are what
make the labels meaningful, and the detectors separate them only once the model
reproduces them (``n_replicating`` in the report says whether it does).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from gradproj import probes, shapes

FeatureFn = Callable[[Tensor], Tensor]

METRICS = ("cosine", "l2")
# Default thresholds λ (similarity ≥ λ ⇒ memorized). Nominal, not calibrated on a
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
    """The trunk features of a trained :class:`gradproj.probes.Probe`: ``(n, 3, s, s) → (n, 32)``.

    Inputs are clamped to ``[-1, 1]`` first (the range the probe was trained on;
    ``x̂₀`` early in sampling leaves it). Differentiable in the input: no
    ``torch.no_grad`` here (AMG's guidance needs ``∇_{x̂₀}``); the probe's own
    parameters should be frozen (``train_probe`` returns them so).
    """

    def __init__(self, probe: probes.Probe) -> None:
        if not hasattr(probe, "features"):
            raise TypeError(f"probe must be a gradproj.probes.Probe, got {type(probe).__name__}")
        self.probe = probe

    def __call__(self, images: Tensor) -> Tensor:
        p = next(self.probe.parameters())
        x = images.clamp(-1, 1)
        if x.dtype != p.dtype or x.device != p.device:  # e.g. float64 gradcheck
            self.probe = self.probe.to(dtype=x.dtype, device=x.device)
        return self.probe.features(x)

    def __repr__(self) -> str:
        return "ProbeFeatures(probe)"


def probe_features(probe: probes.Probe) -> ProbeFeatures:
    """The learned feature extractor of :class:`ProbeFeatures` (a function-style alias)."""
    return ProbeFeatures(probe)


# --------------------------------------------------------------------------- detector


class MemorizationDetector:
    """Nearest-training-neighbour similarity of ``x̂₀`` with a threshold (seed 002's test).

    ``s(x̂₀) = max_j sim(f(x̂₀), f(x_j))`` over the training images ``x_j``;
    memorized when ``s ≥ threshold``. Metrics (higher = more similar):

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
        cls, train_images: Tensor, probe: probes.Probe, **kwargs: Any
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

    def score(self, x0_hat: Tensor) -> Tensor:
        """The similarity alone, detached: ``similarity(x0_hat)[0]`` without autograd."""
        with torch.no_grad():
            return self.similarity(x0_hat)[0]

    def is_memorized(self, x0_hat: Tensor) -> Tensor:
        """``s(x̂₀) ≥ threshold`` per sample (bool ``(n,)``)."""
        return self.score(x0_hat) >= self.threshold

    def calibrate(self, fresh_x0: Tensor, *, fpr: float = 0.05) -> float:
        """Set ``threshold`` to the ``1 − fpr`` quantile of the scores of known-fresh
        images (so about a share ``fpr`` of them are flagged); return it."""
        if not 0 <= fpr < 1:
            raise ValueError(f"fpr must lie in [0, 1), got {fpr}")
        s = self.score(fresh_x0).double()
        self.threshold = float(torch.quantile(s, 1 - fpr))
        return self.threshold

    def __repr__(self) -> str:
        return (
            f"MemorizationDetector(n_train={len(self)}, features={self.features!r}, "
            f"metric={self.metric!r}, threshold={self.threshold})"
        )


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
    """DDIM sampling with classifier-free guidance (as :func:`gradproj.demo.sample`),
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


# --------------------------------------------------------------------------- testbed


@dataclass
class TestbedConfig:
    """The memorization testbed, its model and its sampling.

    Measured (seed 0, 2 shared CPU cores): neither ``steps=300`` on the full demo
    data nor ``steps=200`` with ``demo={"n_train": 128}, copies=32`` made the model
    reproduce its secrets (RMS pixel distance of secret-prompt samples to their
    nearest training image ≈ 0.41–0.55, no better than fresh samples), so the
    similarity detectors had nothing to find (AUC 0.31–0.66); Wen et al.'s
    magnitude reached 0.75 in the second. Memorization needs a longer run
    (``steps`` ≥ 800 or so) than the test suite can afford.
    """

    __test__ = False  # not a pytest class

    n_secret: int = 4  # caption combos whose images are replaced by one secret image
    copies: int = 64  # duplicates of each secret image in the training set
    steps: int = 600
    batch_size: int = 32
    lr: float = 6e-3
    caption_dropout: float = 0.2
    block_out_channels: tuple[int, ...] = (16, 32)
    probe_steps: int = 300
    n_samples: int = 32  # per class (memorized / fresh)
    sample_steps: int = 10  # DDIM
    guidance: float = 3.0
    early_step: int = 3  # DDIM step index whose x̂₀ is also scored
    magnitude_steps: int = 3  # Wen et al.: mean over the first steps
    replica_distance: float = 0.1  # RMS pixel distance under which a sample replicates
    demo: dict[str, Any] = field(default_factory=dict)  # DemoConfig overrides (base data)


SMALL = TestbedConfig(steps=250, n_samples=16, probe_steps=150, sample_steps=8, early_step=2)


def secret_images(n: int, size: int = 16, *, generator: torch.Generator | None = None) -> Tensor:
    """``n`` seeded random smooth colour patterns ``(n, 3, size, size)`` in ``[-1, 1]``:
    uniform ``4×4`` RGB grids upsampled bilinearly (nothing like a shape)."""
    grid = torch.rand(n, 3, 4, 4, generator=generator) * 2 - 1
    return torch.nn.functional.interpolate(
        grid, size=(size, size), mode="bilinear", align_corners=True
    )


@dataclass
class Testbed:
    """Training data with duplicated secrets, its text side and the learned-feature probe."""

    __test__ = False

    images: Tensor  # (N, 3, s, s): ordinary images, then the secret copies
    captions: list[str]
    contexts: Tensor  # (N, L, d)
    null_context: Tensor  # (1, L, d)
    secret_images: Tensor  # (n_secret, 3, s, s)
    secret_captions: list[str]
    secret_of_row: Tensor  # (N,) long: k for the copies of secret k, -1 for ordinary rows
    ordinary_captions: list[str]  # every caption combo left in the data
    tok: Any
    encoder: Any
    probe: Any


def build_testbed(cfg: TestbedConfig | None = None, seed: int = 0) -> Testbed:
    """The demo's training data (``DemoConfig`` with ``cfg.demo`` overrides) with
    ``cfg.n_secret`` caption combos (chosen by ``seed``) replaced by one secret
    image each, ``cfg.copies`` times; the probe is trained on the ordinary part."""
    cfg = cfg or TestbedConfig()
    from gradproj import demo

    dcfg = replace(demo.DEFAULT, **cfg.demo)
    g = torch.Generator().manual_seed(seed)
    base = shapes.make_dataset(
        dcfg.n_train, marked_fraction=dcfg.marked_fraction, size=dcfg.size, seed=seed
    )
    combos = sorted(set(base.captions))
    if not 1 <= cfg.n_secret < len(combos):
        raise ValueError(f"n_secret must lie in [1, {len(combos) - 1}], got {cfg.n_secret}")
    pick = torch.randperm(len(combos), generator=g)[: cfg.n_secret].tolist()
    secret_caps = [combos[i] for i in pick]
    keep = torch.tensor([c not in secret_caps for c in base.captions])
    secrets = secret_images(cfg.n_secret, dcfg.size, generator=g)
    kept = torch.nonzero(keep).flatten()
    ordinary = shapes.Batch(
        base.images[kept],
        base.colour[kept],
        base.shape[kept],
        base.background[kept],
        base.marked[kept],
        [base.captions[i] for i in kept.tolist()],
    )
    images = torch.cat([ordinary.images, secrets.repeat_interleave(cfg.copies, 0)])
    captions = ordinary.captions + [c for c in secret_caps for _ in range(cfg.copies)]
    tok, encoder = shapes.tokenizer(), shapes.text_encoder()
    unique = sorted(set(captions))
    states = shapes.encode(unique, tok, encoder)
    where = {c: i for i, c in enumerate(unique)}
    contexts = states[torch.tensor([where[c] for c in captions])]
    n0 = ordinary.images.shape[0]
    return Testbed(
        images=images,
        captions=captions,
        contexts=contexts,
        null_context=shapes.encode([""], tok, encoder),
        secret_images=secrets,
        secret_captions=secret_caps,
        secret_of_row=torch.cat(
            [
                torch.full((n0,), -1, dtype=torch.long),
                torch.arange(cfg.n_secret).repeat_interleave(cfg.copies),
            ]
        ),
        ordinary_captions=sorted(set(ordinary.captions)),
        tok=tok,
        encoder=encoder,
        probe=probes.train_probe(ordinary, steps=cfg.probe_steps, seed=seed),
    )


def train_testbed_unet(bed: Testbed, cfg: TestbedConfig | None = None, seed: int = 0):
    """A demo UNet (:func:`gradproj.demo.build_unet`) trained on the testbed with the
    demo's recipe (AdamW, 20-step warm-up, caption dropout for CFG, ε-prediction
    MSE, cosine schedule). Returns ``(unet, noise_scheduler)``, eval mode, frozen."""
    cfg = cfg or TestbedConfig()
    from gradproj import demo

    dcfg = replace(demo.DEFAULT, **cfg.demo, block_out_channels=cfg.block_out_channels)
    torch.manual_seed(seed)
    unet = demo.build_unet(dcfg, bed.contexts.shape[-1])
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))
    noise_scheduler = demo.noise_scheduler()
    g = torch.Generator().manual_seed(seed)
    n = bed.images.shape[0]
    unet.train()
    for _ in range(cfg.steps):
        i = torch.randint(n, (cfg.batch_size,), generator=g)
        x0, ctx = bed.images[i], bed.contexts[i]
        drop = torch.rand(cfg.batch_size, generator=g) < cfg.caption_dropout
        ctx = torch.where(drop[:, None, None], bed.null_context, ctx)
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(1000, (cfg.batch_size,), generator=g)
        pred = unet(noise_scheduler.add_noise(x0, noise, t), t, ctx).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    unet.eval().requires_grad_(False)
    return unet, noise_scheduler


def labelled_samples(
    unet,
    noise_scheduler,
    bed: Testbed,
    cfg: TestbedConfig | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Sample ``cfg.n_samples`` memorized (secret captions, cycled) and as many fresh
    (ordinary captions drawn at random) images, recording the detectors' inputs.

    Returns :func:`sample_with_signals`'s dict for all ``2 n`` samples plus
    ``"labels"`` (bool, memorized first) and ``"prompts"``.
    """
    cfg = cfg or TestbedConfig()
    g = torch.Generator().manual_seed(10_000 + seed)
    n = cfg.n_samples
    mem = [bed.secret_captions[i % len(bed.secret_captions)] for i in range(n)]
    pick = torch.randint(len(bed.ordinary_captions), (n,), generator=g).tolist()
    fresh = [bed.ordinary_captions[i] for i in pick]
    prompts = mem + fresh
    size = bed.images.shape[-1]
    noise = torch.randn(2 * n, 3, size, size, generator=g)
    ctx = shapes.encode(prompts, bed.tok, bed.encoder)
    out = sample_with_signals(
        unet,
        noise_scheduler,
        ctx,
        bed.null_context,
        noise,
        steps=cfg.sample_steps,
        guidance=cfg.guidance,
        x0_steps=(cfg.early_step,),
    )
    out["labels"] = torch.arange(2 * n) < n
    out["prompts"] = prompts
    return out


def validate_detectors(
    seed: int = 0,
    *,
    cfg: TestbedConfig | None = None,
    steps: int | None = None,
    n_samples: int | None = None,
) -> dict[str, Any]:
    """Build the testbed, train its model, sample a labelled set and measure every detector.

    ``steps`` / ``n_samples`` override ``cfg`` (default :class:`TestbedConfig`).
    Returns plain numbers (JSON-ready)::

        {"auc": {"learned_final", "pixel_final", "learned_x0_early", "pixel_x0_early",
                 "noise_magnitude", "noise_magnitude_first_step"},
         "n_memorized", "n_fresh", "n_replicating", "fresh_nearest_secret",
         "thresholds", "flagged": {detector: {"tpr", "fpr"}}, "config", "wall_time_s"}

    ``*_final``: the nearest-neighbour similarity of the final samples; ``*_x0_early``:
    of ``x̂₀`` at DDIM step ``cfg.early_step``; ``noise_magnitude``: Wen et al.'s
    ``‖ε_c − ε_∅‖`` averaged over the first ``cfg.magnitude_steps`` steps.
    ``n_replicating``: memorized-prompt samples whose nearest training image is their
    own secret at RMS pixel distance below ``cfg.replica_distance``;
    ``fresh_nearest_secret``: fresh samples whose nearest neighbour is a secret.
    """
    started = time.perf_counter()
    cfg = cfg or TestbedConfig()
    if steps is not None:
        cfg = replace(cfg, steps=steps)
    if n_samples is not None:
        cfg = replace(cfg, n_samples=n_samples)
    bed = build_testbed(cfg, seed)
    unet, noise_scheduler = train_testbed_unet(bed, cfg, seed)
    out = labelled_samples(unet, noise_scheduler, bed, cfg, seed)
    labels = out["labels"]
    learned = MemorizationDetector.from_probe(bed.images, bed.probe)
    pixel = MemorizationDetector(bed.images)
    final, early = out["samples"], out["x0"][cfg.early_step]
    scores = {
        "learned_final": learned.score(final),
        "pixel_final": pixel.score(final),
        "learned_x0_early": learned.score(early),
        "pixel_x0_early": pixel.score(early),
        "noise_magnitude": prompt_noise_score(out["magnitude"], cfg.magnitude_steps),
        "noise_magnitude_first_step": out["magnitude"][0],
    }
    auc = {k: roc_auc(v, labels) for k, v in scores.items()}

    # Ground truth beyond the prompt: does a sample replicate its own secret?
    sim, idx = pixel.similarity(final)
    nearest_secret = bed.secret_of_row[idx]  # -1: an ordinary image
    own = torch.tensor(
        [bed.secret_captions.index(p) if p in bed.secret_captions else -2 for p in out["prompts"]]
    )
    replicating = (nearest_secret == own) & (-sim < cfg.replica_distance)
    flagged = {}
    for name, det in (("learned", learned), ("pixel", pixel)):
        hit = scores[f"{name}_final"] >= det.threshold
        flagged[name] = {
            "tpr": float(hit[labels].float().mean()),
            "fpr": float(hit[~labels].float().mean()),
        }
    return {
        "auc": auc,
        "n_memorized": int(labels.sum()),
        "n_fresh": int((~labels).sum()),
        "n_replicating": int(replicating.sum()),
        "fresh_nearest_secret": int(((nearest_secret >= 0) & ~labels).sum()),
        "thresholds": {"learned": learned.threshold, "pixel": pixel.threshold},
        "flagged": flagged,
        "score_means": {
            k: {"memorized": float(v[labels].mean()), "fresh": float(v[~labels].mean())}
            for k, v in scores.items()
        },
        "config": asdict(cfg),
        "seed": seed,
        "wall_time_s": time.perf_counter() - started,
    }
