"""Host time of a call: validation, bucketing and dispatch, against torch's own per-call cost.

On a GPU each call's Python and launcher work is paid on the host, and when it exceeds
the kernel it is what the caller waits for: the H200 run of 2026-12-04 measured
``project_`` at 0.12-0.26 ms a call (CUDA events) where its kernels took 0.07-0.12 ms
(``benchmarks/results/gpu-H200-2026-12-04b/pvm_cuda.md``: *op ms* against *kernel ms*).
This suite times the host side alone: ``n`` tiny fp32 tensors (8 × 64), so the kernels are
a few microseconds and the rest is per-tensor host work. On a GPU nothing is synchronized
inside the timing, so a round's wall time is the host's (the launcher's C++ side included)
as long as the device keeps up with these tiny launches. Peers, measured in the same run:

* ``project_``, ``project_anchored_`` (the optimizers' update projection,
  ``gradproj.ops``): one ``torch._foreach_mul_`` over the same tensors (one dispatch of a
  list op, its own validation included);
* ``ProjectedOptimizer`` (AdamW ``foreach=True`` inside, ``mode="update"``) and
  ``ProjectedAdamW``: ``torch.optim.AdamW(foreach=True)`` on the same params.

gradproj's calls run on the default backend, and where several kernel backends run (a GPU:
``triton`` and ``cuda``) on each by name too (``project_[cuda]``).

Host time (of this machine's CPU), not GPU performance. Run::

    .venv/bin/python -m pytest benchmarks/bench_host.py --benchmark-only \\
        --benchmark-group-by=param:n --benchmark-columns=min,median,rounds

or, as a script, the best of ``--repeats`` rounds of every case in µs a call (JSON); with
``PYTHONPATH`` set to another checkout (its extension built) it times that one, so two
commits compare in one sitting::

    .venv/bin/python benchmarks/bench_host.py [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import time

import pytest
import torch

import gradproj
from gradproj import ops
from gradproj.bench import harness

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SHAPE = (8, 64)
K = 8
CALLS = ("foreach_mul", "project_", "project_anchored_", "adamw_foreach", "wrapper", "fused")
PEERS = ("foreach_mul", "adamw_foreach")
# gradproj's calls run on the device's default backend (None) and, where more than one
# kernel backend runs here (a GPU: triton and cuda), on each by name as well
KERNEL_BACKENDS = [
    b
    for b in harness.runnable_backends("project_bucket_", DEVICE, torch.float32)
    if b != "reference"
]
NAMED = KERNEL_BACKENDS if len(KERNEL_BACKENDS) > 1 else []
CASES = [(c, None) for c in CALLS] + [(c, b) for b in NAMED for c in CALLS if c not in PEERS]


def case_name(call: str, backend: str | None) -> str:
    return call if backend is None else f"{call}[{backend}]"


def _setup(call: str, n: int, backend: str | None = None):
    """``(run, tensors, basis)``: the timed call and what it changes (for the smoke test)."""
    gen = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(SHAPE[1], K, generator=gen))[0].to(DEVICE)
    tensors = [torch.randn(*SHAPE, generator=gen).to(DEVICE) for _ in range(n)]
    if call == "foreach_mul":
        return (lambda: torch._foreach_mul_(tensors, 1.0)), tensors, basis
    if call == "project_":
        return (lambda: gradproj.project_(tensors, basis, backend=backend)), tensors, basis
    if call == "project_anchored_":
        anchors = [ops.anchor(t, basis) for t in tensors]
        return (
            (lambda: ops.project_anchored_(tensors, anchors, basis, backend=backend)),
            tensors,
            basis,
        )
    params = [torch.nn.Parameter(t) for t in tensors]
    for p in params:
        p.grad = torch.randn(*SHAPE, generator=gen).to(DEVICE)
    bases = {p: basis for p in params}
    if call == "adamw_foreach":
        opt = torch.optim.AdamW(params, lr=1e-3, foreach=True)
    elif call == "wrapper":
        inner = torch.optim.AdamW(params, lr=1e-3, foreach=True)
        opt = gradproj.ProjectedOptimizer(inner, bases, backend=backend)
    else:
        opt = gradproj.ProjectedAdamW(params, lr=1e-3, bases=bases, backend=backend)
    return opt.step, params, basis


@pytest.mark.parametrize("case", CASES, ids=lambda c: case_name(*c))
@pytest.mark.parametrize("n", [32, 128])
def test_host_time(benchmark, case: tuple[str, str | None], n: int) -> None:
    run, _, _ = _setup(case[0], n, case[1])
    run()  # state, anchors, caches outside the timing
    gpu = DEVICE.type == "cuda"
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name() if gpu else "cpu", torch=torch.__version__, tensors=n
    )
    benchmark.pedantic(run, rounds=30, iterations=10, warmup_rounds=2)
    if gpu:
        torch.cuda.synchronize()


def best_time(run, calls: int, repeats: int) -> float:
    """The fastest of ``repeats`` rounds of ``calls`` calls, in µs a call."""
    for _ in range(20):
        run()
    rounds = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            run()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        rounds.append((time.perf_counter() - start) / calls * 1e6)
    return min(rounds)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", help="write the JSON here too")
    args = ap.parse_args(argv)
    result = {
        "gradproj": gradproj.__file__,
        "device": torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "us_per_call": {
            f"{case_name(call, backend)} n={n}": best_time(
                _setup(call, n, backend)[0], 300 if n <= 32 else 100, args.repeats
            )
            for n in (32, 128)
            for call, backend in CASES
        },
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return result


if __name__ == "__main__":
    main()
