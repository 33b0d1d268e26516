#!/usr/bin/env python3
"""Measure the Triton row kernel's tile choices against each other on a GPU.

    python benchmarks/tile_sweep.py --out DIR [--only fp32:32 ...] [--budget-s S]
    python benchmarks/tile_sweep.py --compile-only --arch sm_90 [--only ...] [--jobs N]
    python benchmarks/tile_sweep.py --predict MD --arch sm_90 [--only ...] [--jobs N]

Why: the static model (``benchmarks/perf_model.py``) chose the tiles of
``kernels/project.py`` (``_row_tiles``) without a GPU, and the first H200 runs measured
those kernels at 26-44 % of copy where it predicted 66-100 %: Nsight Compute found the
kernels latency-bound (12.5-25 % occupancy), which the model took as hidden. Which tiles
hide it best is a question for the GPU itself, so this sweep runs ``project_`` on one
bucket (``side="input"``, ``D`` = 768, two tensors of 16384 rows; and the anchored
projection, ``x − U (Uᵀx − C)``, at ``ANCHORED_KS``) with each candidate
tile (:func:`candidates`: the launcher's choice first, then the two-pass tensor-core
kernel's rows, columns, warps and pipeline stages, and the resident kernel's warps and
register cap where it applies) through ``kernels.project.row_tiles_override``.

Per candidate: the compile's registers and spills (``n_regs``, ``n_spills`` of the loaded
kernel), the largest error against the float64 reference relative to ``max|g|`` (a
candidate that misses ``ERROR_BOUND`` is reported, never ranked), and the kernel time
from the profiler (the launch's kernels only: ``do_bench``'s events count the host's
~0.1 ms a call whenever it is slower than the GPU, which would hide the differences).
Measured figures only; nothing here is predicted. Writes ``DIR/tile_sweep.json`` and
``.md`` after every case, so a run cut short keeps what it measured.

``--compile-only``: no GPU; every candidate compiled for ``--arch`` through
``scripts/gpu_compile_check.py``'s stand-in driver, with its registers, spills, shared
memory and blocks per SM (``--jobs`` processes). On the GPU machine this fills Triton's
cache in parallel before the timed run (the stand-in's target is the device's), and here
it shows which candidates compile without spills.

``--predict MD``: no GPU; every candidate through the static model
(``benchmarks/perf_model.py``, with its occupancy bound, calibrated on the H200's
Nsight Compute figures), ranked by predicted fraction of copy on ``--arch``'s device
into ``MD``: predicted from compiled code, not measured; the GPU run's measured ranking
is what checks it.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
D = 768
ROWS = 16384  # per tensor; two tensors: 100 MB of fp32, past an H200's 60 MB of L2
TENSORS = 2
DTYPES = ("fp32", "bf16")
KS = (8, 32, 128)
ERROR_BOUND = {"fp32": 1e-5, "bf16": 1e-2, "fp16": 2e-3}  # of max|g|


ANCHORED_KS = (32,)  # the anchored projection's cases by default (its own two-pass tiles)
# side="output" (transposed views, CONTIG = 0) by default: k = 8, where the model puts the
# resident block (the launcher's choice to RESIDENT_OUTPUT_MAX_K) below the two-pass
# kernel (bf16 19 % against 53 % of copy on both GPUs), and k = 16, where fp32 is resident
# (27 % against 63-66 %); the H200 measured the resident bf16 k = 8 at 25 % and the
# two-pass bf16 k = 32 at 25 % (0.6x the model's), so the GPU decides
OUTPUT_KS = (8, 16)


@dataclass(frozen=True)
class Case:
    dtype: str
    k: int
    anchored: bool = False  # the anchored projection (project_anchored_bucket_)
    output: bool = False  # side="output": the bucket's (D x rows) grads, transposed views

    def __post_init__(self) -> None:
        if self.anchored and self.output:
            raise ValueError("tile_sweep: a case is anchored or side output, not both")

    @property
    def label(self) -> str:
        kind = ":anchored" if self.anchored else (":output" if self.output else "")
        return f"{self.dtype}:{self.k}{kind}"

    @property
    def side(self) -> str:
        return "output" if self.output else "input"

    @property
    def contig(self) -> int:
        """The launch's ``CONTIG``: 1, rows along the unit stride's axis; 0, transposed."""
        return 0 if self.output else 1


def cases(only: list[str] | None = None) -> list[Case]:
    """``DTYPE:K[:anchored|:output]`` cases: all of ``DTYPES`` × ``KS``, anchored ×
    ``ANCHORED_KS`` and side output × ``OUTPUT_KS``, unless ``only`` names some."""
    every = [Case(dt, k) for dt in DTYPES for k in KS]
    every += [Case(dt, k, True) for dt in DTYPES for k in ANCHORED_KS]
    every += [Case(dt, k, output=True) for dt in DTYPES for k in OUTPUT_KS]
    if not only:
        return every
    out = []
    for spec in only:
        dt, _, rest = spec.partition(":")
        k, _, kind = rest.partition(":")
        kinds = ("", "anchored", "output")
        if dt not in ERROR_BOUND or not k.isdigit() or int(k) < 1 or kind not in kinds:
            raise ValueError(
                f"--only takes DTYPE:K[:anchored|:output] with DTYPE in {sorted(ERROR_BOUND)}, "
                f"got {spec!r}"
            )
        out.append(Case(dt, int(k), kind == "anchored", kind == "output"))
    return out


def _elsize(dtype: str) -> int:
    return 4 if dtype == "fp32" else 2


def candidates(
    case: Case, arch: int, d: int = D, limit: int | None = None, few_rows: bool = False
) -> list:
    """The launcher's tiles for ``case`` on ``arch`` first, then the alternatives.
    ``few_rows``: the bucket's rows are few for the device (``kernels.project``
    ``FEW_ROWS_PER_SM``), so the launcher's tiles are its few-rows tiles, and its tiles for
    many rows come next.

    Two-pass tensor-core kernel (``BLOCK_K`` as the launcher's: one chunk up to k = 128):
    ``BLOCK_R`` ∈ {16, 32, 64} × ``BLOCK_D`` ∈ {32, 64} × warps ∈ {4, 8} × stages ∈ {1, 2}
    (Triton's pipeliner; ``_row_tiles`` keeps 1 because the staged copies spilled, which
    the sweep shows per candidate). Resident kernel, where the launcher takes it: its
    block on 4 and 8 warps, with its register cap, the 4-warp blocks' old cap (192) and none;
    side output also where it does not (the transposed views' resident block, as the
    launcher would take it to ``RESIDENT_OUTPUT_MAX_K``).
    """
    from gradproj.kernels import project as P

    elsize = _elsize(case.dtype)
    layout = (arch, elsize, d, case.k, case.contig, case.anchored, 16 // elsize)
    chosen = P._row_tiles(*layout, few_rows)
    out = [chosen, P._row_tiles(*layout)]
    block_k = max(16, min(128, 1 << (case.k - 1).bit_length()))  # the two-pass kernel's
    if case.output:
        res = P.resident_tiles(d, max_chunks=3)
        if not chosen.resident and res is not None and not res.wide:
            rows, cap = P.RESIDENT_OUTPUT_ROWS_MAXNREG[elsize]
            out.append(P._resident(rows, res, case.k, cap, P.RESIDENT_OUTPUT_WARPS[elsize]))
        if not chosen.one_pass:
            # next, the two-pass tile the model ranks first for transposed views at k <= 16
            # (64 x 32 on 4 warps, memory-bound at 67 % of copy on sm_90): timed early,
            # before the case's share of the budget runs out
            out.append(P._Tiles(False, 64, 32, block_k, 4, 1))
    if chosen.resident:
        # the launcher's cap, the 4-warp blocks' old one (RESIDENT_MAXNREG), none
        caps = dict.fromkeys((chosen.maxnreg, P.RESIDENT_MAXNREG, None))
        for warps in (4, 8):
            for cap in caps:
                out.append(chosen._replace(warps=warps, maxnreg=cap))
    if not chosen.one_pass:
        for block_r in (16, 32, 64):
            for block_d in (32, 64):
                for warps in (4, 8):
                    for stages in (1, 2):
                        out.append(P._Tiles(False, block_r, block_d, block_k, warps, stages))
    unique = []
    for t in out:
        if t not in unique:
            unique.append(t)
    return unique[:limit]


def tiles_label(t) -> str:
    kind = "resident" if t.resident else ("one-pass" if t.one_pass else "two-pass")
    cap = f" maxnreg={t.maxnreg}" if t.maxnreg else ""
    extra = f" chunks={t.chunks}" if t.resident else ""
    return (
        f"{kind} R={t.block_r} D={t.block_d} K={t.block_k} warps={t.warps} "
        f"stages={t.stages}{cap}{extra}"
    )


def bucket(case: Case, dev, rows: int = ROWS, d: int = D):
    """``(grads, basis, anchors)``: the sweep's bucket, the basis orthonormal (fp32,
    contiguous), and for an anchored case each tensor's fp32 anchors ``C`` (rows × k, of
    the size ``x U`` has), else ``None``. Side output: each grad the transposed view of a
    ``d × rows`` tensor, as ``gradproj.backends`` passes the output side to a kernel."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[case.dtype]
    gen = torch.Generator().manual_seed(case.k)
    if case.output:
        grads = [torch.randn(d, rows, generator=gen).to(dev, dtype).T for _ in range(TENSORS)]
    else:
        grads = [torch.randn(rows, d, generator=gen).to(dev, dtype) for _ in range(TENSORS)]
    q, _ = torch.linalg.qr(torch.randn(d, case.k, generator=gen, dtype=torch.float64))
    anchors = None
    if case.anchored:
        anchors = [torch.randn(rows, case.k, generator=gen).to(dev) for _ in range(TENSORS)]
    return grads, q.to(dev, torch.float32).contiguous(), anchors


def project(grads, basis, anchors, side: str = "input") -> None:
    """One projection of the bucket in place: ``project_bucket_``, or with ``anchors``
    ``project_anchored_bucket_`` (hard: the anchors do not change)."""
    from gradproj.kernels import project as P

    if anchors is None:
        P.project_bucket_(grads, basis, None, side)
    else:
        P.project_anchored_bucket_(grads, anchors, basis, None, side)


def max_error(grads, basis, tiles, anchors=None, side: str = "input") -> float:
    """``max|out − ref| / max|g|`` of one projection with ``tiles``, against float64:
    ``x − U Uᵀx``, anchored ``x − U (Uᵀx − C)``, of each row ``x`` (side output: of the
    transposed views' rows, the same math)."""
    from gradproj.kernels import project as P

    # clones keep the views' strides (torch.preserve_format): the launch's layout
    work = [g.clone() for g in grads]
    with P.row_tiles_override(tiles):
        project(work, basis, anchors, side)
    u = basis.double()
    worst = 0.0
    for i, (g, out) in enumerate(zip(grads, work, strict=True)):
        x = g.double()
        coef = x @ u if anchors is None else x @ u - anchors[i].double()
        ref = x - coef @ u.T
        scale = x.abs().max().item()
        worst = max(worst, (out.double() - ref).abs().max().item() / scale)
    return worst


def measure(case: Case, dev, budget_s: float, limit: int | None = None) -> list[dict]:
    """Every candidate of ``case`` on the GPU, the launcher's first, until ``budget_s``."""
    import torch
    import triton

    from gradproj.kernels import project as P

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from predicted_vs_measured import kernel_profile

    grads, basis, anchors = bucket(case, dev)
    arch = triton.runtime.driver.active.get_current_target().arch
    few = P.few_rows(sum(g.shape[0] for g in grads), P._sm_count(grads[0].device))
    start = time.perf_counter()
    results = []
    for i, tiles in enumerate(candidates(case, arch, limit=limit, few_rows=few)):
        if time.perf_counter() - start > budget_s:
            results.append({"tiles": tiles_label(tiles), "skipped": "time budget"})
            continue
        row = {"tiles": tiles_label(tiles), "chosen": i == 0, **tiles._asdict()}
        try:
            # the compiled kernels before this candidate's first launch (max_error compiles it)
            before = {id(c) for c in _compiled(P._project_rows_kernel)}
            row["max_error"] = max_error(grads, basis, tiles, anchors, case.side)
            row["ok"] = row["max_error"] <= ERROR_BOUND[case.dtype]
            with P.row_tiles_override(tiles):
                ms, kernels = kernel_profile(lambda: project(grads, basis, anchors, case.side))
            row["kernel_ms"] = ms
            row["launches"] = sum(kernels.values())
            # the kernel this candidate compiled (none new: compiled before, figures unknown)
            new = [c for c in _compiled(P._project_rows_kernel) if id(c) not in before]
            if len(new) == 1:
                row["regs"] = int(getattr(new[0], "n_regs", -1))
                row["spills"] = int(getattr(new[0], "n_spills", -1))
        except Exception as exc:  # a candidate that fails is a finding, not the end of the run
            row["error"] = f"{type(exc).__name__}: {exc}"[:500]
        results.append(row)
        torch.cuda.synchronize()
    copy_ms = _copy_ms(grads, kernel_profile)
    for row in results:
        if "kernel_ms" in row:
            row["copy_ms"] = copy_ms
            row["fraction_of_copy"] = copy_ms / row["kernel_ms"]
    return results


def _compiled(kernel) -> list:
    """The compiled kernels in ``kernel``'s per-device cache, newest last."""
    caches = getattr(kernel, "device_caches", {})
    out = []
    for entry in caches.values():
        cache = entry[0] if isinstance(entry, tuple) else entry
        if isinstance(cache, dict):
            out.extend(cache.values())
    return out


def _copy_ms(grads, kernel_profile) -> float:
    """The profiler's kernel time of a read + write of the bucket's bytes: the peer."""
    import torch

    n = sum(g.numel() * g.element_size() for g in grads)
    src = torch.empty(n, dtype=torch.uint8, device=grads[0].device)
    dst = torch.empty_like(src)
    return kernel_profile(lambda: dst.copy_(src))[0]


def _gcc():
    """``scripts/gpu_compile_check.py`` (needs ``TRITON_INTERPRET`` 0 or unset)."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import gpu_compile_check

    return gpu_compile_check


def _launches(selected: list[Case], arch: str, limit: int | None) -> tuple[list, list]:
    """One compile-only launch per candidate of every case, and its ``(case, tiles)``."""
    gcc = _gcc()
    items, meta = [], []
    for case in selected:
        for tiles in candidates(case, gcc.ARCHS[arch].capability, limit=limit):
            items.append(
                gcc.Launch(f"{case.label} {tiles_label(tiles)}", _compile_call(case, tiles))
            )
            meta.append((case, tiles))
    return items, meta


def _items(specs: list[str], arch: str, limit: int | None) -> list:
    """The compile-only launches of ``specs`` (the compile check's workers rebuild them)."""
    return _launches(cases(specs), arch, limit)[0]


def compile_only(
    specs: list[str] | None, arch: str, jobs: int, limit: int | None = None
) -> list[dict]:
    """Every candidate compiled for ``arch`` (no GPU): registers, spills, smem, blocks/SM,
    through the compile check's own ``check_launches`` (``jobs`` worker processes; each
    compile fills Triton's cache)."""
    gcc = _gcc()
    specs = [c.label for c in cases(specs)]
    items, meta = _launches(cases(specs), arch, limit)
    rebuild = functools.partial(_items, specs, arch, limit)
    rows = gcc.check_launches(items, [arch], jobs=jobs, rebuild=rebuild)
    by_label = {label: r for r in rows for label in r.launches}
    out = []
    for launch, (case, tiles) in zip(items, meta, strict=True):
        r = by_label[launch.label]
        out.append(
            {
                "case": case.label,
                "tiles": tiles_label(tiles),
                "regs": r.regs,
                "spill_stores": r.spill_stores,
                "smem": r.smem,
                "blocks_per_sm": r.blocks_per_sm,
                "violations": [v["kind"] for v in r.violations],
                "error": r.error,
            }
        )
    return out


def _perf_model():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import perf_model

    return perf_model


def _predict_item(item: tuple[Case, object, str, int]) -> dict:
    """One candidate through the static model (``perf_model.model_launch`` on its bucket of
    ``rows`` rows): predicted, from the compiled code, for ``arch``'s device."""
    case, tiles, arch, rows = item
    pm = _perf_model()
    row = {"case": case.label, "tiles": tiles_label(tiles), "rows": rows}
    try:
        kernels = pm.model_launch(
            _compile_call(case, tiles, rows), _compile_call(case, tiles, 2 * rows), rows * D, arch
        )
    except Exception as exc:  # a candidate that does not compile is a finding of its row
        return {**row, "error": f"{type(exc).__name__}: {exc}"[:500]}
    bad = [kn for kn in kernels if "error" in kn or kn["blocks_per_sm"] == 0]
    if bad:
        return {**row, "error": bad[0].get("error") or "no block fits an SM"}
    op = pm.OPS["project_anchored input" if case.anchored else f"project_ {case.side}"]
    got = pm.summarize(op, case.dtype, case.k, pm.DEVICES[arch], rows * D, kernels)
    top = next(kn for kn in kernels if kn["kernel"] == got["limiting_kernel"])
    return {
        **row,
        # fewer bytes than the op must move: the model mis-traced the kernel's loops (seen on
        # two-stage transposed views at BLOCK_K = 16, whose pipelined loads it took for a
        # loop unrolled 8 times: 0.76 B an element, 93 %), so its figure is no prediction
        "below_floor": got["bytes_per_elt"] < got["floor_bytes_per_elt"] - 0.01,
        "predicted_fraction_of_copy": got["predicted_fraction_of_copy"],
        "limiter": got["limiter"],
        "regs": top["regs"],
        "spills": top["spills"],
        "blocks_per_sm": top["blocks_per_sm"],
        "warps": top["warps"],
        "instrs_per_elt": got["instrs_per_elt"]["total"],
        "bytes_per_elt": got["bytes_per_elt"],
    }


def predict(
    specs: list[str] | None, arch: str, jobs: int, limit: int | None = None, bucket_rows: int = 0
) -> list[dict]:
    """Every candidate's predicted fraction of copy on ``arch``'s device (the static
    model with its occupancy bound; predicted from compiled code, not measured), in
    ``jobs`` worker processes; the launcher's choice of each case is marked ``chosen``.
    ``bucket_rows``: the bucket's rows (default ``perf_model.ROWS``); the model counts the
    launch's waves, so a tile's figure depends on them (docs/gpu.md #tiles-waves)."""
    from gradproj.kernels import project as P

    gcc = _gcc()
    bucket_rows = bucket_rows or _perf_model().ROWS
    capability = gcc.ARCHS[arch].capability
    # the launcher's own choice for a bucket of these rows on the stand-in's device
    few = P.few_rows(bucket_rows, gcc.STAND_IN_SMS[capability])
    items = [
        (case, tiles, arch, bucket_rows)
        for case in cases(specs)
        for tiles in candidates(case, capability, limit=limit, few_rows=few)
    ]
    if jobs > 1 and len(items) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(jobs, multiprocessing.get_context("spawn")) as pool:
            rows = list(pool.map(_predict_item, items))
    else:
        rows = [_predict_item(it) for it in items]
    first = set()
    for r in rows:
        r["chosen"] = r["case"] not in first
        first.add(r["case"])
    return rows


def predicted_markdown(arch: str, rows: list[dict]) -> str:
    """The candidates of each case ranked by predicted fraction of copy."""
    lines = [
        f"# Tile candidates of the Triton row kernel, {arch}: predicted from compiled code, "
        "not measured",
        "",
        f"`project_` (`:anchored`: the anchored projection; `:output`: side output, the "
        f"transposed views), side input, D = {D}, {rows[0].get('rows', '?') if rows else '?'} "
        "rows; the static "
        "model (`benchmarks/perf_model.py`, with "
        "its occupancy bound) on each candidate's compiled kernel. ✓: the launcher's choice. "
        "A candidate that spills ranks last: the model does not count local-memory traffic; "
        "so does one the model counts fewer bytes for than the op's floor (mis-traced).",
        "",
    ]
    for label in dict.fromkeys(r["case"] for r in rows):
        lines += [
            f"## {label}",
            "",
            "| tiles | predicted (of copy) | limiter | instr/elt | B/elt | regs | spills "
            "| blocks/SM × warps |",
            "|---|---|---|---|---|---|---|---|",
        ]
        mine = [r for r in rows if r["case"] == label]
        # the model counts no local-memory traffic: a spilling candidate's figure is no
        # prediction, so those rank last
        ranked = sorted(
            mine,
            key=lambda r: (
                r.get("spills", 0) > 0 or r.get("below_floor", False),
                -r.get("predicted_fraction_of_copy", -1.0),
            ),
        )
        for r in ranked:
            mark = " ✓" if r["chosen"] else ""
            if "error" in r:
                lines.append(f"| {r['tiles']}{mark} | fails: {r['error'][:100]} | | | | | | |")
                continue
            frac = f"{r['predicted_fraction_of_copy']:.0%}" + (" (spills)" if r["spills"] else "")
            if r.get("below_floor"):
                frac += " (below the byte floor: mis-traced)"
            lines.append(
                f"| {r['tiles']}{mark} | {frac} | {r['limiter']} "
                f"| {r['instrs_per_elt']:.2f} | {r['bytes_per_elt']:.2f} | {r['regs']} "
                f"| {r['spills']} | {r['blocks_per_sm']} × {r['warps']} |"
            )
        lines.append("")
    return "\n".join(lines)


def _compile_call(case: Case, tiles, rows: int = 0):
    """A launch of ``project_bucket_`` on a bucket of ``case`` with ``tiles`` (CPU tensors:
    under the stand-in driver it compiles and runs nothing): two tensors of ``rows / 2``
    rows each, or of 37 and 5 rows (ragged, the compile check's) when ``rows`` is 0; side
    output 40 and 8 (its 16-byte vectors need rows in multiples of 8)."""

    def call() -> None:
        import torch

        from gradproj.kernels import project as P

        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[case.dtype]
        sizes = (rows // TENSORS,) * TENSORS if rows else ((40, 8) if case.output else (37, 5))
        if case.output:
            mats = [torch.empty(D, n, dtype=dtype).T for n in sizes]
        else:
            mats = [torch.empty(n, D, dtype=dtype) for n in sizes]
        anchors = [torch.empty(n, case.k) for n in sizes] if case.anchored else None
        with P.row_tiles_override(tiles):
            project(mats, torch.empty(D, case.k), anchors, case.side)

    return call


def markdown(device: str, versions: dict, results: dict[str, list[dict]]) -> str:
    lines = [
        f"# Tile sweep of the Triton row kernel on {device} (measured)",
        "",
        f"Versions: {', '.join(f'{k} {v}' for k, v in versions.items())}. `project_` "
        f"(`:anchored`: the anchored projection; `:output`: side output, {TENSORS} grads "
        f"of {D} × {ROWS}), side input, D = {D}, {TENSORS} × {ROWS} "
        "rows; kernel time from torch.profiler (warm "
        "L2); fraction = the copy of the same bytes over it. ✓: the launcher's choice.",
        "",
    ]
    for label, rows in results.items():
        lines += [
            f"## {label}",
            "",
            "| tiles | kernel ms | fraction of copy | max error / max|g| | regs | spills |",
            "|---|---|---|---|---|---|",
        ]
        ranked = sorted(rows, key=lambda r: r.get("kernel_ms", float("inf")))
        for r in ranked:
            mark = " ✓" if r.get("chosen") else ""
            if "kernel_ms" not in r:
                why = r.get("error") or r.get("skipped", "")
                lines.append(f"| {r['tiles']}{mark} | – | – | – | – | {why} |")
                continue
            err = f"{r['max_error']:.2g}" + ("" if r.get("ok") else " (over bound)")
            lines.append(
                f"| {r['tiles']}{mark} | {r['kernel_ms']:.3f} | {r['fraction_of_copy']:.0%} | "
                f"{err} | {r.get('regs', '–')} | {r.get('spills', '–')} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="directory for tile_sweep.json and .md (GPU runs)")
    ap.add_argument("--only", nargs="*", help="cases DTYPE:K (default: fp32/bf16 x k 8, 32, 128)")
    ap.add_argument("--budget-s", type=float, default=300.0, help="stop timing after this")
    ap.add_argument("--compile-only", action="store_true", help="compile, time nothing")
    ap.add_argument("--arch", default="sm_90", help="--compile-only target (sm_80, sm_90)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json", help="--compile-only: write the rows here")
    ap.add_argument("--limit", type=int, help="at most this many candidates a case")
    ap.add_argument(
        "--predict", metavar="MD", help="no GPU: rank the candidates by the static model into MD"
    )
    ap.add_argument(
        "--rows", type=int, default=0, help="--predict: the bucket's rows (perf_model.ROWS)"
    )
    args = ap.parse_args(argv)
    selected = cases(args.only)  # a bad --only fails here, before anything compiles
    if args.predict:
        rows = predict(args.only, args.arch, args.jobs, args.limit, args.rows)
        with open(args.predict, "w") as f:
            f.write(predicted_markdown(args.arch, rows))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
        print(predicted_markdown(args.arch, rows))
        return 0
    if args.compile_only:
        rows = compile_only(args.only, args.arch, args.jobs, args.limit)
        for r in rows:
            print(
                f"{r['case']:>8} {r['tiles']:<60} regs {r['regs']} spill {r['spill_stores']} "
                f"blocks/SM {r['blocks_per_sm']} {' '.join(r['violations'])}"
            )
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
        return 0
    import torch
    import triton

    if not torch.cuda.is_available():
        raise SystemExit("tile_sweep: no CUDA device (use --compile-only without a GPU)")
    if not args.out:
        raise SystemExit("tile_sweep: --out DIR is required for a GPU run")
    os.makedirs(args.out, exist_ok=True)
    dev = torch.device("cuda")
    device = torch.cuda.get_device_name(dev)
    versions = {
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
    }
    start, results = time.perf_counter(), {}
    for i, case in enumerate(selected):
        left = args.budget_s - (time.perf_counter() - start)
        share = left / (len(selected) - i)
        results[case.label] = measure(case, dev, max(share, 0.0), args.limit)
        with open(os.path.join(args.out, "tile_sweep.json"), "w") as f:
            json.dump({"device": device, "versions": versions, "cases": results}, f, indent=1)
        with open(os.path.join(args.out, "tile_sweep.md"), "w") as f:
            f.write(markdown(device, versions, results))
        print(f"tile_sweep: {case.label} done ({time.perf_counter() - start:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
