"""The CUDA kernels of ``csrc/cuda`` on CPU tensors, through an emulator (tests only).

The CUDA kernels cannot run here (no GPU), so the tests run the same sources another
way: ``csrc/cuda/*.cu`` compiled by the host compiler as C++ with
``-DGRADPROJ_CUDA_EMULATION``, ``csrc/cuda_emu/cuda_emu.h`` force-included and the
shims of ``csrc/cuda_emu/include`` (``cuda_runtime.h``, ``ATen/cuda/CUDAContext.h``,
``c10/cuda/*.h``) ahead of torch's headers. A block's threads run as fibers with real
barriers and warp shuffles; deadlocks, divergent barriers, faults and exceptions in a
kernel raise ``RuntimeError`` (the model and its limits: ``cuda_emu.h``).

The result is a torch extension of its own, ``gradproj_cuda_emu``, JIT-built with
``torch.utils.cpp_extension.load`` (ninja) into ``build/cuda_emu`` (rebuilt when a
source under ``csrc/`` changes: ninja tracks the headers), whose kernels are CPU
kernels of ``torch.ops.gradproj_emu.*`` (the schemas of ``torch.ops.gradproj``,
``csrc/op_schemas.h``). ``tests/conftest.py`` offers them as the backend
``"cuda-emulated"`` of the test session; the shipped package never registers it, and
dispatch never picks it unless asked for by name.

Environment: ``GRADPROJ_CUDA_EMULATION=0`` leaves the backend out;
``GRADPROJ_EMU_BUILD_DIR`` moves the build; ``GRADPROJ_EMU_VERBOSE=1`` shows it. Read
by the emulator: ``GRADPROJ_EMU_SCHEDULE`` (the order threads run in between barriers:
``forward``, ``reverse``, ``shuffle``, ``lowest``, ``highest``, ``random``; read at each
launch), ``GRADPROJ_EMU_SEED`` (``shuffle``, ``random``), ``GRADPROJ_EMU_SMS`` (3 SMs),
``GRADPROJ_EMU_SMEM_OPTIN`` (bytes or ``163K``; 227 KiB: H100),
``GRADPROJ_EMU_STACK_KIB`` (256) and ``GRADPROJ_EMU_CC`` (the compute capability, 90), the
last four once per process.
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import sys
import sysconfig
import time
from pathlib import Path

import torch

from gradproj import _extension

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
EMU = CSRC / "cuda_emu"
NAME = "gradproj_cuda_emu"

# -U_FORTIFY_SOURCE: where the fibers switch stacks with _longjmp (not x86-64), glibc's
# fortified longjmp would refuse. -fno-strict-aliasing: the kernels read tensors through
# float4 / Pack views, which nvcc allows. -ffp-contract=off: the arithmetic as written
# (nvcc's own contractions cannot be reproduced anyway; the fmaf calls stay fused).
# torch's own flags add -std=c++20 (as in nvcc's build) and -fPIC.
CFLAGS = [
    "-O2",
    "-DGRADPROJ_CUDA_EMULATION",
    "-U_FORTIFY_SOURCE",
    "-fno-strict-aliasing",
    "-ffp-contract=off",
    "-Wno-unknown-pragmas",
    "-include",
    str(EMU / "cuda_emu.h"),
]


def _fma_flags() -> list[str]:
    """``-mfma`` where this x86-64 CPU has it: the kernels' fmaf become one instruction
    instead of a libm call (a third of the emulated time). The build is for this machine."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return []
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return []
    return ["-mfma"] if "fma" in flags else []


_loaded: str | None = None
_failed: BaseException | None = None


def build_dir() -> Path:
    return Path(os.environ.get("GRADPROJ_EMU_BUILD_DIR") or ROOT / "build" / "cuda_emu")


def enabled() -> bool:
    """Whether the test session offers the backend (``GRADPROJ_CUDA_EMULATION`` not 0)."""
    return os.environ.get("GRADPROJ_CUDA_EMULATION", "1") != "0"


def _ninja_dir() -> str | None:
    """Where ninja is: on PATH, else next to this Python (a venv run without activating)."""
    if shutil.which("ninja"):
        return None
    scripts = sysconfig.get_path("scripts")
    if (Path(scripts) / "ninja").exists():
        return scripts
    raise RuntimeError("the CUDA emulator needs ninja (requirements-ci.txt pins it)")


def toolchain_present() -> bool:
    """A C++ compiler and ninja: what the build needs (the backend's ``is_installed``)."""
    compiler = os.environ.get("CXX", "c++")
    try:
        _ninja_dir()
    except RuntimeError:
        return False
    return shutil.which(compiler) is not None


@contextlib.contextmanager
def _ninja_on_path():
    extra = _ninja_dir()
    if extra is None:
        yield
        return
    old = os.environ.get("PATH", "")
    os.environ["PATH"] = extra + os.pathsep + old
    try:
        yield
    finally:
        os.environ["PATH"] = old


def _write_if_changed(path: Path, text: str) -> None:
    """Writes only a changed file, atomically: an unchanged one keeps ninja's build."""
    if path.exists() and path.read_text() == text:
        return
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def sources() -> list[str]:
    """A C++ file per ``csrc/cuda/*.cu`` (each includes its .cu), and the emulator's own.

    ``cpp_extension`` hands ``.cu`` files to nvcc, so each is compiled through a
    one-line wrapper in the build dir; every ``.cu`` there is, new ones included.
    """
    wrappers = build_dir() / "wrappers"
    wrappers.mkdir(parents=True, exist_ok=True)
    out = []
    for cu in sorted((CSRC / "cuda").glob("*.cu")):
        wrapper = wrappers / f"cuda_{cu.stem}.cpp"
        _write_if_changed(
            wrapper, f'// generated by tests/cuda_emulation.py\n#include "{cu.as_posix()}"\n'
        )
        out.append(str(wrapper))
    out += [str(p) for p in sorted(EMU.glob("*.cpp"))]
    return out


def load() -> str:
    """Builds (when a source changed) and loads the emulator; returns the library's path.

    A failed build is raised again on every later call without rebuilding.
    """
    global _loaded, _failed
    if _loaded is not None:
        return _loaded
    if _failed is not None:
        raise RuntimeError(f"the CUDA emulator did not build: {_failed}") from _failed
    from torch.utils import cpp_extension

    verbose = os.environ.get("GRADPROJ_EMU_VERBOSE", "0") == "1"
    start = time.perf_counter()
    try:
        build_dir().mkdir(parents=True, exist_ok=True)
        with _ninja_on_path():
            path = cpp_extension.load(
                name=NAME,
                sources=sources(),
                extra_cflags=CFLAGS + _fma_flags(),
                extra_include_paths=[str(EMU / "include"), str(CSRC), str(EMU)],
                build_directory=str(build_dir()),
                is_python_module=False,
                verbose=verbose,
            )
    except BaseException as exc:
        _failed = exc
        raise
    elapsed = time.perf_counter() - start
    if elapsed > 5:
        print(f"CUDA emulator built in {elapsed:.0f} s ({build_dir()})", file=sys.stderr)
    _loaded = path
    return path


def stats() -> tuple[int, int, int]:
    """(launches, blocks, thread switches) the emulator ran since it was loaded."""
    load()
    launches, blocks, switches = torch.ops.gradproj_emu.emulator_stats()
    return launches, blocks, switches


def perf_model_cuda():
    """``benchmarks/perf_model_cuda.py``: the perf model whose Python twin of the launchers
    the tests hold to the launchers the emulator runs."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import perf_model_cuda
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return perf_model_cuda


def smem_optin() -> int:
    """The emulated device's shared memory a block, in bytes: ``GRADPROJ_EMU_SMEM_OPTIN``
    as the emulator reads it (227 KiB unless set)."""
    optin = os.environ.get("GRADPROJ_EMU_SMEM_OPTIN", "227K")
    scale = 1024 if optin.upper().endswith("K") else 1
    return int(optin.rstrip("kK")) * scale


def tensor_core_launches(d: int, k: int) -> int:
    """The launches of the tensor-core rows kernel for a (d × k) basis on the emulated
    device (mma_rows.cuh [columns]: a block of columns a launch where U does not fit its
    shared memory), 0 where the kernel does not take such rows: the perf model's twin
    of ``columns_per_launch`` (``benchmarks/perf_model_cuda.py`` ``mma_columns``), at
    ``smem_optin()``."""
    cols = perf_model_cuda().mma_columns(d, k, smem_optin())
    return 0 if cols == 0 else -(-k // cols)


def last_kernel() -> str:
    """The demangled name of the last kernel the emulator launched: the engine chosen."""
    load()
    return torch.ops.gradproj_emu.emulator_last_kernel()


def last_smem() -> int:
    """The dynamic shared memory of the emulator's last launch, in bytes: the layout chosen
    where the kernel is the same."""
    load()
    return int(torch.ops.gradproj_emu.emulator_last_smem())


# ---------------------------------------------------------------- the backend's ops
# gradproj._extension's wrappers (the contract's signatures), calling the emulated
# library torch.ops.gradproj_emu instead of torch.ops.gradproj.


def _emulated(name: str):
    def op(*args, **kwargs) -> None:
        load()
        getattr(_extension, name)(*args, **kwargs, library=torch.ops.gradproj_emu)

    op.__name__ = op.__qualname__ = name
    op.__doc__ = f"``gradproj._extension.{name}`` on ``torch.ops.gradproj_emu`` (the emulator)."
    return op


project_bucket_ = _emulated("project_bucket_")
project_anchored_bucket_ = _emulated("project_anchored_bucket_")
projected_adamw_bucket_ = _emulated("projected_adamw_bucket_")
surgery_bucket_ = _emulated("surgery_bucket_")


def backend():
    """The ``gradproj.backends.Backend`` of the emulated kernels (CPU tensors)."""
    from gradproj.backends import KERNEL_DTYPES, Backend

    ops = ("project_bucket_", "project_anchored_bucket_", "projected_adamw_bucket_")
    return Backend(
        name="cuda-emulated",
        devices=lambda: frozenset({"cpu"}),
        dtypes=KERNEL_DTYPES,
        ops={op: f"tests.cuda_emulation:{op}" for op in (*ops, "surgery_bucket_")},
        is_installed=toolchain_present,
        description="csrc/cuda's kernels on CPU tensors through the emulator of the tests",
        emulated=True,
    )
