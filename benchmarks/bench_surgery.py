"""``surgery_`` on the SD 1.5 K/V-shaped bucket: fused backends vs DoCo's per-tensor loop.

The loop (``benchmarks/peers.surgery_loop_``) computes a cosine per tensor and
branches on it on the host, as the public code does; gradproj decides on the
device. Both use the "cosine" variant so they do the same arithmetic. Run::

    .venv/bin/python -m pytest benchmarks/bench_surgery.py --benchmark-only

Each timed call first restores the inputs (a copy, the same for every contender).
"""

from __future__ import annotations

import pytest
import torch

import gradproj
from benchmarks import harness, peers

DEVICE = harness.device()
CONTENDERS = ["loop", *harness.runnable_backends("surgery_bucket_", DEVICE, torch.float32)]


@pytest.mark.parametrize("contender", CONTENDERS)
def test_surgery_sd15_kv_bucket(benchmark, contender: str) -> None:
    us, _ = harness.make_bucket(harness.SD15_KV_LIKE, 1, DEVICE)
    gen = torch.Generator().manual_seed(1)
    rs = [(-1) ** i * u + torch.randn(u.shape, generator=gen).to(DEVICE) for i, u in enumerate(us)]
    before = [u.clone() for u in us]

    def run() -> None:
        for u, u0 in zip(us, before, strict=True):
            u.copy_(u0)
        if contender == "loop":
            peers.surgery_loop_(us, rs)
        else:
            gradproj.surgery_(us, rs, variant="cosine", backend=contender)
        harness.synchronize(DEVICE)

    run()
    got = [u.clone() for u in us]
    benchmark.pedantic(run, rounds=10, iterations=1, warmup_rounds=1)
    # Same answer as the loop (fp32 sums in a different order).
    for u, u0 in zip(us, before, strict=True):
        u.copy_(u0)
    peers.surgery_loop_(us, rs)
    for a, b in zip(got, us, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
