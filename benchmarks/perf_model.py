#!/usr/bin/env python3
"""Static GPU performance model of gradproj's Triton kernels (predicted from compiled code).

    python benchmarks/perf_model.py [--arch sm_80 sm_90] [--json benchmarks/results/perf_model.json]
                                    [--md docs/perf_model.md] [--quick] [--jobs N] [--cuda]

For each op (``project_`` on sides input/output/flat, the anchored projection,
``ProjectedAdamW``, ``surgery_``), dtype (fp32, bf16) and basis size k ∈ {1, 8, 32,
128}, the op's real bucket launcher (the launches of ``scripts/gpu_compile_check.py``)
is called with CPU tensors under that script's stand-in driver: every Triton kernel the
op launches is compiled for the target (A100 = sm_80, H100 = sm_90), nothing runs. Then,
per compiled kernel, from its SASS (``nvdisasm`` shipped in ``triton/backends/nvidia/bin``)
with the line table Triton compiles in:

* loops: backward branches; each loop is matched to the Python ``for`` of the kernel
  source it came from (the innermost ``for`` holding most of its instructions, nested
  as the SASS loops nest), and its trip count evaluated from that ``range(...)`` and the
  launch's arguments (``D / BLOCK_D``, ``K / BLOCK_K``, ``CHUNK / BLOCK``...); a persistent
  loop (``range(program_id(0), n, num_programs(0))``) counts its mean trips per program,
  ``n / programs``; ``tl.static_range`` is unrolled when traced, so it is no loop. A loop
  whose bounds come from device memory counts once (flagged). Nothing about today's kernels
  is hard-coded: kernels are found by name at run time, loops through the line table;
* instructions issued per element: every SASS instruction weighted by the trip counts of
  the loops around it, times the warps of a program, times the programs of the grid,
  over the op's elements; by class (``fma``: FP32/FP16/FP64 arithmetic, ``tensor``:
  HMMA/HGMMA, ``global``: LDG/STG/LDGSTS/atomics, ``shared``: LDS/STS/LDSM, ``other``).
  These are *warp* instructions: one issue slot of one scheduler each;
* global bytes per element: every global access weighted like the instructions, at its
  width (LDG.E.128: 16 B a thread). The tensor it addresses is found in the source
  (``tl.load``/``tl.store`` pointer traced back to a kernel argument or to an address
  loaded from a device table). Accesses to gradient-sized tensors (addresses from a
  table, or an argument that grows with the bucket) count every time the kernel makes
  them: a second pass over a row block counts twice. Tensors that do not grow with the
  bucket (a basis ``d × k``, weights) count once per launch (later reads hit cache). A
  scalar load (no ``tl.arange`` in its address) counts once per program;
* registers (``ptxas -v``, as the compile check), shared memory (Triton's metadata) →
  resident blocks per SM (``gpu_compile_check.blocks_per_sm``);
* bytes in flight per SM: in each loop body (and the straight-line code), the most bytes
  of global loads a thread has issued and not yet consumed (register dependences in the
  SASS; ``LDGSTS`` groups held by ``DEPBAR.LE SB0, N``), times the resident threads.

From those, per kernel, lower bounds on the time per element; the largest wins:

* memory: bytes per element / the device's copy bandwidth (read + write counted);
* issue: warp instructions per element / (SMs × 4 schedulers × clock);
* pipes: FP32 arithmetic (FFMA/FMUL/FADD) per element × 32 / (SMs × FP32 lanes per SM ×
  clock), the same for FP64, and the MMAs' dense FMAs per element / (SMs × the tensor
  cores' FMAs per clock for that instruction and input type): an A100 has half the FP32
  lanes per SM of an H100, and 3xTF32 at k = 128 needs more tensor-core time than copy;
* latency (Little's law): load bytes a thread issues per element × latency / (bytes in
  flight per SM × SMs): with fewer bytes in flight than bandwidth × latency, the loads
  cannot keep HBM busy;
* occupancy: warp instructions per element × the cycles a warp waits between two of its
  instructions (``WARP_CPI``, measured) / (SMs × resident warps per SM × clock): a
  scheduler issues only when one of its warps is ready, and with fewer resident warps
  than ``WARP_CPI`` per scheduler it idles. The instructions are the busiest warp's where a
  kernel's warps differ (perf_model_cuda: warps past ``d``, the row cache's lookups), since
  a CTA's warps meet at barriers every tile. Nsight Compute measured 8.1–8.7 cycles per
  issued instruction for the CUDA row kernels on an H200 (FMA engine and tensor cores,
  fp32 and bf16), and the whole run's measured kernel times agree with this bound where
  the model without it was 2–10× optimistic (``benchmarks/model_check.py``,
  tests/test_perf_model.py).

Those bounds assume every SM holds its resident blocks and the work is even. A launch's
grid says otherwise (``waves``): 64 programs on an H100's 132 SMs leave 68 idle; an
A100's 256 tiles on 86 blocks last 3 tiles, not 256 / 108; 512 programs on 432 slots
run a second wave of 80. Each wave takes the largest of its bounds, each scaled by the
share it depends on (``bounds`` ``spread``): the device's elements (memory, staging),
the busiest SM's (issue, pipes, latency), the busiest block's (occupancy).

An op's predicted time is the sum over its kernels; its predicted ceiling is the time a
copy of the op's essential bytes takes at the copy roofline over that time (project_:
read and write each gradient element once, and for side="flat", whose D × k basis is as
large as k gradients, read the fp32 basis once for the bucket; ProjectedAdamW: torch's
fused AdamW bytes, p, g, m, v read and p, m, v written, assuming torch's fused AdamW runs
at the copy roofline, i.e. the figure is "× torch fused AdamW speed"; surgery_: read both
gradients once, write the one that changes).

What it does not model (so it can be wrong both ways): coalescing (it assumes every
32-byte sector fetched is used: a layout with a warp's lanes down the rows moves up to 8×
the bytes counted), masks (every lane of an access counts, so a tile padded past ``D``
counts its masked columns as moved), cache hits on re-reads (a second pass counts as HBM
traffic even when the row block is still in L2: pessimistic), the MUFU and INT pipes,
tensor cores below their peak, dependent-instruction stalls, shared-memory bank conflicts
and barriers one by one (only on average, through the measured ``WARP_CPI``), the
latency of a kernel of fixed work (a few blocks between passes, e.g. the flat side's
combine: counted as if spread over every SM, see ``launch_waves``), launch overhead and
the small torch ops and kernels between the modelled ones
(``ProjectedAdamW``'s bias corrections: one thread a param, adamw.cu ``bias_kernel``). Both
sides of a branch count (except a call to a slow path, e.g. sqrt_rn's denormal path).
It is a prediction: ``scripts/gpu_check.sh`` on a GPU is what measures.

``--cuda`` also builds ``csrc/`` as ``make cuda-compile-check`` does (its CUDA venv,
``nvcc -Xptxas -v``, sm_80 and sm_90) into ``~/.cache/gradproj/perf_model_cuda`` (kept:
ninja rebuilds what changed) and lists, per template instantiation and arch (disassembled
by ``perf_model_cuda.load_build``), each innermost SASS loop per iteration: instructions by
class, bytes a thread moves, bytes in flight, registers. Per element, with the trip counts
of the C++ sources: ``benchmarks/perf_model_cuda.py``.

Time (2 cores): about 10 s of CPU per (op, dtype, k, arch) once Triton's cache holds the
kernels (the compile check's launches use the same specialisations, two tensors a bucket);
compiling from an empty cache is the compile check's cost.

The SASS parser and the bound arithmetic are importable without compiling anything
(``tests/test_perf_model.py``); compiling needs ``TRITON_INTERPRET=0`` (the check's
stand-in driver refuses the interpreter).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import datetime
import functools
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_JSON = os.path.join(ROOT, "benchmarks", "results", "perf_model.json")
DEFAULT_MD = os.path.join(ROOT, "docs", "perf_model.md")
TITLE = "Predicted from compiled code, not measured"


# ---------------------------------------------------------------- devices


# Cycles between two issued instructions of one warp ("Warp Cycles Per Issued Instruction"),
# measured by Nsight Compute on the H200 of run 2b for the four launches it profiled, CUDA
# row kernels: 8.08 / 8.07 (tensor cores, bf16 k = 1 / 8), 8.29 (FMA engine, fp32 k = 8),
# 8.73 (tensor cores, fp32 k = 32): benchmarks/results/gpu-H200-2026-12-04b/ncu_*.txt.
# Their mean. The same figure is assumed for the Triton kernels and for the A100.
WARP_CPI = 8.29
WARP_CPI_SOURCE = (
    "cycles between a warp's issued instructions: the mean of 8.08 / 8.07 / 8.29 / 8.73, "
    "measured by Nsight Compute for four CUDA row kernel launches on an H200 (run 2b, "
    "ncu_project_input_*.txt), assumed for every kernel and both GPUs"
)


@dataclass(frozen=True)
class Device:
    """The figures the bounds use, with where each comes from."""

    name: str
    arch: str
    sms: int
    clock_hz: float
    copy_bytes_per_s: float  # device-to-device copy, bytes read + written per second
    latency_s: float  # global load latency under load (Little's law)
    source: str
    schedulers_per_sm: int = 4
    fp32_lanes_per_sm: int = 128  # FFMA/FMUL/FADD results per SM per clock
    fp64_lanes_per_sm: int = 64
    # dense tensor-core FMAs per SM per clock, by SASS instruction family and input type
    mma_fma_per_clock: dict = field(default_factory=dict)
    pipes_source: str = ""
    warp_cpi: float = WARP_CPI  # cycles between a warp's issued instructions (occupancy)
    l2_bytes_per_s: float = 0.0  # L2 -> SM read bandwidth, all SMs (staging); 0: not counted
    l2_source: str = ""


LATENCY_S = 700e-9  # middle of the 600–800 ns that loaded HBM latency is usually quoted at
L2_BYTES_PER_CLOCK_A100 = 5120  # A100 whitepaper: L2 read bandwidth, all SMs together

DEVICES = {
    "sm_80": Device(
        "A100-SXM4-80GB",
        "sm_80",
        sms=108,
        clock_hz=1.410e9,
        copy_bytes_per_s=1.7e12,
        latency_s=LATENCY_S,
        source="108 SMs and 1410 MHz boost clock: NVIDIA A100 whitepaper; copy 1.7 TB/s: an "
        "estimate (about 83% of the 2.04 TB/s HBM2e peak), not measured by this project",
        fp32_lanes_per_sm=64,
        fp64_lanes_per_sm=32,
        mma_fma_per_clock={"HMMA": {"f16": 1024, "tf32": 512}},
        pipes_source="64 FP32 and 32 FP64 lanes per SM, 4 tensor cores of 256 dense FP16 FMAs "
        "a clock (312 TFLOPS FP16/BF16, 156 TF32): NVIDIA A100 whitepaper",
        l2_bytes_per_s=L2_BYTES_PER_CLOCK_A100 * 1.410e9,
        l2_source="L2 read bandwidth 5120 bytes a clock (2.3x V100's): NVIDIA A100 whitepaper",
    ),
    "sm_90": Device(
        "H100-SXM5-80GB",
        "sm_90",
        sms=132,
        clock_hz=1.980e9,
        copy_bytes_per_s=3.0e12,
        latency_s=LATENCY_S,
        source="132 SMs: NVIDIA H100 whitepaper (SXM5); 1980 MHz: its maximum boost clock; "
        "copy 3.0 TB/s: measured on the project's H100 (../shared/ENV.md; H200: 4.3 TB/s, "
        "same SASS)",
        fp32_lanes_per_sm=128,
        fp64_lanes_per_sm=64,
        mma_fma_per_clock={
            "HGMMA": {"f16": 2048, "tf32": 1024},
            "HMMA": {"f16": 1024, "tf32": 512},
        },
        pipes_source="128 FP32 and 64 FP64 lanes per SM, dense tensor-core FMAs per SM twice "
        "A100's clock for clock (2048 FP16, 1024 TF32): NVIDIA H100 whitepaper, reached "
        "through wgmma (HGMMA); mma.sync (HMMA), which Triton emits for these kernels' "
        "16-row dots, is an assumption: taken at A100's per-SM rate, half of wgmma's",
        l2_bytes_per_s=L2_BYTES_PER_CLOCK_A100 / 108 * 132 * 1.980e9,
        l2_source="L2 read bandwidth an assumption (NVIDIA publishes none for H100): A100's "
        "5120 bytes a clock per SM (47.4), times 132 SMs at 1980 MHz, 12.4 TB/s; "
        "scripts/gpu_check.sh's model check is where a GPU tells",
    ),
}

# The GPU the project's runs measured (benchmarks/results/gpu-H200-2026-12-04b): sm_90 as
# the H100 above (the same SASS), with what that run measured: the copy peer of its
# fp32 rows (2 × 16384 × 768 fp32 read and written, 201 MB in 0.052 ms, L2 flushed) and
# the SM clock Nsight Compute saw (131 056 cycles in 72.93 us, unlocked clocks). For
# ``predicted_fraction_for``: the model's rows against that run's kernel times.
H200 = replace(
    DEVICES["sm_90"],
    name="H200 (measured copy and clock)",
    clock_hz=1.80e9,
    copy_bytes_per_s=3.87e12,
    # the H100's L2 bytes a clock, at this clock
    l2_bytes_per_s=DEVICES["sm_90"].l2_bytes_per_s * 1.80e9 / DEVICES["sm_90"].clock_hz,
    source="132 SMs as the H100; copy 3.87 TB/s and 1.80 GHz measured by run 2b "
    "(benchmarks/results/gpu-H200-2026-12-04b)",
)


# ---------------------------------------------------------------- SASS


@dataclass
class Instr:
    """One SASS instruction, with the Python source locations it came from."""

    addr: int
    op: str  # opcode with modifiers, e.g. LDG.E.128
    operands: str
    pred: str = ""
    loc: tuple[tuple[str, int], ...] = ()  # (file, line), innermost (inlined) first
    target: str | None = None  # branch target label
    cold: bool = False  # on a slow path (a call to a runtime routine): not counted

    @property
    def base(self) -> str:
        return self.op.split(".", 1)[0]


@dataclass
class Sass:
    """The instructions of one function and its labels (label → address)."""

    name: str
    instrs: list[Instr]
    labels: dict[str, int]


# the opcode takes lower case too: wgmma shapes (HGMMA.64x32x8)
_INSTR = re.compile(
    r"^\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Za-z0-9_.]*)\s*(.*?)\s*;"
)
_LOC = re.compile(r'//## File "([^"]+)", line (\d+)')
_LABEL = re.compile(r"^([.$\w][\w.$]*):\s*$")
_TYPE = re.compile(r"^\s*\.type\s+([^,\s]+)\s*,\s*@function")
_TARGET = re.compile(r"`\(([^)]+)\)")


def parse_sass(text: str, function: str | None = None) -> Sass:
    """The instructions of ``function`` (default: the first) in ``nvdisasm -g -gi`` output.

    A run of ``//## File ..., line N [inlined at ...]`` comments gives the following
    instructions their location chain, innermost (the inlined helper's line) first and
    the kernel's own line last. Slow paths are marked ``cold``: the instructions from the
    branch before a ``CALL`` up to the unconditional ``BRA`` after it.
    """
    funcs = parse_sass_all(text)
    if not funcs:
        raise ValueError("no function in the SASS (expected nvdisasm output with .type lines)")
    return funcs[function if function is not None else next(iter(funcs))]


def parse_sass_all(text: str) -> dict[str, Sass]:
    """Every function of ``nvdisasm -g -gi`` output, by name, in order (see parse_sass)."""
    funcs: dict[str, Sass] = {}
    current: Sass | None = None
    chain: list[tuple[str, int]] = []
    loc: tuple[tuple[str, int], ...] = ()
    in_comments = False
    pending_labels: list[str] = []
    for line in text.splitlines():
        if m := _TYPE.match(line):
            current = funcs.setdefault(m.group(1), Sass(m.group(1), [], {}))
            loc, in_comments = (), False
            continue
        if current is None:
            continue
        if line.lstrip().startswith("//##"):
            if not in_comments:
                chain = []
                in_comments = True
            if m := _LOC.search(line):
                chain.append((m.group(1), int(m.group(2))))
            continue
        if in_comments:
            loc = tuple(chain)
            in_comments = False
        if m := _LABEL.match(line.strip()):
            pending_labels.append(m.group(1))
            continue
        if m := _INSTR.match(line):
            ins = Instr(
                addr=int(m.group(1), 16),
                op=m.group(3),
                operands=m.group(4),
                pred=(m.group(2) or "").strip(),
                loc=loc,
            )
            if t := _TARGET.search(ins.operands):
                ins.target = t.group(1)
            for label in pending_labels:
                current.labels[label] = ins.addr
            pending_labels = []
            current.instrs.append(ins)
    for sass in funcs.values():
        _mark_cold(sass.instrs, sass.labels)
    return funcs


def _mark_cold(instrs: list[Instr], labels: dict[str, int]) -> None:
    # ptxas puts rare paths (sqrt_rn's denormal case, fp64 division's hard case) behind a
    # branch around a CALL to a runtime routine; the fast path is what the hot loop runs.
    # A CALL to an EXIT is not one: ptxas leaves a persistent loop that way (`@P CALL.REL.NOINC`
    # to an EXIT, then the back edge), and marking it cold took the loop's own compare and
    # branch, so the CUDA model judged the whole loop not run.
    at = {ins.addr: ins for ins in instrs}
    for i, ins in enumerate(instrs):
        if ins.base != "CALL":
            continue
        dest = at.get(labels.get(ins.target or "", -1))
        if dest is not None and dest.base == "EXIT":
            continue
        lo = next((j for j in range(i - 1, max(i - 8, -1), -1) if instrs[j].base == "BRA"), None)
        hi = next(
            (
                j
                for j in range(i + 1, min(i + 8, len(instrs)))
                if instrs[j].base == "BRA" and not instrs[j].pred
            ),
            None,
        )
        first, last = (lo + 1, hi) if lo is not None and hi is not None else (i, i)
        for j in range(first, last + 1):
            instrs[j].cold = True


def live_instrs(sass: Sass) -> list[Instr]:
    """Instructions that can execute: up to the end-of-kernel trap (``BRA`` to itself)."""
    out = []
    for ins in sass.instrs:
        if ins.base == "BRA" and ins.target is not None and sass.labels.get(ins.target) == ins.addr:
            break
        out.append(ins)
    return out


@dataclass
class Loop:
    """A SASS loop: instructions from ``start`` to the backward branch at ``end``."""

    start: int
    end: int
    parent: int | None = None  # index in the loop list
    children: list[int] = field(default_factory=list)
    source: tuple[str, int, int] | None = None  # (file, first line, last line) of its `for`
    trips: float = 1.0  # times the SASS body runs (source iterations / unroll)
    trips_note: str = ""
    unroll: int = 1  # copies of the source body in the SASS body

    def contains(self, addr: int) -> bool:
        return self.start <= addr <= self.end


def find_loops(sass: Sass) -> list[Loop]:
    """Loops from backward branches; overlapping ranges merged; nesting by containment.

    Sorted outermost first (by start, then by length, longest first).
    """
    spans: list[list[int]] = []
    for ins in live_instrs(sass):
        if ins.base not in ("BRA", "JMP") or ins.target is None:
            continue
        target = sass.labels.get(ins.target)
        if target is None or target > ins.addr or target == ins.addr:
            continue
        spans.append([target, ins.addr])
    merged = True
    while merged:  # two branches to one head (a `continue`), or irreducible overlap: one loop
        merged = False
        for i in range(len(spans)):
            for j in range(i + 1, len(spans)):
                a, b = spans[i], spans[j]
                nested = (a[0] <= b[0] and b[1] <= a[1]) or (b[0] <= a[0] and a[1] <= b[1])
                overlap = a[0] <= b[1] and b[0] <= a[1]
                if a[0] == b[0] or (overlap and not nested):
                    spans[i] = [min(a[0], b[0]), max(a[1], b[1])]
                    del spans[j]
                    merged = True
                    break
            if merged:
                break
    spans.sort(key=lambda s: (s[0], -(s[1] - s[0])))
    loops = [Loop(s, e) for s, e in spans]
    for i, lp in enumerate(loops):
        holders = [
            j
            for j, other in enumerate(loops)
            if j != i and other.start <= lp.start and lp.end <= other.end
        ]
        if holders:
            lp.parent = min(holders, key=lambda j: loops[j].end - loops[j].start)
            loops[lp.parent].children.append(i)
    return loops


def innermost_loop(loops: list[Loop], addr: int) -> int | None:
    best = None
    for i, lp in enumerate(loops):
        if lp.contains(addr) and (
            best is None or lp.end - lp.start < loops[best].end - loops[best].start
        ):
            best = i
    return best


CLASSES = ("fma", "tensor", "global", "shared", "other")
_TENSOR = {"HMMA", "HGMMA", "IMMA", "IGMMA", "DMMA", "BMMA", "QGMMA", "BGMMA", "UTCHMMA", "UTCQMMA"}
_FMA = {
    "FFMA", "FMUL", "FADD", "FMNMX", "FFMA2", "FMUL2", "FADD2", "HFMA2", "HMUL2", "HADD2",
    "HMNMX2", "DFMA", "DMUL", "DADD",
}  # fmt: skip
_GLOBAL = {"LDG", "STG", "LDGSTS", "ATOMG", "ATOM", "RED", "REDG", "LD", "ST", "UTMALDG", "UTMASTG"}
_SHARED = {"LDS", "STS", "LDSM", "STSM", "ATOMS"}
_LOADS = {"LDG", "LDGSTS", "LD", "ATOMG", "ATOM"}
_STORES = {"STG", "ST", "RED", "REDG"}


def instr_class(op: str) -> str:
    """``fma``, ``tensor``, ``global``, ``shared`` or ``other`` for an opcode."""
    base = op.split(".", 1)[0]
    for name, group in (
        ("tensor", _TENSOR),
        ("fma", _FMA),
        ("global", _GLOBAL),
        ("shared", _SHARED),
    ):
        if base in group:
            return name
    return "other"


def access_bytes(op: str) -> int:
    """Bytes one thread moves with a global access: LDG.E.128 → 16, .64 → 8, .U16 → 2, else 4."""
    mods = set(op.split(".")[1:])
    for mod, size in (("128", 16), ("64", 8), ("U16", 2), ("S16", 2), ("U8", 1), ("S8", 1)):
        if mod in mods:
            return size
    return 4


_FP32_PIPE = {"FFMA", "FMUL", "FADD"}
_FP64_PIPE = {"DFMA", "DMUL", "DADD"}
_HMMA_SHAPE = re.compile(r"^(16)(8)(\d+)$")  # HMMA.1688 = m16n8k8, .16816 = m16n8k16
_HGMMA_SHAPE = re.compile(r"^(\d+)x(\d+)x(\d+)$")  # HGMMA.64x32x8 = m64n32k8


def pipe_work(op: str) -> tuple[str, float] | None:
    """The throughput-limited pipe an opcode occupies, and its work there per warp instruction.

    ``("fp32", 1)`` for FFMA/FMUL/FADD, ``("fp64", 1)`` for DFMA/DMUL/DADD (one warp
    instruction each); ``("HMMA.tf32", 1024)`` for ``HMMA.1688.F32.TF32`` (the dense FMAs of
    one m16n8k8 warp MMA); ``HGMMA.MxNxK`` is one warpgroup's MMA, issued by each of its 4
    warps: M·N·K/4 FMAs a warp instruction. ``None``: only the issue bound applies. An MMA
    whose shape or input type this does not know raises (it would be silently free).
    """
    parts = op.split(".")
    base, mods = parts[0], parts[1:]
    if base in _FP32_PIPE:
        return "fp32", 1.0
    if base in _FP64_PIPE:
        return "fp64", 1.0
    if base not in ("HMMA", "HGMMA"):
        if base in _TENSOR:
            raise ValueError(f"{op}: a tensor-core instruction the model has no throughput for")
        return None
    shape = _HMMA_SHAPE if base == "HMMA" else _HGMMA_SHAPE
    m = shape.match(mods[0]) if mods else None
    if m is None:
        raise ValueError(f"{op}: unknown {base} shape")
    fmas = math.prod(int(x) for x in m.groups()) / (1 if base == "HMMA" else 4)
    types = set(mods[1:])
    if "TF32" in types:
        kind = "tf32"
    elif types <= {"F32", "F16", "BF16"}:
        kind = "f16"  # FP16 or BF16 inputs (no type: FP16), FP16 or FP32 accumulation
    else:
        raise ValueError(f"{op}: unknown {base} input type")
    return f"{base}.{kind}", fmas


def add_pipe_work(pipes: dict[str, float], op: str, issues: float) -> None:
    """Add ``issues`` warp instructions of ``op`` to ``pipes`` (pipe → work, ``pipe_work``'s
    units), when ``op`` occupies a throughput-limited pipe."""
    work = pipe_work(op)
    if work is not None:
        pipes[work[0]] = pipes.get(work[0], 0.0) + issues * work[1]


_REG = re.compile(r"\bR(\d+)(\.64)?")


def _regs(text: str) -> set[int]:
    out = set()
    for m in _REG.finditer(text):
        n = int(m.group(1))
        out.add(n)
        if m.group(2):
            out.add(n + 1)
    return out


def _split_operands(ins: Instr) -> tuple[set[int], set[int]]:
    """(registers written, registers read) as far as the dependence scan needs them."""
    ops = ins.operands
    first, _, rest = ops.partition(",")
    first = first.strip()
    if ins.base in _STORES | {"LDGSTS", "STS", "BAR", "BRA", "EXIT", "CALL"} or first.startswith(
        ("[", "desc")
    ):
        return set(), _regs(ops)
    written = _regs(first) if not first.startswith("P") else set()
    if ins.base in _LOADS and written:
        lo = min(written)
        written = set(range(lo, lo + max(1, access_bytes(ins.op) // 4)))
    return written, _regs(rest)


def bytes_in_flight(instrs: list[Instr], circular: bool) -> int:
    """Most bytes of global loads one thread has issued and not yet consumed.

    A register load stays in flight until an instruction reads one of its registers;
    ``LDGSTS`` (async copy to shared memory) bytes between ``LDGDEPBAR``s form a group,
    and ``DEPBAR.LE SB0, N`` waits until at most N groups are pending. ``circular``: a
    loop body, scanned twice so loads issued at the bottom for the next iteration count.
    """
    pending: dict[int, int] = {}  # load id -> bytes
    reg_of: dict[int, int] = {}  # register -> load id
    groups: list[int] = []
    group = 0
    best = 0
    body = [i for i in instrs if not i.cold]
    passes = 2 if circular else 1
    for p in range(passes):
        for n, ins in enumerate(body):
            written, read = _split_operands(ins)
            # consumed (read), or its register reused (the write waits for the load first)
            done = {reg_of[r] for r in read | written if r in reg_of}
            for lid in done:
                pending.pop(lid, None)
            for r in [r for r in reg_of if reg_of[r] in done]:
                del reg_of[r]
            if ins.base == "LDGSTS":
                group += access_bytes(ins.op)
            elif ins.base == "LDGDEPBAR":
                groups.append(group)
                group = 0
            elif ins.base == "DEPBAR" and (
                m := re.search(r"SB0\s*,\s*(0x[0-9a-f]+|\d+)", ins.operands)
            ):
                keep = int(m.group(1), 0)
                while len(groups) > keep:
                    groups.pop(0)
            elif ins.base in _LOADS and written:
                lid = p * len(body) + n
                pending[lid] = access_bytes(ins.op)
                for r in written:
                    reg_of[r] = lid
            if p == passes - 1 or not circular:
                best = max(best, sum(pending.values()) + sum(groups) + group)
    return best


# ---------------------------------------------------------------- source (line table → Python)


@functools.lru_cache(maxsize=64)
def _source(path: str) -> ast.Module | None:
    try:
        with open(path) as f:
            return ast.parse(f.read())
    except (OSError, SyntaxError):
        return None


@functools.lru_cache(maxsize=256)
def _nodes(path: str, kind: type) -> list:
    tree = _source(path)
    return [] if tree is None else [n for n in ast.walk(tree) if isinstance(n, kind)]


def _span(node: ast.AST) -> tuple[int, int]:
    return node.lineno, getattr(node, "end_lineno", node.lineno) or node.lineno


def _function_at(path: str, line: int) -> ast.FunctionDef | None:
    best = None
    for fn in _nodes(path, ast.FunctionDef):
        lo, hi = _span(fn)
        if lo <= line <= hi and (best is None or hi - lo < _span(best)[1] - _span(best)[0]):
            best = fn
    return best


def _in(node: ast.AST, path: str, loc: tuple[tuple[str, int], ...], node_path: str) -> bool:
    lo, hi = _span(node)
    return any(f == node_path and lo <= line <= hi for f, line in loc)


def match_loops_to_source(sass: Sass, loops: list[Loop]) -> None:
    """Give each loop the Python ``for`` it came from (``Loop.source``), innermost first.

    A loop's own instructions (not in a nested loop) vote: the innermost ``for`` holding
    at least half of them, and holding the ``for`` of every nested loop.
    """
    instrs = live_instrs(sass)
    files = {f for ins in instrs for f, _ in ins.loc}
    # ``tl.static_range`` is unrolled when the kernel is traced: it never becomes a loop
    fors = [
        (path, node)
        for path in files
        for node in _nodes(path, ast.For)
        if not (isinstance(node.iter, ast.Call) and _call_name(node.iter) == "static_range")
    ]
    order = sorted(range(len(loops)), key=lambda i: loops[i].end - loops[i].start)
    for i in order:
        lp = loops[i]
        own = [
            ins
            for ins in instrs
            if lp.contains(ins.addr) and innermost_loop(loops, ins.addr) == i and ins.loc
        ]
        kids = [loops[c].source for c in lp.children if loops[c].source is not None]
        best = None
        for path, node in fors:
            lo, hi = _span(node)
            if any(
                k[0] != path or not (lo <= k[1] and k[2] <= hi and (lo, hi) != k[1:]) for k in kids
            ):
                continue
            votes = sum(_in(node, path, ins.loc, path) for ins in own) if own else 0
            if own and votes * 2 < len(own):
                continue
            if not own and not kids:
                continue
            if best is None or hi - lo < best[2] - best[1]:
                best = (path, lo, hi)
        lp.source = best


class _Unknown(Exception):
    pass


def _eval(expr: ast.AST, env: dict, fn: ast.FunctionDef | None, depth: int = 0) -> float:
    """An integer expression of launch arguments (and locals assigned from them)."""
    if depth > 8:
        raise _Unknown("too deep")
    if isinstance(expr, ast.Constant) and isinstance(expr.value, int | float):
        return expr.value
    if isinstance(expr, ast.Name):
        if expr.id in env and isinstance(env[expr.id], int | float | bool):
            return env[expr.id]
        assigned = _assignment(fn, expr.id) if fn is not None else None
        if assigned is None:
            raise _Unknown(expr.id)
        return _eval(assigned, env, fn, depth + 1)
    if isinstance(expr, ast.UnaryOp) and isinstance(expr.op, ast.USub):
        return -_eval(expr.operand, env, fn, depth + 1)
    if isinstance(expr, ast.BinOp):
        a, b = _eval(expr.left, env, fn, depth + 1), _eval(expr.right, env, fn, depth + 1)
        ops = {
            ast.Add: lambda: a + b,
            ast.Sub: lambda: a - b,
            ast.Mult: lambda: a * b,
            ast.FloorDiv: lambda: a // b,
            ast.Div: lambda: a / b,
            ast.Mod: lambda: a % b,
        }
        if type(expr.op) in ops:
            return ops[type(expr.op)]()
    if isinstance(expr, ast.Call):
        name = (
            expr.func.attr if isinstance(expr.func, ast.Attribute) else getattr(expr.func, "id", "")
        )
        args = [_eval(a, env, fn, depth + 1) for a in expr.args]
        if name in ("min", "minimum") and args:
            return min(args)
        if name in ("max", "maximum") and args:
            return max(args)
        if name == "cdiv" and len(args) == 2:
            return -(-args[0] // args[1])
        # a persistent loop, ``range(program_id(0), n, num_programs(0))``: see trip_count
        if name == "num_programs" and PROGRAMS in env:
            return env[PROGRAMS]
        if name == "program_id":
            return 0
    raise _Unknown(ast.dump(expr)[:80])


def _assignment(fn: ast.FunctionDef, name: str) -> ast.AST | None:
    """The value of the only plain assignment to ``name`` in ``fn`` (None if several)."""
    found = _plain_assignments(fn).get(name, [])
    return found[0] if len(found) == 1 else None


@functools.lru_cache(maxsize=256)
def _plain_assignments(fn: ast.FunctionDef) -> dict[str, list[ast.AST]]:
    out: dict[str, list[ast.AST]] = {}
    for n in ast.walk(fn):
        if isinstance(n, ast.Assign) and len(n.targets) == 1 and isinstance(n.targets[0], ast.Name):
            out.setdefault(n.targets[0].id, []).append(n.value)
    return out


@functools.lru_cache(maxsize=256)
def _values(fn: ast.FunctionDef) -> dict[str, list[ast.AST]]:
    """Every expression a name of ``fn`` is given: assignments, augmented ones, ``for`` ranges."""
    out: dict[str, list[ast.AST]] = {}
    for n in ast.walk(fn):
        if isinstance(n, ast.Assign | ast.AugAssign):
            for t in _targets(n):
                if isinstance(t, ast.Name):
                    out.setdefault(t.id, []).append(n.value)
        elif isinstance(n, ast.For):
            for name in _names(n.target):
                out.setdefault(name, []).append(n.iter)
    return out


# The key of the launch's program count in a trip count's ``env`` (not a parameter name).
PROGRAMS = "<programs>"


def trip_count(path: str, lo: int, env: dict) -> tuple[float, str]:
    """Iterations of the ``for`` at ``path:lo`` for the launch arguments ``env``."""
    node = next((n for n in _nodes(path, ast.For) if n.lineno == lo), None)
    if node is None or not isinstance(node.iter, ast.Call):
        return 1.0, "no range() found: counted once"
    fn = _function_at(path, lo)
    args = node.iter.args
    try:
        vals = [_eval(a, env, fn) for a in args]
    except _Unknown as exc:
        return 1.0, f"bounds not known at launch ({exc}): counted once"
    start, stop, step = (
        (0, vals[0], 1) if len(vals) == 1 else (*vals[:2], vals[2] if len(vals) > 2 else 1)
    )
    if "num_programs" in ast.dump(node.iter):
        # persistent: the programs share the iterations, so each is counted at their
        # mean (per-element figures multiply a program's trips by the programs)
        return max(0.0, (stop - start) / step), "persistent: mean trips per program"
    return float(max(0, math.ceil((stop - start) / step))), ""


# ---------------------------------------------------------------- what a global access touches


def _call_name(node: ast.Call) -> str:
    return node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")


def _memory_kind(ins: Instr) -> str:
    """The ``tl`` call a global access comes from: ``load``, ``store`` or ``atomic``."""
    if ins.base in ("ATOM", "ATOMG", "RED", "REDG"):
        return "atomic"
    return "store" if ins.base in _STORES else "load"


def _memory_call(path: str, line: int, kind: str, near: bool = True) -> ast.Call | None:
    """The innermost ``tl.<kind>`` call (``load``, ``store``, ``atomic``) spanning
    ``path:line``, else (``near``) the nearest one starting within 3 lines in the same
    function."""
    calls = [
        c
        for c in _nodes(path, ast.Call)
        if _call_name(c) == kind or (kind == "atomic" and _call_name(c).startswith("atomic_"))
    ]
    best = None
    for call in calls:
        lo, hi = _span(call)
        if lo <= line <= hi and (best is None or hi - lo < _span(best)[1] - _span(best)[0]):
            best = call
    if best is None and near:
        fn = _function_at(path, line)
        close = [
            c
            for c in calls
            if fn is not None
            and 0 < abs(c.lineno - line) <= 3
            and _function_at(path, c.lineno) is fn
        ]
        best = min(close, key=lambda c: (abs(c.lineno - line), c.lineno < line), default=None)
    return best


def _names(expr: ast.AST) -> list[str]:
    return [n.id for n in ast.walk(expr) if isinstance(n, ast.Name)]


def _params(fn: ast.FunctionDef) -> list[str]:
    return [a.arg for a in fn.args.args]


def _caller_arg(
    loc: tuple[tuple[str, int], ...], depth: int, callee: ast.FunctionDef, param: str
) -> tuple[ast.AST, ast.FunctionDef, str, int] | None:
    """The expression passed for ``param`` of the inlined ``callee`` at the next call site."""
    if depth + 1 >= len(loc):
        return None
    path, line = loc[depth + 1]
    caller = _function_at(path, line)
    if caller is None:
        return None
    for call in _nodes(path, ast.Call):
        lo, hi = _span(call)
        if not (lo <= line <= hi) or _call_name(call) != callee.name:
            continue
        params = _params(callee)
        for kw in call.keywords:
            if kw.arg == param:
                return kw.value, caller, path, depth + 1
        i = params.index(param)
        if i < len(call.args):
            return call.args[i], caller, path, depth + 1
    return None


def resolve_pointer(
    expr: ast.AST, fn: ast.FunctionDef, path: str, loc, depth: int, kernel_args: dict, seen=None
) -> tuple[str, str]:
    """Where a pointer expression's base comes from: ``("arg", name)`` (a kernel argument that
    is a tensor), ``("table", name)`` (an address loaded from device memory) or
    ``("unknown", "")``."""
    seen = set() if seen is None else seen
    for name in _names(expr):
        key = (fn.name, name)
        if key in seen:
            continue
        seen.add(key)
        if name in _params(fn):
            if depth == len(loc) - 1 or _function_at(*loc[-1]) is fn:  # the kernel itself
                if _is_tensor(kernel_args.get(name)):
                    return "arg", name
                continue
            up = _caller_arg(loc, depth, fn, name)
            if up is not None:
                got = resolve_pointer(up[0], up[1], up[2], loc, up[3], kernel_args, seen)
                if got[0] != "unknown":
                    return got
            continue
        for value in _values(fn).get(name, ()):  # every assignment (branches may differ)
            if any(
                isinstance(n, ast.Attribute) and n.attr == "pointer_type" for n in ast.walk(value)
            ):
                return "table", name
            got = resolve_pointer(value, fn, path, loc, depth, kernel_args, seen)
            if got[0] != "unknown":
                return got
    return "unknown", ""


def is_vector(expr: ast.AST, fn: ast.FunctionDef, loc, depth: int, seen=None) -> bool:
    """Whether an address expression depends on ``tl.arange`` (a tile, not a scalar)."""
    seen = set() if seen is None else seen
    for node in ast.walk(expr):
        if isinstance(node, ast.Call) and _call_name(node) in ("arange", "zeros", "full"):
            return True
    for name in _names(expr):
        if (fn.name, name) in seen:
            continue
        seen.add((fn.name, name))
        if name in _params(fn):
            up = _caller_arg(loc, depth, fn, name)
            if up is not None and is_vector(up[0], up[1], loc, up[3], seen):
                return True
            continue
        if any(is_vector(v, fn, loc, depth, seen) for v in _values(fn).get(name, ())):
            return True
    return False


def _targets(node: ast.AST) -> list[ast.AST]:
    if isinstance(node, ast.AugAssign):
        return [node.target]
    out = []
    for t in node.targets:
        out.extend(t.elts if isinstance(t, ast.Tuple) else [t])
    return out


def _rel(path: str) -> str:
    return os.path.relpath(path, ROOT) if path.startswith(ROOT) else path


def _is_tensor(value: object) -> bool:
    return hasattr(value, "data_ptr") and hasattr(value, "numel")


@dataclass
class Access:
    """What one global memory instruction touches, as the source says."""

    kind: str  # arg / table / unknown
    name: str
    vector: bool
    where: str  # file:line of the tl.load / tl.store
    call: tuple[str, int] | None = None  # (path, line) of that call


def _address_writers(instrs: list[Instr], n: int) -> list[Instr]:
    """The instructions before ``instrs[n]`` that last wrote its address register, nearest
    first (a masked load's own line-table entry sometimes points past the kernel's end)."""
    m = re.search(r"\]\[R(\d+)", instrs[n].operands) or re.search(r"\[R(\d+)", instrs[n].operands)
    if m is None:
        return []
    reg, out = int(m.group(1)), []
    for ins in reversed(instrs[max(0, n - 400) : n]):
        written, _ = _split_operands(ins)
        if reg in written or (reg - 1 in written and ".WIDE" in ins.op):
            out.append(ins)
            if len(out) == 3:
                break
    return out


def classify_access(
    ins: Instr, kernel_args: dict, instrs: list[Instr] | None = None, n: int = 0
) -> Access:
    """What a global access touches: from its own line chain, else from the chains of the
    instructions that computed its address (``instrs[n]`` is ``ins``)."""
    kind = _memory_kind(ins)
    # a writer that is itself a load (a pointer read from a table) tells nothing of this access
    writers = [w for w in _address_writers(instrs, n) if w.base not in _LOADS] if instrs else []
    # Triton's line table often gives a load the line of a neighbouring op; the arithmetic
    # that computed its address is attributed more reliably. So: the nearest address
    # writer's line, then the access's own, each exactly; then the others; then nearby lines.
    order = [(w.loc, False) for w in writers[:1]] + [(ins.loc, False)]
    order += [(w.loc, False) for w in writers[1:]] + [(ins.loc, True)]
    order += [(w.loc, True) for w in writers]
    for loc, near in order:
        for depth, (path, line) in enumerate(loc):
            call = _memory_call(path, line, kind, near)
            if call is None or not call.args:
                continue
            fn = _function_at(path, call.lineno)
            if fn is None:
                break
            ptr = call.args[0]
            base, name = resolve_pointer(ptr, fn, path, loc, depth, kernel_args)
            where = f"{_rel(path)}:{call.lineno}"
            return Access(base, name, is_vector(ptr, fn, loc, depth), where, (path, call.lineno))
    return Access("unknown", "", True, "?")


# ---------------------------------------------------------------- one compiled kernel


@dataclass
class KernelModel:
    """The static figures of one compiled kernel in one launch, per element of the op."""

    kernel: str
    config: str
    warps: int
    programs: int
    programs_at_twice: int  # at twice the bucket's rows: whether the grid grows with it
    regs: int
    spills: int
    smem: int
    blocks_per_sm: int
    occupancy_limiter: str
    instrs_per_elt: dict[str, float]  # warp instructions, by class, and "total"
    pipe_per_elt: dict[str, float]  # FP32/FP64 warp instructions, tensor FMAs (pipe_work)
    bytes_per_elt: dict[str, float]  # read, write, total (HBM, as modelled)
    load_bytes_issued_per_elt: float  # by all threads (for Little's law)
    bytes_in_flight_per_sm: float  # of the region that dominates the latency bound
    loops: list[dict]
    notes: list[str]
    regions: list[dict] = field(default_factory=list)  # per loop / straight-line code
    bounds: dict = field(default_factory=dict)


def _nvdisasm() -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: triton's bundled nvdisasm is missing")
    return path


def disassemble(cubin: bytes) -> str:
    """``nvdisasm -c -g -gi`` of a cubin: SASS with the line table and inlining chains."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        out = subprocess.run([_nvdisasm(), "-c", "-g", "-gi", path], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"nvdisasm failed ({out.returncode}): {out.stderr.strip()[-1000:]}")
    return out.stdout


def _in_source_of(ins: Instr, lp: Loop) -> bool:
    """Whether ``ins`` comes from the source ``for`` of ``lp``."""
    if lp.source is None:
        return False
    path, lo, hi = lp.source
    return any(f == path and lo <= line <= hi for f, line in ins.loc)


def _unroll_factors(
    instrs: list[Instr], loops: list[Loop], accesses: dict[int, Access]
) -> dict[int, int]:
    """Loops ptxas unrolled: {loop index: copies of the source body per SASS iteration}.

    Per ``tl.load``/``tl.store`` of the loop's ``for``: its instructions in the loop over
    the gcd of that count and its counts in each stretch of straight-line code outside
    (ptxas peels remainders of 2, 1... copies after a loop unrolled 4 times). Triton's
    pipelining prologue holds whole multiples of the loop's count: not unrolled. Its
    asynchronous copies (``LDGSTS``) are no evidence either way: the pipeliner places
    them, and a stretch that held one of a tile's 8 copies (two-stage transposed views at
    ``BLOCK_K`` = 16) made a loop look unrolled 8 times and its bytes an eighth.
    """
    out = {}
    for i, lp in enumerate(loops):
        if lp.source is None or lp.trips == 0:
            continue
        inside: dict[str, int] = {}
        outside: dict[str, list[int]] = {}
        run: dict[str, int] = {}
        prev_in: bool | None = None
        path, lo, hi = lp.source
        for ins in instrs:
            acc = accesses.get(ins.addr)
            now_in = lp.contains(ins.addr) and innermost_loop(loops, ins.addr) == i
            if (now_in != prev_in and not now_in) or (ins.base in ("BRA", "EXIT") and not ins.pred):
                for key, c in run.items():  # a stretch of straight-line code ends
                    outside.setdefault(key, []).append(c)
                run = {}
            prev_in = now_in
            if acc is None or acc.call is None or acc.call[0] != path or ins.base == "LDGSTS":
                continue
            if not lo <= acc.call[1] <= hi:
                continue
            if now_in:
                inside[acc.where] = inside.get(acc.where, 0) + 1
            elif not lp.contains(ins.addr):
                run[acc.where] = run.get(acc.where, 0) + 1
        for key, c in run.items():
            outside.setdefault(key, []).append(c)
        # copies of a call's instructions: the gcd of its counts in the loop and in each stretch
        ratios = [inside[k] // math.gcd(inside[k], *outside[k]) for k in inside if k in outside]
        if ratios:
            u = sorted(ratios)[len(ratios) // 2]
            if u >= 2:
                out[i] = u
    return out


def _prologue_copy(ins: Instr, loops: list[Loop]) -> bool:
    """Whether ``ins`` is a copy of a loop's access placed before the loop (software pipelining).

    Triton's pipeliner issues the loads of the first iterations before the loop and, in
    the loop, the loads of iteration i + stages − 1 (predicated off past the end): the
    bytes are the loop's trip count times its body's, so the copies outside add none
    (they still take issue slots).
    """
    for lp in loops:
        if lp.source is None or lp.contains(ins.addr):
            continue
        path, lo, hi = lp.source
        if any(f == path and lo <= line <= hi for f, line in ins.loc):
            return True
    return False


def analyze_sass(
    sass: Sass,
    kernel_args: dict,
    warps: int,
    programs: int,
    elements: int,
    streaming: Callable[[str], bool],
    cached_bytes: Callable[[str], float],
) -> dict:
    """Per-element instructions, bytes and the load regions of one kernel's SASS.

    ``kernel_args``: the launch's arguments by parameter name (trip counts).
    ``streaming(name)``: whether the tensor argument ``name`` grows with the bucket (its
    accesses count every time); otherwise it counts ``cached_bytes(name)`` once.
    """
    instrs = [i for i in live_instrs(sass) if not i.cold]
    loops = find_loops(sass)
    match_loops_to_source(sass, loops)
    notes: list[str] = []
    for lp in loops:
        if lp.source is None:
            lp.trips, lp.trips_note = 1.0, "no source loop matched: counted once"
        else:
            env = kernel_args | {PROGRAMS: programs}
            lp.trips, lp.trips_note = trip_count(lp.source[0], lp.source[1], env)
    # Loop versions: two sibling SASS loops from one `for` (unswitched copies) run one at a time.
    by_source: dict[tuple, list[int]] = {}
    for i, lp in enumerate(loops):
        if lp.source is not None:
            by_source.setdefault((lp.parent, lp.source), []).append(i)
    for (_, src), idx in by_source.items():
        if len(idx) > 1:
            keep = max(idx, key=lambda i: loops[i].end - loops[i].start)
            for i in idx:
                if i != keep:
                    loops[i].trips, loops[i].trips_note = 0.0, "another version of this loop runs"
            notes.append(f"{len(idx)} SASS loops from {_rel(src[0])}:{src[1]}: the largest counted")
    for lp in loops:
        if lp.trips_note and lp.trips_note != "another version of this loop runs":
            src = "?" if lp.source is None else f"{os.path.basename(lp.source[0])}:{lp.source[1]}"
            notes.append(f"loop {lp.start:#x}-{lp.end:#x} ({src}): {lp.trips_note}")
    index = {ins.addr: n for n, ins in enumerate(instrs)}
    accesses = {
        ins.addr: classify_access(ins, kernel_args, instrs, n)
        for n, ins in enumerate(instrs)
        if instr_class(ins.op) == "global" and ins.base not in ("UTMALDG", "UTMASTG")
    }
    unrolled = _unroll_factors(instrs, loops, accesses)
    for i, u in unrolled.items():
        loops[i].trips /= u
        loops[i].unroll = u
        src = loops[i].source
        notes.append(
            f"loop {loops[i].start:#x}-{loops[i].end:#x} ({_rel(src[0])}:{src[1]}) unrolled "
            f"{u}x: it runs trips/{u} times; its peeled remainder copies count nothing"
        )

    def weight(addr: int) -> float:
        w, i = 1.0, innermost_loop(loops, addr)
        while i is not None:
            w *= loops[i].trips
            i = loops[i].parent
        for i in unrolled:
            if not loops[i].contains(addr) and _in_source_of(instrs[index[addr]], loops[i]):
                return 0.0
            acc = accesses.get(addr)
            if acc is not None and acc.call is not None and not loops[i].contains(addr):
                path, lo, hi = loops[i].source
                if acc.call[0] == path and lo <= acc.call[1] <= hi:
                    return 0.0
        return w

    per_program = {c: 0.0 for c in CLASSES}
    pipes: dict[str, float] = {}  # work per program on the throughput-limited pipes
    read = write = 0.0  # HBM bytes per program, streaming tensors
    cached: set[str] = set()
    unknown = 0
    regions: dict[int | None, dict] = {}
    threads = warps * 32
    for ins in instrs:
        w = weight(ins.addr)
        per_program[instr_class(ins.op)] += w
        add_pipe_work(pipes, ins.op, w)
        region = regions.setdefault(innermost_loop(loops, ins.addr), {"issued": 0.0})
        if ins.base in _LOADS:
            region["issued"] += w * access_bytes(ins.op)  # per thread
        if instr_class(ins.op) != "global" or ins.base in ("UTMALDG", "UTMASTG"):
            continue
        if _prologue_copy(ins, loops):
            continue
        acc = accesses[ins.addr]
        if acc.kind == "unknown":
            unknown += 1
        if acc.kind == "arg" and not streaming(acc.name):
            cached.add(acc.name)
            continue
        moved = w * access_bytes(ins.op) * (threads if acc.vector else 1)
        if ins.base in _STORES:
            write += moved
        elif ins.base in ("ATOM", "ATOMG"):
            read += moved
            write += moved
        else:
            read += moved
    if unknown:
        notes.append(f"{unknown} global accesses not traced to a tensor: counted as streamed")
    once = sum(cached_bytes(n) for n in sorted(cached))
    scale = programs / elements
    instrs_per_elt = {c: per_program[c] * warps * scale for c in CLASSES}
    instrs_per_elt["total"] = sum(instrs_per_elt.values())
    pipe_per_elt = {p: v * warps * scale for p, v in sorted(pipes.items())}
    out_regions = []
    for idx, r in regions.items():
        body = [i for i in instrs if innermost_loop(loops, i.addr) == idx]
        if idx is None:
            body = [i for i in instrs if innermost_loop(loops, i.addr) is None]
        if not r["issued"]:
            continue
        out_regions.append(
            {
                "region": "straight-line"
                if idx is None
                else f"loop {loops[idx].start:#x}-{loops[idx].end:#x}",
                "load_bytes_issued_per_elt": r["issued"] * threads * scale,
                "bytes_in_flight_per_thread": bytes_in_flight(body, circular=idx is not None),
            }
        )
    return {
        "instrs_per_elt": instrs_per_elt,
        "pipe_per_elt": pipe_per_elt,
        "bytes_per_elt": {
            "read": read * scale + once / elements,
            "write": write * scale,
            "total": (read + write) * scale + once / elements,
            "cached_once": sorted(cached),
        },
        "loops": [
            {
                "sass": f"{lp.start:#x}-{lp.end:#x}",
                "source": None if lp.source is None else f"{_rel(lp.source[0])}:{lp.source[1]}",
                "trips": lp.trips * lp.unroll,
                "unroll": lp.unroll,
                "parent": lp.parent,
                "instructions": sum(1 for i in instrs if innermost_loop(loops, i.addr) == n),
            }
            for n, lp in enumerate(loops)
        ],
        "regions": out_regions,
        "notes": notes,
    }


# ---------------------------------------------------------------- bounds


def pipe_seconds(pipe_per_elt: dict[str, float], device: Device) -> dict[str, float]:
    """Seconds per element on each throughput-limited pipe (``pipe_work``'s units).

    fp32 / fp64: warp instructions × 32 lanes over the device's lanes per SM; tensor: the
    dense FMAs over its rate for that instruction family and input type (all MMAs share
    the tensor cores, so their times add up under "tensor").
    """
    per_sm_clock = device.sms * device.clock_hz
    out = {"fp32": 0.0, "fp64": 0.0, "tensor": 0.0}
    for pipe, work in pipe_per_elt.items():
        if pipe in ("fp32", "fp64"):
            lanes = device.fp32_lanes_per_sm if pipe == "fp32" else device.fp64_lanes_per_sm
            out[pipe] += work * 32 / (lanes * per_sm_clock)
            continue
        family, kind = pipe.split(".")
        rate = device.mma_fma_per_clock.get(family, {}).get(kind)
        if not rate:
            raise ValueError(f"{device.name} ({device.arch}) has no {family} {kind} rate")
        out["tensor"] += work / (rate * per_sm_clock)
    return out


def balanced_grid(resident: int, work: int, sms: int) -> int:
    """``launch.cuh`` ``balanced_grid`` ([grid]): the fewest blocks, at most ``resident``,
    that run ``work`` items in as many rounds as ``min(resident, work)`` blocks do; past
    one block an SM (``sms``), a whole number of blocks an SM."""
    full = max(1, min(resident, work))
    if work <= full:
        return full
    rounds = -(-work // full)
    fewest = -(-work // rounds)
    return fewest if fewest <= sms else min(full, -(-fewest // sms) * sms)


def waves(
    grid: int, blocks_per_sm: int, sms: int, work: int | None = None
) -> list[tuple[float, float, float]]:
    """How a launch of ``grid`` blocks (``blocks_per_sm`` resident on each of ``sms`` SMs)
    spreads over the device, wave by wave, against the even spread ``bounds`` assumes
    (every SM holding ``blocks_per_sm`` blocks, every block the same share): per wave
    ``(device, sm, block)``, the wave's share of the launch's elements, the busiest SM's
    share times ``sms`` and the busiest block's share times ``sms × blocks_per_sm``, so
    a launch spread evenly in one wave is ``[(1, 1, 1)]``.

    ``work`` None: the blocks are alike and run in waves of ``sms × blocks_per_sm``, the
    last one partial (a Triton grid: one program a block of rows, or a persistent loop
    counted at its mean trips). ``work``: a grid-stride loop over ``work`` items
    (launch.cuh: every block resident, block ``b`` runs items ``b, b + grid, ...``), the
    blocks dealt to the SMs in order (block ``b`` on SM ``b % sms``, as the hardware
    fills empty SMs first; an assumption, the dispatch order is not documented)."""
    if grid <= 0 or blocks_per_sm <= 0:
        return []
    slots = sms * blocks_per_sm
    if work is not None and 0 < work and grid <= slots:
        items = [len(range(b, work, grid)) for b in range(grid)]
        per_sm = [0] * min(grid, sms)
        for b, n in enumerate(items):
            per_sm[b % sms] += n
        return [(1.0, max(per_sm) * sms / work, max(items) * slots / work)]
    full, rest = divmod(grid, slots)
    out = []
    if full:
        out.append((full * slots / grid, full * slots / grid, full * slots / grid))
    if rest:
        busiest = -(-rest // sms)  # the last wave's blocks on its busiest SM
        out.append((rest / grid, busiest * sms / grid, slots / grid))
    return out


def _growing_grid(kn: dict) -> str | None:
    """Which grid of a model row's kernel grows with the bucket: ``"grid"`` (perf_model_cuda's
    grid-stride launch, ``work`` items, ``work_at_twice`` at twice the rows), ``"programs"``
    (this model's, ``programs_at_twice``), or None (a fixed one, or none recorded)."""
    if "grid" in kn and "work" in kn and kn.get("work_at_twice", 0) > kn["work"]:
        return "grid"
    if "programs" in kn and kn.get("programs_at_twice", 0) > kn["programs"]:
        return "programs"
    return None


def launch_waves(kn: dict, device: Device) -> list[tuple[float, float, float]] | None:
    """``waves`` of a kernel of a model row on ``device``: perf_model_cuda's (``grid``
    blocks over ``work`` items) or this model's (``programs``), where the work grows with
    the bucket (``work_at_twice``, ``programs_at_twice``: the tiles of the bucket's rows);
    None (spread evenly) for a kernel that records no grid (an older model's JSON), cannot
    launch, or whose work is fixed: a kernel of a few blocks between the passes (the flat
    side's ``combine_kernel``, surgery's coefficients) or a persistent grid. Counted a
    block at a time, those would be 2-4x slower than the H200 run measured them
    (``benchmarks/model_check.py``: the latency of a few blocks reading what the last
    kernel left in L2 is not the model's HBM latency), so they keep the even spread and
    its documented blind spot."""
    blocks = kn.get("blocks_per_sm", 0)
    grows = _growing_grid(kn)
    if blocks <= 0 or grows is None:
        return None
    if grows == "grid":
        return waves(kn["grid"], blocks, device.sms, kn["work"])
    return waves(kn["programs"], blocks, device.sms)


def bounds(
    bytes_per_elt: float,
    instrs_per_elt: float,
    regions: list[tuple[float, float]],
    device: Device,
    pipe_per_elt: dict[str, float] | None = None,
    warps_per_sm: float | None = None,
    busiest_instrs_per_elt: float | None = None,
    staged_bytes_per_elt: float = 0.0,
    spread: list[tuple[float, float, float]] | None = None,
) -> dict:
    """Lower bounds on a kernel's seconds per element, and the one that binds.

    ``regions``: per loop (and straight-line code), ``(load bytes issued per element by all
    threads, bytes in flight per SM)``. ``bytes_in_flight_per_sm == 0`` for a region with
    loads means the kernel cannot launch (no resident block): the time is infinite.
    ``pipe_per_elt`` (``analyze_sass``): work on the FP32, FP64 and tensor pipes, each
    bounded by its own throughput (``pipe_seconds``) besides the issue slots they take.
    ``warps_per_sm``: resident warps per SM (blocks per SM × warps a block); with it, the
    occupancy bound ``instrs × warp_cpi / (SMs × warps_per_sm × clock)``: each warp
    issues one instruction every ``device.warp_cpi`` cycles on average, so the
    schedulers issue ``min(schedulers, warps_per_sm / warp_cpi)`` a clock (0 warps: the
    kernel cannot launch). ``busiest_instrs_per_elt``: the instructions per element if every
    warp issued as many as the block's busiest (a warp whose columns pass ``d`` skips its
    blocks and idles at the block's barriers, so a tile lasts as long as its busiest warp's
    instructions take); the occupancy bound counts those where given (default
    ``instrs_per_elt``, every warp alike).

    ``spread`` (``waves``): how the launch's blocks fall on the SMs, wave by wave. The
    bounds above assume every SM busy with ``warps_per_sm`` warps and the work even; a
    wave takes the largest of: memory (and staging) for its share of the elements; the
    issue, pipe and latency bounds for its busiest SM's share; occupancy for its busiest
    block's (a warp issues every ``warp_cpi`` cycles however few share its SM, so a block
    with more work than the rest, or a last wave of a few blocks, lasts as long alone).
    Latency by the SM's share, not the block's: a lightly loaded SM's few blocks see less
    than the loaded latency the model uses, and counted by the block the H200 run's
    Triton flat rows (3 of 8-10 resident programs an SM) came out 1.5-3.3x slower than
    measured; by the SM, the latency-bound ones stay within 3 % of the even spread
    (``benchmarks/model_check.py``).
    Each ``*_s_per_elt`` is that bound summed over the waves; ``s_per_elt`` is the sum of
    each wave's largest. Default: one even wave.
    """
    memory = bytes_per_elt / device.copy_bytes_per_s
    issue = instrs_per_elt / (device.sms * device.schedulers_per_sm * device.clock_hz)
    occupancy = 0.0
    if warps_per_sm is not None and instrs_per_elt > 0:
        per_warp = max(instrs_per_elt, busiest_instrs_per_elt or 0.0)
        occupancy = (
            math.inf
            if warps_per_sm <= 0
            else per_warp * device.warp_cpi / (device.sms * warps_per_sm * device.clock_hz)
        )
    latency = 0.0
    for issued, in_flight in regions:
        if issued <= 0:
            continue
        if in_flight <= 0:
            latency = math.inf
            break
        latency += issued * device.latency_s / (in_flight * device.sms)
    even = {"memory": memory, "issue": issue, "latency": latency, "occupancy": occupancy}
    even |= pipe_seconds(pipe_per_elt or {}, device)
    # which share of a wave each bound scales with (``waves``): 0 the device's, 1 the
    # busiest SM's (the default), 2 the busiest block's
    share = {"memory": 0, "occupancy": 2}
    times = dict.fromkeys(even, 0.0)
    slowest = 0.0
    for wave in spread or [(1.0, 1.0, 1.0)]:
        t = {name: v * wave[share.get(name, 1)] for name, v in even.items()}
        for name, v in t.items():
            times[name] += v
        slowest += max(t.values())
    limiter = max(times, key=lambda k: times[k])
    staging = 0.0
    if staged_bytes_per_elt > 0 and device.l2_bytes_per_s > 0:
        staging = staged_bytes_per_elt / device.l2_bytes_per_s
    return {
        **{f"{name}_s_per_elt": t for name, t in times.items()},
        "staging_s_per_elt": staging,
        "s_per_elt": slowest + staging,
        "limiter": limiter if staging <= slowest else "staging",
    }


def kernel_bounds(kn: dict, device: Device) -> dict:
    """``bounds`` of a kernel of a model row (this model's JSON or perf_model_cuda's), again,
    for ``device``: another device of the same architecture (the same SASS), e.g. the GPU a
    run measured, with its measured copy rate and clock."""
    moved = kn["bytes_per_elt"]
    regions = [
        (r.get("load_bytes_issued_per_elt", r.get("load_bytes_per_elt", 0.0)),
         r["bytes_in_flight_per_sm"])
        for r in kn.get("regions", [])
    ]  # fmt: skip
    return bounds(
        moved["total"] if "total" in moved else moved["read"] + moved["write"],
        kn["instrs_per_elt"]["total"],
        regions,
        device,
        kn.get("pipe_per_elt"),
        warps_per_sm=kn["blocks_per_sm"] * kn["warps"],
        busiest_instrs_per_elt=kn.get("busiest_instrs_per_elt"),
        staged_bytes_per_elt=kn.get("staged_bytes_per_elt", 0.0),
        spread=launch_waves(kn, device),
    )


def predicted_fraction_for(row: dict, device: Device) -> float:
    """A model row's predicted fraction of copy (``predicted_fraction``) on ``device``, its
    kernels re-bounded there (``kernel_bounds``); 0.0 for a row that failed."""
    if "error" in row or any(kn.get("blocks_per_sm", 0) == 0 for kn in row["kernels"]):
        return 0.0
    times = [kernel_bounds(kn, device)["s_per_elt"] for kn in row["kernels"]]
    return predicted_fraction(row["floor_bytes_per_elt"], times, device)


def _grid_at_scale(kn: dict, scale: float, device: Device) -> dict:
    """A kernel's launch geometry for ``scale`` × its bucket: perf_model_cuda's grid-stride
    launches whose work grows with the bucket (``work_at_twice``) take ``scale`` × the
    work on the grid ``balanced_grid`` picks for it (its staging, ``grid`` copies of the
    basis, follows the grid); a Triton grid that grew with the bucket
    (``programs_at_twice``) grows by ``scale``; a fixed one stays."""
    blocks = kn.get("blocks_per_sm", 0)
    grows = _growing_grid(kn)
    if grows == "grid":
        work = max(1, round(kn["work"] * scale))
        grid = balanced_grid(blocks * device.sms, work, device.sms)
        staged = kn.get("staged_bytes_per_elt", 0.0) * grid / kn["grid"] / scale
        at_twice = max(work + 1, round(kn["work_at_twice"] * scale))
        return {"work": work, "work_at_twice": at_twice, "grid": grid,
                "staged_bytes_per_elt": staged}  # fmt: skip
    out = {"staged_bytes_per_elt": kn.get("staged_bytes_per_elt", 0.0) / scale}
    if grows == "programs":
        out["programs"] = max(1, round(kn["programs"] * scale))
        out["programs_at_twice"] = max(out["programs"] + 1, round(kn["programs_at_twice"] * scale))
    return out


def at_scale(row: dict, scale: float) -> dict:
    """A model row for ``scale`` × its bucket's elements: the row modelled on that bucket
    where the model made one (``modelled_at_scale``: the Triton row launchers choose their
    tiles by the bucket's rows, docs/gpu.md #few-rows), else this one re-dealt. What a
    launch costs once is spread over more elements: a kernel's staging (the bytes every
    block copies before its first tile, ``staged_bytes_per_elt``) and its tail
    (``waves``: the grid for the larger bucket, ``_grid_at_scale``). The other figures are
    per element as they were. Its kernels are re-bounded on the row's device, its time,
    fraction and limiter follow; a row without either keeps them, and so does one whose
    launch fails (no resident block: no bucket makes it run)."""
    if scale == 1:
        return row
    modelled = row.get("modelled_at_scale", {}).get(f"{scale:g}")
    if modelled is not None:  # modelled on the larger bucket itself (_model_item)
        return modelled
    kernels = row.get("kernels", [])
    fails = any(kn.get("blocks_per_sm", 1) == 0 for kn in kernels)
    fixed = ("staged_bytes_per_elt", "grid", "programs")  # what a launch pays once
    if "error" in row or fails or not any(kn.get(key) for kn in kernels for key in fixed):
        return {**row, "elements": row["elements"] * scale}
    device = DEVICES[row["arch"]]
    kernels = [{**kn, **_grid_at_scale(kn, scale, device)} for kn in kernels]
    for kn in kernels:
        kn["bounds"] = kernel_bounds(kn, device)
    out = {**row, "kernels": kernels, "elements": row["elements"] * scale}
    dominant = max(kernels, key=lambda kn: kn["bounds"]["s_per_elt"])
    out["limiter"] = dominant["bounds"]["limiter"]
    out["limiting_kernel"] = dominant["kernel"]
    out["s_per_elt"] = sum(kn["bounds"]["s_per_elt"] for kn in kernels)
    out["predicted_fraction_of_copy"] = predicted_fraction_for(out, device)
    return out


def predicted_fraction(
    floor_bytes_per_elt: float, kernel_times: list[float], device: Device
) -> float:
    """Copy time of the op's essential bytes over the predicted time (1.0: at the roofline)."""
    total = sum(kernel_times)
    if total == 0 or math.isinf(total):
        return 0.0
    return floor_bytes_per_elt / device.copy_bytes_per_s / total


# ---------------------------------------------------------------- ops


D = 768  # the SD 1.5 text width, as the compile check and the benchmarks use
ROWS = 4096  # rows of the modelled bucket: a multiple of every row tile, so no partial tile
KS = (1, 8, 32, 128)
DTYPES = ("fp32", "bf16")
ITEMSIZE = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class Op:
    """An op of the model: how to launch it on ``rows × D`` elements, and its floor bytes."""

    name: str
    floor: str  # what the essential bytes are
    floor_streams: int  # element-sized streams of the essential bytes (× itemsize)
    launch: Callable  # (gcc, dtype, k, rows) -> gpu_compile_check.Launch
    # The fp32 basis read once for the bucket is essential too where it is as large as
    # the gradients (side="flat": U is D × k for vectors of D elements): 4k / TENSORS
    # bytes per element. Elsewhere U (d × k) is negligible next to rows × d.
    floor_basis: bool = False

    def floor_bytes(self, dt: str, k: int) -> float:
        basis = 4 * k / TENSORS if self.floor_basis else 0.0
        return self.floor_streams * ITEMSIZE[dt] + basis


# Two tensors a bucket, as the compile check's launches: the same specialisations (e.g.
# n_tensors is not the constant 1), so its compiled kernels in Triton's cache serve here.
TENSORS = 2


def _project(side: str, anchored: bool) -> Callable:
    def launch(gcc, dt: str, k: int, rows: int):
        shape = (rows // TENSORS,) * TENSORS
        return gcc.project_launch(dt, side, k, False, anchored, d=D, rows=shape)

    return launch


def _adamw(side: str) -> Callable:
    def launch(gcc, dt: str, k: int, rows: int):
        return gcc.adamw_launch(dt, side, k, False, False, d=D, rows=(rows // TENSORS,) * TENSORS)

    return launch


def _surgery(gcc, dt: str, k: int, rows: int):
    return gcc.surgery_launch(dt, "projection", False, numels=(rows // TENSORS * D,) * TENSORS)


OPS = {
    op.name: op
    for op in (
        Op("project_ input", "grad read + written once", 2, _project("input", False)),
        Op("project_ output", "grad read + written once", 2, _project("output", False)),
        Op(
            "project_ flat",
            "grad read + written once, the D × k basis read once for the bucket",
            2,
            _project("flat", False),
            floor_basis=True,
        ),
        Op("project_anchored input", "grad read + written once", 2, _project("input", True)),
        Op(
            "ProjectedAdamW input",
            "torch fused AdamW: p, g, m, v read; p, m, v written",
            7,
            _adamw("input"),
        ),
        Op(
            "ProjectedAdamW output",
            "torch fused AdamW: p, g, m, v read; p, m, v written",
            7,
            _adamw("output"),
        ),
        Op(
            "surgery_ projection one-sided",
            "g_u, g_r read once; g_u written once",
            3,
            _surgery,
        ),
    )
}


@dataclass
class LaunchCall:
    """One kernel launch as the launcher made it."""

    fn: object  # JITFunction
    args: dict
    grid: tuple


def _gcc():
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import gpu_compile_check  # refuses to load unless TRITON_INTERPRET is 0

    return gpu_compile_check


@contextlib.contextmanager
def recording(arch, plan: bool) -> Iterator[tuple[list, list[LaunchCall]]]:
    """``gpu_compile_check.compiling_for`` that also records every launch's arguments and grid."""
    from triton.runtime.jit import JITFunction

    gcc = _gcc()
    calls: list[LaunchCall] = []
    with gcc.compiling_for(arch, plan=plan) as seen:
        inner = JITFunction.run

        def run(self, *args, grid, warmup, **kwargs):
            names = [p.name for p in self.params]
            bound = dict(zip(names, args, strict=False)) | kwargs
            g = grid(bound) if callable(grid) else grid
            g = tuple(g) if isinstance(g, tuple | list) else (g,)
            calls.append(LaunchCall(self, bound, g))
            return inner(self, *args, grid=grid, warmup=warmup, **kwargs)

        JITFunction.run = run
        try:
            yield seen, calls
        finally:
            JITFunction.run = inner


def remap_paths(sass: Sass, kernel_file: str) -> None:
    """Point the line table at the kernel's file as it is now.

    Triton's cache key holds a kernel's source and first line, not its file's path: a
    cubin compiled from another copy of the file (another checkout, a test's temporary
    copy) is reused with that copy's path in its line table.
    """
    here = os.path.dirname(kernel_file)
    for ins in sass.instrs:
        loc = []
        for f, line in ins.loc:
            name = os.path.basename(f)
            if name == os.path.basename(kernel_file):
                f = kernel_file
            elif not os.path.exists(f) and os.path.exists(os.path.join(here, name)):
                f = os.path.join(here, name)
            loc.append((f, line))
        ins.loc = tuple(loc)


def _numel_bytes(value) -> tuple[int, int]:
    return (value.numel(), value.numel() * value.element_size()) if _is_tensor(value) else (0, 0)


def model_launch(
    call: Callable[[], None],
    call_twice: Callable[[], None],
    elements: int,
    arch_name: str,
) -> list[dict]:
    """Compile every Triton kernel ``call()`` launches for ``arch_name`` and model each.

    ``call_twice()`` makes the same launches on a bucket twice as large (planned only,
    nothing compiles): the tensor arguments that grow are the streamed ones. ``elements``:
    the elements of ``call()``'s bucket, the unit of every per-element figure.
    """
    gcc = _gcc()
    arch, device = gcc.ARCHS[arch_name], DEVICES[arch_name]
    with recording(arch, plan=True) as (_, twice):
        call_twice()
    with recording(arch, plan=False) as (seen, calls):
        call()
    if len(calls) != len(twice):
        raise RuntimeError(f"{len(calls)} launches, but {len(twice)} at twice the size")
    kernels = []
    for n, (record, launch) in enumerate(zip(seen, calls, strict=True)):
        name = launch.fn.fn.__name__
        if record.kernel is None:
            kernels.append({"kernel": name, "config": record.config, "error": record.error})
            continue
        big = twice[n].args

        def streaming(arg: str, small=launch.args, big=big) -> bool:
            return _numel_bytes(big.get(arg))[0] > _numel_bytes(small.get(arg))[0]

        def cached_bytes(arg: str, small=launch.args) -> float:
            return _numel_bytes(small.get(arg))[1]

        compiled = record.kernel
        usage = gcc.kernel_usage(compiled, arch, record.log)
        warps, smem = int(compiled.metadata.num_warps), int(compiled.metadata.shared)
        blocks, limiter = gcc.blocks_per_sm(usage["regs"], warps, smem, arch)
        sass = parse_sass(disassemble(compiled.asm["cubin"]), compiled.metadata.name)
        remap_paths(sass, launch.fn.fn.__code__.co_filename)
        programs = math.prod(launch.grid)
        got = analyze_sass(sass, launch.args, warps, programs, elements, streaming, cached_bytes)
        threads_per_sm = blocks * warps * 32
        at_twice = math.prod(twice[n].grid)
        grown = {"programs": programs, "programs_at_twice": at_twice, "blocks_per_sm": blocks}
        for r in got["regions"]:
            r["bytes_in_flight_per_sm"] = r["bytes_in_flight_per_thread"] * threads_per_sm
        regions = [
            (r["load_bytes_issued_per_elt"], r["bytes_in_flight_per_sm"]) for r in got["regions"]
        ]
        b = bounds(
            got["bytes_per_elt"]["total"],
            got["instrs_per_elt"]["total"],
            regions,
            device,
            got["pipe_per_elt"],
            warps_per_sm=blocks * warps,
            spread=launch_waves(grown, device),
        )
        hot = max(got["regions"], key=lambda r: r["load_bytes_issued_per_elt"], default=None)
        kernels.append(
            asdict(
                KernelModel(
                    kernel=name,
                    config=record.config,
                    warps=warps,
                    programs=programs,
                    programs_at_twice=at_twice,
                    regs=usage["regs"],
                    spills=usage["spill_stores"] + usage["spill_loads"],
                    smem=smem,
                    blocks_per_sm=blocks,
                    occupancy_limiter=limiter,
                    instrs_per_elt=got["instrs_per_elt"],
                    pipe_per_elt=got["pipe_per_elt"],
                    bytes_per_elt=got["bytes_per_elt"],
                    load_bytes_issued_per_elt=sum(r[0] for r in regions),
                    bytes_in_flight_per_sm=0.0 if hot is None else hot["bytes_in_flight_per_sm"],
                    loops=got["loops"],
                    notes=got["notes"],
                    regions=got["regions"],
                    bounds=b,
                )
            )
        )
    return kernels


def model_op(op: Op, dt: str, k: int, arch_name: str, rows: int = ROWS) -> dict:
    """Model every kernel ``op`` launches on a ``rows × D`` bucket for ``arch_name``."""
    gcc = _gcc()
    kernels = model_launch(
        op.launch(gcc, dt, k, rows).call,
        op.launch(gcc, dt, k, 2 * rows).call,
        rows * D,
        arch_name,
    )
    return summarize(op, dt, k, DEVICES[arch_name], rows * D, kernels)


def summarize(op: Op, dt: str, k: int, device: Device, elements: int, kernels: list[dict]) -> dict:
    """The op's row: kernel figures summed, its predicted time and ceiling."""
    ok = [kn for kn in kernels if "error" not in kn]
    floor = op.floor_bytes(dt, k)
    failed = len(ok) < len(kernels) or any(kn["blocks_per_sm"] == 0 for kn in ok)
    times = [kn["bounds"]["s_per_elt"] for kn in ok]
    fraction = 0.0 if failed else predicted_fraction(floor, times, device)
    dominant = max(ok, key=lambda kn: kn["bounds"]["s_per_elt"], default=None)
    total = lambda f: sum(f(kn) for kn in ok)  # noqa: E731
    return {
        "arch": device.arch,
        "device": device.name,
        "op": op.name,
        "dtype": dt,
        "k": k,
        "elements": elements,
        "floor": op.floor,
        "floor_bytes_per_elt": floor,
        "bytes_per_elt": total(lambda kn: kn["bytes_per_elt"]["total"]),
        "instrs_per_elt": {
            c: total(lambda kn, c=c: kn["instrs_per_elt"][c]) for c in (*CLASSES, "total")
        },
        "s_per_elt": sum(times),
        "memory_s_per_elt": total(lambda kn: kn["bounds"]["memory_s_per_elt"]),
        **{
            f"{b}_s_per_elt": total(lambda kn, b=b: kn["bounds"][f"{b}_s_per_elt"])
            for b in ("issue", "latency", "occupancy", "fp32", "fp64", "tensor")
        },
        "limiter": "launch fails"
        if failed
        else (dominant["bounds"]["limiter"] if dominant else "-"),
        "limiting_kernel": None if dominant is None else dominant["kernel"],
        "predicted_fraction_of_copy": fraction,
        "kernels": kernels,
    }


# The bucket the GPU runs measure, in multiples of ROWS (benchmarks/predicted_vs_measured.py
# --scale): the row launchers choose their tiles by the bucket's rows (kernels/project.py
# FEW_ROWS_PER_SM; ProjectedAdamW's too, kernels/adamw.py _rows_config), so their ops are
# modelled on it too, not re-dealt from ROWS (at_scale).
SCALE = 8


def _model_item(item: tuple[str, str, int, str]) -> dict:
    op_name, dt, k, arch = item
    start = time.perf_counter()
    try:
        row = model_op(OPS[op_name], dt, k, arch)
        row_launch = op_name.startswith(("project_ ", "project_anchored ", "ProjectedAdamW "))
        if row_launch and "flat" not in op_name:
            big = model_op(OPS[op_name], dt, k, arch, ROWS * SCALE)
            row["modelled_at_scale"] = {f"{SCALE:g}": big}
    except Exception as exc:  # a launcher or compile failure is a finding of its row
        row = {
            "arch": arch,
            "device": DEVICES[arch].name,
            "op": op_name,
            "dtype": dt,
            "k": k,
            "error": f"{type(exc).__name__}: {exc}"[:2000],
            "predicted_fraction_of_copy": 0.0,
            "limiter": "error",
            "kernels": [],
        }
    row["model_s"] = round(time.perf_counter() - start, 1)
    return row


# ---------------------------------------------------------------- CUDA kernels (per iteration)

CUDA_DIR = os.path.join(os.path.expanduser("~"), ".cache", "gradproj", "perf_model_cuda")
CUDA_VENV = os.environ.get(
    "GRADPROJ_CUDA_VENV", os.path.join(os.path.expanduser("~"), ".cache", "gradproj", "venv-cuda")
)


def build_cuda(out_dir: str = CUDA_DIR, archs: str = "8.0;9.0") -> tuple[str, str]:
    """Build ``csrc/`` for ``archs`` as ``make cuda-compile-check`` does (its CUDA venv, nvcc
    with ``-Xptxas -v``), into ``out_dir``, kept between runs (ninja rebuilds what changed).
    Returns (the built ``_C*.so``, the build log)."""
    import glob

    py = os.path.join(CUDA_VENV, "bin", "python")
    site = subprocess.run(
        [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    env = {
        **os.environ,
        "GRADPROJ_FORCE_CUDA": "1",
        "GRADPROJ_PTXAS_VERBOSE": "1",
        "CUDA_HOME": os.environ.get("CUDA_HOME", "/usr/local/cuda"),
        "CPATH": os.path.join(site, "nvidia", "cu13", "include"),
        "TORCH_CUDA_ARCH_LIST": archs,
        "MAX_JOBS": os.environ.get("MAX_JOBS", "2"),
    }
    os.makedirs(out_dir, exist_ok=True)
    log = os.path.join(out_dir, "build.log")
    cmd = [py, "setup.py", "-q", "build_ext", "--build-temp", os.path.join(out_dir, "temp")]
    cmd += ["--build-lib", os.path.join(out_dir, "lib")]
    with open(log, "w") as f:
        done = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise RuntimeError(f"the CUDA build failed ({done.returncode}): see {log}")
    return glob.glob(os.path.join(out_dir, "lib", "gradproj", "_C*.so"))[0], log


def _cuda_tool(name: str) -> str:
    cuda = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", name)
    if os.path.exists(cuda):
        return cuda
    return os.path.join(os.path.dirname(_nvdisasm()), name)


def cuda_kernels(so: str) -> list[dict]:
    """Per CUDA kernel instantiation and arch: its innermost loops, per SASS iteration.

    The kernels of ``so`` as ``perf_model_cuda.load_build`` disassembles them (the cubins
    through ``nvdisasm``; registers and local memory from the cubins, so an incremental
    build loses nothing); each innermost loop (a backward branch) with the ``.cu`` line
    most of its instructions come from, warp instructions per iteration by class, global
    bytes a thread moves per iteration and the most it has in flight. Per element:
    ``benchmarks/perf_model_cuda.py``, which reads the trip counts of the C++ sources.
    """
    import perf_model_cuda  # imports this module: loaded here, not at the top

    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import cuda_compile_report as ccr

    build = perf_model_cuda.load_build(so)
    out = []
    for arch, funcs in sorted(build.sass.items()):
        for name, sass in sorted(funcs.items()):
            usage = build.usage.get((name, arch))
            loops = find_loops(sass)
            instrs = [i for i in live_instrs(sass) if not i.cold]
            rows = []
            for n, lp in enumerate(loops):
                if lp.children:
                    continue
                body = [i for i in instrs if innermost_loop(loops, i.addr) == n]
                lines = [i.loc[-1] for i in body if i.loc]
                line = max(set(lines), key=lines.count) if lines else None
                counts = {c: sum(instr_class(i.op) == c for i in body) for c in CLASSES}
                rows.append(
                    {
                        "sass": f"{lp.start:#x}-{lp.end:#x}",
                        "source": None if line is None else f"{_rel(line[0])}:{line[1]}",
                        "instrs_per_iter": counts | {"total": len(body)},
                        "load_bytes_per_thread_iter": sum(
                            access_bytes(i.op) for i in body if i.base in _LOADS
                        ),
                        "store_bytes_per_thread_iter": sum(
                            access_bytes(i.op) for i in body if i.base in _STORES
                        ),
                        "bytes_in_flight_per_thread": bytes_in_flight(body, circular=True),
                    }
                )
            out.append(
                {
                    "arch": arch,
                    "kernel": ccr.short_name(name),
                    "name": name,
                    "regs": None if usage is None else usage.registers,
                    "local_bytes": None if usage is None else usage.local_bytes,
                    "instructions": len(instrs),
                    "inner_loops": rows,
                }
            )
    return out


def format_cuda_table(kernels: list[dict]) -> str:
    """Markdown: one line per innermost loop of each CUDA kernel instantiation and arch."""
    head = ("arch", "kernel", "regs", "local B", "loop (source)",
            "instr/iter: fma/tensor/glob/shr/other", "ld/st B per thread/iter",
            "in flight B/thread")  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k in kernels:
        for lp in k["inner_loops"] or [None]:
            if lp is None:
                cells = ("-", "-", "-", "-")
            else:
                c = lp["instrs_per_iter"]
                cells = (
                    f"{lp['sass']} ({lp['source']})",
                    f"{c['total']}: "
                    + "/".join(str(c[x]) for x in ("fma", "tensor", "global", "shared", "other")),
                    f"{lp['load_bytes_per_thread_iter']}/{lp['store_bytes_per_thread_iter']}",
                    str(lp["bytes_in_flight_per_thread"]),
                )
            name = k["kernel"].replace("|", "/")
            lines.append(
                f"| {k['arch']} | `{name}` | {k['regs']} | {k['local_bytes']} | "
                + " | ".join(cells)
                + " |"
            )
    return "\n".join(lines)


# ---------------------------------------------------------------- report


def _si(x: float) -> str:
    return f"{x:.3g}"


def _ratio(row: dict) -> str:
    f = row["predicted_fraction_of_copy"]
    if row["op"].startswith("ProjectedAdamW"):
        return "fails" if f == 0 else f"{1 / f:.2f}× torch"
    return "fails" if f == 0 else f"{100 * f:.0f}%"


def format_table(rows: list[dict]) -> str:
    """The markdown table, one line per (arch, op, dtype, k)."""
    head = (
        "GPU",
        "op",
        "dtype",
        "k",
        "predicted (of copy)",
        "limiter",
        "kernel",
        "B/elt",
        "instr/elt (fma/tensor/mem/other)",
        "regs",
        "smem KiB",
        "blocks/SM",
        "in flight KiB/SM",
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(
                f"| {r['device']} | {r['op']} | {r['dtype']} | {r['k']} | error | "
                + r["error"][:60].replace("|", "/")
                + " |" * (len(head) - 5)
            )
            continue
        ins = r["instrs_per_elt"]
        ks = r["kernels"]
        dom = next((kn for kn in ks if kn["kernel"] == r["limiting_kernel"]), ks[0] if ks else {})
        lines.append(
            "| "
            + " | ".join(
                (
                    r["device"],
                    r["op"],
                    r["dtype"],
                    str(r["k"]),
                    _ratio(r),
                    r["limiter"],
                    str(r["limiting_kernel"]),
                    f"{r['bytes_per_elt']:.2f} (floor {r['floor_bytes_per_elt']:g})",
                    f"{ins['total']:.2f} ({ins['fma']:.2f}/{ins['tensor']:.2f}/"
                    f"{ins['global'] + ins['shared']:.2f}/{ins['other']:.2f})",
                    str(dom.get("regs", "-")),
                    f"{dom.get('smem', 0) / 1024:.1f}",
                    str(dom.get("blocks_per_sm", "-")),
                    f"{dom.get('bytes_in_flight_per_sm', 0) / 1024:.1f}",
                )
            )
            + " |"
        )
    return "\n".join(lines)


def markdown(result: dict) -> str:
    """docs/perf_model.md: the table with the model's constants and assumptions."""
    dev = "\n".join(
        f"- {d['arch']} = {d['name']}: {d['sms']} SMs, {d['clock_hz'] / 1e9:.3f} GHz, copy "
        f"{d['copy_bytes_per_s'] / 1e12:.1f} TB/s (read + write), latency "
        f"{d['latency_s'] * 1e9:.0f} ns, {d['warp_cpi']:g} cycles between a warp's issues; "
        f"{d['fp32_lanes_per_sm']} FP32 lanes per SM; dense "
        "tensor-core FMAs per SM per clock: "
        + ", ".join(
            f"{fam} {kind} {rate}"
            for fam, kinds in d["mma_fma_per_clock"].items()
            for kind, rate in kinds.items()
        )
        + f". Source: {d['source']}; {d['pipes_source']}; {WARP_CPI_SOURCE}."
        for d in result["devices"].values()
    )
    return f"""# {TITLE}

Generated by `python benchmarks/perf_model.py` on {result["date"]} (triton {result["triton"]}),
from the kernels as they were then. Every figure below is a **prediction** from the compiled
SASS of the Triton kernels (sm_80 / sm_90 compiled on a machine without a GPU); nothing here
was run on a GPU. Measured figures live apart, in the GPU runbook's results.

- *predicted (of copy)*: the copy time of the op's essential bytes (the *floor* B/elt:
  project_ reads and writes each gradient element once, plus for side="flat" the fp32
  D × k basis read once for the bucket, 4k/{TENSORS} B/elt, since it is k times a
  vector's size; surgery_ reads both gradients and writes g_u once) over the predicted
  time, i.e. the predicted fraction of the copy roofline. ProjectedAdamW: predicted time
  over torch's fused AdamW time, assuming torch's fused AdamW moves p, g, m, v in and
  p, m, v out at the copy roofline (lower is better; the issue's target is ≤ 1.10×).
- *limiter*: the largest of the bounds (memory at the copy rate; issue at 4 warp
  instructions per SM per clock; latency by Little's law; occupancy: each resident warp
  issues once every {WARP_CPI:g} cycles (measured, see the constants); fp32: FFMA/FMUL/FADD at the
  SM's FP32 lanes; tensor: the MMAs' dense FMAs at the tensor cores' rate), for the
  kernel that takes most of the time (*kernel*); *B/elt* and *instr/elt* (warp
  instructions per element: fma / tensor / global + shared memory / other) are summed over
  the op's kernels; regs, smem, blocks/SM and bytes in flight are the limiting kernel's.
- Shape: buckets of {TENSORS} tensors of {ROWS // TENSORS} × {D} (flat: {TENSORS} vectors of
  {ROWS // TENSORS * D}; surgery_: {TENSORS} pairs of that length); loop trip counts are
  evaluated for that launch.

Constants:

{dev}

Assumptions and what is not modelled: {result["assumptions"]}

{format_table(result["rows"])}
{_cuda_section(result.get("cuda"))}"""


def _cuda_section(cuda: dict | None) -> str:
    if cuda is None:
        return (
            "\nCUDA kernels: per element in [perf_model_cuda.md](perf_model_cuda.md) "
            "(`make perf-model-cuda`); `--cuda` lists their loops per iteration.\n"
        )
    if "error" in cuda:
        return f"\nCUDA kernels: the build or its disassembly failed: {cuda['error']}\n"
    return f"""
## CUDA kernels: SASS per loop iteration (no per-element prediction)

From `{_rel(cuda["so"])}`, built {cuda.get("so_built", "?")} from the `csrc/` of then (for
sm_80 and sm_90 with make cuda-compile-check's flags). Each innermost loop of each template
instantiation: warp instructions per iteration by class, global bytes a thread
loads/stores per iteration, the most it has in flight. Trip
counts come from the C++ launch arithmetic, which this model does not read: these figures
are per iteration, not per element, and no bound or ceiling is derived from them.

{format_cuda_table(cuda["kernels"])}
"""


ASSUMPTIONS = (
    "every 32-byte sector fetched is used (coalescing is not modelled: an uncoalesced "
    "layout moves up to 8x the bytes counted here) and every lane of an access moves "
    "its bytes (masks are not read: a tile padded past D counts its padding); a re-read "
    "of a row block counts as HBM traffic (pessimistic when it hits L2); tensors that "
    "do not grow with the bucket (a d x k basis, weights) are read from HBM once; one "
    "issue slot per warp instruction, and FP32, FP64 and tensor-core work each at its "
    "pipe's peak rate, no other pipe limited (MUFU, INT); dependency stalls, bank "
    "conflicts and barrier waits only as the measured average cycles between a warp's "
    "issues (the occupancy bound: the same for every kernel, so a kernel with more or "
    "fewer stalls than the measured ones is predicted too slow or too fast); loaded "
    "latency 700 ns for every load, L2 hits included (pessimistic for them); stores do "
    "not need bytes in flight; the grid's waves and its busiest SM and block counted "
    "where the work grows with the bucket (a kernel of fixed work spread evenly); no "
    "launch overhead, the small torch ops between kernels free; both sides of a branch "
    "execute except a slow-path call; the loads Triton's pipeliner places before a loop "
    "take issue slots but move no extra bytes; a loop ptxas unrolled runs trips/unroll "
    "times and its peeled remainder copies count nothing; CUDA kernels: "
    "benchmarks/perf_model_cuda.py."
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", default=list(DEVICES), choices=list(DEVICES))
    parser.add_argument("--json", default=DEFAULT_JSON, help="write the model here ('' : no file)")
    parser.add_argument(
        "--md", default=DEFAULT_MD, help="write the markdown table here ('' : no file)"
    )
    parser.add_argument("--quick", action="store_true", help="k = 32 only, every op and dtype")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="worker processes")
    parser.add_argument("--ops", nargs="+", default=list(OPS), choices=list(OPS), metavar="OP")
    parser.add_argument(
        "--cuda",
        action="store_true",
        help=f"also build csrc/ (make cuda-compile-check's venv and flags) into {CUDA_DIR} and "
        "list the CUDA kernels' loops per iteration",
    )
    parser.add_argument("--cuda-so", help="list the CUDA kernels of this built _C*.so instead")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("perf_model: TRITON_INTERPRET must be 0: the interpreter compiles nothing")
    os.environ["TRITON_INTERPRET"] = "0"
    import triton

    start = time.perf_counter()
    ks = (32,) if args.quick else KS
    items = [(op, dt, k, a) for a in args.arch for op in args.ops for dt in DTYPES for k in ks]
    if args.jobs > 1 and len(items) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(args.jobs, ctx) as pool:
            rows = list(pool.map(_model_item, items))
    else:
        rows = [_model_item(it) for it in items]
    cuda = None
    if args.cuda or args.cuda_so:
        try:
            so = args.cuda_so or build_cuda()[0]
            built = datetime.datetime.fromtimestamp(os.path.getmtime(so), datetime.UTC)
            cuda = {"so": so, "so_built": built.strftime("%Y-%m-%d %H:%M UTC")}
            cuda["kernels"] = cuda_kernels(so)
        except (OSError, RuntimeError, subprocess.CalledProcessError, IndexError) as exc:
            cuda = {"error": f"{type(exc).__name__}: {exc}"}
    wall = time.perf_counter() - start
    result = {
        "title": TITLE,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "triton": triton.__version__,
        "shape": {"rows": ROWS, "d": D},
        "devices": {a: asdict(DEVICES[a]) for a in args.arch},
        "assumptions": ASSUMPTIONS,
        "quick": args.quick,
        "wall_s": round(wall, 1),
        "rows": rows,
        "cuda": cuda,
    }
    print(format_table(rows))
    if cuda is not None:
        print("\nCUDA kernels, per SASS loop iteration (no per-element prediction):")
        print(cuda.get("error") or format_cuda_table(cuda["kernels"]))
    print(f"\n{len(rows)} rows in {wall:.0f} s (triton {triton.__version__}); {TITLE.lower()}.")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if args.md:
        os.makedirs(os.path.dirname(os.path.abspath(args.md)), exist_ok=True)
        with open(args.md, "w") as f:
            f.write(markdown(result))
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
