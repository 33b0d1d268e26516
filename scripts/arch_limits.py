"""Per-arch limits of NVIDIA GPUs, resident blocks per SM, and the table both compile checks print.

Shared by ``scripts/cuda_compile_report.py`` (the CUDA extension's kernels, from
ptxas's log) and ``scripts/gpu_compile_check.py`` (the Triton kernels), so the two
reports count occupancy the same way. Blocks per SM follow ``cuda_occupancy.h``:
registers are allocated per warp in units of 256, from each of the 4 sub-partitions'
quarter of the register file; each block's shared memory takes 1 KiB more from the
SM's pool (8.0+).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

KiB = 1024


@dataclass(frozen=True)
class ArchLimits:
    """Per-SM and per-block limits (CUDA C++ Programming Guide, compute capabilities table)."""

    name: str  # sm_80
    capability: int  # 80
    gpu: str  # a GPU of the arch, for messages
    max_threads_per_sm: int
    max_blocks_per_sm: int
    smem_per_sm: int  # the largest carveout
    smem_optin_per_block: int  # cudaFuncAttributeMaxDynamicSharedMemorySize ceiling
    smem_reserved_per_block: int = 1 * KiB  # the system's share per block (8.0+)
    static_smem_per_block: int = 48 * KiB
    regs_per_sm: int = 65536
    max_regs_per_thread: int = 255
    reg_alloc_unit: int = 256  # registers per warp are allocated in these units
    sub_partitions: int = 4


ARCHS: dict[str, ArchLimits] = {
    a.name: a
    for a in (
        ArchLimits("sm_70", 70, "V100", 2048, 32, 96 * KiB, 96 * KiB, smem_reserved_per_block=0),
        ArchLimits("sm_75", 75, "T4", 1024, 16, 64 * KiB, 64 * KiB, smem_reserved_per_block=0),
        ArchLimits("sm_80", 80, "A100", 2048, 32, 164 * KiB, 163 * KiB),
        ArchLimits("sm_86", 86, "A10", 1536, 16, 100 * KiB, 99 * KiB),
        ArchLimits("sm_87", 87, "Jetson Orin", 1536, 16, 164 * KiB, 163 * KiB),
        ArchLimits("sm_89", 89, "L4", 1536, 24, 100 * KiB, 99 * KiB),
        ArchLimits("sm_90", 90, "H100", 2048, 32, 228 * KiB, 227 * KiB),
        ArchLimits("sm_100", 100, "B200", 2048, 32, 228 * KiB, 227 * KiB),
    )
}


def arch_limits(arch: str) -> ArchLimits | None:
    """Limits of ``sm_90`` for ``sm_90``/``sm_90a``/``sm_100f``; None when unknown."""
    return ARCHS.get(re.sub(r"[a-z]$", "", arch))


def blocks_per_sm_regs(registers: int, threads: int, lim: ArchLimits) -> int:
    """Resident blocks per SM as registers allow (cuda_occupancy.h's rule)."""
    if registers > lim.max_regs_per_thread:
        return 0
    per_warp = -(-max(registers, 1) * 32 // lim.reg_alloc_unit) * lim.reg_alloc_unit
    warps_per_partition = lim.regs_per_sm // lim.sub_partitions // per_warp
    return warps_per_partition * lim.sub_partitions // -(-threads // 32)


def blocks_per_sm_smem(smem: int, lim: ArchLimits) -> int:
    """Resident blocks per SM as ``smem`` bytes per block allow; 0 above the per-block limit."""
    if smem > lim.smem_optin_per_block:
        return 0
    return lim.smem_per_sm // (smem + lim.smem_reserved_per_block)


def blocks_per_sm(registers: int, threads: int, smem: int, lim: ArchLimits) -> tuple[int, str]:
    """``(blocks, limiter)``: resident blocks per SM and the limit that binds first.

    ``limiter`` is ``regs``, ``threads``, ``smem`` (only when the block uses shared
    memory) or ``blocks`` (the per-SM cap); on a tie the first of that order.
    """
    limits = {
        "regs": blocks_per_sm_regs(registers, threads, lim),
        "threads": lim.max_threads_per_sm // threads,
    }
    if smem:
        limits["smem"] = blocks_per_sm_smem(smem, lim)
    limits["blocks"] = lim.max_blocks_per_sm
    limiter = min(limits, key=lambda name: limits[name])
    return limits[limiter], limiter


def format_table(head: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """Lines of a text table: columns padded to their widest cell, a dashed rule under ``head``."""
    cells = [tuple(head), *(tuple(r) for r in rows)]
    widths = [max(len(r[i]) for r in cells) for i in range(len(head))]

    def line(cols: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)).rstrip()

    return [line(cells[0]), line(["-" * w for w in widths]), *map(line, cells[1:])]
