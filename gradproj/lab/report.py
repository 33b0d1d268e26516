"""The lab's reports: per-seed figures summarised, and the tables, bar charts and sample grids.

Every experiment writes ``results.json`` with :func:`run_record`'s fields (what decides
its numbers: versions, CPU, threads, deterministic settings), its summary from
:func:`summary`, and its figures through :func:`bars` and :func:`sample_grid`.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
from pathlib import Path
from typing import Any

import torch

# (key, title) of the figures every table and chart shows, in order.
DEMO_PANELS = (
    ("mark_rate_concept_prompts", "mark rate, 'acme' prompts"),
    ("mark_rate_neutral_prompts", "mark rate, 'plain' prompts"),
    ("mark_rate_attack", "mark rate, embedding search"),
    ("colour_accuracy", "colour accuracy ('plain')"),
    ("shape_accuracy", "shape accuracy ('plain')"),
    ("frechet_distance", "Fréchet distance (probe space)"),
)
DEFENSE_COLUMNS = (
    ("mark_rate_concept_prompts", "mark, `acme` prompts"),
    ("mark_lift", "lift over `plain`"),
    ("mark_rate_attack", "mark, DoRI attack"),
    ("colour_accuracy", "colour acc"),
    ("shape_accuracy", "shape acc"),
    ("frechet_distance", "Fréchet"),
    ("sampling_cost", "sampling cost"),
)


def summary(per_seed: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """``{key: {"mean", "std", "n"}}`` over the seeds; NaN entries (undefined figures,
    e.g. an AUC on one class) are left out, and a key with none left is NaN, ``n = 0``."""
    out = {}
    for key in per_seed[0]:
        vals = [r[key] for r in per_seed if key in r and r[key] == r[key]]
        if not vals:
            out[key] = {"mean": float("nan"), "std": float("nan"), "n": 0}
            continue
        out[key] = {
            "mean": statistics.fmean(vals),
            "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            "n": len(vals),
        }
    return out


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_record(threads: int) -> dict[str, Any]:
    """What decides a run's numbers besides its config and seeds.

    The lab's figures are deterministic for a given machine and software, but not
    across them: another CPU instruction set (``torch.backends.cpu.get_cpu_capability``
    picks AVX2 or AVX-512 kernels, whose float sums round differently), another
    torch/diffusers version or another thread count changes the trained weights in
    the last bits, and a few hundred steps of training amplify that into different
    samples. So every results file carries these.
    """
    import diffusers
    import numpy

    from gradproj import backends

    return {
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "numpy": numpy.__version__,
        },
        "machine": {
            "cpu": cpu_model(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cores": os.cpu_count(),
            "platform": platform.platform(),
        },
        "threads": threads,
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "projection_backend_cpu_fp32": backends.select(
            "project_bucket_", torch.device("cpu"), torch.float32
        ).name,
    }


def write_json(path: Path, results: dict[str, Any]) -> None:
    path.write_text(json.dumps(results, indent=2))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def bars(
    summary_by_row: dict[str, dict[str, dict[str, float]]],
    path: Path,
    panels: tuple[tuple[str, str], ...],
    title: str,
) -> None:
    """One panel per figure, one bar per row (arm or defense): mean ± std over seeds."""
    plt = _pyplot()
    rows = list(summary_by_row)
    fig, axes = plt.subplots(1, len(panels), figsize=(2.9 * len(panels), 3.4))
    for ax, (key, name) in zip(axes, panels, strict=True):
        means = [summary_by_row[r][key]["mean"] for r in rows]
        stds = [summary_by_row[r][key]["std"] for r in rows]
        ax.bar(
            range(len(rows)), means, yerr=stds, capsize=3, color=[f"C{i}" for i in range(len(rows))]
        )
        ax.set_xticks(range(len(rows)), rows, rotation=35, ha="right", fontsize=7)
        ax.set_title(name.replace("`", "'"), fontsize=9)
        if "rate" in key or "accuracy" in key:
            ax.set_ylim(0, 1.05)
    fig.suptitle(f"{title}: mean ± std over seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sample_grid(images: dict[str, dict[str, torch.Tensor]], path: Path, per_row: int = 8) -> None:
    """Rows: model × prompt set; columns: the same noise / prompt across rows."""
    plt = _pyplot()
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


def defense_table(summary_by_row: dict[str, dict[str, dict[str, float]]]) -> str:
    """The markdown table: rows = defenses, columns = :data:`DEFENSE_COLUMNS` (mean ± std)."""
    lines = [
        "| defense | " + " | ".join(h for _, h in DEFENSE_COLUMNS) + " |",
        "|---" * (len(DEFENSE_COLUMNS) + 1) + "|",
    ]
    for row, s in summary_by_row.items():
        cells = []
        for key, _ in DEFENSE_COLUMNS:
            m, sd = s[key]["mean"], s[key]["std"]
            cells.append(
                f"{m:.1f} ± {sd:.1f}" if key == "frechet_distance" else f"{m:.2f} ± {sd:.2f}"
            )
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def demo_table(results: dict[str, Any]) -> str:
    """The demo's console table: the probe's validation, then one line per arm."""
    p = results["probe_on_held_out_real"]
    lines = [
        f"probe on held-out real images: colour acc {p['colour_accuracy']:.3f}, shape acc "
        f"{p['shape_accuracy']:.3f}, mark precision {p['mark_precision']:.3f}, recall "
        f"{p['mark_recall']:.3f}"
    ]
    keys = [
        ("mark_rate_concept_prompts", "mark|acme"),
        ("mark_rate_neutral_prompts", "mark|plain"),
        ("mark_rate_attack", "mark|search"),
        ("colour_accuracy", "colour acc"),
        ("shape_accuracy", "shape acc"),
        ("frechet_distance", "FD"),
        ("drift_over_w0", "‖ΔWU‖/‖W₀‖"),
    ]
    lines.append(f"{'arm':<20}" + "".join(f"{h:>20}" for _, h in keys))
    for arm, s in results["summary"].items():
        cells = "".join(
            f"{s[k]['mean']:>11.3g} ± {s[k]['std']:<6.2g}"
            if k != "drift_over_w0"
            else f"{s[k]['mean']:>19.2e} "
            for k, _ in keys
        )
        lines.append(f"{arm:<20}{cells}")
    return "\n".join(lines)
