"""``project_`` on one bucket: the eager reference against every other runnable backend.

Times the public call ``gradproj.project_(grads, U, backend=name)`` (validation,
bucketing and the kernel) on ``harness.SD15_KV_LIKE`` (32 fp32 weights of
``out × 768``, 33.75 MiB) for ``k = 8`` and ``k = 32``. The speed-up of a backend is
the reference's mean over its mean within one ``k`` group. Run::

    .venv/bin/python -m pytest benchmarks/bench_project.py --benchmark-only \\
        --benchmark-group-by=param:k --benchmark-columns=min,mean,rounds

``extra_info["GBps"]`` is the rate against the floor of one read and one write of
every gradient element.
"""

from __future__ import annotations

import pytest
import torch

import gradproj
from gradproj.bench import harness

DEVICE = harness.device()
BACKENDS = harness.runnable_backends("project_bucket_", DEVICE, torch.float32)


@pytest.mark.parametrize("k", [8, 32])
@pytest.mark.parametrize("backend", BACKENDS)
def test_project_sd15_kv_bucket(benchmark, backend: str, k: int) -> None:
    grads, basis = harness.make_bucket(harness.SD15_KV_LIKE, k, DEVICE)

    def run() -> None:
        gradproj.project_(grads, basis, backend=backend)
        harness.synchronize(DEVICE)

    run()  # warm-up: first-call imports, caches, lazy kernel compilation
    benchmark.pedantic(run, rounds=10, iterations=1, warmup_rounds=1)
    benchmark.extra_info["device"] = (
        torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else "cpu"
    )
    benchmark.extra_info["threads"] = torch.get_num_threads()
    benchmark.extra_info["GBps"] = harness.bucket_bytes(grads) / benchmark.stats["mean"] / 1e9
    # The projection happened: rows are orthogonal to the basis after it.
    for g in grads[:2]:
        assert (g @ basis).abs().max().item() < 1e-3 * g.abs().max().item()
