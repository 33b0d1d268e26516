"""The projection benchmark suite: every backend against its peers, written as one JSON file.

    gradproj bench                      # the suite on this device: JSON, plot, summary table
    gradproj bench --quick              # about a minute: the SD 1.5 K/V bucket only
    python -m gradproj.bench.suite --smoke   # tiny, seconds, any device (the tests)

Every case (a bucket of named model shapes or a uniform bucket of a given size, a
``k``, a dtype) times, in one process and one run:

* each runnable gradproj backend through the public ``gradproj.project_``;
* the peers of :mod:`gradproj.bench.peers`, each at its strongest: per-tensor eager
  in place (one ``addmm_`` per tensor), ``torch.compile`` of it (default and
  max-autotune-no-cudagraphs) in every case, the grouped flat-bucket version, and a
  device copy of the same bytes (the roofline).

Also: the fused ``surgery_`` against DoCo's per-tensor loop and a sync-free
per-tensor version, and one optimizer step on the SD 1.5 K/V bucket: torch's AdamW
(fused, foreach), fused AdamW followed by the best eager anchored projection, fused AdamW
wrapped in ``ProjectedOptimizer``, and ``ProjectedAdamW``.

GPU timing: ``triton.testing.do_bench`` (warm-up, L2 flushed between repetitions,
median). CPU timing: median of repeated ``perf_counter`` runs (CPU figures are for
ratios on that machine only). Every row carries bytes moved, GB/s, % of the copy
bandwidth measured in the same case, the ratio to every peer, and the max error
against the float64 reference; the file carries device and versions.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch

import gradproj
from gradproj import reference
from gradproj.bench import harness, peers

MIB = 1 << 20

# Named buckets of real models (out × in per tensor, one shared basis).
# SD 1.5 UNet attn2.to_k/to_v: 16 transformer blocks × (K, V), text width 768.
SD15_KV = tuple((c, 768) for c in (320,) * 10 + (640,) * 10 + (1280,) * 12)
# SDXL UNet attn2.to_k/to_v: 10 transformer layers at 640 and 60 at 1280, × (K, V), width 2048.
SDXL_KV = tuple((c, 2048) for c in (640,) * 20 + (1280,) * 120)
# Text-side input projections reading the T5 width 4096: SD3 context_embedder (1536)
# and Flux context_embedder (3072).
SD3_FLUX_CTX = ((1536, 4096), (3072, 4096))
NAMED = {"sd15_kv": SD15_KV, "sdxl_kv": SDXL_KV, "sd3_flux_ctx": SD3_FLUX_CTX}


def uniform(mib: int, d: int = 768, out: int = 1024) -> tuple[tuple[int, int], ...]:
    """A bucket of ``out × d`` fp32 tensors totalling ``mib`` MiB (the last one trimmed)."""
    rows = max(1, mib * MIB // (4 * d))
    shapes = [(out, d)] * (rows // out)
    if rows % out:
        shapes.append((rows % out, d))
    return tuple(shapes)


def bucket_mib(shapes: tuple[tuple[int, int], ...]) -> float:
    """Size of a bucket of these shapes in fp32, MiB."""
    return sum(math.prod(s) for s in shapes) * 4 / MIB


def cases(smoke: bool) -> list[dict]:
    """The cases to run: ``shapes``, ``k`` and ``dtype``."""
    if smoke:
        tiny = ((5, 24), (9, 24), (3, 24))
        return [
            {"name": "tiny", "shapes": tiny, "k": k, "dtype": dt}
            for k in (1, 8)
            for dt in ("float32", "bfloat16")
        ]
    out = []
    for name, shapes in NAMED.items():
        for k in (1, 8, 32, 128):
            for dt in ("float32", "bfloat16"):
                out.append({"name": name, "shapes": shapes, "k": k, "dtype": dt})
    for mib in (1, 4, 16, 64, 256, 1024):
        for k in (8, 32):
            out.append(
                {
                    "name": f"uniform_{mib}MiB",
                    "shapes": uniform(mib),
                    "k": k,
                    "dtype": "float32",
                }
            )
    return out


def time_ms(fn: Callable[[], None], dev: torch.device, reps: int) -> float:
    """Median milliseconds of ``fn`` (do_bench on CUDA: warm-up, L2 flush)."""
    if dev.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def max_error(grads: list[torch.Tensor], before: list[torch.Tensor], basis: torch.Tensor) -> float:
    """Largest |out − float64 reference| over the first few tensors, relative to max|g|."""
    worst = 0.0
    for g, g0 in list(zip(grads, before, strict=True))[:4]:
        ref = reference.project(g0.double(), basis.double())
        scale = max(g0.double().abs().max().item(), 1e-30)
        worst = max(worst, (g.double() - ref).abs().max().item() / scale)
    return worst


def run_case(case: dict, dev: torch.device, reps: int, compile_peers: bool = True) -> list[dict]:
    dtype = getattr(torch, case["dtype"])
    grads, basis = harness.make_bucket(case["shapes"], case["k"], dev, dtype)
    basis_g = basis.to(dtype)  # the peers' basis in the grads' dtype, converted once
    before = [g.clone() for g in grads]
    nbytes = harness.bucket_bytes(grads)
    flat, views = peers.grouped_buffer(grads)

    def fresh() -> None:  # every timed call projects the same, unprojected values
        for g, v, g0 in zip(grads, views, before, strict=True):
            g.copy_(g0)
            v.copy_(g0)

    # The peers' form: in the grads' dtype, or for bf16/fp16 in float32 when that is
    # faster on this device (no fast half-precision GEMM); whichever wins the eager race.
    forms = {"native": (peers.eager_project_, peers.grouped_project_, basis_g)}
    if dtype != torch.float32:
        forms["upcast"] = (peers.eager_upcast_project_, peers.grouped_upcast_project_, basis)
    race = {}
    for form, (eager, _, u) in forms.items():
        fresh()
        race[form] = time_ms(lambda eager=eager, u=u: eager(grads, u), dev, max(2, reps // 2))
    form = min(race, key=race.get)
    eager, grouped, u = forms[form]
    fresh()

    contenders: dict[str, Callable[[], None]] = {
        "copy": peers.copy_roofline(flat),
        "eager": lambda: eager(grads, u),
        "grouped": lambda: grouped(flat, u),
    }
    if compile_peers:
        torch._dynamo.reset()  # a fresh compile per case: no recompile limit, no stale graph
        for label, mode in (
            ("compiled", "default"),
            ("compiled_max_autotune", "max-autotune-no-cudagraphs"),
        ):
            fn = peers.compiled(mode, eager)
            contenders[label] = lambda fn=fn: fn(grads, u)
    for name in harness.runnable_backends("project_bucket_", dev, dtype):
        contenders[f"gradproj:{name}"] = lambda name=name: gradproj.project_(
            grads, basis, backend=name
        )

    timings, errors = {}, {}
    for label, fn in contenders.items():
        fresh()
        fn()  # first call: compile / build tables / check the answer
        harness.synchronize(dev)
        if label != "copy":
            errors[label] = max_error(views if label == "grouped" else grads, before, basis)
        timings[label] = time_ms(fn, dev, reps)
    fresh()

    rows = []
    copy_ms = timings["copy"]
    for label, ms in timings.items():
        rows.append(
            {
                "case": case["name"],
                "tensors": len(case["shapes"]),
                "k": case["k"],
                "dtype": case["dtype"],
                "contender": label,
                "peer_form": form if label in PEER_ORDER else None,
                "ms": ms,
                "bytes": nbytes,
                "GBps": nbytes / ms / 1e6,
                "pct_of_copy": 100.0 * copy_ms / ms,
                "max_rel_error": errors.get(label),
                "speedup_vs": {
                    peer: timings[peer] / ms for peer in timings if not peer.startswith("gradproj")
                },
            }
        )
    return rows


def run_surgery_case(
    shapes: tuple[tuple[int, int], ...], dev: torch.device, reps: int
) -> list[dict]:
    """The fused ``surgery_`` (cosine variant) against DoCo's per-tensor loop."""
    gen = torch.Generator().manual_seed(0)
    us = [torch.randn(s, generator=gen).to(dev) for s in shapes]
    # every other pair conflicts, so the per-tensor decision goes both ways
    rs = [(-1) ** i * u + torch.randn(u.shape, generator=gen).to(dev) for i, u in enumerate(us)]
    before = [u.clone() for u in us]
    nbytes = 3 * sum(u.numel() * u.element_size() for u in us)  # read u, r; write u

    def fresh() -> None:
        for u, u0 in zip(us, before, strict=True):
            u.copy_(u0)

    contenders = {
        "loop": lambda: peers.surgery_loop_(us, rs),
        "no_sync": lambda: peers.surgery_no_sync_(us, rs),
    }
    for name in harness.runnable_backends("surgery_bucket_", dev, torch.float32):
        contenders[f"gradproj:{name}"] = lambda name=name: gradproj.surgery_(
            us, rs, variant="cosine", backend=name
        )
    timings, outputs = {}, {}
    for label, fn in contenders.items():
        fresh()
        fn()
        harness.synchronize(dev)
        outputs[label] = [u.clone() for u in us]
        fresh()
        timings[label] = time_ms(lambda fn=fn: (fresh(), fn()), dev, reps)
    rows = []
    for label, ms in timings.items():
        err = max(
            (a - b).abs().max().item() for a, b in zip(outputs[label], outputs["loop"], strict=True)
        )
        rows.append(
            {
                "case": "surgery_sd15_kv",
                "tensors": len(shapes),
                "contender": label,
                "ms": ms,
                "bytes": nbytes,
                "GBps": nbytes / ms / 1e6,
                "max_abs_diff_vs_loop": err,
                "speedup_vs_loop": timings["loop"] / ms,
                "speedup_vs_no_sync": timings["no_sync"] / ms,
            }
        )
    return rows


OPTIMIZERS = (
    "adamw_fused",
    "adamw_foreach",
    "adamw_fused+eager_anchored",
    "adamw_fused+ProjectedOptimizer",
    "ProjectedAdamW",
)


def run_optimizer_case(
    shapes: tuple[tuple[int, int], ...], k: int, dev: torch.device, reps: int
) -> list[dict]:
    """One AdamW step on a protected bucket: torch's AdamW (fused, foreach; no projection),
    AdamW + the best eager anchored projection, AdamW + ``ProjectedOptimizer``, and
    ``ProjectedAdamW``."""
    fused = harness.fused_adamw_supported(dev)

    def build(kind: str) -> Callable[[], None]:
        gen = torch.Generator().manual_seed(0)
        basis = torch.linalg.qr(torch.randn(shapes[0][1], k, generator=gen))[0].to(dev)
        params = []
        for s in shapes:
            p = torch.nn.Parameter(0.02 * torch.randn(s, generator=gen).to(dev))
            p.grad = torch.randn(s, generator=gen).to(dev)
            params.append(p)
        bases = {p: basis for p in params}
        if kind in ("adamw_fused", "adamw_fused+eager_anchored", "adamw_fused+ProjectedOptimizer"):
            opt = torch.optim.AdamW(params, lr=1e-3, **({"fused": True} if fused else {}))
        elif kind == "adamw_foreach":
            opt = torch.optim.AdamW(params, lr=1e-3, foreach=True)
        else:
            opt = gradproj.ProjectedAdamW(params, lr=1e-3, bases=bases)
        if kind == "adamw_fused+ProjectedOptimizer":
            opt = gradproj.ProjectedOptimizer(opt, bases)
        if kind != "adamw_fused+eager_anchored":
            return opt.step
        anchors = [p.detach() @ basis for p in params]

        def step() -> None:
            opt.step()
            peers.anchored_project_(params, anchors, basis)

        return step

    timings = {}
    for kind in OPTIMIZERS:
        step = build(kind)
        step()  # state, anchors, kernels
        timings[kind] = time_ms(step, dev, reps)
    numel = sum(math.prod(s) for s in shapes)
    return [
        {
            "case": "adamw_step_sd15_kv",
            "k": k,
            "contender": kind,
            "fused_adamw": fused,
            "ms": ms,
            "bytes": 7 * 4 * numel,  # p, g, m, v read; p, m, v written (fp32)
            "GBps": 7 * 4 * numel / ms / 1e6,
            "time_vs_fused_adamw": ms / timings["adamw_fused"],
            "time_vs_adamw+eager_anchored": ms / timings["adamw_fused+eager_anchored"],
        }
        for kind, ms in timings.items()
    ]


def environment(dev: torch.device) -> dict:
    env = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name(dev)
        if dev.type == "cuda"
        else platform.processor() or platform.machine(),
        "device_type": dev.type,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if dev.type == "cuda":
        env["cuda"] = torch.version.cuda
    return env


def selected(smoke: bool, quick: bool, dev: torch.device) -> list[dict]:
    """The cases of this run. The full suite is a GPU suite; on a CPU (to stay within
    ~15 minutes, most of it torch.compile's): buckets up to 128 MiB (SD 1.5 K/V, SD3/Flux
    context, not SDXL) and k in {8, 32}. ``quick``: the SD 1.5 K/V bucket, fp32, k = 8."""
    if quick:
        return [{"name": "sd15_kv", "shapes": SD15_KV, "k": 8, "dtype": "float32"}]
    out = []
    for case in cases(smoke):
        if dev.type == "cpu" and not smoke:
            if bucket_mib(case["shapes"]) > 128 or case["k"] not in (8, 32):
                continue
        out.append(case)
    return out


def run(
    *,
    smoke: bool = False,
    quick: bool = False,
    reps: int = 10,
    device: str | None = None,
    compile_peers: bool = True,
    progress: Callable[[int, int, str], None] | None = None,
) -> dict:
    """Run the suite; the result as :func:`main` writes it. ``progress(i, n, label)``
    is called before each of the ``n`` parts."""
    dev = torch.device(device) if device else harness.device()
    progress = progress or (lambda i, n, label: None)
    result = {"environment": environment(dev), "rows": []}
    result["environment"]["torch_compile_peers"] = compile_peers
    todo = selected(smoke, quick, dev)
    n = len(todo) + 2
    start = time.perf_counter()
    for i, case in enumerate(todo):
        progress(i, n, f"{case['name']} k={case['k']} {case['dtype']}")
        result["rows"].extend(run_case(case, dev, reps, compile_peers))
    shapes = ((5, 24), (9, 24)) if smoke else SD15_KV
    progress(n - 2, n, "surgery_ on the SD 1.5 K/V bucket")
    result["surgery"] = run_surgery_case(shapes, dev, reps)
    progress(n - 1, n, "one AdamW step on the SD 1.5 K/V bucket")
    result["optimizer"] = run_optimizer_case(shapes, 4 if smoke else 32, dev, reps)
    progress(n, n, "done")
    result["environment"]["wall_s"] = round(time.perf_counter() - start, 1)
    return result


def write(result: dict, out: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)


PEER_ORDER = ("eager", "compiled", "compiled_max_autotune", "grouped")


def summary_table(result: dict, backend: str | None = None) -> str:
    """A markdown table: per case, the best gradproj backend's time, % of copy, and its
    speed-up over every peer (``—`` where a peer did not run)."""
    by_case: dict[tuple, dict[str, dict]] = {}
    for row in result["rows"]:
        by_case.setdefault((row["case"], row["k"], row["dtype"]), {})[row["contender"]] = row
    head = "| case | k | dtype | gradproj | ms | % of copy | " + " | ".join(
        f"vs {p}" for p in PEER_ORDER
    )
    lines = [head + " |", "|" + "---|" * (6 + len(PEER_ORDER))]
    for (case, k, dtype), rows in by_case.items():
        ours = {c: r for c, r in rows.items() if c.startswith("gradproj:")}
        if backend is not None:
            ours = {c: r for c, r in ours.items() if c == f"gradproj:{backend}"}
        if not ours:
            continue
        name, row = min(ours.items(), key=lambda kv: kv[1]["ms"])
        vs = [f"{rows[p]['ms'] / row['ms']:.2f}×" if p in rows else "—" for p in PEER_ORDER]
        if rows.get("eager", {}).get("peer_form") == "upcast":
            dtype = f"{dtype} (peers in fp32)"
        lines.append(
            f"| {case} | {k} | {dtype} | {name.split(':')[1]} | {row['ms']:.2f} | "
            f"{row['pct_of_copy']:.0f}% | " + " | ".join(vs) + " |"
        )
    opt = result.get("optimizer") or []
    if opt:
        lines += [
            "",
            "| AdamW step, SD 1.5 K/V | k | ms | vs fused AdamW | vs AdamW + eager anchored |",
            "|---|---|---|---|---|",
        ]
        for r in opt:
            lines.append(
                f"| {r['contender']} | {r['k']} | {r['ms']:.2f} | {r['time_vs_fused_adamw']:.2f}× "
                f"| {r['time_vs_adamw+eager_anchored']:.2f}× |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny cases, seconds, any device")
    parser.add_argument("--quick", action="store_true", help="the SD 1.5 K/V bucket only")
    parser.add_argument("--out", help="write the JSON here")
    parser.add_argument("--reps", type=int, default=10, help="CPU timing repetitions")
    parser.add_argument("--device", default=None, help="default: cuda if available")
    parser.add_argument(
        "--no-compile", action="store_true", help="skip the torch.compile peers (they take minutes)"
    )
    args = parser.parse_args(argv)
    result = run(
        smoke=args.smoke,
        quick=args.quick,
        reps=args.reps,
        device=args.device,
        compile_peers=not args.no_compile,
        progress=lambda i, n, label: print(f"[{i}/{n}] {label}", flush=True),
    )
    if args.out:
        write(result, args.out)
    return result


if __name__ == "__main__":
    main()
