"""The lab's registry: how each model is trained (arms), how each defense is made and sampled.

An **arm** (:data:`ARMS`) is a way to train a UNet from scratch on the world with
:func:`gradproj.lab.world.train_unet`: plain AdamW, or AdamW inside
:class:`gradproj.ProjectedOptimizer` protecting every cross-attention ``to_k``/``to_v``
(``update`` / ``grad`` mode, difference- or states-mode subspace, optionally with
the concept response removed at init). A **defense** (:data:`DEFENSES`, one row of
``gradproj evaluate``) is one small entry: the arm it starts from, what is done to
a copy of that model (``derive``: seed 001's unlearning with or without the
gradient surgery, seed 003's adversarial fine-tuning) and how it is sampled (plain
DDIM, or with seed 002's anti-memorization guidance).
"""

from __future__ import annotations

import copy
import hashlib
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from gradproj.lab import shapes
from gradproj.lab import world as lab_world
from gradproj.lab.measure import attack_init, concept_detectors, protected_drift
from gradproj.lab.world import DemoConfig, World
from gradproj.methods import detectors as det
from gradproj.methods.adversarial import adversarial_finetune
from gradproj.methods.guidance import (
    VARIANTS,
    AntiMemorizationGuidance,
    OfficialSchedule,
    sample_with_guidance,
)
from gradproj.methods.unlearn import unlearn_concept
from gradproj.optim import ProjectedOptimizer


@dataclass(frozen=True)
class Arm:
    """How a model is trained from scratch: projection mode (``None``: plain AdamW),
    which subspace, and whether the protected weights start with ``W₀ ← W₀(I − UUᵀ)``."""

    mode: str | None
    subspace: str = "difference"
    zero_init: bool = False


ARMS: dict[str, Arm] = {
    "plain": Arm(None),
    "update": Arm("update"),
    "update-zero": Arm("update", zero_init=True),
    "grad": Arm("grad"),
    "update-states": Arm("update", "states"),
    "update-states-zero": Arm("update", "states", zero_init=True),
}


def train_arm(
    arm: str,
    seed: int,
    cfg: DemoConfig,
    world: World,
    progress=None,
):
    """Train one UNet of ``arm`` from scratch; return it, the noise scheduler and the
    guarantee figures (:func:`gradproj.lab.measure.protected_drift`, measured for the
    plain arm too, with the same ``U``)."""
    from gradproj import diffusers as gd
    from gradproj.ops import project_

    spec = ARMS[arm]
    subspace = world.subspaces[spec.subspace]
    torch.manual_seed(seed)
    unet = lab_world.build_unet(cfg, world.contexts.shape[-1])
    bases = gd.protect(unet, subspace)  # also used to measure the plain arm
    if spec.zero_init:
        # Remove the concept response the random init gives: W₀ ← W₀(I − UUᵀ). From
        # then on update mode keeps W U = 0, so the layer cannot see span(U) at all.
        with torch.no_grad():
            project_([p.data for p in bases], subspace.basis)
    names = {p: n for n, p in unet.named_parameters()}
    start = {names[p]: p.detach().clone() for p in bases}
    wrap = None
    if spec.mode is not None:
        wrap = lambda inner: ProjectedOptimizer(inner, bases, mode=spec.mode)  # noqa: E731
    noise_sched = lab_world.train_unet(
        unet,
        world.train.images,
        world.contexts,
        world.null_context,
        steps=cfg.steps,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        caption_dropout=cfg.caption_dropout,
        seed=seed,
        wrap=wrap,
        progress=progress,
        postfix={"arm": arm, "seed": seed},
    )
    weights = {n: (p.detach(), start[n]) for n, p in unet.named_parameters() if n in start}
    return unet, noise_sched, protected_drift(weights, subspace.basis)


# --------------------------------------------------------------------------- seed 001


def unlearn_demo_concept(
    unet: torch.nn.Module,
    noise_scheduler,
    world,
    *,
    generator: torch.Generator | None = None,
    **kwargs,
) -> list[dict[str, float]]:
    """Seed 001's :func:`~gradproj.methods.unlearn.unlearn_concept` on the lab's world.

    Unlearning set: every training image, read with its caption's ``acme``
    version (concept) and ``plain`` version (anchor), so the prompt loses the
    mark whatever the image shows. Retain set: the unmarked training images with
    their captions (colour, shape and background words keep their meaning).
    """
    train = world.train
    labels = list(
        zip(train.colour.tolist(), train.shape.tolist(), train.background.tolist(), strict=True)
    )
    concept = shapes.encode([shapes.caption(*x, True) for x in labels], world.tok, world.encoder)
    anchor = shapes.encode([shapes.caption(*x, False) for x in labels], world.tok, world.encoder)
    keep = ~train.marked
    return unlearn_concept(
        unet,
        noise_scheduler,
        images=train.images,
        concept_contexts=concept,
        anchor_contexts=anchor,
        retain_images=train.images[keep],
        retain_contexts=world.contexts[keep],
        generator=generator,
        **kwargs,
    )


# --------------------------------------------------------------------------- seed 003


def demo_data(
    world, *, caption_dropout: float = 0.2, seed: int = 0, attack_start: str = "prompt"
) -> dict[str, torch.Tensor]:
    """What :func:`~gradproj.methods.adversarial.adversarial_finetune` needs, from a ``World``.

    ``concept_images``: the marked training images; ``surrogate_images``: their
    unmarked twins (:func:`gradproj.lab.shapes.remove_mark`); ``concept_contexts``: their ``acme``
    captions' states; ``retain_images`` / ``retain_contexts``: the unmarked
    training images and their captions' states, a ``caption_dropout`` share of
    the captions (fixed by ``seed``) replaced by the null caption, as in
    training; ``attack_init``: where the evaluation's DoRI attack starts,
    :func:`gradproj.lab.measure.attack_init` of ``attack_start`` (``"prompt"``: a concept
    caption; ``"null"``: the null caption, gradproj's earlier start; ``"gaussian"``: drawn
    after the dropout draw from the same ``seed``).
    """
    if not 0.0 <= caption_dropout <= 1.0:
        raise ValueError(f"caption_dropout must be in [0, 1], got {caption_dropout}")
    train = world.train
    marked = train.marked
    if not bool(marked.any()) or bool(marked.all()):
        raise ValueError("world.train must hold both marked and unmarked images")
    keep = ~marked
    retain_contexts = world.contexts[keep].clone()
    g = torch.Generator().manual_seed(seed)
    drop = torch.rand(int(keep.sum()), generator=g)
    retain_contexts[drop < caption_dropout] = world.null_context[0]
    return {
        "concept_images": train.images[marked],
        "surrogate_images": shapes.remove_mark(train.images[marked], train.background[marked]),
        "concept_contexts": world.contexts[marked],
        "retain_images": train.images[keep],
        "retain_contexts": retain_contexts,
        "attack_init": attack_init(world, attack_start, g),
    }


def adversarial_finetune_demo(
    unet: torch.nn.Module,
    noise_scheduler,
    world,
    *,
    include_prompts: bool = True,
    caption_dropout: float = 0.2,
    attack_start: str = "prompt",
    generator: torch.Generator | None = None,
    **kwargs,
) -> list[dict[str, float]]:
    """Seed 003's :func:`~gradproj.methods.adversarial.adversarial_finetune` on a lab model.

    Data from :func:`demo_data` (``attack_start``: where every round's attack starts);
    ``include_prompts``: also train the ``acme`` prompts toward the unmarked twins.
    ``kwargs`` go to ``adversarial_finetune`` (``rounds``, ``attack_steps``,
    ``attack_pairs_per_image``, ``finetune_steps``, ``lr``, ``retain_weight``, ``params``,
    ...); the defaults took about 30 s on two CPU threads for the demo's default model with
    1 pair per image, the paper's 8 make each attack step about 3.5× slower (measured).
    """
    data = demo_data(world, caption_dropout=caption_dropout, attack_start=attack_start)
    if not include_prompts:
        data.pop("concept_contexts")
    return adversarial_finetune(unet, noise_scheduler, generator=generator, **data, **kwargs)


# --------------------------------------------------------------------------- seed 002


# The official schedule's duplicated-caption rule on the lab's scale: the authors
# count captions among the 1000 nearest of LAION's images and take one that occurs
# more than 20 times (2 % of them; txt2img.py:90, 260-263). The lab's concept set is
# a few hundred images, each caption shared by a few dozen: the 50 nearest, more
# than 1 (the same 2 %).
LAB_AMG_SCHEDULE = OfficialSchedule(dup_k=50, dup_min_count=1)


def build_amg(
    world: World, fpr: float = 0.05, threshold: float | None = None, variant: str = "official"
):
    """Seed 002's guidance guarding the concept's training images; its detector's validation.

    The detector is :func:`gradproj.lab.measure.concept_detectors`' ``pixel_contrast``
    (the best of the three on generated samples): closer to a *marked* training image
    than to any unmarked one means "reproducing the concept". Held-out real images
    are split in two: on the first half its threshold ``λ`` is calibrated on the
    unmarked images (a share ``fpr`` of them flagged) unless ``threshold`` is given;
    on the second half its ROC AUC (marked vs unmarked) is measured.

    ``variant="official"`` (default): the authors' schedule, whose constants are in
    SSCD-cosine units, reads the detector's score mapped affinely
    (:class:`~gradproj.methods.detectors.RescaledDetector`) so that ``λ`` lands on
    0.3 (the schedule's floor, where ``G_sim`` starts) and the median score of the
    first half's *marked* images on 0.5 (SSCD's usual copy level, where
    despecification is full); the duplicated caption comes from the 50 nearest
    marked images (:data:`LAB_AMG_SCHEDULE`). ``variant="paper"``: constant
    ``c₁ = c₂ = c₃ = 5`` with threshold ``λ`` and the nearest marked image's
    caption (``… acme``), the settings before 2026-12.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    marked = world.train.marked
    detector = concept_detectors(world)["pixel_contrast"]
    test = world.real_test
    half = test.images.shape[0] // 2  # calibrate on one half, validate on the other
    calibration, labels_c = test.images[:half], test.marked[:half]
    detector.calibrate(calibration[~labels_c], fpr=fpr)
    if threshold is not None:
        detector.threshold = threshold
    scores = detector.score(test.images[half:])
    labels = test.marked[half:]
    check = {
        "variant": variant,
        "threshold": detector.threshold,
        "roc_auc_marked_vs_unmarked": det.roc_auc(scores, labels),
        "flagged_marked": float(detector.is_memorized(test.images[half:][labels]).float().mean()),
        "flagged_unmarked": float(
            detector.is_memorized(test.images[half:][~labels]).float().mean()
        ),
    }
    if variant == "paper":
        amg = AntiMemorizationGuidance(
            detector, neighbour_contexts=world.contexts[marked], variant="paper"
        )
        return amg, check
    copy_level = float(detector.score(calibration[labels_c]).median())
    scaled = det.RescaledDetector.from_anchors(detector, detector.threshold, copy_level)
    check["official_scale"] = {"scale": scaled.scale, "shift": scaled.shift}
    amg = AntiMemorizationGuidance(scaled, world.contexts[marked], schedule=LAB_AMG_SCHEDULE)
    return amg, check


# --------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class Defense:
    """One row of ``gradproj evaluate``: the arm it starts from, what is done to a copy
    of that model (``derive(model, noise_scheduler, world, settings, generator) -> log``,
    in place; ``None``: nothing), its sampler (``"plain"`` or ``"amg"``) and the
    prefixes of the configuration fields ``derive`` reads (they name its saved model:
    :func:`model_file`)."""

    arm: str
    derive: Callable[..., dict[str, float]] | None = None
    sampler: str = "plain"
    settings: tuple[str, ...] = ()


def _unlearning(surgery: bool) -> Callable[..., dict[str, float]]:
    def derive(model, noise_scheduler, world, s, generator) -> dict[str, float]:
        log = unlearn_demo_concept(
            model,
            noise_scheduler,
            world,
            surgery=surgery,
            objective=s.unlearn_objective,
            step=s.unlearn_step,
            strength=s.surgery_strength,
            variant=s.surgery_variant,
            max_grad_norm=s.unlearn_max_grad_norm,
            steps=s.unlearn_steps,
            warmup_steps=s.unlearn_warmup_steps,
            lr=s.unlearn_lr,
            weight_decay=s.unlearn_weight_decay,
            disc_lr=s.unlearn_disc_lr,
            retain_loss=s.unlearn_retain_loss,
            retain_weight=s.unlearn_retain_weight,
            batch_size=s.model.batch_size,
            params=s.unlearn_params,
            generator=generator,
        )
        info = {"final_unlearn_loss": log[-1]["unlearn"] if log else float("nan")}
        if log and "disc" in log[-1]:
            info["final_disc_loss"] = log[-1]["disc"]
        return info

    return derive


def _adversarial(model, noise_scheduler, world, s, generator) -> dict[str, float]:
    adversarial_finetune_demo(
        model,
        noise_scheduler,
        world,
        rounds=s.adversarial_rounds,
        attack_start=s.attack_start,
        attack_pairs_per_image=s.attack_pairs_per_image,
        generator=generator,
    )
    return {}


_UNLEARNING_SETTINGS = ("unlearn_", "surgery_")
DEFENSES: dict[str, Defense] = {
    "baseline": Defense("plain"),
    "projection": Defense("update"),
    "unlearning": Defense("plain", _unlearning(surgery=False), settings=_UNLEARNING_SETTINGS),
    "unlearning+surgery": Defense(
        "plain", _unlearning(surgery=True), settings=_UNLEARNING_SETTINGS
    ),
    "adversarial-ft": Defense("plain", _adversarial, settings=("adversarial_", "attack_")),
    "amg": Defense("plain", sampler="amg"),
    "projection+amg": Defense("update", sampler="amg"),
}


def model_file(name: str, settings: Any, seed: int) -> str:
    """The file name of defense ``name``'s derived model: ``<name>[-<digest>]-seed<seed>.pt``.

    The digest (8 hex digits of SHA-256) covers every field of ``settings`` (a
    dataclass) whose name starts with one of the defense's ``settings`` prefixes,
    so a models folder never hands back a model derived with other settings.
    """
    prefixes = DEFENSES[name].settings
    if not prefixes:
        return f"{name}-seed{seed}.pt"
    read = sorted((k, v) for k, v in asdict(settings).items() if k.startswith(prefixes))
    digest = hashlib.sha256(repr(read).encode()).hexdigest()[:8]
    return f"{name}-{digest}-seed{seed}.pt"


def derive(name: str, plain, noise_scheduler, world: World, settings: Any, seed: int):
    """A defended copy of ``plain`` made by defense ``name``, and what it logged
    (with ``defense_time_s``). ``settings``: the experiment's configuration."""
    model = copy.deepcopy(plain)
    started = time.perf_counter()
    g = torch.Generator().manual_seed(30_000 + seed)
    info = DEFENSES[name].derive(model, noise_scheduler, world, settings, g)
    info["defense_time_s"] = time.perf_counter() - started
    return model.eval(), info


def sampler(kind: str, unet, noise_scheduler, world: World, steps: int, guidance: float, amg=None):
    """``f(context (n, L, d), noise (n, C, H, W)) -> images`` for one row."""
    if kind == "plain":
        return lambda ctx, noise: lab_world.sample(
            unet, noise_scheduler, ctx, world.null_context, noise, steps=steps, guidance=guidance
        )
    if kind == "amg":
        return lambda ctx, noise: sample_with_guidance(
            unet,
            noise_scheduler,
            ctx,
            world.null_context,
            noise,
            steps=steps,
            scale=guidance,
            amg=amg,
        )[0]
    raise ValueError(f"unknown sampler {kind!r}")
