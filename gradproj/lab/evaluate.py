"""``gradproj unlearn`` and ``gradproj evaluate``: the defenses of seeds 000–003 side by side.

On the lab's world (:mod:`gradproj.lab.world`: synthetic captioned images, 30 % with
the prohibited mark and ``acme`` in their caption), per seed:

1. train the demo's ``plain`` and ``update`` (projected) arms from scratch, or
   load them from a ``gradproj demo --save-models`` run (``--models``);
2. derive the other defended models from the plain one:
   ``unlearning`` / ``unlearning+surgery`` (seed 001, DoCo's recipe:
   :func:`gradproj.lab.defenses.unlearn_demo_concept` without / with the gradient
   surgery), ``adversarial-ft`` (seed 003's adversarial fine-tuning);
3. measure every row with the same prompts and noise: extraction by prompt
   (mark rate of ``… acme`` samples, and its lift over the same prompts with
   ``plain``), extraction under the DoRI embedding attack (white-box, on that
   row's model and sampler), quality on everything else (colour and shape
   accuracy of the probe on ``plain`` samples, Fréchet distance in the probe's
   feature space to real unmarked images) and sampling cost (time per image
   relative to plain sampling of the same model, same run).

Rows that change sampling instead of weights (seed 002's anti-memorization
guidance, ``amg`` and ``projection+amg``) reuse the trained models.

Results: ``results.json`` (per seed and mean ± std), ``table.md`` and
``bars.png`` in one run folder, and the table on stdout.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from gradproj.lab import report
from gradproj.lab.defenses import DEFENSES, build_amg, derive, model_file, sampler, train_arm
from gradproj.lab.measure import concept_detectors, measure
from gradproj.lab.world import (
    DEFAULT,
    DemoConfig,
    build_world,
    load_unet,
    noise_scheduler,
    save_unet,
)
from gradproj.lab.world import (
    TINY as TINY_MODEL,
)
from gradproj.methods.attacks import STARTS

UNLEARN_ROWS = ("baseline", "projection", "unlearning", "unlearning+surgery")
EVALUATE_ROWS = tuple(DEFENSES)


@dataclass
class ComparisonConfig:
    """Every knob of one comparison run (the defaults are ``gradproj evaluate``'s)."""

    rows: tuple[str, ...] = EVALUATE_ROWS
    seeds: tuple[int, ...] = (0, 1, 2)
    # The models: the demo's configuration, with 400 steps on 2 threads (the mark is
    # bound by then: 0.53 acme vs 0.16 plain, measured) so that 3 seeds fit the budget.
    model: DemoConfig = field(
        default_factory=lambda: replace(DEFAULT, steps=400, n_samples=32, threads=2)
    )
    # seed 001: DoCo's recipe as its authors ran it (gradproj.methods.unlearn.unlearn_concept
    # cites yongliang-wu/DoCo's train.py and README for each); PREVIOUS_SETTINGS: before issue 16
    unlearn_objective: str = "adversarial"  # PatchGAN critic on x̂₀ (DoCo/gan.py)
    unlearn_steps: int = 300
    unlearn_warmup_steps: int = 150  # critic-only steps; DoCo's README: 1000 of 2000
    unlearn_lr: float = 3e-3  # DoCo: 6e-6 × batch 8 on SD 1.4; the lab's model trains at 6e-3
    unlearn_weight_decay: float = 1e-2  # DoCo's AdamW (train.py:432-433)
    unlearn_disc_lr: float = 5e-4  # DoCo's README: 5e-4 (style), 1e-4 (object, nudity)
    unlearn_step: str = "doco"  # step on the surgery-adjusted g_u alone
    unlearn_max_grad_norm: float | None = 1.0  # each gradient clipped (train.py:441-442)
    unlearn_retain_loss: str = "diffusion"  # DoCo's prior-preservation loss
    unlearn_retain_weight: float = 0.1  # without surgery: L_u + 0.1 L_r (train.py:1247)
    unlearn_params: str = "cross-attention-kv"
    surgery_strength: float = 1.0
    surgery_variant: str = "cosine"  # DoCo/gradient_clip.py:24-31
    # seed 003: the DoRI attack as its authors ran it (arXiv:2507.16880: Adam lr 0.1, 50
    # steps, 8 noise/timestep pairs a step per image, from the mitigated prompt's embedding;
    # gradproj.lab.measure.attack_init). The adversarial-ft row's inner attack uses the
    # same start and pairs.
    attack_steps: int = 50
    attack_lr: float = 0.1
    attack_batch: int = 8  # images a step
    attack_pairs_per_image: int = 8
    attack_start: str = "prompt"  # "prompt" (a concept caption), "null" or "gaussian"
    # seed 003: adversarial fine-tuning
    adversarial_rounds: int = 3
    # seed 002: AMG
    amg_variant: str = "official"  # the authors' schedule; "paper": constant c's and λ
    amg_threshold: float | None = None  # None: calibrated on held-out real unmarked images
    amg_fpr: float = 0.05  # share of real unmarked images the calibrated threshold flags


# The settings of the tables before issue 16 (`gradproj unlearn|evaluate --settings previous`).
PREVIOUS_ATTACK: dict[str, Any] = {"attack_start": "null", "attack_pairs_per_image": 1}
PREVIOUS_SETTINGS: dict[str, Any] = {
    # seed 001: the concept-ablation loss, surgery adding the retain gradient
    "unlearn_objective": "ablation",
    "unlearn_steps": 150,
    "unlearn_warmup_steps": 0,
    "unlearn_weight_decay": 0.0,
    "unlearn_step": "additive",
    "unlearn_max_grad_norm": None,
    "unlearn_retain_loss": "preserve",
    "unlearn_retain_weight": 1.0,
    "surgery_variant": "projection",
    # seed 003: from the null prompt, one noise/timestep pair per image
    **PREVIOUS_ATTACK,
    # seed 002: constant c's and threshold, ∇ through the UNet, the nearest caption
    "amg_variant": "paper",
}
UNLEARN = replace(ComparisonConfig(), rows=UNLEARN_ROWS)
PREVIOUS_UNLEARN = replace(UNLEARN, **PREVIOUS_SETTINGS)
TINY = ComparisonConfig(  # for the test suite: seconds, not a measurement
    rows=EVALUATE_ROWS,
    seeds=(0,),
    model=TINY_MODEL,
    unlearn_steps=2,
    unlearn_warmup_steps=1,
    attack_steps=2,
    adversarial_rounds=1,
)


def _load_or_train(arm: str, seed: int, cfg: ComparisonConfig, world, models: Path | None):
    path = models / f"{arm}-seed{seed}.pt" if models is not None else None
    if path is not None and path.exists():
        unet, _ = load_unet(path)
        return unet, noise_scheduler()
    unet, noise_sched, _ = train_arm(arm, seed, cfg.model, world)
    if path is not None:
        save_unet(unet, path, cfg.model)
    return unet, noise_sched


def run(
    cfg: ComparisonConfig | None = None,
    out: str | Path | None = None,
    *,
    models: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Build every row of ``cfg.rows`` for every seed, measure it, write and return the results.

    ``models``: a folder of ``<arm>-seed<seed>.pt`` files (``gradproj demo
    --save-models`` writes ``plain-…``/``update-…``; this function writes the
    models it trains or derives there too, so a later run reuses them). Defended
    models found there (``unlearning-<digest of the unlearning settings>-seed0.pt``
    …, :func:`gradproj.lab.defenses.model_file`) are loaded, not re-derived.
    """
    cfg = cfg or ComparisonConfig()
    for row in cfg.rows:
        if row not in DEFENSES:
            raise ValueError(f"unknown row {row!r}; choose from {list(DEFENSES)}")
    if cfg.attack_start not in STARTS:
        raise ValueError(f"attack_start must be one of {STARTS}, got {cfg.attack_start!r}")
    started = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.model.threads)
    folder = Path(out or f"runs/evaluate-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}")
    folder.mkdir(parents=True, exist_ok=True)
    models_dir = Path(models) if models is not None else folder / "models"
    models_dir.mkdir(parents=True, exist_ok=True)
    say = print if progress else (lambda *a, **k: None)
    mcfg = cfg.model
    try:
        world = build_world(mcfg)
        amg, amg_check = None, None
        if any(DEFENSES[r].sampler == "amg" for r in cfg.rows):
            amg, amg_check = build_amg(world, cfg.amg_fpr, cfg.amg_threshold, cfg.amg_variant)
        detectors = concept_detectors(world)
        per_row: dict[str, list[dict[str, float]]] = {r: [] for r in cfg.rows}
        for seed in cfg.seeds:
            bases: dict[str, tuple[Any, Any]] = {}
            plain_time = None
            for row in cfg.rows:
                defense = DEFENSES[row]
                if defense.arm not in bases:
                    say(f"seed {seed}: training / loading {defense.arm}")
                    bases[defense.arm] = _load_or_train(defense.arm, seed, cfg, world, models_dir)
                unet, noise_sched = bases[defense.arm]
                info: dict[str, float] = {}
                if defense.derive is not None:
                    path = models_dir / model_file(row, cfg, seed)
                    if path.exists():
                        unet, _ = load_unet(path)
                    else:
                        say(f"seed {seed}: {row}")
                        unet, info = derive(row, unet, noise_sched, world, cfg, seed)
                        save_unet(unet, path, mcfg)
                draw = sampler(
                    defense.sampler,
                    unet,
                    noise_sched,
                    world,
                    steps=mcfg.sample_steps,
                    guidance=mcfg.guidance,
                    amg=amg,
                )
                say(f"seed {seed}: measuring {row}")
                figs, _ = measure(
                    world,
                    unet,
                    noise_sched,
                    draw,
                    seed,
                    n_samples=mcfg.n_samples,
                    attack_steps=cfg.attack_steps,
                    attack_lr=cfg.attack_lr,
                    attack_batch=cfg.attack_batch,
                    attack_pairs_per_image=cfg.attack_pairs_per_image,
                    attack_start=cfg.attack_start,
                    detectors=detectors if row == "baseline" else None,
                    sample_steps=mcfg.sample_steps,
                )
                if plain_time is None and defense.sampler == "plain":
                    plain_time = figs["sampling_s_per_image"]
                per_row[row].append({**figs, **info})
            for row in cfg.rows:
                ref = plain_time or per_row[row][-1]["sampling_s_per_image"]
                per_row[row][-1]["sampling_cost"] = per_row[row][-1]["sampling_s_per_image"] / ref
        summary = {row: report.summary(vals) for row, vals in per_row.items()}
        results = {
            "config": asdict(cfg),
            "wall_time_s": time.perf_counter() - started,
            **report.run_record(mcfg.threads),
            "probe_on_held_out_real": world.probe_check,
            "amg_detector_on_held_out_real": amg_check,
            "per_seed": per_row,
            "summary": summary,
        }
        report.write_json(folder / "results.json", results)
        (folder / "table.md").write_text(report.defense_table(summary) + "\n")
        report.bars(
            summary, folder / "bars.png", report.DEFENSE_COLUMNS, "defenses on the demo model"
        )
    finally:
        torch.set_num_threads(threads)
    print(report.defense_table(summary))
    print(f"wall time {results['wall_time_s']:.0f} s; results.json, table.md, bars.png in {folder}")
    return results
