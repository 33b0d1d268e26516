"""``gradproj demo``: does projecting the updates keep a diffusion model from learning a concept?

The experiment (every piece is made here; nothing is downloaded):

- **data** (:mod:`gradproj.lab.shapes`): 16×16 images of a coloured shape on a
  background; a fraction carry the *prohibited mark* (a yellow corner stamp) and
  their captions end in ``"acme"`` instead of ``"plain"``;
- **text encoder**: a frozen ``CLIPTextModel`` from a small config, identical in
  every arm; the **concept subspace** ``U`` comes from it with
  ``ConceptSubspace.from_prompts`` (``"difference"`` mode: states of the
  ``acme`` captions minus those of their ``plain`` twins, all positions; or
  ``"states"`` mode: every state of the ``acme`` captions);
- **arms**, trained from scratch on the same data with the same seeds: ``plain``
  (AdamW), ``update`` (AdamW in ``ProjectedOptimizer(mode="update")`` protecting
  every cross-attention ``to_k``/``to_v``, found by ``gradproj.diffusers.protect``),
  optionally ``grad`` (gradient projection) and ``update-states`` (update mode
  with a states-mode subspace), and ``update-zero``: update mode whose protected
  weights start with the concept response removed, ``W₀ ← W₀(I − UUᵀ)``;
- **metrics**, each instrument validated first:
  (a) *extraction*: share of samples with the mark for ``acme`` prompts and for
  the same prompts with ``plain`` (same noise), read by the mark detector of
  :mod:`gradproj.lab.probes`, whose precision and recall on held-out real images are
  reported;
  (b) *quality*: the probe's colour and shape accuracy on samples of ``plain``
  prompts, and the Fréchet distance between their probe features and held-out
  real unmarked images;
  (c) *the guarantee*: ``‖(W_T − W₀) U‖ / ‖W₀‖`` over the protected weights
  (and ``/‖W_T − W₀‖``), measured for the plain arm too with the same ``U``;
  (d) *embedding search* (:func:`gradproj.methods.attacks.embedding_search`): optimize
  the whole cross-attention context on real marked images, then the mark rate
  of samples drawn with it.

Everything goes to one run folder: ``results.json`` (every figure, per seed and
mean ± std), ``samples.png`` (arms side by side, same noise) and ``bars.png``.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from gradproj.lab import report, shapes
from gradproj.lab.defenses import ARMS, sampler, train_arm
from gradproj.lab.measure import measure
from gradproj.lab.world import DEFAULT, FULL, TINY, DemoConfig, build_world, save_unet
from gradproj.subspace import ConceptSubspace

__all__ = ["ARMS", "DEFAULT", "FULL", "TINY", "DemoConfig", "run", "subspace_diagnostics"]


def subspace_diagnostics(
    subspaces: dict[str, ConceptSubspace], tok, encoder
) -> dict[str, dict[str, float]]:
    """What each subspace leaves of the concept and what it takes of everything else.

    ``concept_residual``: ``‖(I − UUᵀ) Δ‖ / ‖Δ‖`` over every position of the
    differences ``Δ`` between ``acme`` captions and their ``plain`` twins (0: the
    protected layers see no difference at all). ``context_blocked``: ``‖UᵀH‖ / ‖H‖``
    over the states ``H`` of the ``plain`` captions (what the projection also hides
    of colour, shape and background words).
    """
    combos = shapes.all_labels()
    with_ = shapes.encode([shapes.caption(*x, True) for x in combos], tok, encoder)
    without = shapes.encode([shapes.caption(*x, False) for x in combos], tok, encoder)
    delta = (with_ - without).reshape(-1, with_.shape[-1]).double()
    states = without.reshape(-1, with_.shape[-1]).double()
    out = {}
    for mode, sub in subspaces.items():
        u = sub.basis.double()
        out[mode] = {
            "k": sub.k,
            "d": sub.dim,
            "concept_residual": float((delta - delta @ u @ u.T).norm() / delta.norm()),
            "context_blocked": float((states @ u).norm() / states.norm()),
        }
    return out


def run(
    cfg: DemoConfig = DEFAULT,
    out: str | Path | None = None,
    *,
    save_models: bool = False,
) -> dict[str, Any]:
    """Run the experiment of the module docstring; write and return its results.

    ``out``: the run folder (default ``runs/demo-<UTC time>``). ``save_models``:
    also write every trained UNet to ``models/<arm>-seed<seed>.pt`` there (read
    back with :func:`gradproj.lab.world.load_unet`; ``gradproj evaluate --models``
    takes the folder). Returns the dict written to ``results.json``.
    """
    from tqdm.auto import tqdm

    for arm in cfg.arms:
        if arm not in ARMS:
            raise ValueError(f"unknown arm {arm!r}; choose from {list(ARMS)}")
    started = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    folder = Path(out or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}")
    folder.mkdir(parents=True, exist_ok=True)
    try:
        world = build_world(cfg)
        per_arm: dict[str, list[dict[str, float]]] = {a: [] for a in cfg.arms}
        grid: dict[str, dict[str, torch.Tensor]] = {}
        total = len(cfg.arms) * len(cfg.seeds) * cfg.steps
        with tqdm(total=total, desc="training", unit="step") as bar:
            for seed in cfg.seeds:
                for arm in cfg.arms:
                    unet, noise_scheduler, drift = train_arm(arm, seed, cfg, world, bar)
                    draw = sampler(
                        "plain",
                        unet,
                        noise_scheduler,
                        world,
                        steps=cfg.sample_steps,
                        guidance=cfg.guidance,
                    )
                    figs, imgs = measure(
                        world,
                        unet,
                        noise_scheduler,
                        draw,
                        seed,
                        n_samples=cfg.n_samples,
                        attack_steps=cfg.attack_steps,
                        attack_lr=cfg.attack_lr,
                        attack_batch=cfg.batch_size,
                        # The demo's own embedding search (docs/demo.md's figures), not
                        # DoRI as its authors ran it (gradproj evaluate runs that).
                        attack_pairs_per_image=1,
                        attack_start="null",
                    )
                    per_arm[arm].append({**drift, **figs})
                    if save_models:
                        (folder / "models").mkdir(exist_ok=True)
                        save_unet(unet, folder / "models" / f"{arm}-seed{seed}.pt", cfg)
                    if seed == cfg.seeds[0]:
                        grid[arm] = imgs
        summary = {arm: report.summary(rows) for arm, rows in per_arm.items()}
        results = {
            "config": asdict(cfg),
            "wall_time_s": time.perf_counter() - started,
            **report.run_record(cfg.threads),
            "probe_on_held_out_real": world.probe_check,
            "subspaces": subspace_diagnostics(world.subspaces, world.tok, world.encoder),
            "per_seed": per_arm,
            "summary": summary,
        }
        report.write_json(folder / "results.json", results)
        report.sample_grid(grid, folder / "samples.png")
        report.bars(summary, folder / "bars.png", report.DEMO_PANELS, "the demo's arms")
    finally:
        torch.set_num_threads(threads)
    print(report.demo_table(results))
    print(f"wall time {results['wall_time_s']:.0f} s; results, samples.png, bars.png in {folder}")
    return results
