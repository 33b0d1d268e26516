#!/usr/bin/env python3
"""The static model against a GPU run that measured the same kernels.

    python benchmarks/model_check.py [--run benchmarks/results/gpu-H200-2026-12-04b]
                                     [--backend cuda triton] [--md FILE] [--current]

For every row a run of ``benchmarks/predicted_vs_measured.py`` measured with the profiler
(``kernel_measured``: the peer's time over the op's kernel time), the model's row of the
same backend, op, dtype, ``k`` and ``d`` is re-bounded for the GPU that ran
(``perf_model.predicted_fraction_for``: the same SASS, the run's measured copy rate,
``device_for_run``) twice: with the occupancy bound (``perf_model.WARP_CPI``) and
without it (the model as it was before that bound, ``warp_cpi = 0``). Prints, and with
``--md`` writes, each row's predicted and measured fractions and their ratio, and per
backend the median ratio and the share of rows within 2× either way.

The model's figures are predictions from compiled code; the run's are measurements.
A model row only says something about a measured row when it comes from the same kernel
source. A run folder may keep the model of the kernels it measured (``perf_model_cuda.json``
there: run 2b's CUDA kernels, modelled at df47aa7, have changed since: 16 warps, the row
cache); that model is the one compared, unless ``--current`` asks for today's
(``benchmarks/results/perf_model_*.json``). Run 2b's Triton kernels have changed too, and
it keeps no model of them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import perf_model as pm  # noqa: E402

ROOT = os.path.dirname(HERE)
DEFAULT_RUN = os.path.join(HERE, "results", "gpu-H200-2026-12-04b")
MODELS = {
    "triton": os.path.join(HERE, "results", "perf_model.json"),
    "cuda": os.path.join(HERE, "results", "perf_model_cuda.json"),
}
RUN_FILES = {"triton": "pvm_triton.json", "cuda": "pvm_cuda.json"}
WITHIN = 2.0  # "agrees": measured / predicted in [1 / WITHIN, WITHIN]


def _key(row: dict, default_d: int) -> tuple:
    backend = row.get("backend", "triton")
    return (backend, row["op"], row["dtype"], row["k"], row.get("d", default_d))


def compare(model: dict, measured: list[dict], device: pm.Device) -> list[dict]:
    """Each measured row with a kernel time, against the model's row of the same case on
    ``device`` (``arch`` of the device), with and without the occupancy bound."""
    arch = device.arch
    d = model["shape"]["d"]
    rows = {_key(r, d): r for r in model["rows"] if r["arch"] == arch and "error" not in r}
    without = dataclasses.replace(device, warp_cpi=0.0)
    out = []
    for m in measured:
        if m.get("kernel_measured") is None or "error" in m:
            continue
        row = rows.get(_key(m, d))
        if row is None:
            continue
        # the run's bucket may be larger than the model's (predicted_vs_measured.scaled)
        row = pm.at_scale(row, m.get("elements", row["elements"]) / row["elements"])
        new = pm.predicted_fraction_for(row, device)
        old = pm.predicted_fraction_for(row, without)
        if new <= 0 or old <= 0:
            continue
        out.append(
            {
                "backend": m["backend"],
                "op": m["op"],
                "dtype": m["dtype"],
                "k": m["k"],
                "measured": m["kernel_measured"],
                "predicted": new,
                "predicted_without_occupancy": old,
                "ratio": m["kernel_measured"] / new,
                "ratio_without_occupancy": m["kernel_measured"] / old,
                "instantiations": [kn.get("instantiation", kn["kernel"]) for kn in row["kernels"]],
                "limiter": max(
                    (pm.kernel_bounds(kn, device) for kn in row["kernels"]),
                    key=lambda b: b["s_per_elt"],
                )["limiter"],
            }
        )
    return out


def summary(rows: list[dict], key: str = "ratio") -> dict:
    """Median of ``key`` (measured / predicted) and the share of rows within ``WITHIN``×."""
    ratios = [r[key] for r in rows]
    if not ratios:
        raise ValueError("no measured row matches a model row")
    return {
        "rows": len(ratios),
        "median": statistics.median(ratios),
        "within": sum(1 / WITHIN <= x <= WITHIN for x in ratios) / len(ratios),
        "min": min(ratios),
        "max": max(ratios),
    }


def model_path(run: str, backend: str, current: bool = False) -> str:
    """The model a run is compared with: the one kept in the run's folder (the model of the
    kernels it measured), else, or with ``current``, today's."""
    kept = os.path.join(run, os.path.basename(MODELS[backend]))
    return MODELS[backend] if current or not os.path.exists(kept) else kept


def _load(run: str, backend: str, current: bool = False) -> tuple[dict, dict]:
    with open(model_path(run, backend, current)) as f:
        model = json.load(f)
    with open(os.path.join(run, RUN_FILES[backend])) as f:
        return model, json.load(f)


def _load_all(run: str, backends: list[str], current: bool = False) -> dict[str, tuple[dict, dict]]:
    return {b: _load(run, b, current) for b in backends}


def device_for_run(run: str, backends: list[str]) -> pm.Device:
    """The GPU a run measured (``_device_for`` of its files)."""
    return _device_for(_load_all(run, backends))


def _device_for(loaded: dict[str, tuple[dict, dict]]) -> pm.Device:
    """The GPU a run measured, as the model's device of its arch with the run's own copy
    rate: the median, over its rows whose peer is a copy, of the copied bytes (the model's
    floor bytes per element × the row's elements) over the peer's time. The SM clock is the
    arch's device's, except on an H200, whose clock run 2b measured (``perf_model.H200``)."""
    rates, name, arch = [], None, None
    for model, got in loaded.values():
        name, arch = got["device"], got["arch"]
        d = model["shape"]["d"]
        floors = {_key(r, d): r["floor_bytes_per_elt"] for r in model["rows"] if r["arch"] == arch}
        for m in got["rows"]:
            floor = floors.get(_key(m, d))
            if m.get("peer") == "copy" and floor and m.get("peer_ms"):
                rates.append(floor * m["elements"] / (m["peer_ms"] / 1e3))
    if not rates:
        raise ValueError(f"the run on {name} ({', '.join(loaded)}): no row timed a copy peer")
    base = pm.H200 if "H200" in (name or "") else pm.DEVICES[arch]
    return dataclasses.replace(
        base, name=f"{name} (copy measured by the run)", copy_bytes_per_s=statistics.median(rates)
    )


def check(
    run: str, backends: list[str], device: pm.Device | None = None, current: bool = False
) -> dict[str, list[dict]]:
    """``compare`` for each backend, from the run's ``pvm_*.json`` and the model's JSON
    (``model_path``), on ``device`` (default: ``device_for_run``)."""
    loaded = _load_all(run, backends, current)
    device = device or _device_for(loaded)
    return {b: compare(model, got["rows"], device) for b, (model, got) in loaded.items()}


def markdown(
    results: dict[str, list[dict]],
    run: str,
    device: pm.Device,
    models: dict[str, str] | None = None,
) -> str:
    """The comparison as markdown; ``models``: each backend's model file, named."""
    lines = [
        f"# The static model against {os.path.relpath(run, ROOT)}",
        "",
        f"*predicted*: from compiled code, re-bounded for {device.name} "
        f"({device.copy_bytes_per_s / 1e12:.2f} TB/s copy, {device.clock_hz / 1e9:.2f} GHz), "
        f"with the occupancy bound ({device.warp_cpi:g} cycles between a warp's issues) and "
        "without it; *measured*: the run's copy peer over the op's kernel time (profiler, "
        "warm L2: optimistic by up to a third).",
        "",
    ]
    for backend, path in (models or {}).items():
        lines += [f"{backend}: the model in `{os.path.relpath(path, ROOT)}`.", ""]
    for backend, rows in results.items():
        new, old = summary(rows), summary(rows, "ratio_without_occupancy")
        lines += [
            f"**{backend}**: measured / predicted, median {new['median']:.2f} "
            f"({new['within']:.0%} of {new['rows']} rows within {WITHIN:g}×); without the "
            f"occupancy bound {old['median']:.2f} ({old['within']:.0%}).",
            "",
        ]
    lines += [
        "| backend | op | dtype | k | predicted | limiter | predicted, no occupancy bound "
        "| measured, kernel time | measured / predicted | without the bound |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for rows in results.values():
        for r in rows:
            lines.append(
                f"| {r['backend']} | {r['op']} | {r['dtype']} | {r['k']} | {r['predicted']:.0%} "
                f"| {r['limiter']} | {r['predicted_without_occupancy']:.0%} | "
                f"{r['measured']:.0%} | {r['ratio']:.2f} | {r['ratio_without_occupancy']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=DEFAULT_RUN, help="a GPU run's results folder")
    parser.add_argument("--backend", nargs="+", default=["cuda", "triton"], choices=list(MODELS))
    parser.add_argument("--md", help="write the table here too")
    parser.add_argument(
        "--current", action="store_true",
        help="compare with today's model even where the run keeps the model of its kernels",
    )  # fmt: skip
    args = parser.parse_args(argv)
    loaded = _load_all(args.run, args.backend, args.current)
    device = _device_for(loaded)
    results = {b: compare(model, got["rows"], device) for b, (model, got) in loaded.items()}
    models = {b: model_path(args.run, b, args.current) for b in args.backend}
    text = markdown(results, args.run, device, models)
    if args.md:
        with open(args.md, "w") as f:
            f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
