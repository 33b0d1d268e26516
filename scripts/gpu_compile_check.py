#!/usr/bin/env python3
"""Compile every Triton kernel of gradproj for real GPUs (sm_80, sm_90) on a machine without one.

    python scripts/gpu_compile_check.py [--arch sm_80 sm_90] [--json OUT] [--quick] [--jobs N]

How (the stand-in driver recipe of the shared ENV.md, "Compiling for real GPUs on a
machine without one"): with ``TRITON_INTERPRET=0``, Triton's active driver is
replaced by :class:`StandInDriver`, which reports a CUDA target of the chosen
capability, and ``JITFunction.run`` is made to compile without launching
(``warmup=True``). gradproj's real bucket launchers (``gradproj.kernels.*``) are
then called with CPU tensors in every launch configuration the test suite and the
benchmarks use (:func:`launches`): each launch compiles for the target, nothing
runs. Launches that reach the same compiled kernel (same name, constexprs and
Triton's integer/pointer specialisations) are checked once.

Per compiled kernel and arch:

* shared memory: ``CompiledKernel.metadata.shared`` against the arch's per-block
  limit (the opt-in maximum a launch may ask for; Triton refuses to launch above it);
* registers and spills: the bundled ``ptxas -v`` (the same binary and flags Triton
  builds the cubin with; Triton 3.9 only learns ``n_regs``/``n_spills`` when it
  loads the cubin on a device);
* ``num_warps`` and resident blocks per SM, the least of what registers (allocated
  per warp in units of 256), threads, shared memory (plus 1 KiB reserved per block)
  and the 32-blocks cap allow.

Exit status 1 when a kernel fails to compile, needs more shared memory per block
than the arch has, spills registers, or carries a running sum through a tensor-core
dot's accumulator (``mma-chain``, read from the TTIR: :func:`chained_mma_accumulators`)
— unless that violation is listed in
``scripts/gpu_compile_known.json``, the ratchet of known current defects (entries
``{kernel, config, arch, kind, note}``; one list per Triton version,
:func:`known_path_for`). A
listed violation that no longer occurs also fails the check (a stale entry: remove
it), so the list can only shrink. ``config`` is :func:`config_label`'s text, as the
table prints it.

``--quick``: 8 launches reaching 13 kernels (every kernel function, every dtype, the
largest tiles and the known shared-memory failure); stale entries are then judged
only for the kernels it compiled.

Time, 2 cores (``--jobs 2``, the default is one job per core): from an empty Triton
cache the full check compiles 217 kernels per arch: measured 14 min wall, 1665 s of
CPU (the slowest: the flat apply kernel with a ragged k > 128, ~40 s each, and AdamW
with BLOCK_K = 256, ~11 s each); ``--quick``: 35 s wall, 60 s of CPU. Once Triton's
cache holds the kernels: about 12 s (``--quick``: 8 s). Compiled kernels
live in Triton's cache (``~/.triton``, ``TRITON_CACHE_DIR``) with this check's
``ptxas -v`` figures beside each, never in the repository.

The module is importable: tests run toy kernels through the same functions
(:func:`check_launches`, :func:`judge`).
"""

from __future__ import annotations

import os

if os.environ.setdefault("TRITON_INTERPRET", "0") not in ("", "0"):
    _refusal = (
        "gpu_compile_check: TRITON_INTERPRET must be 0 (or unset) when triton is imported: "
        f"got TRITON_INTERPRET={os.environ['TRITON_INTERPRET']!r}; the interpreter compiles nothing"
    )
    if __name__ == "__main__":
        raise SystemExit(_refusal)
    raise RuntimeError(_refusal)
# Triton 3.9 warns when this is unset; 1 is its default (and triton 3.6's behaviour).
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import argparse
import contextlib
import io
import itertools
import json
import multiprocessing
import re
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.jit import JITFunction

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import arch_limits
from arch_limits import ARCHS as LIMITS
from arch_limits import ArchLimits as Arch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KNOWN_PATH = os.path.join(ROOT, "scripts", "gpu_compile_known.json")
KINDS = ("compile", "smem", "spill", "mma-chain")
# The known list was measured with this Triton (requirements-ci.txt); another version
# compiles differently (other registers, spills, shared memory), so expect differences.
KNOWN_TRITON = "3.9.0"


def known_path_for(version: str) -> str:
    """The known list of one Triton version: each compiles differently (registers, spills).

    ``scripts/gpu_compile_known.json`` for :data:`KNOWN_TRITON` (what CI's main venv pins),
    ``scripts/gpu_compile_known-triton<version>.json`` for another (triton 3.6: the GPU
    machines' version, ``make triton36-check``). A version without a file has an empty list:
    every violation it shows is new.
    """
    if version == KNOWN_TRITON:
        return KNOWN_PATH
    return os.path.join(ROOT, "scripts", f"gpu_compile_known-triton{version}.json")


# ---------------------------------------------------------------- architectures


ARCHS = {name: LIMITS[name] for name in ("sm_80", "sm_90")}


def blocks_per_sm(regs: int, num_warps: int, smem: int, arch: Arch) -> tuple[int, str]:
    """``(blocks, limiter)``: resident blocks per SM of ``num_warps`` warps and what limits them.

    ``scripts/arch_limits.py``'s count (the same as ``scripts/cuda_compile_report.py``'s):
    ``limiter`` is ``regs``, ``threads``, ``smem`` or ``blocks`` (the 32-block cap);
    0 blocks when the shared memory is above the per-block limit (no launch).
    """
    return arch_limits.blocks_per_sm(regs, num_warps * 32, smem, arch)


# ---------------------------------------------------------------- stand-in driver


# The SMs of the GPU each stand-in target stands for: A100 SXM4 (108) and H100 SXM5 (132),
# the devices of benchmarks/perf_model.py. The launchers read them (kernels/project.py
# _sm_count) where a bucket's rows choose the tiles (FEW_ROWS_PER_SM).
STAND_IN_SMS = {80: 108, 90: 132}


class _StandInUtils:
    """The part of a Triton driver's ``utils`` the launchers read: the device's properties."""

    def __init__(self, sms: int) -> None:
        self.sms = sms

    def get_device_properties(self, device: int) -> dict[str, int]:
        return {"multiprocessor_count": self.sms}


class StandInDriver:
    """A Triton driver that reports a CUDA device of capability ``capability`` and launches nothing.

    The device id is the capability itself, so each arch gets its own entry in every
    ``JITFunction``'s per-device cache (whose target is fixed when it is created). Its
    ``utils.get_device_properties`` reports ``STAND_IN_SMS``' SMs for the capability.
    """

    def __init__(self, capability: int) -> None:
        self.capability = capability
        self.utils = _StandInUtils(STAND_IN_SMS.get(capability, 0))

    def get_current_device(self) -> int:
        return self.capability

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", self.capability, 32)

    @staticmethod
    def is_active() -> bool:
        return True


@dataclass
class Compiled:
    """One kernel compiled by a launch: its JIT function, Triton's cache key, the result."""

    fn: JITFunction
    key: str
    config: str  # config_label(): what tells this kernel from its siblings
    kernel: object | None = None  # triton.compiler.CompiledKernel
    error: str | None = None
    log: str = ""  # Triton's own ptxas -v output, when it ran ptxas (cache miss)
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # this process and its children (ptxas): load-independent


def _cpu_seconds() -> float:
    """CPU time of this process and its waited-for children (ptxas)."""
    me, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _fmt(value: object) -> str:
    return str(int(value)) if isinstance(value, bool) else str(value)


def config_label(fn: JITFunction, specialization: list) -> str:
    """What tells a compiled kernel from its siblings, e.g.
    ``fp32 HAS_W=0 ... BLOCK_K=128 | D%16 n_tensors=1``.

    From Triton's specialisation of the call (one ``(type, value)`` per parameter):
    the element dtype (of the ``*0_ptr`` argument that carries it, gradproj's
    convention), every ``tl.constexpr`` parameter, then Triton's specialisations of
    the other arguments: ``=1`` (an int equal to 1 becomes a constant), ``%16`` (an int
    divisible by 16) and ``unaligned`` (a pointer not 16-byte aligned).
    """
    parts, special = [], []
    for p, (ty, value) in zip(fn.params, specialization, strict=True):
        if p.name.endswith("0_ptr") and ty.startswith("*") and not parts:
            parts.append(ty[1:])
        if p.is_constexpr:
            parts.append(f"{p.name}={_fmt(value)}")
        elif ty == "constexpr":
            special.append(f"{p.name}={_fmt(value)}")
        elif ty.startswith("*") and value != "D":
            special.append(f"{p.name}:unaligned")
        elif not ty.startswith("*") and value == "D":
            special.append(f"{p.name}%16")
    return " ".join(parts) + (" | " + " ".join(special) if special else "")


def _launch_key(fn: JITFunction, args: tuple, kwargs: dict) -> tuple[str, str]:
    """Triton's cache key of this call (specialisation and options) and its config label."""
    device = driver.active.get_current_device()
    binder = fn.device_caches[device][4]
    _, specialization, options = binder(*args, **kwargs)
    key = f"{fn.fn.__name__}:{specialization}{options}"
    return key, config_label(fn, specialization)


@contextlib.contextmanager
def compiling_for(arch: Arch, only: set[str] | None = None, plan: bool = False) -> Iterator[list]:
    """Within: Triton targets ``arch``, kernel launches compile and never run.

    Yields the list of :class:`Compiled`, one per launch. ``plan``: compute keys only,
    compile nothing. ``only``: compile only launches whose key is in it.
    """
    from triton import knobs

    if knobs.runtime.interpret:
        raise RuntimeError(
            "gpu_compile_check: TRITON_INTERPRET is on; the interpreter compiles nothing"
        )

    original = JITFunction.run
    seen: list[Compiled] = []

    def run(self, *args, grid, warmup, **kwargs):
        record = Compiled(self, *_launch_key(self, args, kwargs))
        seen.append(record)
        if plan or (only is not None and record.key not in only):
            return None
        buf = io.StringIO()
        start, cpu = time.perf_counter(), _cpu_seconds()
        try:
            with contextlib.redirect_stdout(buf):
                record.kernel = original(self, *args, grid=grid, warmup=True, **kwargs)
        except Exception as exc:  # any compile failure is a finding, reported per kernel
            record.error = f"{type(exc).__name__}: {exc}"
        record.seconds = time.perf_counter() - start
        record.cpu_seconds = _cpu_seconds() - cpu
        record.log = buf.getvalue()
        return record.kernel

    dump = knobs.nvidia.dump_ptxas_log
    previous = getattr(driver, "_active", None)  # None: no driver chosen yet (no GPU here)
    driver.set_active(StandInDriver(arch.capability))
    JITFunction.run = run
    knobs.nvidia.dump_ptxas_log = True  # Triton prints its own ptxas -v log (cache misses)
    try:
        yield seen
    finally:
        JITFunction.run = original
        knobs.nvidia.dump_ptxas_log = dump
        driver.set_active(previous)


# ---------------------------------------------------------------- one compiled kernel


_USED = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def parse_ptxas(log: str) -> dict[str, int] | None:
    """Registers, stack frame and spill bytes from a ``ptxas -v`` log (``None`` if absent)."""
    regs = [int(m) for m in _USED.findall(log)]
    frames = [tuple(map(int, m)) for m in _SPILL.findall(log)]
    if not regs or not frames:
        return None
    return {
        "regs": max(regs),
        "stack": max(f[0] for f in frames),
        "spill_stores": max(f[1] for f in frames),
        "spill_loads": max(f[2] for f in frames),
    }


def ptxas_usage(kernel, arch: Arch) -> dict[str, int]:
    """Run the bundled ``ptxas -v`` on the kernel's PTX, with Triton's own flags and binary."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    flags = ["-lineinfo", "-v", "--regAllocOptLevel=2"]
    if not kernel.metadata.enable_fp_fusion:
        flags.append("--fmad=false")
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "kernel.ptx")
        with open(ptx, "w") as f:
            f.write(kernel.asm["ptx"])
        cmd = [get_ptxas(arch.capability).path, *flags]
        cmd += [f"--gpu-name={sm_arch_from_capability(arch.capability)}", ptx]
        out = subprocess.run(
            [*cmd, "-o", os.path.join(tmp, "kernel.cubin")], capture_output=True, text=True
        )
    usage = parse_ptxas(out.stderr)
    if out.returncode != 0 or usage is None:
        raise RuntimeError(f"ptxas -v failed ({out.returncode}): {out.stderr.strip()[-2000:]}")
    return usage


_USAGE_FILE = "gpu_compile_check_ptxas.json"


def kernel_usage(kernel, arch: Arch, log: str = "") -> dict[str, int]:
    """Registers and spills of a compiled kernel: from Triton's own ``ptxas -v`` ``log`` when it
    compiled the kernel just now, else from the note this check left beside the kernel in
    Triton's cache, else by running ptxas (and leaving that note)."""
    from triton.runtime.cache import get_cache_manager

    usage = parse_ptxas(log)
    cache = get_cache_manager(kernel.hash)  # the directory Triton keeps this cubin in
    if usage is None:
        path = cache.get_file(_USAGE_FILE)
        if path is not None:
            with open(path) as f:
                return json.load(f)
        usage = ptxas_usage(kernel, arch)
    cache.put(json.dumps(usage), _USAGE_FILE, binary=False)
    return usage


@dataclass
class Row:
    """The check of one compiled kernel on one arch (a line of the table)."""

    kernel: str
    config: str
    arch: str
    regs: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    stack: int | None = None
    smem: int | None = None
    smem_limit: int = 0
    warps: int | None = None
    blocks_per_sm: int | None = None
    limiter: str | None = None
    compile_s: float = 0.0
    compile_cpu_s: float = 0.0
    error: str | None = None
    launches: list[str] = field(default_factory=list)
    violations: list[dict] = field(default_factory=list)


_DEF = re.compile(r"^\s*(%[\w.$-]+)(?::\d+)?\s*=\s*(.*)$")
_ITER_ARG = re.compile(r"(%[\w.$-]+)\s*=\s*%[\w.$#-]+")
_DOT = re.compile(r"\btt\.dot\s+(%[\w.$#-]+),\s*(%[\w.$#-]+),\s*(%[\w.$#-]+)")
_PRECISION = re.compile(r"inputPrecision\s*=\s*(\w+)")
_OPERAND = re.compile(r":\s*tensor<(?:\d+x)+(\w+)>")
_ZERO = re.compile(r"arith\.constant dense<(?:0\.0+e\+00|0\.0+|0)>")


def chained_mma_accumulators(ttir: str) -> list[str]:
    """The tensor-core dots of ``ttir`` whose accumulator is a running value.

    The tensor cores truncate each MMA's sum to fp32 (tests/tensor_cores.py: measured on an
    H200), so a sum carried through many MMAs drifts toward zero: gradproj's row kernel
    chained its pass 1 through all of ``D`` and missed the fp32 tolerance by 3x. A
    ``tt.dot`` on the tensor cores (``tf32``, or 16-bit operands) may take as accumulator only
    a zero constant or another dot's result (the tf32 pieces of one product); running sums
    are fp32 adds. Triton's combine pass folds ``acc + tl.dot(a, b)`` back into a chained
    dot, which is why this reads the compiled TTIR, not the source. Exempt: ``ieee`` (FMA
    units, round to nearest: the printer's default, so no attribute means ieee) and
    ``tf32x3`` on fp32 operands, which Triton's F32DotTC pass lowers to three
    dots from zero and one fp32 add of the accumulator (read in the TTGIR of triton 3.6 and
    3.9). Returns one line per offending dot.
    """
    defs: dict[str, str] = {}
    for line in ttir.splitlines():
        m = _DEF.match(line)
        if m:
            defs[m.group(1)] = m.group(2)
        if "iter_args(" in line:
            inner = line.split("iter_args(", 1)[1].split(")", 1)[0]
            for name in _ITER_ARG.findall(inner):
                defs[name] = "a loop-carried value (scf.for iter_args)"
    found = []
    for lineno, line in enumerate(ttir.splitlines(), 1):
        m = _DOT.search(line)
        if not m:
            continue
        # the printer elides the default precision, ieee; 16-bit operands always take the
        # tensor cores, whatever the attribute says
        precision = _PRECISION.search(line)
        precision = precision.group(1).lower() if precision else "ieee"
        operand = _OPERAND.search(line)
        if (operand is None or operand.group(1) == "f32") and precision in ("ieee", "tf32x3"):
            continue
        acc = m.group(3).split("#", 1)[0]
        source = defs.get(acc, "a function argument or block argument")
        if _ZERO.search(source) or re.search(r"\btt\.dot\s", source):
            continue
        found.append(
            f"line {lineno}: tt.dot accumulates into {acc}, {source.split(' loc(')[0][:160]}"
        )
    return found


def analyze(record: Compiled, arch: Arch, launch: str) -> Row:
    """Measure one compiled kernel and list its violations on ``arch``."""
    name = record.fn.fn.__name__
    if record.kernel is None:
        row = Row(name, record.config, arch.name, error=record.error, launches=[launch])
        row.violations.append({"kind": "compile", "detail": (record.error or "")[:2000]})
        row.compile_s = round(record.seconds, 2)
        row.compile_cpu_s = round(record.cpu_seconds, 2)
        return row
    k = record.kernel
    usage = kernel_usage(k, arch, record.log)
    smem, warps = int(k.metadata.shared), int(k.metadata.num_warps)
    blocks, limiter = blocks_per_sm(usage["regs"], warps, smem, arch)
    row = Row(
        name,
        record.config,
        arch.name,
        smem=smem,
        smem_limit=arch.smem_optin_per_block,
        warps=warps,
        blocks_per_sm=blocks,
        limiter=limiter,
        compile_s=round(record.seconds, 2),
        compile_cpu_s=round(record.cpu_seconds, 2),
        launches=[launch],
        **usage,
    )
    if smem > arch.smem_optin_per_block:
        row.violations.append(
            {
                "kind": "smem",
                "detail": f"{smem} B of shared memory per block > {arch.smem_optin_per_block} B "
                f"allowed on {arch.name} ({arch.gpu}): the launch would fail",
            }
        )
    chained = chained_mma_accumulators(k.asm.get("ttir", ""))
    if chained:
        row.violations.append(
            {
                "kind": "mma-chain",
                "detail": f"{len(chained)} tensor-core dot(s) accumulate a running sum "
                f"(truncated each MMA): " + "; ".join(chained[:3]),
            }
        )
    if usage["spill_stores"] or usage["spill_loads"]:
        row.violations.append(
            {
                "kind": "spill",
                "detail": f"{usage['spill_stores']} B spill stores, {usage['spill_loads']} B "
                f"spill loads at {usage['regs']} registers",
            }
        )
    return row


# ---------------------------------------------------------------- launches


@dataclass(frozen=True)
class Launch:
    """One call of a launcher with CPU tensors: ``label`` says which configuration.

    ``cost`` (estimated CPU seconds to compile) orders the work: the slowest first, so
    parallel workers finish together.
    """

    label: str
    call: Callable[[], None]
    cost: float = 1.0


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# k values: every BLOCK_K the launchers pick and every specialisation of K.
#   project (rows and flat): BLOCK_K = clamp(next_pow2(k), 16, 128), chunked beyond 128;
#     k = 1: K becomes a constant; k = 8: BLOCK_K = 16 with K not a multiple of 16;
#     32, 64, 128: K a multiple of 16; 129: BLOCK_K = 128 with a ragged chunk;
#     256, 512: two and four chunks of 128 (the k = 128 kernel again);
#     contiguous rows with 128 < D <= 1024 and k <= 16 (fp32) / 8 (16-bit), or
#     1024 < D <= 4096 and k <= 8 / 4 (4- and 2-row blocks), or transposed views of
#     16-byte vectors with 128 < D <= 768 and k <= 8 (8 or 16 rows): the resident
#     kernel (K a loop bound); projected AdamW's FMA form likewise (contiguous rows,
#     D <= 4096).
#   projected AdamW: BLOCK_K = max(16, next_pow2(k)) up to 128, k ≤ 256; 129 and 256:
#     two tiles of 128 (KSPLIT = 2), 129 with K not a multiple of 16.
PROJECT_KS = (1, 8, 32, 64, 128, 129, 256, 512)
ADAMW_KS = (1, 8, 32, 64, 128, 129, 256)
SIDES = ("input", "output", "flat")

D = 768  # the SD 1.5 text width (the benchmarks' K/V buckets): a multiple of 16
ROWS = (37, 5)  # rows of the bucket's tensors: two tensors, neither a multiple of BLOCK_R
# A bucket of many rows for every stand-in device (64 rows an SM: kernels/project.py
# FEW_ROWS_PER_SM): the row launcher's tiles for many rows, where ROWS' bucket takes its
# few-rows tiles. Nothing runs, so its size costs only the launcher's tables.
MANY_ROWS = (64 * max(STAND_IN_SMS.values()) + 37, 5)
MANY_VEC_ROWS = (MANY_ROWS[0] + 11, 16)  # ... whose rows are whole 16-byte vectors (VEC > 1)


def _row_views(dtype: torch.dtype, side: str, d: int, rows: tuple[int, ...]) -> list[torch.Tensor]:
    """Row views as gradproj's buckets pass them (``output``: transposed views)."""
    if side == "output":
        return [torch.empty(d, r, dtype=dtype).T for r in rows]
    if side == "flat":  # one basis of rows[0]·d: every vector of a flat bucket has that length
        return [torch.empty(rows[0] * d, dtype=dtype) for _ in rows]
    return [torch.empty(r, d, dtype=dtype) for r in rows]


def _hs(soft: bool) -> str:
    return "soft" if soft else "hard"


def project_launch(
    dt: str, side: str, k: int, soft: bool, anchored: bool, d: int = D, rows=ROWS, note: str = ""
) -> Launch:
    """``project_bucket_`` (or ``project_anchored_bucket_``) on a bucket of ``rows × d`` grads."""
    dtype = DTYPES[dt]

    def call() -> None:
        from gradproj.kernels import project

        mats = _row_views(dtype, side, d, rows)
        basis = torch.empty(mats[0].shape[-1], k)
        w = torch.empty(k) if soft else None
        if anchored:
            anchors = [torch.zeros(1 if side == "flat" else m.shape[0], k) for m in mats]
            project.project_anchored_bucket_(mats, anchors, basis, w, side)
        else:
            project.project_bucket_(mats, basis, w, side)

    op = "project_anchored_bucket_" if anchored else "project_bucket_"
    label = f"{op} {side} {dt} k={k} {_hs(soft)}{note}"
    # estimated CPU seconds (measured: the flat apply kernel with a ragged k > 128 ~40 s)
    ragged = k % 16 != 0
    if side == "flat":
        cost = 40.0 if ragged and k > 128 else 1 + 2 * min(k, 128) / 128
    else:
        cost = (1 + 6 * min(k, 128) / 128) * (1.5 if ragged and k > 16 else 1.0)
    return Launch(label, call, cost=cost)


def adamw_launch(
    dt: str,
    side: str,
    k: int,
    soft: bool,
    amsgrad: bool,
    maximize: bool = False,
    d: int = D,
    rows=ROWS,
    note: str = "",
    strided: bool = False,
) -> Launch:
    """``projected_adamw_bucket_`` on a bucket of ``rows × d`` parameters.

    ``strided``: grads that are every other column of a wider tensor (no unit
    stride: the kernel's STRIDED layout).
    """
    dtype = DTYPES[dt]

    def call() -> None:
        from gradproj.kernels import adamw

        params = _row_views(dtype, side, d, rows)
        grads = _row_views(dtype, side, d, rows)
        if strided:
            grads = [torch.empty(p.shape[0], 2 * p.shape[1], dtype=dtype)[:, ::2] for p in params]
        m, v, vmax = ([torch.zeros_like(p) for p in params] for _ in range(3))
        anchors = [torch.zeros(1 if side == "flat" else p.shape[0], k) for p in params]
        adamw.projected_adamw_bucket_(
            params,
            grads,
            m,
            v,
            vmax if amsgrad else None,
            [torch.ones(()) for _ in params],
            anchors,
            torch.empty(params[0].shape[-1], k),
            torch.empty(k) if soft else None,
            side,
            lr=1e-3,
            beta1=0.9,
            beta2=0.999,
            eps=1e-8,
            weight_decay=1e-2,
            maximize=maximize,
        )

    flags = f"{_hs(soft)} {'amsgrad' if amsgrad else 'no-amsgrad'}{' maximize' * maximize}"
    label = f"projected_adamw_bucket_ {side} {dt} k={k} {flags}{note}"
    return Launch(label, call, cost=2 + 9 * max(16, triton.next_power_of_2(k)) / 256)


def surgery_launch(dt: str, variant: str, symmetric: bool, numels=(20000, 4773)) -> Launch:
    """``surgery_bucket_`` on pairs of flat grads (one over a chunk, one ragged)."""
    dtype = DTYPES[dt]

    def call() -> None:
        from gradproj.kernels import surgery

        us = [torch.zeros(n, dtype=dtype) for n in numels]
        rs = [torch.zeros(n, dtype=dtype) for n in numels]
        surgery.surgery_bucket_(us, rs, 0.7, variant, symmetric)

    sym = "symmetric" if symmetric else "one-sided"
    return Launch(f"surgery_bucket_ {dt} {variant} {sym}", call, cost=0.3)


def launches(quick: bool = False) -> list[Launch]:
    """Every launch configuration of the test suite and the benchmarks (``quick``: a subset).

    Full: every dtype × side × k of ``PROJECT_KS`` / ``ADAMW_KS`` × soft/hard ×
    anchored or not (projection) / amsgrad or not (AdamW), every surgery variant,
    plus the test suite's odd shapes where they specialise differently.
    """
    from gradproj.kernels import adamw, project  # their tile tiers' largest k

    if quick:
        return _quick()
    out: list[Launch] = []
    for dt in DTYPES:
        for k in PROJECT_KS:
            for side in SIDES:
                for anchored in (False, True):
                    for soft in (False, True):
                        out.append(project_launch(dt, side, k, soft, anchored))
                        # the tiles of many rows: the two-pass kernel's past k = 8, and
                        # 16-bit resident rows (few rows on sm_90 keep 4 warps)
                        if side != "flat" and (k > 8 or (side == "input" and dt != "fp32")):
                            many = project_launch(
                                dt, side, k, soft, anchored, rows=MANY_ROWS, note=" many rows"
                            )
                            out.append(many)
        for k in ADAMW_KS:
            for side in SIDES:
                for amsgrad in (False, True):
                    for soft in (False, True):
                        out.append(adamw_launch(dt, side, k, soft, amsgrad))
                        # the tiles of many rows at k = 65-128 on sm_90 (kernels/adamw.py
                        # _rows_config)
                        if side != "flat" and 64 < k <= 128:
                            out.append(adamw_launch(dt, side, k, soft, amsgrad, rows=MANY_ROWS,
                                                    note=" many rows"))  # fmt: skip
        for variant in ("projection", "cosine"):
            for symmetric in (False, True):
                out.append(surgery_launch(dt, variant, symmetric))
        # every numel a multiple of 16 bytes: vectorized (VEC > 1)
        out.append(surgery_launch(dt, "projection", True, numels=(20000, 4768)))
        # tests/test_project.py: a lone (37, 129) grad, k = 7 (D, K not multiples of 16;
        # flat: one chunk, so n_chunks becomes a constant)
        tests = " (37, 129) (tests)"
        for soft in (False, True):
            out.append(project_launch(dt, "input", 7, soft, False, d=129, rows=(37,), note=tests))
        out.append(project_launch(dt, "flat", 7, False, False, d=129, rows=(37,), note=tests))
        # tests/test_project.py: (37, 129) output side, k = 37: D = 37, the one-pass tile
        out.append(
            project_launch(dt, "output", 37, True, True, d=37, rows=(129,), note=" D=37 (tests)")
        )
        # output side with rows a multiple of 16 bytes: vectorized along rows (VEC > 1)
        out.append(project_launch(dt, "output", 32, False, False, rows=(48, 16), note=" (48+16)"))
        out.append(
            project_launch(dt, "output", 32, False, False, rows=MANY_VEC_ROWS, note=" many rows")
        )
        # the resident kernel (contiguous rows, 128 < D <= 1024, small k) in each of its
        # chunkings: 1 x 256, 3 x 128, 2 x 256, 4 x 256 columns (768: 3 x 256, above), at k =
        # 8 and the dtype's largest k (RESIDENT_MAX_K: fp32 16), soft and hard (16-bit: 4
        # warps and 8, kernels/project.py RESIDENT_WARPS), and for 16-bit hard rows many rows
        # too (few on sm_90: 4 warps)
        res_ks = sorted({8, project.RESIDENT_MAX_K[4 if dt == "fp32" else 2]})
        for d in (200, 320, 500, 1024):
            for anchored in (False, True):
                for soft, k in itertools.product((True, False), res_ks):
                    out.append(project_launch(dt, "input", k, soft, anchored, d=d, note=f" D={d}"))
                if dt != "fp32":
                    note = f" D={d} many rows"
                    out.append(project_launch(dt, "input", 8, False, anchored, d=d,
                                              rows=MANY_ROWS, note=note))  # fmt: skip
        # its wide blocks (1024 < D <= 4096): 4 rows of 3 and 4 tiles of 512, 2 rows of 3
        # and 4 tiles of 1024, at the largest k of the tier and dtype (resident_max_k: fp32
        # 8; 16-bit 8 in 4 rows, 4 in 2), and k = 1
        size = 4 if dt == "fp32" else 2
        for d in (1100, 2048, 3000, 4096):
            wide_k = project.resident_max_k(project.resident_tiles(d), size)
            for anchored in (False, True):
                out.append(project_launch(dt, "input", wide_k, True, anchored, d=d, note=f" D={d}"))
        for d in (2048, 4096):
            out.append(project_launch(dt, "input", 1, False, False, d=d, note=f" D={d}"))
    # fp32 rows at k = 16, resident (RESIDENT_MAX_K), at D = 768 with few and many rows
    vec_rows = (48, 16)  # transposed views whose rows are whole 16-byte vectors (VEC > 1)
    for anchored in (False, True):
        out.append(project_launch("fp32", "input", 16, True, anchored))
        out.append(project_launch("fp32", "input", 16, True, anchored, rows=MANY_ROWS,
                                  note=" many rows"))  # fmt: skip
    # its blocks over transposed views (side="output", 128 < D <= 1536, VEC > 1) in each
    # chunking at its largest k (RESIDENT_OUTPUT_MAX_K: fp32 8, 16-bit 4; beyond 768,
    # RESIDENT_OUTPUT_WIDE_MAX_K: 8, 4), and at k = 1 (K a constant); past that limit, to
    # k = 16, the two-pass kernel's 64 x 32 tiles over the same views
    for dt in DTYPES:
        size = 4 if dt == "fp32" else 2
        for d in (200, 320, 500, 768, 1024, 1280, 1536):
            limits = (
                project.RESIDENT_OUTPUT_MAX_K if d <= 768 else project.RESIDENT_OUTPUT_WIDE_MAX_K
            )
            out_k = limits[size]
            for anchored in (False, True):
                note = f" D={d} (48+16)"
                out.append(project_launch(dt, "output", out_k, True, anchored, d=d,
                                          rows=vec_rows, note=note))  # fmt: skip
                if dt == "fp32" and d <= 768:
                    # fp32's few rows on sm_90 take 4 warps (RESIDENT_OUTPUT_FEW_ROWS_WARPS_
                    # MAXNREG): the many rows' 8, capped at 192
                    many = f" D={d} many rows"
                    out.append(project_launch(dt, "output", out_k, True, anchored, d=d,
                                              rows=MANY_VEC_ROWS, note=many))  # fmt: skip
        out.append(project_launch(dt, "output", 1, False, False, rows=vec_rows, note=" (48+16)"))
        for anchored in (False, True):
            for k in (project.RESIDENT_OUTPUT_MAX_K[size] + 1, 16):
                out.append(project_launch(dt, "output", k, True, anchored, rows=vec_rows,
                                          note=" (48+16) two-pass"))  # fmt: skip
                out.append(project_launch(dt, "output", k, True, anchored, rows=MANY_VEC_ROWS,
                                          note=" many rows two-pass"))  # fmt: skip
    # projected AdamW's FMA form (contiguous rows, 128 < D <= 4096) in each chunking (D >
    # 768: 4-row blocks of 2 or 3 tiles of 512; D > 1536: 2-row blocks of 2 or 3 tiles of
    # 1024; D = 4096: 4 of them on 8 warps), at k = 8 and at its largest k for the dtype and
    # width (adamw.FMA_MAX_K, FMA_4TILE_MAX_K), soft weights, with and without amsgrad
    for dt in DTYPES:
        size = 4 if dt == "fp32" else 2
        for d in (200, 320, 500, 768, 1024, 1536, 2048, 3072, 4096):
            for amsgrad in (False, True):
                for k in sorted({8, adamw.fma_max_k(d, size, amsgrad)}):
                    out.append(adamw_launch(dt, "input", k, True, amsgrad, d=d, note=f" D={d}"))
    for dt in ("fp32", "bf16"):  # tests/test_adamw.py: amsgrad + maximize, k = 3, D = 24
        tests = " (37, 24) + (5, 24) (tests)"
        out.append(adamw_launch(dt, "input", 3, False, True, True, d=24, note=tests))
    for dt in DTYPES:  # output side with rows a multiple of 16 bytes: vectorized (ALIGN > 1)
        aligned = " (48, 768) + (16, 768)"
        out.append(adamw_launch(dt, "output", 32, False, False, rows=(48, 16), note=aligned))
    # ... there the FMA form (128 < D <= 768, k <= FMA_COLS_MAX_K: fp32 16, 16-bit 8) in each
    # chunking, at k = 1 and at its largest k, soft and hard (16-bit 3-tile blocks take their
    # warps and register cap by both: FMA_COLS_16BIT_SM80_MAXNREG, _WARPS_MAXNREG)
    for d in (200, 320, 500, 768):
        for amsgrad in (False, True):
            for dt in DTYPES:
                top = adamw.FMA_COLS_MAX_K[4 if dt == "fp32" else 2]
                for k, soft in itertools.product((1, top), (True, False)):
                    note = f" ({48}, {d}) + (16, {d})"
                    out.append(adamw_launch(dt, "output", k, soft, amsgrad, d=d, rows=(48, 16),
                                            note=note))  # fmt: skip
    # tests/test_adamw.py: grads with no unit stride (STRIDED layout)
    strided = " (9, 40) + (5, 40) strided grads (tests)"
    out.append(
        adamw_launch(
            "fp32", "input", 7, False, False, d=40, rows=(9, 5), note=strided, strided=True
        )
    )
    return out


def _quick() -> list[Launch]:
    """Every kernel once or twice, every dtype, the largest tiles (the known violations)."""
    return [
        project_launch("fp32", "input", 128, False, False),
        project_launch("bf16", "output", 64, True, True),
        project_launch("fp16", "input", 8, False, False),
        project_launch("fp32", "flat", 128, True, False),
        adamw_launch("fp32", "input", 256, True, True),
        adamw_launch("bf16", "output", 32, False, False),
        adamw_launch("fp32", "flat", 32, True, True),
        surgery_launch("fp32", "projection", False),
        surgery_launch("bf16", "cosine", True),
    ]


# ---------------------------------------------------------------- the check


def _plan(items: list[Launch], arch: Arch) -> tuple[dict[str, int], dict[str, list[str]], list]:
    """Which launch first reaches each distinct kernel, and every launch reaching it."""
    first: dict[str, int] = {}
    users: dict[str, list[str]] = {}
    failed = []
    with compiling_for(arch, plan=True) as seen:
        for i, item in enumerate(items):
            before = len(seen)
            try:
                item.call()
            except Exception as exc:
                failed.append((item.label, f"{type(exc).__name__}: {exc}"))
                continue
            if len(seen) == before:  # e.g. kernels made by triton.jit under the interpreter
                failed.append((item.label, "the launch reached no compiled Triton kernel"))
            for record in seen[before:]:
                first.setdefault(record.key, i)
                users.setdefault(record.key, []).append(item.label)
    return first, users, failed


def compile_one(items: list[Launch], index: int, key: str, arch: Arch) -> Row:
    """Compile the kernel ``key`` that launch ``items[index]`` reaches, and check it.

    A failure anywhere (the launch, Triton, ptxas) is the kernel's ``compile`` violation.
    """
    seen: list[Compiled] = []
    try:
        with compiling_for(arch, only={key}) as seen:
            items[index].call()
        return analyze(next(r for r in seen if r.key == key), arch, items[index].label)
    except Exception as exc:
        record = next((r for r in seen if r.key == key), None)
        name, config = key.split(":", 1)[0], "?" if record is None else record.config
        row = Row(name, config, arch.name, error=f"{type(exc).__name__}: {exc}")
        row.violations.append({"kind": "compile", "detail": row.error[:2000]})
        return row


_WORKER_ITEMS: list[Launch] = []


def _worker_init(quick: bool | None, rebuild: Callable[[], list[Launch]] | None = None) -> None:
    _WORKER_ITEMS[:] = rebuild() if rebuild is not None else launches(quick)


def _worker(index: int, key: str, arch_name: str) -> Row:
    return compile_one(_WORKER_ITEMS, index, key, ARCHS[arch_name])


def check_launches(
    items: list[Launch],
    archs: list[str],
    jobs: int = 1,
    quick: bool | None = None,
    progress: Callable[[str], None] | None = None,
    rebuild: Callable[[], list[Launch]] | None = None,
) -> list[Row]:
    """Compile every distinct kernel ``items`` reach, for every arch, and check each.

    ``jobs > 1`` compiles in that many worker processes, which rebuild the items with
    ``rebuild()`` (a picklable callable), or else ``launches(quick)`` (so ``items`` must be
    what it returns); ``jobs = 1`` runs here, for any items. A launch that raises is
    reported as a compile failure.
    """
    work = []  # (cost, index, key, arch)
    users: dict[tuple[str, str], list[str]] = {}
    rows: list[Row] = []
    for arch_name in archs:
        first, launched, failed = _plan(items, ARCHS[arch_name])
        for key, index in first.items():
            work.append((items[index].cost, index, key, arch_name))
            users[(arch_name, key)] = launched[key]
        for label, err in failed:
            row = Row("(launcher)", label, arch_name, error=err, launches=[label])
            row.violations.append({"kind": "compile", "detail": err})
            rows.append(row)
    work.sort(key=lambda w: -w[0])
    done = 0

    def finish(row: Row, key: str) -> None:
        nonlocal done
        row.launches = users[(row.arch, key)]
        rows.append(row)
        done += 1
        if progress is not None:
            progress(f"[{done}/{len(work)}] {row.arch} {row.kernel} {row.compile_s:.1f}s")

    if jobs <= 1 or len(work) <= 1:
        for _, index, key, arch_name in work:
            finish(compile_one(items, index, key, ARCHS[arch_name]), key)
    else:
        assert quick is not None or rebuild is not None, (
            "jobs > 1 needs quick= or rebuild= to rebuild the items in the workers"
        )
        ctx = multiprocessing.get_context("spawn")  # no fork of a process holding torch threads
        init = {"initializer": _worker_init, "initargs": (quick, rebuild)}
        with ProcessPoolExecutor(jobs, ctx, **init) as pool:
            futures = {pool.submit(_worker, i, key, a): key for _, i, key, a in work}
            for future in as_completed(futures):
                finish(future.result(), futures[future])
    order = {name: i for i, name in enumerate(archs)}
    rows.sort(key=lambda r: (order[r.arch], r.kernel, r.config))
    return rows


@dataclass
class Verdict:
    """Violations split by the known list: ``new`` fail, ``known`` pass, ``stale`` fail."""

    new: list[dict]
    known: list[dict]
    stale: list[dict]

    @property
    def ok(self) -> bool:
        return not self.new and not self.stale


def load_known(path: str = KNOWN_PATH) -> list[dict]:
    """The known-violations list; every entry has kernel, config, arch, kind and a note."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        entries = json.load(f)
    for i, e in enumerate(entries):
        missing = {"kernel", "config", "arch", "kind", "note"} - set(e)
        if missing or e["kind"] not in KINDS or not str(e["note"]).strip():
            raise ValueError(
                f"{path}: entry {i} needs kernel, config, arch, kind in {KINDS} and a note; got {e}"
            )
    return entries


def judge(rows: list[Row], known: list[dict], complete: bool) -> Verdict:
    """Compare the rows' violations with the known list.

    A known entry is stale when its kernel was checked on its arch without that
    violation, or, when ``complete`` (the full launch list ran on that arch), when no
    kernel of its name and config was compiled at all.
    """
    listed = {(e["kernel"], e["config"], e["arch"], e["kind"]): e for e in known}
    found = {
        (r.kernel, r.config, r.arch, v["kind"]): {
            "kernel": r.kernel,
            "config": r.config,
            "arch": r.arch,
            **v,
        }
        for r in rows
        for v in r.violations
    }
    checked = {(r.kernel, r.config, r.arch) for r in rows}
    archs = {r.arch for r in rows}
    stale = []
    for key, e in listed.items():
        if key in found:
            continue
        if key[:3] in checked:
            stale.append({**e, "why": "checked and no longer violated"})
        elif complete and e["arch"] in archs:
            stale.append({**e, "why": "no kernel with this name and config was compiled"})
    return Verdict(
        new=[v for key, v in found.items() if key not in listed],
        known=[v for key, v in found.items() if key in listed],
        stale=stale,
    )


# ---------------------------------------------------------------- report


def _kib(n: int | None) -> str:
    return "-" if n is None else f"{n / 1024:.1f}K"


def format_table(rows: list[Row]) -> str:
    """One line per compiled kernel and arch."""
    head = ("kernel", "config", "arch", "regs", "spills st/ld", "smem", "warps", "blocks/SM")
    lines = []
    for r in rows:
        spills = "-" if r.spill_stores is None else f"{r.spill_stores}/{r.spill_loads}"
        blocks = "-" if r.blocks_per_sm is None else f"{r.blocks_per_sm} ({r.limiter})"
        marks = ",".join(v["kind"] for v in r.violations)
        lines.append(
            (
                r.kernel,
                r.config,
                r.arch,
                "-" if r.regs is None else str(r.regs),
                spills,
                _kib(r.smem),
                "-" if r.warps is None else str(r.warps),
                blocks + (f"  !{marks}" if marks else ""),
            )
        )
    return "\n".join(arch_limits.format_table(head, lines))


def report(verdict: Verdict, known_path: str = KNOWN_PATH) -> str:
    """One ``FAIL`` line per new violation and per stale known entry."""
    where = os.path.relpath(known_path, ROOT) if known_path.startswith(ROOT) else known_path
    out = []
    for v in verdict.new:
        out.append(f"FAIL {v['kind']}: {v['kernel']} [{v['config']}] on {v['arch']}: {v['detail']}")
    for e in verdict.stale:
        out.append(
            f"FAIL stale known entry ({e['why']}; remove it from {where}): "
            f"{e['kernel']} [{e['config']}] on {e['arch']}, kind {e['kind']}"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    parser.add_argument("--json", help="write the table, violations and verdict here")
    parser.add_argument("--quick", action="store_true", help="a subset of the launches")
    parser.add_argument(
        "--known",
        default=known_path_for(triton.__version__),
        help="the known-violations list (default: this Triton version's)",
    )
    parser.add_argument(
        "--jobs", type=int, default=os.cpu_count() or 1, help="compile in this many processes"
    )
    args = parser.parse_args(argv)
    start = time.perf_counter()
    known = load_known(args.known)
    items = launches(args.quick)
    rows = check_launches(
        items,
        args.arch,
        jobs=args.jobs,
        quick=args.quick,
        progress=lambda s: print(s, file=sys.stderr, flush=True),
    )
    verdict = judge(rows, known, complete=not args.quick)
    wall = time.perf_counter() - start
    print(format_table(rows))
    print()
    n_kernels = len({(r.kernel, r.config) for r in rows})
    cpu = _cpu_seconds()
    print(
        f"{n_kernels} distinct kernels x {len(args.arch)} arch(s) = {len(rows)} compiled from "
        f"{len(items)} launches in {wall:.0f} s wall, {cpu:.0f} s CPU, {args.jobs} job(s) "
        f"(triton {triton.__version__}); "
        f"{len(verdict.known)} known violations, {len(verdict.new)} new, "
        f"{len(verdict.stale)} stale known entries"
    )
    if args.json:
        result = {
            "triton": triton.__version__,
            "archs": {a: asdict(ARCHS[a]) for a in args.arch},
            "quick": args.quick,
            "wall_s": round(wall, 1),
            "cpu_s": round(cpu, 1),
            "jobs": args.jobs,
            "rows": [asdict(r) for r in rows],
            "new": verdict.new,
            "known": verdict.known,
            "stale": verdict.stale,
            "ok": verdict.ok,
        }
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    text = report(verdict, args.known)
    if text:
        print(text)
    print("OK" if verdict.ok else "FAILED")
    return 0 if verdict.ok else 1


if __name__ == "__main__":
    sys.exit(main())
