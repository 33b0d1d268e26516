#!/usr/bin/env python3
"""Measured against predicted: the first GPU run checks the static model.

    python benchmarks/predicted_vs_measured.py --out DIR [--model MODEL_JSON ...]

CUDA only (``scripts/gpu_check.sh`` runs it). For every row of the static models
(:mod:`benchmarks.perf_model` for the Triton kernels, :mod:`benchmarks.perf_model_cuda`
for the CUDA ones, "predicted from compiled code, not measured") of this device's
architecture (``sm_80`` rows on compute capability 8.x, ``sm_90`` on 9.x), the same op,
side, dtype and ``k`` on the model's bucket (``shape`` of the JSON: its rows split into
two tensors of ``d`` columns) is timed on the row's backend (``backend`` of the row,
``triton`` when absent) with ``triton.testing.do_bench`` (median, L2 flushed), together
with its peer in the same run:

* ``project_`` / anchored / ``surgery_``: a device copy of the op's essential bytes
  (the model's ``floor_bytes_per_elt`` × elements, read + written), so the measured
  fraction is ``t_copy / t_op``, the model's ``predicted_fraction_of_copy``;
* ``ProjectedAdamW``: ``torch.optim.AdamW(fused=True).step()`` on the same parameters,
  so the measured figure is ``t_fused_adamw / t_projected`` (the model assumes torch's
  fused AdamW at the copy roofline: this comparison also tests that assumption).

Writes ``DIR/predicted_vs_measured.json`` and ``.md`` (device name, versions, every
row: predicted, measured, measured / predicted). Nothing here is a prediction: the
model's figures are copied from its JSON, labelled as such.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from collections.abc import Callable

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import perf_model as pm  # noqa: E402

DEFAULT_MODELS = [
    os.path.join(ROOT, "benchmarks", "results", "perf_model.json"),
    os.path.join(ROOT, "benchmarks", "results", "perf_model_cuda.json"),
]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TENSORS = 2  # the model's bucket: its rows split into this many tensors


def arch_of(capability: tuple[int, int]) -> str:
    """The model's arch for a device: ``sm_80`` for 8.x, ``sm_90`` for 9.x (and later)."""
    major = capability[0]
    if major < 8:
        raise ValueError(f"no model rows for compute capability {capability}: sm_80 or later")
    return "sm_80" if major == 8 else "sm_90"


def rows_for(model: dict, arch: str) -> list[dict]:
    """The model's rows for ``arch``; a clear error when the model has none."""
    rows = [r for r in model["rows"] if r["arch"] == arch]
    if not rows:
        raise ValueError(f"the model has no rows for {arch} (it has {model.get('devices')})")
    return rows


@functools.lru_cache(maxsize=2)
def _orthonormal(d: int, k: int, dev: torch.device) -> torch.Tensor:
    """A fixed ``d × k`` orthonormal basis (fp32), by a float64 QR on ``dev``: a flat basis is
    as long as the bucket (millions of rows), which a CPU QR takes seconds over."""
    gen = torch.Generator(device=dev).manual_seed(0)
    a = torch.randn(d, k, generator=gen, device=dev, dtype=torch.float64)
    return torch.linalg.qr(a)[0].to(torch.float32)


def scaled(row: dict, shape: dict, scale: int) -> tuple[dict, dict]:
    """The row and bucket with ``scale`` × the model's rows (per-element figures do not
    depend on it, but for the CUDA kernels' staging, a fixed cost per launch:
    ``perf_model.at_scale`` predicts the row again for the larger bucket), so one launch
    runs well past launch latency and its bytes are several times the L2 (the model's
    4096 × 768 fp32 bucket is 12.6 MB; an H200's L2 is 60 MB).
    ``side="flat"`` keeps the model's bucket: its basis is as long as the bucket (k = 128
    would be 25 M × 128 at scale 8), and ``d · k`` stays below 2³¹. A width-sweep row (the
    CUDA model's ``widths``) names its own ``d``."""
    shape = {**shape, "d": row.get("d", shape["d"])}
    if scale == 1 or row["op"].endswith(" flat"):
        return row, shape
    return pm.at_scale(row, scale), {**shape, "rows": shape["rows"] * scale}


def case(
    row: dict, shape: dict, dev: torch.device
) -> tuple[Callable[[], None], Callable[[], None]]:
    """``(op, peer)``: closures that run the row's op on its backend and its peer."""
    import gradproj
    from gradproj import ops

    backend = row.get("backend", "triton")
    dtype = DTYPES[row["dtype"]]
    n_rows, d, k = shape["rows"] // TENSORS, shape["d"], row["k"]
    op = row["op"]

    def randn(*size: int) -> torch.Tensor:
        return torch.randn(*size, device=dev).to(dtype)

    def copy_peer(floor_bytes: float) -> Callable[[], None]:
        n = int(floor_bytes * row["elements"]) // 2  # read n bytes, write n bytes
        src = torch.empty(n, dtype=torch.uint8, device=dev)
        dst = torch.empty_like(src)
        return lambda: dst.copy_(src)

    peer = copy_peer(row["floor_bytes_per_elt"])
    if op.startswith(("project_ ", "project_anchored ")):
        side = op.split()[-1]
        if side == "flat":
            grads = [randn(n_rows * d) for _ in range(TENSORS)]
            basis = _orthonormal(n_rows * d, k, dev)
        elif side == "output":
            grads = [randn(d, n_rows) for _ in range(TENSORS)]
            basis = _orthonormal(d, k, dev)
        else:
            grads = [randn(n_rows, d) for _ in range(TENSORS)]
            basis = _orthonormal(d, k, dev)
        if op.startswith("project_anchored"):
            anchors = [ops.anchor(g, basis, side=side) for g in grads]
            return (
                lambda: ops.project_anchored_(grads, anchors, basis, side=side, backend=backend),
                peer,
            )
        return lambda: gradproj.project_(grads, basis, side=side, backend=backend), peer
    if op.startswith("surgery_"):
        g_u = [randn(n_rows * d) for _ in range(TENSORS)]
        g_r = [-g for g in g_u]  # every pair conflicts: the apply pass always runs
        return lambda: gradproj.surgery_(g_u, g_r, backend=backend), peer
    if op.startswith("ProjectedAdamW"):
        side = op.split()[-1]
        basis = _orthonormal(d, k, dev)
        size = (n_rows, d) if side == "input" else (d, n_rows)

        def params() -> list[torch.Tensor]:
            out = [torch.nn.Parameter(randn(*size)) for _ in range(TENSORS)]
            for p in out:
                p.grad = torch.randn_like(p)
            return out

        mine, theirs = params(), params()
        bases = {p: basis for p in mine}
        projected = gradproj.ProjectedAdamW(mine, bases=bases, side=side, backend=backend)
        fused = torch.optim.AdamW(theirs, fused=True)
        return projected.step, fused.step
    raise ValueError(f"no case for the model's op {op!r}")


def select(rows: list[dict], spec: str | list[str] | None) -> list[dict]:
    """The rows ``spec`` names, ``"OP:DTYPE:K"`` or ``"OP:DTYPE:K:D"`` (such as
    ``"project_ input:bf16:8"``), or a list of such specs (their rows in the specs' order);
    every row for ``None``. A spec that names no row is an error, not an empty run."""
    if spec is None:
        return rows
    if not isinstance(spec, str):
        return [r for one in spec for r in select(rows, one)]
    parts = spec.split(":")
    if len(parts) not in (3, 4):
        raise ValueError(f"--only wants OP:DTYPE:K[:D], got {spec!r}")
    op, dtype, k = parts[0], parts[1], int(parts[2])
    d = int(parts[3]) if len(parts) == 4 else None
    out = [
        r
        for r in rows
        if r["op"] == op and r["dtype"] == dtype and r["k"] == k and d in (None, r.get("d"))
    ]
    if not out:
        raise ValueError(f"no model row is {spec!r}")
    return out


def run_once(rows: list[dict], shape: dict, dev: torch.device, scale: int, calls: int = 3) -> None:
    """Each row's op ``calls`` times and nothing else: the process a kernel profiler
    (``ncu --launch-skip``) wraps, so its launches are the op's alone."""
    for model_row in rows:
        row, row_shape = scaled(model_row, shape, scale)
        op_fn, _ = case(row, row_shape, dev)
        for _ in range(calls):
            op_fn()
    if dev.type == "cuda":
        torch.cuda.synchronize()


def kernel_profile(fn: Callable[[], None], calls: int = 5) -> tuple[float, dict[str, float]]:
    """``(ms, kernels)``: the device time of ``fn``'s kernels, copies and memsets per call,
    and each kernel's launches per call (torch.profiler, CUPTI). The model predicts kernel
    time; do_bench's events also count host time whenever the host is slower than the GPU
    (Python, bucketing, launches), so both are reported."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    total_us, kernels = 0.0, {}
    for event in prof.key_averages():
        # device-side events only: a runtime call on the host (cudaLaunchKernel) carries
        # its kernel's time too
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        us = event.self_device_time_total
        if us > 0:
            total_us += us
            kernels[event.key[:160]] = event.count / calls
    return total_us / calls / 1e3, kernels


def compare(
    rows: list[dict],
    shape: dict,
    dev: torch.device,
    bench: Callable,
    scale: int = 1,
    progress: Callable[[list[dict]], None] | None = None,
    profile: Callable[[Callable[[], None]], tuple[float, dict]] | None = None,
) -> list[dict]:
    """Every row timed: ``bench(fn)`` gives milliseconds (do_bench on a GPU), on ``scale`` ×
    the model's rows (:func:`scaled`). A row whose op fails to run (its backend not built,
    say) is reported with its error, not dropped. ``progress(results so far)`` after each
    row, so a run cut short still leaves what it measured."""
    out = []
    for model_row in rows:
        row, row_shape = scaled(model_row, shape, scale)
        try:
            op_fn, peer_fn = case(row, row_shape, dev)
            t_op, t_peer = bench(op_fn), bench(peer_fn)
            kernel_ms, kernels = profile(op_fn) if profile is not None else (None, None)
        except Exception as exc:
            if isinstance(exc, ValueError) and "no case" in str(exc):
                raise  # a model op without a case is this script's defect
            out.append(
                {
                    "backend": row.get("backend", "triton"),
                    "op": row["op"],
                    "dtype": row["dtype"],
                    "k": row["k"],
                    "d": row_shape["d"],
                    "error": f"{type(exc).__name__}: {exc}"[:500],
                }
            )
            if progress is not None:
                progress(out)
            continue
        measured = t_peer / t_op
        predicted = row["predicted_fraction_of_copy"]
        out.append(
            {
                "backend": row.get("backend", "triton"),
                "op": row["op"],
                "dtype": row["dtype"],
                "k": row["k"],
                "op_ms": t_op,
                "peer_ms": t_peer,
                "peer": "torch fused AdamW" if row["op"].startswith("ProjectedAdamW") else "copy",
                "predicted": predicted,
                "measured": measured,
                "measured_over_predicted": measured / predicted if predicted else None,
                "predicted_limiter": row["limiter"],
                "elements": row["elements"],
                "d": row_shape["d"],
            }
        )
        if kernel_ms is not None:
            out[-1]["kernel_ms"] = kernel_ms
            out[-1]["kernel_measured"] = t_peer / kernel_ms if kernel_ms > 0 else None
            out[-1]["kernels_per_call"] = kernels
        if progress is not None:
            progress(out)
    return out


def kernel_text(r: dict) -> str:
    """The profiler's columns of a row: kernel ms, the fraction on kernel time, launches."""
    if r.get("kernel_ms") is None:
        return "| | |"
    frac = r.get("kernel_measured")
    launches = sum(r.get("kernels_per_call", {}).values())
    frac_text = "—" if frac is None else f"{frac:.0%}"
    return f"{r['kernel_ms']:.3f} | {frac_text} | {launches:g} |"


def markdown(device: str, versions: dict, results: list[dict]) -> str:
    lines = [
        f"# Measured on {device} against the static model's prediction",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".",
        "*predicted*: from compiled code (benchmarks/perf_model.py, perf_model_cuda.py), not",
        "measured; *measured*:",
        "this run (do_bench medians, CUDA events: host time counts wherever the host is slower",
        "than the GPU). Fractions of the copy roofline (ProjectedAdamW: torch fused AdamW time",
        "over ProjectedAdamW time). *kernel ms*: the op's kernels, copies and memsets per call",
        "(torch.profiler), and *measured, kernel time*: the peer's time over it, the figure the",
        "model predicts; *launches*: kernels, copies and memsets per call.",
        "",
        "| backend | op | d | dtype | k | predicted | measured | measured / predicted | op ms "
        "| peer ms | kernel ms | measured, kernel time | launches |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['backend']} | {r['op']} | {r.get('d', '')} | {r['dtype']} | "
                         f"{r['k']} | failed: {r['error'][:120]} | | | | | | | |")  # fmt: skip
            continue
        ratio = r["measured_over_predicted"]
        ratio_text = "—" if ratio is None else f"{ratio:.2f}"
        lines.append(
            f"| {r['backend']} | {r['op']} | {r.get('d', '')} | {r['dtype']} | {r['k']} "
            f"| {r['predicted']:.0%} "
            f"| {r['measured']:.0%} "
            f"| {ratio_text} | {r['op_ms']:.3f} | {r['peer_ms']:.3f} | {kernel_text(r)}"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", nargs="+", default=[m for m in DEFAULT_MODELS if os.path.exists(m)]
    )
    parser.add_argument("--out", required=True)
    parser.add_argument(
        "--scale", type=int, default=8, help="x the model's rows (not side='flat'); see scaled()"
    )
    parser.add_argument("--name", default="predicted_vs_measured", help="output file stem")
    parser.add_argument(
        "--widths", action="store_true", help="the CUDA model's width sweep instead of its rows"
    )
    parser.add_argument("--rep", type=int, default=100, help="do_bench's rep, ms")
    parser.add_argument(
        "--no-profile", action="store_true", help="skip the profiler's kernel time per row"
    )
    parser.add_argument(
        "--only", nargs="+", help="the rows OP:DTYPE:K[:D] alone, one or more (see select())"
    )
    parser.add_argument(
        "--once", action="store_true", help="run the rows' ops 3 times, time nothing (for ncu)"
    )
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("predicted_vs_measured: needs a CUDA device (it measures)", file=sys.stderr)
        return 2
    if args.scale < 1:
        parser.error(f"--scale must be >= 1, got {args.scale}")
    import triton
    import triton.testing

    models = []
    for path in args.model:
        with open(path) as f:
            models.append(json.load(f))
    dev = torch.device("cuda")
    arch = arch_of(torch.cuda.get_device_capability(dev))

    def bench(fn: Callable[[], None]) -> float:
        return float(triton.testing.do_bench(fn, warmup=25, rep=args.rep, return_mode="median"))

    versions = {
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "model triton": models[0].get("triton"),
        "model dates": ", ".join(str(m.get("date")) for m in models),
        "rows": f"{args.scale} x the model's (side='flat': the model's)",
    }
    device = torch.cuda.get_device_name(dev)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, args.name)
    done: list[dict] = []

    def write(results: list[dict]) -> None:
        with open(stem + ".json", "w") as f:
            json.dump(
                {"device": device, "arch": arch, "versions": versions, "rows": results}, f, indent=1
            )
        with open(stem + ".md", "w") as f:
            f.write(markdown(device, versions, results))
        print(markdown(device, versions, results[-1:]).splitlines()[-1], flush=True)

    for model in models:
        prior = list(done)
        if args.widths and "widths" not in model:
            continue
        rows = select(
            rows_for({**model, "rows": model["widths"]} if args.widths else model, arch),
            args.only,
        )
        if args.once:
            run_once(rows, model["shape"], dev, args.scale)
            continue
        done = prior + compare(
            rows,
            model["shape"],
            dev,
            bench,
            args.scale,
            lambda so_far, prior=prior: write(prior + so_far),
            None if args.no_profile else kernel_profile,
        )
    print(markdown(device, versions, done))
    return 0


if __name__ == "__main__":
    sys.exit(main())
