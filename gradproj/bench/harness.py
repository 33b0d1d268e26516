"""Shared pieces of the benchmarks: the buckets they time and how to time fairly.

A bucket here is what ``gradproj.project_`` receives from an optimizer: many weights
sharing one basis. ``SD15_KV_LIKE`` is shaped like the cross-attention K/V weights
of Stable Diffusion 1.5 (``out × 768``, ``out`` from 320 to 1280; the text encoder
width 768 is the side the concept basis lives in), scaled to about 32 MiB of fp32.
"""

from __future__ import annotations

import torch

from gradproj import backends

# 32 weights, 11 520 rows × 768 = 33.75 MiB of fp32.
SD15_KV_LIKE: tuple[tuple[int, int], ...] = ((320, 768),) * 30 + ((640, 768), (1280, 768))


def device() -> torch.device:
    """The device the benchmarks run on: the GPU when there is one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronize(dev: torch.device) -> None:
    """Wait for queued device work, so a timer measures the kernels, not their launch."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def make_bucket(
    shapes: tuple[tuple[int, int], ...],
    k: int,
    dev: torch.device,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Random grads of ``shapes`` and one orthonormal ``(in × k)`` basis for all of them."""
    gen = torch.Generator().manual_seed(seed)
    grads = [torch.randn(s, generator=gen).to(device=dev, dtype=dtype) for s in shapes]
    q, _ = torch.linalg.qr(torch.randn(shapes[0][1], k, generator=gen, dtype=torch.float64))
    return grads, q.to(device=dev, dtype=torch.float32)


def fused_adamw_supported(dev: torch.device) -> bool:
    """Whether ``torch.optim.AdamW(fused=True)`` steps a float32 parameter on ``dev``."""
    p = torch.nn.Parameter(torch.zeros(2, device=dev))
    p.grad = torch.zeros(2, device=dev)
    try:
        torch.optim.AdamW([p], fused=True).step()
    except (RuntimeError, ValueError):
        return False
    return True


def bucket_bytes(grads: list[torch.Tensor]) -> int:
    """Bytes a projection must move at least: every element read once and written once."""
    return 2 * sum(g.numel() * g.element_size() for g in grads)


def runnable_backends(op: str, dev: torch.device, dtype: torch.dtype) -> list[str]:
    """Registered backends that can run ``op`` here, minus the Triton interpreter and
    emulated backends (CPU: correct but orders of magnitude slow, never a performance
    figure)."""
    names = []
    for name in backends.registered():
        backend = backends.get(name)
        if backend.unsupported_reason(op, dev, dtype) is not None or backend.emulated:
            continue
        if name == "triton" and dev.type == "cpu":
            continue
        names.append(name)
    return names
