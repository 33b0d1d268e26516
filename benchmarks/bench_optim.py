"""Step time of a projected AdamW, three ways, against torch's fastest AdamW.

* ``torch_adamw``: ``torch.optim.AdamW(fused=True)`` where the build supports it
  on the device (else ``foreach=True``): the floor, with no projection;
* ``wrapper``: ``torch.optim.AdamW(foreach=True)`` inside
  ``ProjectedOptimizer(mode="update")``: AdamW, then one anchored-projection
  launch per bucket (p read and written twice);
* ``projected_adamw``: ``gradproj.ProjectedAdamW``, the fused kernel of the
  default backend for the device (``"reference"`` on a CPU without the
  extension: plain PyTorch, so expect it slower than torch's fused AdamW there;
  the GPU goal is ≤ 1.10× fused AdamW).

Only ``optimizer.step()`` is timed; grads are fixed. The bucket is shaped like
the cross-attention K/V weights of a small UNet: ``n`` weights of ``out × in``
sharing one ``in × k`` basis. Run::

    .venv/bin/python -m pytest benchmarks/bench_optim.py --benchmark-only \
        --benchmark-group-by=param:shape
"""

from __future__ import annotations

import pytest
import torch

from gradproj import ProjectedAdamW, ProjectedOptimizer

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# (n weights, out, in, k). Small on CPU so the suite runs in well under a minute.
SHAPES = {
    "4x128x256_k16": (4, 128, 256, 16),
    "8x320x768_k32": (8, 320, 768, 32),
}
KINDS = ("torch_adamw", "wrapper", "projected_adamw")


def _fused_supported() -> bool:
    p = torch.nn.Parameter(torch.zeros(2, device=DEVICE))
    p.grad = torch.zeros(2, device=DEVICE)
    try:
        torch.optim.AdamW([p], fused=True).step()
    except (RuntimeError, ValueError):
        return False
    return True


FUSED = _fused_supported()


def _setup(kind: str, shape: tuple[int, int, int, int]) -> torch.optim.Optimizer:
    n, out, d, k = shape
    gen = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(d, k, generator=gen))[0].to(DEVICE)
    params = []
    for _ in range(n):
        p = torch.nn.Parameter(torch.randn(out, d, generator=gen).to(DEVICE) * 0.02)
        p.grad = torch.randn(out, d, generator=gen).to(DEVICE)
        params.append(p)
    bases = {p: basis for p in params}
    if kind == "torch_adamw":
        return torch.optim.AdamW(params, lr=1e-3, fused=FUSED, foreach=None if FUSED else True)
    if kind == "wrapper":
        return ProjectedOptimizer(torch.optim.AdamW(params, lr=1e-3, foreach=True), bases)
    return ProjectedAdamW(params, lr=1e-3, bases=bases)


def _step(opt: torch.optim.Optimizer) -> None:
    opt.step()
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_adamw_step(benchmark, shape, kind):
    opt = _setup(kind, SHAPES[shape])
    _step(opt)  # state, anchors and (on CUDA) kernels are made outside the timing
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu",
        torch=torch.__version__,
        torch_adamw="fused" if FUSED else "foreach",
    )
    benchmark.pedantic(_step, args=(opt,), rounds=20, iterations=3, warmup_rounds=2)
