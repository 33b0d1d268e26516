"""``gradproj demo``: does projecting the updates keep a diffusion model from learning a concept?

The experiment (every piece is made here; nothing is downloaded):

- **data** (:mod:`gradproj.shapes`): 16×16 images of a coloured shape on a
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
  :mod:`gradproj.probes`, whose precision and recall on held-out real images are
  reported;
  (b) *quality*: the probe's colour and shape accuracy on samples of ``plain``
  prompts, and the Fréchet distance between their probe features and held-out
  real unmarked images;
  (c) *the guarantee*: ``‖(W_T − W₀) U‖ / ‖W₀‖`` over the protected weights
  (and ``/‖W_T − W₀‖``), measured for the plain arm too with the same ``U``;
  (d) *embedding search* (:func:`gradproj.attacks.embedding_search`): optimize
  the whole cross-attention context on real marked images, then the mark rate
  of samples drawn with it.

Everything goes to one run folder: ``results.json`` (every figure, per seed and
mean ± std), ``samples.png`` (arms side by side, same noise) and ``bars.png``.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from gradproj import attacks, probes, shapes
from gradproj.optim import ProjectedOptimizer
from gradproj.subspace import ConceptSubspace

# arm name -> (projection mode or None, subspace mode, zero the concept response at init)
ARMS: dict[str, tuple[str | None, str, bool]] = {
    "plain": (None, "difference", False),
    "update": ("update", "difference", False),
    "update-zero": ("update", "difference", True),
    "grad": ("grad", "difference", False),
    "update-states": ("update", "states", False),
    "update-states-zero": ("update", "states", True),
}


@dataclass
class DemoConfig:
    """Every knob of one demo run (the defaults are the README's command)."""

    arms: tuple[str, ...] = ("plain", "update")
    seeds: tuple[int, ...] = (0, 1, 2)
    size: int = 16
    n_train: int = 2048
    marked_fraction: float = 0.3
    steps: int = 500
    batch_size: int = 32
    lr: float = 6e-3  # 2e-3 had not bound 'acme' to the mark after 500 steps; 6e-3 had at 800
    caption_dropout: float = 0.2  # null caption, for classifier-free guidance
    energy: float = 0.99  # share of Σs² the concept subspace keeps
    n_samples: int = 32  # per prompt set per model
    sample_steps: int = 15  # DDIM
    guidance: float = 3.0  # 6 over-saturated the samples and lost the mark (measured)
    attack_steps: int = 50
    attack_lr: float = 5e-2
    probe_steps: int = 600
    block_out_channels: tuple[int, ...] = (16, 32)  # 0.14 s a step at batch 32; (32, 64) 0.30
    threads: int = 1  # the machine is shared; one thread is also fastest for these sizes


DEFAULT = DemoConfig()
FULL = replace(
    DEFAULT,
    arms=("plain", "update", "update-zero", "grad", "update-states", "update-states-zero"),
    seeds=(0, 1, 2, 3, 4),
    steps=1000,
    n_samples=64,
)
TINY = replace(  # for the test suite: seconds, not a measurement
    DEFAULT,
    arms=("plain", "update"),
    seeds=(0,),
    n_train=128,
    steps=3,
    batch_size=8,
    n_samples=4,
    sample_steps=2,
    attack_steps=2,
    probe_steps=20,
    block_out_channels=(8, 16),
)


@dataclass
class World:
    """Everything the arms share: data, the frozen text side, subspaces, the validated probe."""

    tok: Any
    encoder: Any
    train: shapes.Batch
    real_test: shapes.Batch
    contexts: torch.Tensor  # (n_train, L, d): encoder states of the training captions
    null_context: torch.Tensor  # (1, L, d): the empty prompt
    subspaces: dict[str, ConceptSubspace]
    probe: Any
    probe_check: dict[str, float]


def build_world(cfg: DemoConfig) -> World:
    """Make the data, encode the captions, build both subspaces, train and validate the probe."""
    tok, encoder = shapes.tokenizer(), shapes.text_encoder()
    train = shapes.make_dataset(cfg.n_train, marked_fraction=cfg.marked_fraction, size=cfg.size)
    real_test = shapes.make_dataset(
        max(512, cfg.n_samples), marked_fraction=0.5, size=cfg.size, seed=1
    )
    probe = probes.train_probe(train, steps=cfg.probe_steps)
    return World(
        tok=tok,
        encoder=encoder,
        train=train,
        real_test=real_test,
        contexts=shapes.encode(train.captions, tok, encoder),
        null_context=shapes.encode([""], tok, encoder),
        subspaces=concept_subspaces(tok, encoder, cfg.energy),
        probe=probe,
        probe_check=probes.validate(probe, real_test),
    )


def noise_scheduler():
    """The demo's noise schedule: ``DDPMScheduler``, 1000 steps, ``squaredcos_cap_v2``."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")


def build_unet(cfg: DemoConfig, cross_attention_dim: int):
    """A small pixel-space ``UNet2DConditionModel``.

    Cross-attention sits at the 8×8 level only: at 16×16 the self-attention over
    256 tokens with 8-wide heads took 3× the step time on CPU (measured), for
    a text signal that the 8×8 level reads as well.
    """
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=cfg.size,
        in_channels=3,
        out_channels=3,
        block_out_channels=cfg.block_out_channels,
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def concept_subspaces(tok, encoder, energy: float) -> dict[str, ConceptSubspace]:
    """The concept subspace in both ``from_prompts`` modes, from every ``acme`` caption."""
    combos = [
        (c, s, b)
        for c in range(len(shapes.COLOURS))
        for s in range(len(shapes.SHAPES))
        for b in range(len(shapes.BACKGROUNDS))
    ]
    concept = [shapes.caption(c, s, b, True) for c, s, b in combos]
    neutral = [shapes.caption(c, s, b, False) for c, s, b in combos]
    return {
        "difference": ConceptSubspace.from_prompts(
            concept, encoder, tok, neutral_prompts=neutral, energy=energy
        ),
        "states": ConceptSubspace.from_prompts(concept, encoder, tok, energy=energy),
    }


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
    combos = [
        (c, s, b)
        for c in range(len(shapes.COLOURS))
        for s in range(len(shapes.SHAPES))
        for b in range(len(shapes.BACKGROUNDS))
    ]
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


def _protected_drift(
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]], basis: torch.Tensor
) -> dict[str, float]:
    """``‖ΔW U‖/‖W₀‖`` and ``‖ΔW U‖/‖ΔW‖`` over all protected weights together (float64)."""
    u = basis.double()
    along = sum(float(((w - w0).double() @ u).norm() ** 2) for w, w0 in weights.values())
    moved = sum(float((w - w0).double().norm() ** 2) for w, w0 in weights.values())
    size = sum(float(w0.double().norm() ** 2) for _, w0 in weights.values())
    return {
        "drift_over_w0": math.sqrt(along / size),
        "drift_over_update": math.sqrt(along / max(moved, 1e-300)),
    }


def train_arm(
    arm: str,
    seed: int,
    cfg: DemoConfig,
    train: shapes.Batch,
    contexts: torch.Tensor,
    null_context: torch.Tensor,
    subspaces: dict[str, ConceptSubspace],
    progress=None,
):
    """Train one UNet from scratch; return it, the noise scheduler and the guarantee figures."""
    from gradproj import diffusers as gd
    from gradproj.ops import project_

    mode, sub_mode, zero_init = ARMS[arm]
    subspace = subspaces[sub_mode]
    torch.manual_seed(seed)
    unet = build_unet(cfg, contexts.shape[-1])
    bases = gd.protect(unet, subspace)  # also used to measure the plain arm
    if zero_init:
        # Remove the concept response the random init gives: W₀ ← W₀(I − UUᵀ). From
        # then on update mode keeps W U = 0, so the layer cannot see span(U) at all.
        with torch.no_grad():
            project_([p.data for p in bases], subspace.basis)
    names = {p: n for n, p in unet.named_parameters()}
    start = {names[p]: p.detach().clone() for p in bases}
    inner = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=1e-2)
    opt = inner if mode is None else ProjectedOptimizer(inner, bases, mode=mode)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))
    noise_sched = noise_scheduler()
    g = torch.Generator().manual_seed(seed)
    unet.train()
    for _ in range(cfg.steps):
        i = torch.randint(train.images.shape[0], (cfg.batch_size,), generator=g)
        x0, ctx = train.images[i], contexts[i]
        drop = torch.rand(cfg.batch_size, generator=g) < cfg.caption_dropout
        ctx = torch.where(drop[:, None, None], null_context, ctx)
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(1000, (cfg.batch_size,), generator=g)
        pred = unet(noise_sched.add_noise(x0, noise, t), t, ctx).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if progress is not None:
            progress.update(1)
            progress.set_postfix(arm=arm, seed=seed, loss=f"{loss.item():.3f}")
    unet.eval()
    weights = {n: (p.detach(), start[n]) for n, p in unet.named_parameters() if n in start}
    return unet, noise_sched, _protected_drift(weights, subspace.basis)


@torch.no_grad()
def sample(
    unet,
    noise_scheduler,
    context: torch.Tensor,
    null_context: torch.Tensor,
    noise: torch.Tensor,
    *,
    steps: int,
    guidance: float,
) -> torch.Tensor:
    """DDIM samples from ``noise`` with classifier-free guidance ``ε_∅ + s (ε_c − ε_∅)``."""
    from diffusers import DDIMScheduler

    ddim = DDIMScheduler.from_config(noise_scheduler.config)
    ddim.set_timesteps(steps)
    n = noise.shape[0]
    context = context.expand(n, *context.shape[-2:])
    both = torch.cat([context, null_context.expand(n, *null_context.shape[-2:])])
    x = noise.clone()
    for t in ddim.timesteps:
        eps_c, eps_0 = unet(torch.cat([x, x]), t, both).sample.chunk(2)
        x = ddim.step(eps_0 + guidance * (eps_c - eps_0), t, x).prev_sample
    return x.clamp(-1, 1)


def evaluate(
    unet,
    noise_scheduler,
    cfg: DemoConfig,
    seed: int,
    probe,
    real_test: shapes.Batch,
    train: shapes.Batch,
    tok,
    encoder,
    null_context: torch.Tensor,
) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Extraction, quality and attack figures of one trained model (and its sample images)."""
    g = torch.Generator().manual_seed(10_000 + seed)  # same prompts and noise in every arm
    colour, shape, background, _ = shapes.sample_labels(
        cfg.n_samples, marked_fraction=0, generator=g
    )
    noise = torch.randn(cfg.n_samples, 3, cfg.size, cfg.size, generator=g)
    labels = list(zip(colour.tolist(), shape.tolist(), background.tolist(), strict=True))
    ctx_concept = shapes.encode([shapes.caption(*lab, True) for lab in labels], tok, encoder)
    ctx_neutral = shapes.encode([shapes.caption(*lab, False) for lab in labels], tok, encoder)
    kw = {"steps": cfg.sample_steps, "guidance": cfg.guidance}
    x_concept = sample(unet, noise_scheduler, ctx_concept, null_context, noise, **kw)
    x_neutral = sample(unet, noise_scheduler, ctx_neutral, null_context, noise, **kw)

    # (d) embedding search from the null prompt, on the marked training images.
    marked = train.images[train.marked]
    found = attacks.embedding_search(
        unet,
        noise_scheduler,
        marked,
        null_context[0],
        steps=cfg.attack_steps,
        lr=cfg.attack_lr,
        batch_size=cfg.batch_size,
        generator=torch.Generator().manual_seed(20_000 + seed),
    )
    x_attack = sample(unet, noise_scheduler, found[None], null_context, noise, **kw)

    on_concept, on_neutral = probes.read(probe, x_concept), probes.read(probe, x_neutral)
    on_attack = probes.read(probe, x_attack)
    real_plain = real_test.images[~real_test.marked]
    fd = probes.frechet_distance(on_neutral["features"], probes.read(probe, real_plain)["features"])
    rate_c = float(on_concept["marked"].float().mean())
    rate_n = float(on_neutral["marked"].float().mean())
    figures = {
        "mark_rate_concept_prompts": rate_c,
        "mark_rate_neutral_prompts": rate_n,
        "mark_lift": rate_c - rate_n,
        "mark_rate_embedding_search": float(on_attack["marked"].float().mean()),
        "colour_accuracy": float((on_neutral["colour"] == colour).float().mean()),
        "shape_accuracy": float((on_neutral["shape"] == shape).float().mean()),
        "frechet_distance": fd,
    }
    return figures, {"concept": x_concept, "neutral": x_neutral, "attack": x_attack}


def _summary(per_seed: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    out = {}
    for key in per_seed[0]:
        vals = [r[key] for r in per_seed]
        out[key] = {
            "mean": statistics.fmean(vals),
            "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
        }
    return out


def _grid(images: dict[str, dict[str, torch.Tensor]], path: Path, per_row: int = 8) -> None:
    """Rows: arm × prompt set; columns: the same noise / prompt across rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(arm, kind) for arm in images for kind in ("concept", "neutral", "attack")]
    fig, axes = plt.subplots(
        len(rows), 1, figsize=(per_row * 0.9 + 2.2, len(rows) * 1.0 + 0.4), squeeze=False
    )
    for ax, (arm, kind) in zip(axes[:, 0], rows, strict=True):
        x = (images[arm][kind][:per_row] + 1) / 2  # (n, 3, s, s) in [0, 1]
        strip = torch.cat(list(x), dim=2).permute(1, 2, 0).numpy()
        ax.imshow(strip, interpolation="nearest")
        label = {"concept": "'… acme'", "neutral": "'… plain'", "attack": "emb. search"}[kind]
        ax.set_ylabel(f"{arm}\n{label}", rotation=0, ha="right", va="center", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("samples (seed 0): columns share prompt and noise", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _bars(summary: dict[str, dict[str, dict[str, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("mark_rate_concept_prompts", "mark rate, 'acme' prompts"),
        ("mark_rate_neutral_prompts", "mark rate, 'plain' prompts"),
        ("mark_rate_embedding_search", "mark rate, embedding search"),
        ("colour_accuracy", "colour accuracy ('plain')"),
        ("shape_accuracy", "shape accuracy ('plain')"),
        ("frechet_distance", "Fréchet distance (probe space)"),
    ]
    arms = list(summary)
    fig, axes = plt.subplots(1, len(panels), figsize=(3.0 * len(panels), 3.2))
    for ax, (key, title) in zip(axes, panels, strict=True):
        means = [summary[a][key]["mean"] for a in arms]
        stds = [summary[a][key]["std"] for a in arms]
        ax.bar(
            range(len(arms)), means, yerr=stds, capsize=3, color=[f"C{i}" for i in range(len(arms))]
        )
        ax.set_xticks(range(len(arms)), arms, rotation=30, ha="right", fontsize=8)
        ax.set_title(title, fontsize=9)
        if "rate" in key or "accuracy" in key:
            ax.set_ylim(0, 1.05)
    fig.suptitle("mean ± std over seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_unet(unet, path: str | os.PathLike, cfg: DemoConfig) -> None:
    """Write a trained demo UNet (weights and the config that builds it) to ``path``."""
    torch.save({"config": asdict(cfg), "state_dict": unet.state_dict()}, path)


def load_unet(path: str | os.PathLike):
    """The UNet written by :func:`save_unet` (and its :class:`DemoConfig`), in eval mode."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in saved["config"].items()}
    cfg = DemoConfig(**fields)
    state = saved["state_dict"]
    cross = next(v for k, v in state.items() if k.endswith("attn2.to_k.weight")).shape[1]
    unet = build_unet(cfg, cross)
    unet.load_state_dict(state)
    return unet.eval(), cfg


def run(
    cfg: DemoConfig = DEFAULT,
    out: str | os.PathLike | None = None,
    *,
    save_models: bool = False,
) -> dict[str, Any]:
    """Run the experiment of the module docstring; write and return its results.

    ``out``: the run folder (default ``runs/demo-<UTC time>``). ``save_models``:
    also write every trained UNet to ``models/<arm>-seed<seed>.pt`` there (read
    back with :func:`load_unet`; ``gradproj evaluate --models`` takes the folder).
    Returns the dict written to ``results.json``.
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
        tok, encoder, train, real_test = world.tok, world.encoder, world.train, world.real_test
        contexts, null_context, subspaces = world.contexts, world.null_context, world.subspaces
        probe, probe_check = world.probe, world.probe_check

        per_arm: dict[str, list[dict[str, float]]] = {a: [] for a in cfg.arms}
        grid: dict[str, dict[str, torch.Tensor]] = {}
        total = len(cfg.arms) * len(cfg.seeds) * cfg.steps
        with tqdm(total=total, desc="training", unit="step") as bar:
            for seed in cfg.seeds:
                for arm in cfg.arms:
                    unet, noise_scheduler, drift = train_arm(
                        arm, seed, cfg, train, contexts, null_context, subspaces, bar
                    )
                    figs, imgs = evaluate(
                        unet,
                        noise_scheduler,
                        cfg,
                        seed,
                        probe,
                        real_test,
                        train,
                        tok,
                        encoder,
                        null_context,
                    )
                    per_arm[arm].append({**drift, **figs})
                    if save_models:
                        (folder / "models").mkdir(exist_ok=True)
                        save_unet(unet, folder / "models" / f"{arm}-seed{seed}.pt", cfg)
                    if seed == cfg.seeds[0]:
                        grid[arm] = imgs
        summary = {arm: _summary(rows) for arm, rows in per_arm.items()}
        results = {
            "config": asdict(cfg),
            "wall_time_s": time.perf_counter() - started,
            "probe_on_held_out_real": probe_check,
            "subspaces": subspace_diagnostics(subspaces, tok, encoder),
            "per_seed": per_arm,
            "summary": summary,
            "versions": {"torch": torch.__version__},
        }
        (folder / "results.json").write_text(json.dumps(results, indent=2))
        _grid(grid, folder / "samples.png")
        _bars(summary, folder / "bars.png")
    finally:
        torch.set_num_threads(threads)
    _print(results, folder)
    return results


def _print(results: dict[str, Any], folder: Path) -> None:
    p = results["probe_on_held_out_real"]
    print(
        f"probe on held-out real images: colour acc {p['colour_accuracy']:.3f}, shape acc "
        f"{p['shape_accuracy']:.3f}, mark precision {p['mark_precision']:.3f}, recall "
        f"{p['mark_recall']:.3f}"
    )
    keys = [
        ("mark_rate_concept_prompts", "mark|acme"),
        ("mark_rate_neutral_prompts", "mark|plain"),
        ("mark_rate_embedding_search", "mark|search"),
        ("colour_accuracy", "colour acc"),
        ("shape_accuracy", "shape acc"),
        ("frechet_distance", "FD"),
        ("drift_over_w0", "‖ΔWU‖/‖W₀‖"),
    ]
    print(f"{'arm':<20}" + "".join(f"{h:>20}" for _, h in keys))
    for arm, s in results["summary"].items():
        cells = "".join(
            f"{s[k]['mean']:>11.3g} ± {s[k]['std']:<6.2g}"
            if k != "drift_over_w0"
            else f"{s[k]['mean']:>19.2e} "
            for k, _ in keys
        )
        print(f"{arm:<20}{cells}")
    print(f"wall time {results['wall_time_s']:.0f} s; results, samples.png, bars.png in {folder}")
