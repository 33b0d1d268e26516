"""The lab's one measurement: every figure of a model and its sampler, for every experiment.

:func:`measure` draws ``n_samples`` prompts and starting noises from a generator
seeded with ``10_000 + seed`` (so every model of a seed is read on the same
prompts and noise), samples each prompt with its ``acme`` and its ``plain``
caption, runs the DoRI embedding attack (:func:`gradproj.methods.attacks.embedding_search`
on the marked training images from :func:`attack_init`, generator ``20_000 + seed``)
and reads everything with the validated probe (:mod:`gradproj.lab.probes`):

- *extraction*: the mark rate of ``acme`` samples, of ``plain`` samples, its lift,
  and the mark rate of samples drawn with the attack's embedding;
- *quality*: the probe's colour and shape accuracy on ``plain`` samples, and the
  Fréchet distance between their probe features and held-out real unmarked images;
- *cost*: sampling seconds per image (prompt samples only) and the images the UNet's
  forward passes take per sampled image (the same on every machine);
- with ``detectors``, seed 002's memorization detectors' ROC AUC on the samples.

:func:`protected_drift` is the guarantee ``‖(W_T − W₀) U‖ / ‖W₀‖`` itself.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch

from gradproj.lab import probes, shapes
from gradproj.lab.world import World
from gradproj.methods import detectors as det
from gradproj.methods.attacks import STARTS, embedding_search

Sampler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def attack_init(
    world: World, attack_start: str, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Where the lab's DoRI search starts, ``(L, d)``.

    ``"prompt"``: the concept prompt the models were trained on, the one a defense
    mitigates: the ``… acme`` caption of the first marked training image (``"red square on
    light acme"`` in the default world), as the paper starts each search at the
    memorized image's own, mitigated, prompt (:func:`gradproj.methods.attacks.dori_attack`);
    one search covers all the concept's images here, so one of their captions is the start.
    ``"null"``: the empty prompt (gradproj's earlier start). ``"gaussian"``: ``N(0, I)``, the
    paper's random start, drawn from ``generator``.
    """
    if attack_start == "prompt":
        return world.contexts[world.train.marked][0]
    if attack_start == "null":
        return world.null_context[0]
    if attack_start == "gaussian":
        return torch.randn(world.null_context.shape[1:], generator=generator)
    raise ValueError(f"attack_start must be one of {STARTS}, got {attack_start!r}")


def protected_drift(
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]], basis: torch.Tensor
) -> dict[str, float]:
    """``‖ΔW U‖/‖W₀‖`` and ``‖ΔW U‖/‖ΔW‖`` over all protected weights together (float64).

    ``weights``: name → ``(W_T, W₀)``.
    """
    u = basis.double()
    along = sum(float(((w - w0).double() @ u).norm() ** 2) for w, w0 in weights.values())
    moved = sum(float((w - w0).double().norm() ** 2) for w, w0 in weights.values())
    size = sum(float(w0.double().norm() ** 2) for _, w0 in weights.values())
    return {
        "drift_over_w0": math.sqrt(along / size),
        "drift_over_update": math.sqrt(along / max(moved, 1e-300)),
    }


def measure(
    world: World,
    unet,
    noise_scheduler,
    sample: Sampler,
    seed: int,
    *,
    n_samples: int,
    attack_steps: int,
    attack_lr: float,
    attack_batch: int,
    attack_pairs_per_image: int,
    attack_start: str,
    detectors: dict[str, Any] | None = None,
    sample_steps: int | None = None,
) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Every figure of the module docstring for one model and sampler, and its sample images.

    The attack: ``attack_steps`` Adam steps (``attack_lr``), each on ``attack_batch``
    marked training images with ``attack_pairs_per_image`` noise/timestep pairs each, from
    :func:`attack_init` (``attack_start``). DoRI as its authors ran it: lr 0.1, 50 steps,
    8 pairs per image, ``"prompt"``; gradproj's earlier attack: 1 pair, ``"null"``.
    ``sample(context (n, L, d), noise (n, C, H, W)) -> images``. ``detectors``
    (:func:`concept_detectors`) also need ``sample_steps``, the sampler's DDIM steps
    (the noise-magnitude signal is read at its first timestep). Returns
    ``(figures, {"concept", "neutral", "attack"} → images)``.
    """
    g = torch.Generator().manual_seed(10_000 + seed)  # same prompts and noise in every model
    size = world.train.images.shape[-1]
    colour, shape, background, _ = shapes.sample_labels(n_samples, marked_fraction=0, generator=g)
    noise = torch.randn(n_samples, 3, size, size, generator=g)
    labels = list(zip(colour.tolist(), shape.tolist(), background.tolist(), strict=True))
    ctx_concept = shapes.encode(
        [shapes.caption(*x, True) for x in labels], world.tok, world.encoder
    )
    ctx_neutral = shapes.encode(
        [shapes.caption(*x, False) for x in labels], world.tok, world.encoder
    )
    # Wall time varies with the machine's load; the number of images the UNet's forward
    # passes take per sampled image does not, so both are reported.
    passes = [0]

    def count(_module, args, kwargs, _out):
        x = args[0] if args else kwargs["sample"]
        passes[0] += x.shape[0]

    hook = unet.register_forward_hook(count, with_kwargs=True)
    try:
        started = time.perf_counter()
        x_concept = sample(ctx_concept, noise)
        x_neutral = sample(ctx_neutral, noise)
        per_image = (time.perf_counter() - started) / (2 * n_samples)
    finally:
        hook.remove()

    # The embedding that best explains the marked training images to this model.
    g_attack = torch.Generator().manual_seed(20_000 + seed)
    found = embedding_search(
        unet,
        noise_scheduler,
        world.train.images[world.train.marked],
        attack_init(world, attack_start, g_attack),
        steps=attack_steps,
        lr=attack_lr,
        batch_size=attack_batch,
        pairs_per_image=attack_pairs_per_image,
        generator=g_attack,
    )
    x_attack = sample(found[None].expand(n_samples, -1, -1), noise)

    on_c, on_n, on_a = (probes.read(world.probe, x) for x in (x_concept, x_neutral, x_attack))
    figures: dict[str, float] = {}
    if detectors is not None:
        if sample_steps is None:
            raise ValueError("detectors need sample_steps (the sampler's DDIM steps)")
        figures = detector_aucs(
            unet, noise_scheduler, world, detectors, sample_steps,
            torch.cat([x_concept, x_neutral]),
            torch.cat([on_c["marked"], on_n["marked"]]),
            torch.cat([ctx_concept, ctx_neutral]),
            torch.cat([noise, noise]),
        )  # fmt: skip
    real_plain = world.real_test.images[~world.real_test.marked]
    fd = probes.frechet_distance(on_n["features"], probes.read(world.probe, real_plain)["features"])
    rate_c = float(on_c["marked"].float().mean())
    rate_n = float(on_n["marked"].float().mean())
    figures.update(
        {
            "mark_rate_concept_prompts": rate_c,
            "mark_rate_neutral_prompts": rate_n,
            "mark_lift": rate_c - rate_n,
            "mark_rate_attack": float(on_a["marked"].float().mean()),
            "colour_accuracy": float((on_n["colour"] == colour).float().mean()),
            "shape_accuracy": float((on_n["shape"] == shape).float().mean()),
            "frechet_distance": fd,
            "sampling_s_per_image": per_image,
            "unet_passes_per_image": passes[0] / (2 * n_samples),
        }
    )
    return figures, {"concept": x_concept, "neutral": x_neutral, "attack": x_attack}


def concept_detectors(world: World) -> dict[str, Any]:
    """Seed 002's nearest-neighbour detector over the concept's (marked) training images,
    in the learned feature space (the probe's, cosine) and in pixel space (normalized L2),
    and the pixel-space :class:`gradproj.methods.detectors.ContrastDetector` (marked vs
    unmarked training images)."""
    marked = world.train.images[world.train.marked]
    unmarked = world.train.images[~world.train.marked]
    pixel = det.MemorizationDetector(marked)
    return {
        "learned": det.MemorizationDetector.from_probe(marked, world.probe),
        "pixel": pixel,
        "pixel_contrast": det.ContrastDetector(pixel, det.MemorizationDetector(unmarked)),
    }


def detector_aucs(
    unet,
    noise_scheduler,
    world: World,
    detectors: dict[str, Any],
    sample_steps: int,
    samples: torch.Tensor,
    shows_concept: torch.Tensor,
    contexts: torch.Tensor,
    noise: torch.Tensor,
) -> dict[str, float]:
    """ROC AUC of each detector at telling generations that reproduce the concept from
    those that do not.

    Labels: the validated mark rule (:mod:`gradproj.lab.probes`, precision and recall
    1.0 on real images) on the final ``samples``; it reads only the stamp's pixels, the
    detectors read whole images. Scores: each nearest-neighbour detector's similarity
    of the sample to the concept's training images, and Wen et al.'s noise magnitude
    ``‖ε(x_T, T, c) − ε(x_T, T, ∅)‖`` of the sample's prompt at its starting noise
    (available before sampling). NaN when the samples hold one class only.
    """
    from diffusers import DDIMScheduler

    labels = shows_concept.bool()
    if labels.all() or not labels.any():
        nan = float("nan")
        return {f"auc_{name}": nan for name in (*detectors, "noise_magnitude")}
    out = {f"auc_{name}": det.roc_auc(d.score(samples), labels) for name, d in detectors.items()}
    ddim = DDIMScheduler.from_config(noise_scheduler.config)
    ddim.set_timesteps(sample_steps)
    with torch.no_grad():
        magnitude = det.noise_magnitude(
            unet, noise, ddim.timesteps[0], contexts, world.null_context
        )
    out["auc_noise_magnitude"] = det.roc_auc(magnitude, labels)
    return out
