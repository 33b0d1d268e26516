#!/usr/bin/env python3
"""Static model of gradproj's CUDA kernels, per element (predicted from compiled code).

    python benchmarks/perf_model_cuda.py [--so _C.so] [--arch sm_80 sm_90]
                                         [--json benchmarks/results/perf_model_cuda.json]
                                         [--md docs/perf_model_cuda.md]

The twin of ``benchmarks/perf_model.py`` for ``csrc/cuda``: the same ops, shapes, device
figures and bounds (memory, issue, latency, occupancy, the FP32 and tensor pipes), so the two tables
compare the backends, and one of its own: the staging of the basis before a block's first tile.
Without ``--so`` it builds ``csrc/`` as ``make cuda-compile-check`` does
(``perf_model.build_cuda``: the CUDA venv, ``nvcc -Xptxas -v``, sm_80 and sm_90; ninja
keeps the build between runs). Then, per op, dtype, k and arch:

* **launches**: a Python twin of the host arithmetic of ``csrc/cuda`` (``tile.cuh``
  ``run_rows``, ``surgery.cu`` ``launch``) gives each kernel launched, its
  work items and dynamic shared memory; the grid is ``launch.cuh``'s ``balanced_grid``
  (the fewest blocks, at most ``blocks/SM × SMs``, that take as many rounds of the work
  as that many would), blocks/SM from the registers (``cuobjdump -res-usage``) and the
  shared memory;
* **instructions per element**, from the SASS (``cuobjdump -xelf``, ``nvdisasm -g -gi``):
  each SASS loop is matched to the C++ ``for``/``while`` it came from (the innermost loop
  of the sources, not ``#pragma unroll``-ed, whose lines hold at least half of the SASS
  loop's instructions, inlined call sites included); its trip count is the expression in
  that loop's ``// model-trips: EXPR`` comment (on the loop's header or the line above),
  evaluated with the launch's geometry and any ``// model-binds: NAME = EXPR`` of the
  call sites the instructions were inlined through. A loop without one counts once and
  is flagged. Every instruction counts its trips × the trips of the loops around it
  (× the factor of any ``// model-scale: EXPR`` block it lies in: the rows kernels'
  unrolled slot loops, whose slots past ``d`` are skipped, count ``slots / S``, the
  tensor-core rows kernel's blocks past ``d`` ``blocks / NB``), × 8 warps
  × the grid, over the op's elements; and again for the busiest warp (the factors with
  ``Launch.env["busiest"]``'s names: all its blocks, the row cache's lookups where it makes
  them), which the occupancy bound counts;
* **bytes per element**, from the kernels' design (:func:`hbm_bytes`: which streams
  each launch reads and writes, the coefficient workspace, the basis where it is not a
  small cached table), not from the SASS: the CUDA kernels address every tensor through
  a device table, so the accesses cannot be told apart there;
* **bytes in flight**: the most global-load bytes a thread has outstanding in each loop
  body and in straight-line code (the SASS register dependences, as perf_model), times
  the resident threads;
* **staging**: the bytes each block copies from L2 into shared memory before its first
  tile (the tensor-core rows kernel's basis, the FMA engine's resident Uᵀ:
  ``staged_bytes_per_elt``, the grid's copies over the bucket's elements), whose time at
  the device's L2 bandwidth adds to the binding bound's (``perf_model.bounds``): no tile
  runs until its block's basis is in. A fixed cost per launch: per element it falls as
  the bucket grows (the modelled bucket of ``perf_model.ROWS`` rows is small).

Same assumptions as perf_model (every instruction issues in one slot, both sides of a
branch count, every sector fetched is used, 700 ns loaded latency, each resident warp
issuing once every ``perf_model.WARP_CPI`` cycles, the grid's waves), and one more:
block ``b`` of a grid-stride loop runs items ``b, b + grid, ...`` and sits on SM
``b % sms`` (``perf_model.waves``).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "scripts"))
import arch_limits  # noqa: E402
import perf_model as pm  # noqa: E402

ROOT = pm.ROOT
DEFAULT_JSON = os.path.join(ROOT, "benchmarks", "results", "perf_model_cuda.json")
DEFAULT_MD = os.path.join(ROOT, "docs", "perf_model_cuda.md")
SOURCES = os.path.join(ROOT, "csrc", "cuda")

# csrc/cuda/tile.cuh and surgery.cu constants
THREADS = 256
WARPS = THREADS // 32
CHUNK = 8  # tile::kChunk
EPT = 16  # tile::kEpt
RESIDENT_BYTES = 128 * 1024  # tile::kResidentBytes (capped by the device: resident_limit)
SURGERY_CHUNK = THREADS * 16  # surgery.cu kChunk
# csrc/cuda/mma_rows.cuh and project.cu (the tensor-core rows kernel)
# mma_rows.cuh kMinAdamWRowsK<T>: AdamW's contiguous rows (the projections: every k)
ADAMW_ROWS_MIN_K = {"fp32": 9, "bf16": 1, "fp16": 1}
ADAMW_BLOCK_POLICY_MAX_K16 = 32  # adamw.cu kBlockPolicyMaxK16
MMA_MAX_D = 1280  # mma_rows::kMaxD: the projection's kMaxRowD (NB = 10)
MMA_MAX_ADAMW_D = 1024  # mma_rows::kMaxAdamWD: AdamW's, and ProjectPairPolicy's kMaxPairD
MMA_MAX_PAIR_D_ADAMW = 768  # mma_rows::kMaxPairD<AdamWPairPolicy<16-bit>>
MMA_BLOCKS = (2, 3, 4, 6, 8, 10)  # the NB the launcher compiles (run_columns)
MMA_MAX_SMEM = 224 * 1024  # mma_rows::kMaxDynamicSmem
MMA_RESERVED_SMEM = 1024  # mma_rows::kReservedSmemPerBlock
MMA_TILE_ROWS = 16
MMA_COEF_CHUNK = 16
# [row cache] row_slots(row_bytes): tiles the cache holds, 8 for rows of at most 16 bytes
# (two tiles a lookup), else 4 (one)
MMA_ROW_SLOTS = {16: 8, 64: 4}
MMA_MAX_ROW_BYTES = 64  # kMaxRowBytes: AdamW's Row (a projection's: 16)
MMA_STAGE_BARRIER_BYTES = 16  # kStageBarrierBytes: [async staging]'s mbarrier (sm_90)
# mma_rows.cuh [16 warps]: rows of (32, 64] column blocks (row pairs', AdamW's fp32 rows: 48)
MMA_WIDE_WARPS = 16  # kWideWarps
MMA_WIDE_BLOCKS = (32, 64)  # (kSixteenWarpsFrom, kSixteenWarpsTo<P>]
MMA_WIDE_PAIR_BLOCKS = 48  # kSixteenWarpsTo<P> of the row-pair policies and AdamW's fp32 rows
MMA_WIDE_NB = (3, 4)  # the NB the launcher compiles for them


# ---------------------------------------------------------------- C++ loops and annotations


@dataclass(frozen=True)
class CppLoop:
    """A ``for``/``while`` of the sources: its lines, whether it is unrolled, its trips."""

    path: str
    first: int  # the line of the keyword
    last: int  # the line of the closing brace (or of the body statement's ';')
    unrolled: bool
    trips: str | None  # the model-trips expression


_KEYWORD = re.compile(r"\b(for|while)\s*\(")
_TRIPS = re.compile(r"model-trips:\s*(.+?)\s*$")
_BINDS = re.compile(r"model-binds:\s*(\w+)\s*=\s*(.+?)\s*$")


def _annotation(lines: list[str], first: int, last: int, pattern: re.Pattern) -> re.Match | None:
    """``pattern`` in a comment on lines ``first..last`` (1-based) or a comment-only line
    just above them."""
    candidates = list(range(first, last + 1))
    if first >= 2 and lines[first - 2].lstrip().startswith("//"):
        candidates.insert(0, first - 1)
    for n in candidates:
        _, sep, comment = lines[n - 1].partition("//")
        if sep and (m := pattern.search(comment)):
            return m
    return None


def cpp_loops(path: str) -> list[CppLoop]:
    """Every ``for``/``while`` loop of a C++/CUDA source file, comments and strings ignored."""
    import cuda_compile_report as ccr

    with open(path) as f:
        text = f.read()
    code = ccr._strip_comments(text)
    code = re.sub(r'"(?:\\.|[^"\\])*"', lambda m: re.sub(r"[^\n]", " ", m.group(0)), code)
    lines = text.split("\n")
    line_of = [0] * (len(code) + 1)
    n = 1
    for i, c in enumerate(code):
        line_of[i] = n
        if c == "\n":
            n += 1
    line_of[len(code)] = n
    code_lines = code.split("\n")
    loops = []
    for m in _KEYWORD.finditer(code):
        close = ccr._matching(code, m.end() - 1, "(", ")")
        rest = close + 1
        while rest < len(code) and code[rest].isspace():
            rest += 1
        if m.group(1) == "while" and rest < len(code) and code[rest] == ";":
            continue  # the `while (...)` of a do-while
        end = ccr._matching(code, rest, "{", "}") if code[rest] == "{" else code.find(";", rest)
        first, header_last, last = line_of[m.start()], line_of[close], line_of[end]
        prev = first - 2
        while prev >= 0 and not code_lines[prev].strip():
            prev -= 1
        # (``#pragma unroll 1`` keeps the loop a loop)
        pragma = lines[prev].strip() if prev >= 0 else ""
        unrolled = pragma.startswith("#pragma unroll") and pragma.split()[2:3] != ["1"]
        trips = _annotation(lines, first, header_last, _TRIPS)
        loops.append(CppLoop(path, first, last, unrolled, trips.group(1) if trips else None))
    return loops


def cpp_binds(path: str) -> dict[int, tuple[str, str]]:
    """Line → (name, expression) of each ``model-binds`` annotation (it applies to the call on
    that line, or on the next line when the comment stands alone)."""
    with open(path) as f:
        lines = f.read().split("\n")
    out = {}
    for n, line in enumerate(lines, 1):
        _, sep, comment = line.partition("//")
        if sep and (m := _BINDS.search(comment)):
            target = n + 1 if not line.split("//", 1)[0].strip() else n
            out[target] = (m.group(1), m.group(2))
    return out


_COLD = re.compile(r"model-cold-if:\s*(.+?)\s*(?:\(.*)?$")
_UNIFORM = re.compile(r"model-uniform\b()")
# ``model-scale: EXPR (why)``: the block runs EXPR times as often as its loops say (EXPR
# up to the first `` (``), e.g. an unrolled slot loop whose slots past d are skipped.
_SCALE = re.compile(r"model-scale:\s*(.+?)(?:\s+\(.*)?$")


def cpp_spans(path: str, pattern: re.Pattern = _COLD) -> list[tuple[int, int, str]]:
    """``(first, last, condition)`` of each ``model-cold-if`` block: a ``{`` block (or the
    line) the launch does not run when the condition holds, e.g. a policy's scalar
    fallback when its rows are vectors. With ``pattern=_UNIFORM``: the ``model-uniform``
    blocks, whose loads read tables and coefficients, not the elements: device-table
    lookups every lane of a warp makes at one address, a row's coefficients, the few
    lanes that finish a coefficient. Counted per thread they would swamp the element
    loads, so their bytes are left out of the loads a thread must keep in flight (their
    instructions count; condition ``"True"``). With ``pattern=_SCALE``: the ``model-scale``
    blocks and their factors."""
    import cuda_compile_report as ccr

    with open(path) as f:
        text = f.read()
    code = ccr._strip_comments(text)
    starts = [0]
    for line in text.split("\n"):
        starts.append(starts[-1] + len(line) + 1)
    out = []
    for n, line in enumerate(text.split("\n"), 1):
        _, sep, comment = line.partition("//")
        if not (sep and (m := pattern.search(comment))):
            continue
        if not sep or not line.split("//", 1)[0].strip():  # a comment line: the next line's
            n += 1
        brace = code.rfind("{", starts[n - 1], starts[n])
        last = n
        if brace >= 0:
            last = code.count("\n", 0, ccr._matching(code, brace, "{", "}")) + 1
        out.append((n, last, m.group(1) or "True"))
    return out


@functools.cache
def _sources() -> tuple[dict[str, list[CppLoop]], dict[str, dict[int, tuple[str, str]]]]:
    loops, binds = {}, {}
    for name in sorted(os.listdir(SOURCES)):
        if name.endswith((".cu", ".cuh")):
            path = os.path.join(SOURCES, name)
            loops[path] = cpp_loops(path)
            binds[path] = cpp_binds(path)
    return loops, binds


@functools.cache
def _spans(pattern: re.Pattern = _COLD) -> dict[str, list[tuple[int, int, str]]]:
    return {
        os.path.join(SOURCES, n): cpp_spans(os.path.join(SOURCES, n), pattern)
        for n in sorted(os.listdir(SOURCES))
        if n.endswith((".cu", ".cuh"))
    }


def _repo_path(path: str) -> str | None:
    """The file under csrc/cuda a SASS line-table path names (built elsewhere: by suffix)."""
    base = os.path.basename(path)
    full = os.path.join(SOURCES, base)
    return full if os.path.exists(full) and path.endswith(os.path.join("cuda", base)) else None


# ---------------------------------------------------------------- SASS with full inline chains


def _frames(chains: dict[int, tuple[tuple[str, int], ...]], addr: int) -> list[tuple[str, int]]:
    """The (csrc/cuda file, line) frames of an instruction's inline chain, innermost first."""
    return [(r, ln) for p, ln in chains.get(addr, ()) if (r := _repo_path(p)) is not None]


_CHAIN = re.compile(r'File "([^"]+)", line (\d+)(?: inlined at "([^"]+)", line (\d+))?')


def sass_chains(text: str) -> dict[str, dict[int, tuple[tuple[str, int], ...]]]:
    """Per function, per instruction address: its location chain, innermost first, the
    kernel's own line last (``nvdisasm -g -gi``; every ``inlined at`` frame kept)."""
    out: dict[str, dict[int, tuple[tuple[str, int], ...]]] = {}
    current = None
    chain: list[tuple[str, int]] = []
    pending: list[tuple[str, int]] = []
    in_comments = False
    for line in text.splitlines():
        if m := pm._TYPE.match(line):
            current = out.setdefault(m.group(1), {})
            chain, in_comments = [], False
            continue
        if current is None:
            continue
        s = line.lstrip()
        if s.startswith("//##"):
            if not in_comments:
                pending, in_comments = [], True
            if m := _CHAIN.search(s):
                frame = (m.group(1), int(m.group(2)))
                if not pending or pending[-1] != frame:
                    pending.append(frame)
                if m.group(3):
                    pending.append((m.group(3), int(m.group(4))))
            continue
        if in_comments:
            chain, in_comments = pending, False
        if m := pm._INSTR.match(line):
            current[int(m.group(1), 16)] = tuple(chain)
    return out


# ---------------------------------------------------------------- launches (twin of the host code)


@dataclass
class Launch:
    """One kernel launch of an op: which instantiation, its work and its geometry names."""

    kernel: str  # a substring of the demangled instantiation
    work: int  # blocks of work (the grid-stride loop's range)
    dynamic_smem: int
    env: dict  # names the model-trips expressions use
    threads: int = THREADS  # a block's


balanced_grid = pm.balanced_grid  # launch.cuh's [grid], the twin perf_model's tail uses


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


def chunk_for(k: int) -> int:
    """``tile::chunk_for``: the rows kernel's coefficients a chunk (KC), the smallest
    power of two not below k, at most ``tile::kChunk``."""
    return next(c for c in (1, 2, 4) if k <= c) if k <= 4 else CHUNK


def rows_kernel(policy: str, mode: int, kc: int) -> str:
    """The demangled ``rows_kernel<P, Mode, KC>`` (mode 0 fused, 1 partials, 2 apply)."""
    return f"rows_kernel<{policy}, (gradproj::cuda::tile::Mode){mode}, {kc}>"


def rows_launches(
    policy: str, krows: int, d: int, k: int, total_rows: int, entries: int,
    resident_bytes: int = RESIDENT_BYTES, ept: int = EPT,
):  # fmt: skip
    """``tile::run_rows``: the rows kernel (fused, or partials + combine + apply), in
    chunks of KC coefficients (``tile::chunk_for``: the smallest power of two not below k,
    at most ``tile::kChunk``);
    ``ept``: the policy's ``kEpt``, elements of a row per thread."""
    kp = _round_up(k, CHUNK)
    kc = chunk_for(k)
    staged = _round_up(k, kc)  # the rows the chunks read (resident): kp, or k up to KC
    wpr = 1
    while wpr < WARPS and wpr * 32 * ept < d:
        wpr *= 2
    seg_width = wpr * 32 * ept
    nseg = -(-d // seg_width)
    tile_rows = krows * (WARPS // wpr)
    n_tiles = -(-total_rows // tile_rows)

    # a thread's slots of V = 4 columns (S of them) that lie before d, per segment: the
    # kernels skip the others (the slot map: slot s starts at column s * wpr * 32 * 4, a
    # warp's lanes take 128 consecutive columns, so a warp skips a slot whole). Counted
    # in warps: slot s runs in the group's warps whose columns start before d.
    def warps_in(seg: int, s: int) -> float:
        start = seg * seg_width + s * wpr * 128
        return -(-max(0, min(wpr * 128, d - start)) // 128) / wpr

    slots = [sum(warps_in(seg, s) for s in range(ept // 4)) for seg in range(nseg)]
    # the busiest warp: a group's first, in every slot it starts before d, and the lanes
    # that finish the group's coefficients (model-scale 1 / wpr)
    first = max(sum(warps_in(seg, s) > 0 for s in range(ept // 4)) for seg in range(nseg))
    env = dict(d=d, k=k, kp=kp, KC=kc, wpr=wpr, nseg=nseg, entries=entries,
               basis_ld=_round_up(d, 8))  # fmt: skip
    env |= dict(S=ept // 4, slots=sum(slots) / nseg, busiest=dict(slots=first, wpr=1))
    if nseg == 1:
        smem_ld = _round_up(d, 32)
        resident = staged * smem_ld * 4 <= resident_bytes
        smem = staged * smem_ld * 4 if resident else kc * smem_ld * 4
        env |= dict(smem_ld=smem_ld, resident=resident)
        if resident:  # stage_ut before the first tile: U^T's staged rows, from L2
            env["staged"] = staged * d * 4
        return [Launch(rows_kernel(policy, 0, kc), n_tiles, smem, env)]
    env |= dict(smem_ld=seg_width, resident=False)
    smem = kc * seg_width * 4
    combine = -(-(total_rows * kp) // THREADS)
    return [
        Launch(rows_kernel(policy, 1, kc), n_tiles * nseg, smem, env),
        Launch(f"combine_kernel<{policy} >", combine, 0, env),
        Launch(rows_kernel(policy, 2, kc), n_tiles * nseg, smem, env),
    ]


def _mma_smem(
    nblk: int,
    kp: int,
    pairs: bool = False,
    warps: int = WARPS,
    row_bytes: int = MMA_MAX_ROW_BYTES,
    split: bool = True,
) -> int:
    """``mma_rows::smem_bytes``: the staged basis (twice with pairs: hi and lo), the partial
    sums (a tile a warp), the coefficient tile (``coef_ld_for``: split, 2 kp floats a row;
    AdamW's plain, kp + 4), the row cache (``row_bytes``: the policy's ``sizeof(P::Row)``;
    ``columns_per_launch`` counts the largest for every policy, and the split tile), the
    [async staging] mbarrier (``kStageBarrierBytes``)."""
    coef_ld = 2 * kp if split else kp + 4
    return _mma_staged(nblk, kp, pairs) + 4 * (warps * MMA_TILE_ROWS * MMA_COEF_CHUNK
                                               + MMA_TILE_ROWS * coef_ld) + (
        _row_slots(row_bytes) * MMA_TILE_ROWS * (row_bytes + 8)
    ) + MMA_STAGE_BARRIER_BYTES  # fmt: skip


def _mma_staged(nblk: int, kp: int, pairs: bool = False) -> int:
    """The staged basis of ``mma_rows::smem_bytes``: ``nblk`` blocks of 16 rows of ``kp``
    fp32 columns (twice with pairs: hi and lo), which every block copies from L2."""
    return 4 * nblk * (kp // 8) * 128 * (2 if pairs else 1)


def _mma_resident(smem: int, warps: int, limit: int, per_sm: int) -> int:
    """``mma_rows::run_columns``' ``resident`` ([fp32 pairs]): the warps an SM holds of a
    launch of ``smem`` bytes by shared memory, two CTAs of 8 warps at most, one of 16."""
    if smem > limit:
        return 0
    return warps * min(2 if warps == WARPS else 1, per_sm // (smem + MMA_RESERVED_SMEM))


def _row_slots(row_bytes: int) -> int:
    """``mma_rows::row_slots``: the [row cache]'s tiles."""
    return 8 if row_bytes <= 16 else 4


def mma_max_d(policy: str) -> int:
    """``mma_rows::kMaxRowD<P>``: the widest rows the policy's tensor-core kernel takes."""
    if "AdamWPairPolicy" in policy:
        return MMA_MAX_PAIR_D_ADAMW
    if "AdamWPolicy" in policy and "<float" not in policy and ", true>" in policy:
        return MMA_MAX_D  # kMaxUpdateD: 16-bit contiguous rows at 10 blocks a warp
    if "AdamW" in policy or "PairPolicy" in policy:
        return MMA_MAX_ADAMW_D
    return MMA_MAX_D


def mma_columns(d: int, k: int, smem_optin: int | None, max_d: int = MMA_MAX_D) -> int:
    """``mma_rows::columns_per_launch<P>``: the basis columns of each tensor-core launch (all
    k where the staged basis fits the per-block shared memory, else the fewest launches of
    at most that many, a multiple of 8), or 0 where the kernel does not take the rows
    (``max_d``: the policy's ``kMaxRowD``)."""
    if d > max_d or k < 1:
        return 0
    limit = MMA_MAX_SMEM if smem_optin is None else min(MMA_MAX_SMEM, smem_optin)
    nblk = -(-d // 16)
    launches = 1
    while True:
        kc = _round_up(-(-k // launches), 8)
        if _mma_smem(nblk, kc) <= limit:
            return min(kc, k)
        if kc == 8:
            return 0
        launches += 1


def mma_launches(
    policy: str,
    dt: str,
    d: int,
    k: int,
    total_rows: int,
    entries: int,
    smem_optin: int | None,
    anchored: bool = False,
    rest: str | None = None,
) -> list[Launch] | None:
    """``mma_rows::run``: the tensor-core rows kernel, one launch per block of basis columns
    (``mma_columns``), or None where project.cu takes ``tile::run_rows`` (d above the
    policy's ``mma_max_d``, not even 8 columns fit). ``anchored``:
    the rows have anchors (the modelled ops have no weights), whose loads the plain
    projection skips.
    ``rest``: the policy of the launches after the first (adamw.cu: project.cu's anchored
    projection of the stepped params), by default ``policy``."""
    kc = mma_columns(d, k, smem_optin, mma_max_d(policy))
    if kc == 0:
        return None
    nblk = -(-d // 16)
    n_tiles = -(-total_rows // MMA_TILE_ROWS)
    limit = MMA_MAX_SMEM if smem_optin is None else min(MMA_MAX_SMEM, smem_optin)
    launches = []
    for c0 in range(0, k, kc):
        cols = min(kc, k - c0)
        name = policy if c0 == 0 or rest is None else rest
        # projections (not AdamW's)
        projection = re.search(r"Project(Pair)?Policy", name)
        adamw = "AdamW" in name
        row_bytes = MMA_MAX_ROW_BYTES if adamw else 16  # sizeof(P::Row)
        # [16 warps]: those rows of 513-1024 columns (row pairs and AdamW's fp32 rows: 768),
        # where the partial sums of 16 warps fit beside the launch's columns
        warps = WARPS
        lo, hi = MMA_WIDE_BLOCKS
        if "PairPolicy" in name or "AdamWPolicy<float" in name:
            hi = MMA_WIDE_PAIR_BLOCKS
        wide_smem = _mma_smem(
            nblk, _round_up(cols, 8), False, MMA_WIDE_WARPS, row_bytes, split=not adamw
        )
        sixteen = lo < nblk <= hi and wide_smem <= limit
        if sixteen and "ProjectPolicy<float, true>" in name:
            # fp32 contiguous rows only where two 8-warp CTAs do not fit the SM's shared
            # memory (the per-block opt-in + 1 KiB on sm_80 / sm_90) beside their bases
            eight_smem = _mma_smem(nblk, _round_up(cols, 8), False, WARPS, row_bytes)
            per_sm = (MMA_MAX_SMEM if smem_optin is None else smem_optin) + MMA_RESERVED_SMEM
            sixteen = 2 * (eight_smem + MMA_RESERVED_SMEM) > per_sm
        if sixteen:
            warps = MMA_WIDE_WARPS
        # [pairs]: those projections without anchors whose U fits twice
        fits = _mma_smem(nblk, _round_up(cols, 16), True, warps, row_bytes) <= limit
        pairs = bool(projection) and dt != "fp32" and not anchored and cols > 8 and fits
        if ("ProjectPolicy<float" in name and not anchored and cols > 8
                and _round_up(cols, 16) == _round_up(cols, 8)):  # fmt: skip
            # [fp32 pairs]: where k padded to 16 is k padded to 8 and shared memory leaves
            # the SM as many resident warps (two CTAs of 8 warps, or one of 16)
            per_sm = (MMA_MAX_SMEM if smem_optin is None else smem_optin) + MMA_RESERVED_SMEM
            frags = _mma_smem(nblk, _round_up(cols, 8), False, warps, row_bytes)
            now = _mma_resident(frags, warps, limit, per_sm)
            split8 = _mma_smem(nblk, _round_up(cols, 16), True, WARPS, row_bytes)
            split16 = _mma_smem(nblk, _round_up(cols, 16), True, MMA_WIDE_WARPS, row_bytes)
            if _mma_resident(split8, WARPS, limit, per_sm) >= now:
                warps, pairs = WARPS, True
            elif lo < nblk <= hi and _mma_resident(split16, MMA_WIDE_WARPS, limit, per_sm) >= now:
                warps, pairs = MMA_WIDE_WARPS, True
        if warps == WARPS:
            nb = next(n for n in MMA_BLOCKS if -(-nblk // WARPS) <= n)
        else:
            nb = next(n for n in MMA_WIDE_NB if -(-nblk // warps) <= n)
        # the warps' valid blocks (the unrolled block loop breaks at the first past d)
        blocks = sum(max(0, min(nb, nblk - w * nb)) for w in range(warps)) / warps
        # [raw pairs]: the other 16-bit projections of more than 8 columns, U staged once in
        # pairs' order, where that fits and k padded to 16 is k padded to 8; AdamW's 16-bit
        # rows too where they compile without spills (kRawPairsAt: at most 4 blocks a warp on
        # 8 warps, row pairs on 16)
        raw_at = not adamw or (nb <= 4 if warps == WARPS else "PairPolicy" in name)
        raw_smem = _mma_smem(nblk, _round_up(cols, 16), False, warps, row_bytes, split=not adamw)
        raw = ((bool(projection) or adamw) and raw_at and dt != "fp32" and cols > 8 and not pairs
               and _round_up(cols, 16) == _round_up(cols, 8) and raw_smem <= limit)  # fmt: skip
        pairs = pairs or raw
        # [stacked]: 16-bit projections of a launch of at most 8 columns, U hi and lo as two
        # groups of the fragment layout (kp = 16), where that fits
        stacked = (bool(projection) and dt != "fp32" and cols <= 8
                   and _mma_smem(nblk, 16, False, warps, row_bytes) <= limit)  # fmt: skip
        kp = 16 if stacked else _round_up(cols, 16 if pairs else 8)
        groups = kp // 8
        # [row cache] kLookupTiles (tiles a lookup: two with eight slots, but for 16-bit
        # stacked rows of 4 blocks on 16 warps) and kLookupWarp (the last warp with two,
        # else warp 0)
        eight = _row_slots(row_bytes) == 8
        lookup = 2 if eight and not (stacked and warps == MMA_WIDE_WARPS and nb == 4) else 1
        # the busiest warp: warp 0, its NB blocks whole; the lookups (model-scale: cache)
        # count there where warp 0 makes them, or the last warp holds NB blocks too (where
        # it holds fewer, they take the time its missing blocks leave)
        last = max(0, min(nb, nblk - (warps - 1) * nb))
        # aside: the lookups a warp other than the busiest makes (one-tile lookups: the
        # prologue's second, the last warp's)
        # lead: what one thread alone does (the [async staging] copy's issue on sm_90), by a
        # warp that makes no lookup (kStageWarp): where the busiest counts the lookups, their
        # warp outlasts it (a lookup of 16-32 rows issues more than the copy), else it is
        # warp 0's
        cache = 1.0 if lookup == 1 or last == nb else 0.0
        busiest = dict(blocks=min(nb, nblk), cache=cache, aside=0.0, lead=1.0 - cache)
        env = dict(aside=1.0, lead=1 / warps, d=d, k=cols, kp=kp, J=groups, nblk=nblk, NB=nb,
                   blocks=blocks, entries=entries, second=groups % 2 == 0, anchored=anchored,
                   updates=adamw, units=2 if pairs and not raw else 1, W=warps, threads=32 * warps,
                   steps=1 if stacked else groups, cache=1 / warps, lookup=lookup,
                   busiest=busiest)  # fmt: skip
        kernel = (f"mma_rows_kernel<{name}, {nb}, {'true' if pairs else 'false'}, {warps}, "
                  f"{'true' if stacked else 'false'}, {'true' if raw else 'false'}>")  # fmt: skip
        smem = _mma_smem(nblk, kp, pairs and not raw, warps, row_bytes, split=not adamw)
        # [async staging]: each block copies the launch's basis from L2 before its first tile
        env["staged"] = _mma_staged(nblk, kp, pairs and not raw)
        launches.append(Launch(kernel, n_tiles, smem, env, 32 * warps))
    return launches


def surgery_launches(ctype: str, numels: list[int]):
    """``surgery.cu`` ``launch``: partials, coefficients, apply."""
    chunks = sum(-(-n // SURGERY_CHUNK) for n in numels)
    # whole: every chunk is a whole one ([packs]; the model's tensors are aligned)
    env = dict(entries=len(numels), chunks_per_pair=max(-(-n // SURGERY_CHUNK) for n in numels),
               whole=all(n % SURGERY_CHUNK == 0 for n in numels))  # fmt: skip
    pairs_blocks = -(-len(numels) // WARPS)
    return [
        Launch(f"surgery_partials_kernel<{ctype}>", chunks, 0, env),
        Launch("surgery_coefficients_kernel", pairs_blocks, 0, env),
        Launch(f"surgery_apply_kernel<{ctype}>", chunks, 0, env),
    ]


_CTYPE = {"fp32": "float", "bf16": "c10::BFloat16", "fp16": "c10::Half"}
_NS = "gradproj::cuda::(anonymous namespace)::"


# The Triton model's ops, every one.
OPS = tuple(pm.OPS)


def op_launches(
    op: str, dt: str, k: int, rows: int = pm.ROWS, d: int = pm.D, smem_optin: int | None = None
) -> list[Launch]:
    """The CUDA launches of one modelled op on the perf model's bucket (pm.TENSORS tensors of
    rows / TENSORS × d; flat: vectors of that many elements; surgery: pairs of them).
    ``smem_optin``: the device's per-block shared memory limit (caps the resident basis)."""
    t = _CTYPE[dt]
    per = rows // pm.TENSORS
    res = RESIDENT_BYTES if smem_optin is None else min(RESIDENT_BYTES, smem_optin)
    if op in ("project_ input", "project_anchored input"):
        policy = f"{_NS}ProjectPolicy<{t}, true>"
        anchored = op == "project_anchored input"
        mma = mma_launches(policy, dt, d, k, rows, pm.TENSORS, smem_optin, anchored)
        return mma or rows_launches(policy, 2, d, k, rows, pm.TENSORS, res)
    if op == "project_ output":  # tensor cores with strided rows, else ProjectBlockPolicy
        # 16-bit: the bucket's views pair their rows (project.cu pair_rows: even row counts)
        # up to ProjectPairPolicy's kMaxPairD
        strided = f"{_NS}ProjectPairPolicy<{t}>"
        if dt == "fp32" or d > mma_max_d(strided):
            strided = f"{_NS}ProjectPolicy<{t}, false>"
        mma = mma_launches(strided, dt, d, k, rows, pm.TENSORS, smem_optin)
        # the block policy: 4 rows a group, 8 elements a thread
        return mma or rows_launches(f"{_NS}ProjectBlockPolicy<{t}>", 4, d, k, rows, pm.TENSORS,
                                    res, 8)  # fmt: skip
    if op == "project_ flat":
        policy = f"{_NS}ProjectPolicy<{t}, true>"
        return rows_launches(policy, 2, per * d, k, pm.TENSORS, pm.TENSORS, res)
    if op == "ProjectedAdamW input":
        # the tensor cores' policy (the update's root flushed: the model's eps, 1e-8, takes
        # it) and the FMA engine's (adamw.cu [flushed root])
        policy = f"{_NS}AdamWPolicy<{t}, true>"
        engine = f"{_NS}AdamWRowsPolicy<{t}, true>"
        rest = f"{_NS}ProjectPolicy<{t}, true>"
        if k < ADAMW_ROWS_MIN_K[dt]:  # adamw.cu: the FMA engine
            return rows_launches(engine, 1, d, k, rows, pm.TENSORS, res)
        mma = mma_launches(policy, dt, d, k, rows, pm.TENSORS, smem_optin, True, rest)
        if not mma and dt == "fp32" and d > MMA_MAX_ADAMW_D:
            # [wide] adamw.cu step_then_project: the step alone (the rows engine with no
            # basis columns), then project.cu's anchored projection of p on tensor cores
            project = mma_launches(rest, dt, d, k, rows, pm.TENSORS, smem_optin, True)
            if project:
                return rows_launches(engine, 1, d, 0, rows, pm.TENSORS, res) + project
        return mma or rows_launches(engine, 1, d, k, rows, pm.TENSORS, res)
    if op == "ProjectedAdamW output":
        # tensor cores with strided rows: fp32; 16-bit in row pairs (the bucket's views pair
        # up) up to d = 768 (mma_rows.cuh kMaxPairD), else from k = 33
        if dt != "fp32" and d <= MMA_MAX_PAIR_D_ADAMW:
            policy, rest = f"{_NS}AdamWPairPolicy<{t}>", f"{_NS}ProjectPairPolicy<{t}>"
        else:
            policy, rest = f"{_NS}AdamWPolicy<{t}, false>", f"{_NS}ProjectPolicy<{t}, false>"
        strided = dt == "fp32" or d <= MMA_MAX_PAIR_D_ADAMW or k > ADAMW_BLOCK_POLICY_MAX_K16
        mma = strided and mma_launches(policy, dt, d, k, rows, pm.TENSORS, smem_optin, True,
                                       rest)  # fmt: skip
        # the block policy: 4 rows a group, 4 elements a thread
        return mma or rows_launches(f"{_NS}AdamWBlockPolicy<{t}>", 4, d, k, rows, pm.TENSORS,
                                    res, 4)  # fmt: skip
    if op == "surgery_ projection one-sided":
        return surgery_launches(t, [per * d] * pm.TENSORS)
    raise KeyError(op)


def hbm_bytes(
    op: str, dt: str, k: int, rows: int = pm.ROWS, d: int = pm.D, smem_optin: int | None = None
) -> list[dict]:
    """HBM bytes per element of each launch of :func:`op_launches`, from the kernels' design.

    The basis (d × k, small next to the bucket), the device tables and the weights are
    read once per launch, later reads hit cache; the fp32 coefficient workspace
    (rows × kp) is written in pass 1 and read back in pass 2, the split launches' partials
    (nseg × rows × kp) too. A flat bucket's basis is as large as k vectors: each segment
    stages its slice of Uᵀ in both passes, shared by the tile's rows (the bucket's
    vectors), so it streams from HBM.
    """
    b = pm.ITEMSIZE[dt]
    kp = _round_up(k, CHUNK)
    launches = op_launches(op, dt, k, rows, d, smem_optin)
    nseg = launches[0].env.get("nseg", 1)  # the split launches' segments

    def mv(read: float, write: float, note: str) -> dict:
        return {"read": read, "write": write, "note": note}

    if op == "surgery_ projection one-sided":
        return [mv(2 * b, 0, "u, r read"), mv(0, 0, "per-pair sums"),
                mv(2 * b, b, "u, r read, u written")]  # fmt: skip
    if op == "project_ flat":
        n = rows // pm.TENSORS * d
        # Uᵀ slice per segment, shared by the tile's vectors: its k rows (tile.cuh
        # rows_chunk stages no padding)
        slices = 4 * k / pm.TENSORS
        part = nseg * kp * 4 / n  # partials per element, written then read
        return [
            mv(b + slices, part, "x read, Uᵀ slices staged, partials written"),
            mv(part, 0, "partials read, coef written"),
            mv(b + slices, b, "x read, Uᵀ slices staged, x written"),
        ]
    basis = 4 * kp / rows  # read once per launch: d × kp floats over rows × d elements
    coef = 4 * kp / d  # per element: the row's kp coefficients over its d elements
    anchors = 4 * k / d if op.startswith(("project_anchored", "ProjectedAdamW")) else 0.0
    if op == "ProjectedAdamW input" and launches[0].env["kp"] == 0:  # [wide] step, then project
        moved = [mv(4 * b, 3 * b, "p, g, m, v read once; p, m, v written once (the step)")]
        for launch in launches[1:]:
            basis = 4 * launch.env["kp"] * launch.env["units"] / rows
            anchors = 4 * launch.env["k"] / d
            moved.append(mv(b + anchors + basis, b, "p read once, written once; anchors read"))
        return moved
    if launches[0].kernel.startswith("mma_rows_kernel"):  # coefficients in shared memory
        moved = []
        for i, launch in enumerate(launches):  # a block of basis columns each ([columns])
            cols = launch.env["k"]
            basis = 4 * launch.env["kp"] * launch.env["units"] / rows
            anchors = 4 * cols / d if op.startswith(("project_anchored", "ProjectedAdamW")) else 0.0
            if op.startswith("ProjectedAdamW") and i == 0:
                note = "p, g, m, v read once; p, m, v written once; anchors read"
                moved.append(mv(4 * b + anchors + basis, 3 * b, note))
            else:
                x = "p" if op.startswith("ProjectedAdamW") else "x"
                note = f"{x} read once, written once" + ("; anchors read" if anchors else "")
                moved.append(mv(b + anchors + basis, b, note))
        return moved
    if op == "project_ output" and nseg == 1:  # the rows engine, fused
        return [mv(b + coef + basis, b + coef, "x read once, written once; coef")]
    if op == "project_ output":
        part = 4 * kp * nseg / d
        return [
            mv(b + basis, part, "x read, partials written"),
            mv(part, coef, "partials read, coef written"),
            mv(b + coef + basis, b, "x and coef read, x written"),
        ]
    if op == "ProjectedAdamW output":
        if nseg == 1:
            note = "p, g, m, v read once; p, m, v written once; coef; anchors read"
            return [mv(4 * b + coef + anchors + basis, 3 * b + coef, note)]
        part = 4 * kp * nseg / d
        # the partials pass reads p, g, m, v to form x' (m, v not stored: kFinal is false
        # there); the apply pass reads them again, forms x' once more and stores p, m, v
        return [
            mv(4 * b + basis, part, "p, g, m, v read, partials written"),
            mv(part + anchors, coef, "partials and anchors read, coef written"),
            mv(4 * b + coef + basis, 3 * b, "p, g, m, v and coef read, p, m, v written"),
        ]
    if op == "ProjectedAdamW input":
        return [mv(4 * b + coef + anchors + basis, 3 * b + coef,
                   "p, g, m, v read once; p, m, v written once; coef; anchors read")]  # fmt: skip
    note = "x read once, written once; coef" + ("; anchors read" if anchors else "")
    return [mv(b + coef + anchors + basis, b + coef, note)]


# ---------------------------------------------------------------- one kernel


def _eval(expr: str, env: dict) -> float:
    names = {"ceil": math.ceil, "log2": math.log2, "min": min, "max": max} | env
    return float(eval(expr, {"__builtins__": {}}, names))


def _holds(cond: str, env: dict) -> bool:
    """A model-cold-if condition; one naming what this launch lacks (another kernel's
    geometry) is about code this kernel does not contain: False."""
    try:
        return bool(_eval(cond, env))
    except NameError:
        return False


def match_loops(
    loops: list[pm.Loop],
    instrs: list[pm.Instr],
    chains: dict[int, tuple[tuple[str, int], ...]],
    cpp: dict[str, list[CppLoop]],
) -> list[CppLoop | None]:
    """The C++ loop each SASS loop came from (None: no match)."""

    per_instr = {ins.addr: _frames(chains, ins.addr) for ins in instrs}
    result: list[CppLoop | None] = []
    for n, lp in enumerate(loops):
        # its own instructions (not those of the SASS loops nested in it) decide
        body = [ins for ins in instrs if pm.innermost_loop(loops, ins.addr) == n]
        body = body or [ins for ins in instrs if lp.contains(ins.addr)]
        best = None
        for path, cands in cpp.items():
            for c in cands:
                if c.unrolled:
                    continue
                covered = sum(
                    any(p == path and c.first <= ln <= c.last for p, ln in per_instr[i.addr])
                    for i in body
                )
                if body and covered >= len(body) / 2:
                    if best is None or c.last - c.first < best.last - best.first:
                        best = c
        result.append(best)
    return result


def _asm_loop_trips(
    own: list[pm.Instr], chains: dict[int, tuple[tuple[str, int], ...]]
) -> tuple[str, int, str] | None:
    """(file, line, trips) of a SASS loop that no C++ loop holds but one inline ``asm``
    statement wrote (a PTX loop, e.g. mma_rows.cuh [async staging]'s spin on an mbarrier):
    most of its own instructions come from one line, the statement's last, whose ``model-trips``
    (on the statement's lines, or a comment-only line above them) gives the trips. None where
    there is no such annotation."""
    lines = Counter(f[0] for i in own if (f := _frames(chains, i.addr)))
    if not lines:
        return None
    (path, line), count = lines.most_common(1)[0]
    if 2 * count < len(own):
        return None
    with open(path) as f:
        text = f.read().split("\n")
    # the line table names the statement's last line: its `asm` a few lines up
    up = range(line, max(0, line - 10), -1)
    first = next((at for at in up if "asm" in text[at - 1]), None)
    m = None if first is None else _annotation(text, first, line, _TRIPS)
    return None if m is None else (path, first, m.group(1))


def _binds_env(
    body: list[pm.Instr],
    chains: dict[int, tuple[tuple[str, int], ...]],
    binds: dict[str, dict[int, tuple[str, str]]],
    env: dict,
) -> dict:
    """The launch's names plus the model-binds of the call sites the loop's instructions
    were inlined through (a name bound on several chains: the most common chain's)."""
    out = dict(env)
    bound: set[str] = set()
    for chain, _ in Counter(chains.get(i.addr, ()) for i in body).most_common():
        for path, line in chain:
            repo = _repo_path(path)
            if repo is not None and line in binds.get(repo, {}):
                name, expr = binds[repo][line]
                if name not in bound:
                    out[name] = _eval(expr, env)
                    bound.add(name)
    return out


def _copies(
    loops: list[pm.Loop],
    instrs: list[pm.Instr],
    chains: dict[int, tuple[tuple[str, int], ...]],
    cpp: dict[str, list[CppLoop]],
) -> list[str]:
    """What ptxas made of each C++ loop: unrolled copies, remainder loops, versions.

    * Unrolled: a global access of the loop's own source lines (outside any
      ``#pragma unroll`` loop) appears ``U`` times in the SASS loop: it runs ``trips / U``
      times (``U`` = the fewest copies of any such line).
    * Siblings (same parent, same C++ loop, same call sites): the main loop and its
      remainder, or unswitched versions of which one runs. The largest counts, the others
      nothing. Notes say which.
    """
    notes = []
    unrolled_spans = {
        (c.path, c.first, c.last) for cands in cpp.values() for c in cands if c.unrolled
    }
    groups: dict[tuple, list[int]] = {}
    size = {}
    for n, lp in enumerate(loops):
        if lp.source is None:
            continue
        path, first, last = lp.source
        own = [i for i in instrs if pm.innermost_loop(loops, i.addr) == n]
        size[n] = len(own)
        per_line: Counter = Counter()
        for ins in own:
            chain = chains.get(ins.addr, ())
            if pm.instr_class(ins.op) != "global" or not chain:
                continue
            repo, line = _repo_path(chain[0][0]), chain[0][1]
            inside = repo == path and first <= line <= last
            if inside and not any(
                p == path and f <= line <= la and (f, la) != (first, last)
                for p, f, la in unrolled_spans
            ):
                per_line[line] += 1
        unroll = min(per_line.values()) if per_line else 1
        if unroll > 1:
            lp.trips /= unroll
            lp.unroll = unroll
            notes.append(f"loop {lp.start:#x}-{lp.end:#x} ({os.path.basename(path)}:{first}): "
                         f"unrolled {unroll}x")  # fmt: skip
        body = [i for i in instrs if lp.contains(i.addr)]
        sites = Counter(chains.get(i.addr, ())[1:] for i in body).most_common(1)
        groups.setdefault((lp.parent, lp.source, sites[0][0] if sites else ()), []).append(n)
    for (_, src, _), idx in groups.items():
        if len(idx) < 2:
            continue
        keep = max(idx, key=lambda n: size[n])
        for n in idx:
            if n != keep:
                loops[n].trips = 0.0
        notes.append(f"{len(idx)} SASS loops from {os.path.basename(src[0])}:{src[1]} (remainder "
                     "or versions): the largest counted")  # fmt: skip
    return notes


def _line_key(frames: list[tuple[str, int]]) -> str:
    """``kernel.cuh:349 < policy.cu:72``: an instruction's outermost csrc/cuda frame (the
    kernel's line), then its innermost, where they differ."""
    if not frames:
        return "(no line)"
    names = [f"{os.path.basename(p)}:{ln}" for p, ln in (frames[-1], frames[0])]
    return names[0] if names[0] == names[1] else f"{names[0]} < {names[1]}"


def _cut_chains_cold(
    live: list[pm.Instr], chains: dict[int, tuple[tuple[str, int], ...]], cold_here: set[int]
) -> set[int]:
    """Instructions whose inline chain ptxas cut, cold where every call site they could
    have come from is. A complete chain ends in the kernel's own body, which nothing
    inlines, so a chain that other chains extend outward (the same innermost frames, more
    callers) was cut: code merged from several call sites keeps only the frames they share
    (adamw.cu's element path, inlined from mma_rows.cuh's ragged loads, model-cold-if, lost
    its two outer frames in 313 of its instructions in the bf16 pairs kernel: 0.19 warp
    instructions an element counted hot)."""
    by_chain: dict[tuple, list[int]] = {}
    for ins in live:
        by_chain.setdefault(tuple(_frames(chains, ins.addr)), []).append(ins.addr)
    extended: dict[tuple, list[tuple]] = {}
    for chain in by_chain:
        for n in range(1, len(chain)):
            extended.setdefault(chain[:n], []).append(chain)
    out: set[int] = set()
    for chain, addrs in by_chain.items():
        callers = extended.get(chain)
        if callers and all(a in cold_here for c in callers for a in by_chain[c]):
            out.update(addrs)
    return out


def analyze_kernel(
    sass: pm.Sass,
    chains: dict[int, tuple[tuple[str, int], ...]],
    env: dict,
    cpp: dict[str, list[CppLoop]],
    binds: dict[str, dict[int, tuple[str, str]]],
    by_line: dict[str, float] | None = None,
) -> dict:
    """Warp instructions and load bytes per block (all its work), by class and by region.
    ``by_line``: also adds each instruction's warp instructions per block to the key of its
    source line, ``file:line`` of the kernel's own frame, then its innermost
    (``mma_rows.cuh:349 < project.cu:72``)."""
    cold = [
        (path, first, last)
        for path, spans in _spans().items()
        for first, last, cond in spans
        if _holds(cond, env)
    ]

    uniform = [(p, f, la) for p, spans in _spans(_UNIFORM).items() for f, la, _ in spans]
    scaled = [(p, f, la, e) for p, spans in _spans(_SCALE).items() for f, la, e in spans]

    def within(ins: pm.Instr, spans: list) -> bool:
        frames = _frames(chains, ins.addr)
        return any(p == cp and f <= ln <= la for p, ln in frames for cp, f, la in spans)

    # a block's factor, evaluated once it is reached: for the average warp (``env``) and for
    # the busiest (``env["busiest"]`` overrides the names a warp's share depends on)
    factors: dict[int, float] = {}
    busiest_factors: dict[int, float] = {}
    busiest_env = env | env.get("busiest", {})

    def scale(ins: pm.Instr) -> tuple[float, float]:
        """The instruction's factor for the mean warp and for the busiest."""
        mean = busy = 1.0
        for n, (cp, f, la, expr) in enumerate(scaled):
            if within(ins, [(cp, f, la)]):
                if n not in factors:
                    factors[n] = _eval(expr, env)
                    busiest_factors[n] = _eval(expr, busiest_env)
                mean *= factors[n]
                busy *= busiest_factors[n]
        return mean, busy

    live = [i for i in pm.live_instrs(sass) if not i.cold]
    cold_here = {i.addr for i in live if within(i, cold)}
    cold_here |= _cut_chains_cold(live, chains, cold_here)
    instrs = [i for i in live if i.addr not in cold_here]
    loops = pm.find_loops(sass)
    matched = match_loops(loops, live, chains, cpp)
    notes = []
    for n, (lp, c) in enumerate(zip(loops, matched, strict=True)):
        where = f"loop {lp.start:#x}-{lp.end:#x}"
        body = [i for i in live if lp.contains(i.addr)]
        own = [i for i in body if pm.innermost_loop(loops, i.addr) == n]
        # A loop this launch does not run: its header (the instructions of the `for`
        # line: compare, increment, branch) is cold here, e.g. inlined through a cold call
        header = [
            i
            for i in own
            if c is not None
            and chains.get(i.addr)
            and _repo_path(chains[i.addr][0][0]) == c.path
            and chains[i.addr][0][1] == c.first
        ] or own
        if header and sum(i.addr in cold_here for i in header) * 2 > len(header):
            lp.trips = 0.0
            notes.append(f"{where}: not run by this launch (model-cold-if)")
            continue
        closing = next((i for i in live if i.addr == lp.end), None)
        if c is None and closing is not None and closing.op.startswith("BRA.U.ANY"):
            # ptxas's loop over the distinct values a warp's lanes give an operand that must
            # sit in a uniform register (mma_rows.cuh [async staging]: the bulk copy's, by
            # one thread): once where they are warp-uniform
            lp.trips = 1.0
            notes.append(f"{where}: a uniform operand's loop (BRA.U.ANY), once")
            continue
        asm_trips = _asm_loop_trips(own, chains) if c is None else None
        if asm_trips is not None:  # a loop written in inline PTX: its statement's model-trips
            path, line, trips = asm_trips
            lp.trips = _eval(trips, _binds_env(body, chains, binds, env))
            lp.source = (path, line, line)  # the `asm` line
            continue
        if c is None or c.trips is None:
            lp.trips = 1.0
            src = "no C++ loop" if c is None else f"{os.path.basename(c.path)}:{c.first}"
            notes.append(f"{where} ({src}): no model-trips, counted once")
            continue
        try:
            lp.trips = _eval(c.trips, _binds_env(body, chains, binds, env))
        except NameError as exc:
            raise NameError(f"{where} ({os.path.basename(c.path)}:{c.first}): {exc}") from None
        lp.source = (c.path, c.first, c.last)
    notes += _copies(loops, instrs, chains, cpp)

    def weight(addr: int) -> float:
        w, i = 1.0, pm.innermost_loop(loops, addr)
        while i is not None:
            w *= loops[i].trips
            i = loops[i].parent
        return w

    per_block = {c: 0.0 for c in pm.CLASSES}
    busiest = 0.0  # per block, every warp doing the busiest warp's instructions
    pipes: dict[str, float] = {}  # per block: FP32/FP64 warp instructions, tensor FMAs
    regions: dict[int | None, dict] = {}
    for ins in instrs:
        w = weight(ins.addr)
        f, f_busiest = scale(ins)
        per_block[pm.instr_class(ins.op)] += w * f
        busiest += w * f_busiest
        if by_line is not None:
            key = _line_key(_frames(chains, ins.addr))
            by_line[key] = by_line.get(key, 0.0) + w * f
        pm.add_pipe_work(pipes, ins.op, w * f)
        if ins.base in pm._LOADS and not within(ins, uniform):
            r = regions.setdefault(
                pm.innermost_loop(loops, ins.addr), {"issued": 0.0, "unscaled": 0.0}
            )
            r["issued"] += w * f * pm.access_bytes(ins.op)  # per thread
            r["unscaled"] += w * pm.access_bytes(ins.op)
    out_regions = []
    for idx, r in regions.items():
        body = [i for i in instrs if pm.innermost_loop(loops, i.addr) == idx]
        # loads a model-scale block skips are not in flight either: in proportion
        share = r["issued"] / r["unscaled"] if r["unscaled"] else 1.0
        out_regions.append(
            {
                "region": "straight-line" if idx is None else f"loop {loops[idx].start:#x}",
                "load_bytes_per_thread": r["issued"],
                "bytes_in_flight_per_thread": share
                * pm.bytes_in_flight(body, circular=idx is not None),
            }
        )

    def source(lp: pm.Loop, c: CppLoop | None) -> str | None:
        """The C++ loop a SASS loop came from, or the `asm` line of a PTX loop."""
        if c is not None:
            return f"{os.path.relpath(c.path, ROOT)}:{c.first}" + ("" if c.trips else " (no trips)")
        if lp.source is not None:
            return f"{os.path.relpath(lp.source[0], ROOT)}:{lp.source[1]}"
        return None

    loop_rows = [
        {"sass": f"{lp.start:#x}-{lp.end:#x}", "source": source(lp, c), "trips": lp.trips,
         "parent": lp.parent}
        for lp, c in zip(loops, matched, strict=True)
    ]  # fmt: skip
    return {
        "per_block": per_block,
        "busiest_per_block": busiest,
        "pipes": pipes,
        "regions": out_regions,
        "loops": loop_rows,
        "notes": notes,
    }


# ---------------------------------------------------------------- the build


@dataclass
class Build:
    """The disassembled kernels of one built extension, per arch, and their resources."""

    sass: dict[str, dict[str, pm.Sass]]  # arch -> demangled name -> SASS
    chains: dict[str, dict[str, dict]]  # arch -> demangled name -> addr -> chain
    usage: dict[tuple[str, str], Usage]  # (demangled, arch) -> resources
    so: str


@dataclass(frozen=True)
class Usage:
    """A kernel's resources from its cubin (``cuobjdump -res-usage``)."""

    registers: int
    local_bytes: int  # per thread: spills and stack arrays (0: none)
    static_smem: int


_RES_FUNC = re.compile(r"^\s*Function\s+([^\s:]+):")
_RES_USE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def parse_res_usage(text: str) -> dict[str, Usage]:
    """Mangled name → :class:`Usage` from ``cuobjdump -res-usage`` of one cubin."""
    out, name = {}, None
    for line in text.splitlines():
        if m := _RES_FUNC.match(line):
            name = m.group(1)
        elif name and (m := _RES_USE.search(line)):
            reg, stack, shared, local = map(int, m.groups())
            out[name] = Usage(reg, max(local, stack), shared)
            name = None
    return out


def load_build(so: str) -> Build:
    """Every CUDA kernel of a built ``_C*.so``, per arch: SASS, inline chains, resources.

    Resources come from the cubins themselves, so an incremental build (whose log only
    holds the ptxas lines of what it recompiled) loses nothing.
    """
    import cuda_compile_report as ccr

    sass: dict[str, dict[str, pm.Sass]] = {}
    chains: dict[str, dict[str, dict]] = {}
    usage: dict[tuple[str, str], Usage] = {}
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([pm._cuda_tool("cuobjdump"), "-xelf", "all", os.path.abspath(so)],
                       cwd=tmp, capture_output=True, check=True)  # fmt: skip
        for cubin in sorted(os.listdir(tmp)):
            arch = re.search(r"sm_\d+", cubin)
            if not cubin.endswith(".cubin") or arch is None:
                continue
            path = os.path.join(tmp, cubin)
            text = subprocess.run(
                [pm._cuda_tool("nvdisasm"), "-c", "-g", "-gi", path],
                capture_output=True, text=True, check=True,
            ).stdout  # fmt: skip
            funcs = {n: f for n, f in pm.parse_sass_all(text).items() if not n.startswith("$")}
            names = ccr.demangle(sorted(funcs))
            a = arch.group(0)
            sass.setdefault(a, {}).update({names[n]: f for n, f in funcs.items()})
            ch = sass_chains(text)
            chains.setdefault(a, {}).update({names[n]: ch[n] for n in funcs})
            res = subprocess.run(
                [pm._cuda_tool("cuobjdump"), "-res-usage", path],
                capture_output=True, text=True, check=True,
            ).stdout  # fmt: skip
            for mangled, u in parse_res_usage(res).items():
                if mangled in names:
                    usage[(names[mangled], a)] = u
    return Build(sass, chains, usage, so)


def _find(build: Build, arch: str, pattern: str) -> str:
    hits = [n for n in build.sass.get(arch, {}) if f"::{pattern}(" in n or f" {pattern}(" in n]
    hits = hits or [n for n in build.sass.get(arch, {}) if pattern in n]
    if len(hits) != 1:
        raise LookupError(f"{len(hits)} CUDA kernels match {pattern!r} on {arch}")
    return hits[0]


def _short(name: str) -> str:
    """``rows_kernel (fused)`` for a demangled instantiation."""
    base = re.findall(r"(\w+_kernel)\b", name)
    out = base[0] if base else name
    if mode := re.search(r"Mode\)(\d)", name):
        out += f" ({('fused', 'partials', 'apply')[int(mode.group(1))]})"
    return out


def _per_elt_by_line(by_line: dict[str, float], scale: float) -> dict[str, float]:
    """A kernel's warp instructions per block by source line, per element, most first."""
    return {key: v * scale for key, v in sorted(by_line.items(), key=lambda kv: -kv[1])}


def model_op(
    build: Build, op: str, dt: str, k: int, arch: str, d: int = pm.D, lines: bool = False
) -> dict:
    """The op's CUDA launches on the perf model's bucket (rows of ``d`` elements), predicted
    for ``arch``. ``lines``: each kernel also gets ``lines``, its warp instructions per
    element by source line (:func:`_line_key`), most first."""
    device = pm.DEVICES[arch]
    lim = arch_limits.ARCHS[arch]
    elements = pm.ROWS * d
    cpp, binds = _sources()
    kernels = []
    launches = op_launches(op, dt, k, d=d, smem_optin=lim.smem_optin_per_block)
    # the same launches for twice the rows: which kernels' work grows with the bucket
    twice = op_launches(op, dt, k, 2 * pm.ROWS, d, lim.smem_optin_per_block)
    if [t.kernel for t in twice] != [launch.kernel for launch in launches]:
        raise RuntimeError(f"{op} {dt} k = {k}: other kernels at twice the rows")
    for launch, at_twice in zip(launches, twice, strict=True):
        name = _find(build, arch, launch.kernel)
        rec = build.usage.get((name, arch))
        if rec is None:
            raise LookupError(f"no resource usage for {name} on {arch} in the cubin")
        regs, static, spills = rec.registers, rec.static_smem, rec.local_bytes
        blocks, limiter = arch_limits.blocks_per_sm(
            regs, launch.threads, static + launch.dynamic_smem, lim
        )
        grid = balanced_grid(blocks * device.sms, launch.work, device.sms)
        env = launch.env | {
            "items": launch.work / grid,
            "vec": bool(re.search(r"Policy<[^<>]*, true>", launch.kernel)),  # its kVec
            "block": "BlockPolicy" in launch.kernel,  # its vectors hold one element of 4 rows
            "amsgrad": False,  # the modelled AdamW step
        }
        by_line: dict[str, float] | None = {} if lines else None
        got = analyze_kernel(
            build.sass[arch][name], build.chains[arch][name], env, cpp, binds, by_line
        )
        scale = grid * launch.threads // 32 / elements
        instrs = {c: v * scale for c, v in got["per_block"].items()}
        instrs["total"] = sum(instrs.values())
        busiest = got["busiest_per_block"] * scale
        pipe_per_elt = {p: v * scale for p, v in sorted(got["pipes"].items())}
        for r in got["regions"]:
            r["load_bytes_per_elt"] = r["load_bytes_per_thread"] * launch.threads * grid / elements
            r["bytes_in_flight_per_sm"] = r["bytes_in_flight_per_thread"] * launch.threads * blocks
        kernels.append(
            {
                "kernel": _short(name),
                "instantiation": name,
                "work": launch.work,
                "work_at_twice": at_twice.work,
                "grid": grid,
                "regs": regs,
                "spills": spills,
                "smem": static + launch.dynamic_smem,
                "blocks_per_sm": blocks,
                "warps": launch.threads // 32,
                "occupancy_limiter": limiter,
                "instrs_per_elt": instrs,
                "busiest_instrs_per_elt": busiest,
                "staged_bytes_per_elt": grid * launch.env.get("staged", 0) / elements,
                "pipe_per_elt": pipe_per_elt,
                "regions": got["regions"],
                "loops": got["loops"],
                "notes": got["notes"],
            }
            | ({} if by_line is None else {"lines": _per_elt_by_line(by_line, scale)})
        )
    moved_per_launch = hbm_bytes(op, dt, k, d=d, smem_optin=lim.smem_optin_per_block)
    for kn, moved in zip(kernels, moved_per_launch, strict=True):
        kn["bytes_per_elt"] = moved
        kn["bounds"] = pm.kernel_bounds(kn, device)
    times = [kn["bounds"]["s_per_elt"] for kn in kernels]
    floor = pm.OPS[op].floor_bytes(dt, k)
    failed = any(kn["blocks_per_sm"] == 0 for kn in kernels)
    dominant = max(kernels, key=lambda kn: kn["bounds"]["s_per_elt"])
    row = {
        "arch": arch,
        "device": device.name,
        "backend": "cuda",
        "op": op,
        "dtype": dt,
        "k": k,
        "d": d,
        "elements": elements,
        "floor": pm.OPS[op].floor,
        "floor_bytes_per_elt": floor,
        "bytes_per_elt": sum(kn["bytes_per_elt"]["read"] + kn["bytes_per_elt"]["write"]
                             for kn in kernels),
        "instrs_per_elt": {
            c: sum(kn["instrs_per_elt"][c] for kn in kernels) for c in (*pm.CLASSES, "total")
        },
        "s_per_elt": sum(times),
        "limiter": "launch fails" if failed else dominant["bounds"]["limiter"],
        "limiting_kernel": dominant["kernel"],
        "predicted_fraction_of_copy": (
            0.0 if failed else pm.predicted_fraction(floor, times, device)
        ),
        "kernels": kernels,
    }  # fmt: skip
    return row


# ---------------------------------------------------------------- report


def _cell(row: dict) -> str:
    f = row["predicted_fraction_of_copy"]
    if row["op"].startswith("ProjectedAdamW"):
        return "fails" if f == 0 else f"{1 / f:.2f}× torch"
    return f"{f:.0%}"


def format_table(rows: list[dict]) -> str:
    head = ("GPU", "op", "dtype", "k", "predicted (of copy)", "limiter", "kernel",
            "B/elt (HBM; L2 staging)",
            "instr/elt (fma/tensor/glob/shr/other)", "regs", "smem KiB", "blocks/SM",
            "in flight KiB/SM")  # fmt: skip
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['device']} | {r['op']} | {r['dtype']} | {r['k']} | error: "
                       f"{r['error'][:120]} |" + " |" * 8)  # fmt: skip
            continue
        kn = next(x for x in r["kernels"] if x["kernel"] == r["limiting_kernel"])
        c = r["instrs_per_elt"]
        flight = max((x["bytes_in_flight_per_sm"] for x in kn["regions"]), default=0.0)
        short = kn["kernel"]
        cells = (
            r["device"], r["op"], r["dtype"], str(r["k"]), _cell(r), r["limiter"], short,
            f"{r['bytes_per_elt']:.2f} (floor {r['floor_bytes_per_elt']:g}"
            + (f"; staged {staged:.2f})" if (staged := kn.get("staged_bytes_per_elt")) else ")"),
            f"{c['total']:.2f} (" + "/".join(f"{c[x]:.2f}" for x in pm.CLASSES) + ")",
            str(kn["regs"]), f"{kn['smem'] / 1024:.1f}", str(kn["blocks_per_sm"]),
            f"{flight / 1024:.1f}",
        )  # fmt: skip
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


# Other row widths of SD-family models (the main table is pm.D = 768, SD 1.5's text width):
# the UNet's 320 / 640 / 1280 channels, SD 2's 1024 text width, SDXL's 2048. The ops a
# width changes the kernel choice of (the flat side and surgery do not depend on d).
WIDTHS = (320, 640, 1024, 1280, 2048)
WIDTH_OPS = ("project_ input", "project_ output", "project_anchored input", "ProjectedAdamW input")
WIDTH_KS = (1, 8, 32)


def width_table(rows: list[dict]) -> str:
    """One line per (op, dtype, width): k = 1 / 8 / 32, A100 · H100."""
    cells: dict = {}
    for r in rows:
        cells.setdefault((r["op"], r["dtype"], r["d"]), {}).setdefault(r["arch"], []).append(
            "error" if "error" in r else _cell(r).replace(" torch", "")
        )
    out = ["| predicted, not measured | `d` | A100 k = 1 / 8 / 32 | H100 k = 1 / 8 / 32 |",
           "|---|---|---|---|"]  # fmt: skip
    for (op, dt, d), by_arch in cells.items():
        line = [f"`{op}` {dt}", str(d)] + [" / ".join(by_arch.get(a, [])) for a in pm.DEVICES]
        out.append("| " + " | ".join(line) + " |")
    return "\n".join(out)


def markdown(result: dict) -> str:
    devices = "\n".join(
        f"- {d.arch} = {d.name}: {d.source}; L2 {d.l2_bytes_per_s / 1e12:.1f} TB/s: {d.l2_source}"
        for d in pm.DEVICES.values()
    )
    return f"""# CUDA kernels: {pm.TITLE.lower()}

Generated by `python benchmarks/perf_model_cuda.py` on {result["date"]} from
`{result["so"]}` (the `csrc/cuda` of then, built for sm_80 and sm_90 as `make
cuda-compile-check` builds it). Every figure is a **prediction**: the instructions come from
the SASS, each loop's trip count from the `// model-trips:` comment on its C++ loop, the
bytes from the kernels' design (`hbm_bytes`); nothing ran on a GPU. Same ops, bucket,
floors, devices and bounds as the Triton model ([perf_model.md](perf_model.md)), so the
two tables compare the backends.

{devices}

{format_table(result["rows"])}

Other widths (the same bucket of {pm.ROWS} rows; ProjectedAdamW as time over torch's fused
AdamW), also predicted:

{width_table(result.get("widths", []))}

Notes: a CUDA kernel loops over its work grid-stride, block b over items b, b + grid,
... on SM b % SMs; the launch lasts as long as its busiest SM and block
(`perf_model.waves`: at this bucket an A100's 256 tiles on 86 blocks last 3 tiles, 1.27×
the even 256 / 108; a kernel of fixed work, the flat side's combine, counted evenly);
side input (plain and anchored) runs the tensor-core rows kernel (`mma_rows_kernel`: 16
rows a CTA, U staged once per CTA, a block of its columns a launch where the whole does
not fit the device's shared memory; the staging's copy from L2 adds to the kernel's
time: *staging*, the limiter where it outlasts the tiles) at every k, and so does
`ProjectedAdamW` input (AdamWPolicy: x' formed from p, g, m, v as its tile starts; fp32
from k = {ADAMW_ROWS_MIN_K["fp32"]}, below on the FMA engine); side output (transposed
views) runs it too, with strided rows (`ProjectPolicy<T, false>`; 16-bit in row pairs,
`ProjectPairPolicy<T>` and `AdamWPairPolicy<T>`: the bucket's views have even row
counts), and otherwise the rows kernel with a block policy (4 view rows a group, a
vector of G's row holding one element of each), so `D` = {pm.D} is one segment, read
once and written once; the flat side's vectors are cut into 4096-element segments and
split into partials, combine and apply.
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--so", help="a built gradproj _C*.so with CUDA kernels (default: build one)")
    ap.add_argument("--arch", nargs="+", default=list(pm.DEVICES))
    ap.add_argument("--json", default=DEFAULT_JSON)
    ap.add_argument("--md", default=DEFAULT_MD)
    ap.add_argument("--no-widths", action="store_true", help="skip the sweep over WIDTHS")
    ap.add_argument(
        "--lines", nargs=4, metavar=("OP", "DTYPE", "K", "D"),
        help="only print one op's warp instructions per element by source line, per kernel "
        "and arch (e.g. --lines 'project_ input' bf16 8 768); writes no JSON",
    )  # fmt: skip
    ap.add_argument("--top", type=int, default=25, help="--lines: the lines printed a kernel")
    args = ap.parse_args(argv)
    if args.lines and args.lines[0] not in OPS:
        ap.error(f"--lines: op {args.lines[0]!r} is not one of {', '.join(OPS)}")
    so = args.so or pm.build_cuda()[0]
    build = load_build(so)
    if args.lines:
        op, dt, k, d = args.lines
        for arch in args.arch:
            row = model_op(build, op, dt, int(k), arch, int(d), lines=True)
            for kn in row["kernels"]:
                total = kn["instrs_per_elt"]["total"]
                print(f"\n{arch} {kn['instantiation']}: {total:.3f} warp instructions / element")
                for key, v in list(kn["lines"].items())[: args.top]:
                    print(f"  {v:8.4f}  {100 * v / total:5.1f} %  {key}")
        return 0
    rows = []
    for arch in args.arch:
        for op in OPS:
            for dt in pm.DTYPES:
                for k in pm.KS:
                    try:
                        rows.append(model_op(build, op, dt, k, arch))
                    except Exception as exc:  # a missing kernel is a finding of its row
                        rows.append({"arch": arch, "device": pm.DEVICES[arch].name, "op": op,
                                     "dtype": dt, "k": k, "error": f"{type(exc).__name__}: {exc}",
                                     "predicted_fraction_of_copy": 0.0})  # fmt: skip
    widths = []
    for op in () if args.no_widths else WIDTH_OPS:
        for dt in pm.DTYPES:
            for d in WIDTHS:
                for arch in args.arch:
                    for k in WIDTH_KS:
                        try:
                            widths.append(model_op(build, op, dt, k, arch, d))
                        except Exception as exc:
                            widths.append({"arch": arch, "op": op, "dtype": dt, "k": k, "d": d,
                                           "error": f"{type(exc).__name__}: {exc}"})  # fmt: skip
    for r in widths:  # the sweep keeps the totals, not each kernel's detail
        r.pop("kernels", None)
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    so_rel = os.path.relpath(so, ROOT) if so.startswith(ROOT) else so.replace(
        os.path.expanduser("~"), "~")  # fmt: skip
    result = {
        "title": pm.TITLE,
        "date": now,
        "so": so_rel,
        "shape": {"rows": pm.ROWS, "d": pm.D},
        "devices": {a: asdict(pm.DEVICES[a]) for a in args.arch},
        "rows": rows,
        "widths": widths,
    }
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    with open(args.md, "w") as f:
        f.write(markdown(result))
    print(format_table(rows))
    print(f"\n{len(rows)} rows; {pm.TITLE.lower()}.")
    print(width_table(widths))
    failed = [r for r in rows + widths if "error" in r]
    for r in failed:
        print(
            f"error: {r['arch']} {r['op']} {r['dtype']} k = {r['k']} d = {r.get('d', pm.D)}: "
            f"{r['error']}"
        )
    return 1 if failed else 0  # as benchmarks/perf_model.py: a row that failed fails the run


if __name__ == "__main__":
    sys.exit(main())
