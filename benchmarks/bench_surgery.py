"""``surgery_`` on two K/V buckets (SD 1.5, the demo's): fused backends vs DoCo's per-tensor loop.

The loop (``gradproj.bench.peers.surgery_loop_``) computes a cosine per tensor and
branches on it on the host, as the public code does; gradproj decides on the
device. Both use the "cosine" variant so they do the same arithmetic. Run::

    .venv/bin/python -m pytest benchmarks/bench_surgery.py --benchmark-only

Each timed call first restores the inputs (a copy, the same for every contender).
"""

from __future__ import annotations

import pytest
import torch

import gradproj
from gradproj.bench import harness, peers

DEVICE = harness.device()
CONTENDERS = ["loop", *harness.runnable_backends("surgery_bucket_", DEVICE, torch.float32)]


# The bucket `gradproj unlearn` runs surgery on every step: the demo UNet's 8
# cross-attention K/V weights (32 × 32): where a parallel region would cost more
# than the work.
DEMO_KV = ((32, 32),) * 8
BUCKETS = {"sd15_kv": harness.SD15_KV_LIKE, "demo_kv": DEMO_KV}


@pytest.mark.parametrize("bucket", list(BUCKETS))
@pytest.mark.parametrize("contender", CONTENDERS)
def test_surgery_bucket(benchmark, contender: str, bucket: str) -> None:
    us, _ = harness.make_bucket(BUCKETS[bucket], 1, DEVICE)
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
