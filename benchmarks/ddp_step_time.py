"""Step time of the tiny diffusers UNet: 1 process vs 2 DDP processes (gloo, CPU), with and
without gradproj's projection hook. Same global batch in every row.

    .venv/bin/python benchmarks/ddp_step_time.py [--steps 20]

Prints a Markdown table (docs/multi-gpu.md quotes it). CPU figures only say
that the hook adds nothing measurable to a DDP step; they are not GPU performance.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from gradproj.distributed import ProjectionHookState, projection_hook
from tests.test_distributed import (
    PER_RANK,
    WORLD,
    basis,
    batch,
    loss_of,
    protected,
    tiny_unet,
)


def _time_steps(model, forward, steps: int) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    times = []
    for step in range(steps + 2):  # two warm-up steps
        start = time.perf_counter()
        opt.zero_grad()
        forward(step).backward()
        opt.step()
        times.append(time.perf_counter() - start)
    return sorted(times[2:])[len(times[2:]) // 2]


def _worker(rank: int, rendezvous: str, steps: int, hook: str, out: str) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=WORLD)
    model = tiny_unet()
    ddp = DDP(model)
    if hook == "allreduce":  # the same all-reduce, through a Python hook: the baseline
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        ddp.register_comm_hook(None, allreduce_hook)
    elif hook == "projection":
        u = basis()
        ddp.register_comm_hook(
            ProjectionHookState({p: u for p in protected(model)}), projection_hook
        )
    mine = slice(rank * PER_RANK, (rank + 1) * PER_RANK)

    def forward(step):
        x, noise, t, text = batch(step)
        return loss_of(ddp, x[mine], noise[mine], t[mine], text[mine])

    median = _time_steps(ddp, forward, steps)
    if rank == 0:
        torch.save(median, out)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    rows = []
    torch.set_num_threads(WORLD)  # the single process gets the cores the two ranks share
    model = tiny_unet()
    rows.append(
        (
            "1 process, no projection",
            _time_steps(model, lambda s: loss_of(model, *batch(s)), args.steps),
        )
    )
    for hook in ("", "allreduce", "projection"):
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "t.pt")
            mp.start_processes(
                _worker,
                args=(out + ".rendezvous", args.steps, hook, out),
                nprocs=WORLD,
                start_method="spawn",
            )
            label = "2 DDP processes" + (f" + {hook} hook" if hook else " (built-in all-reduce)")
            rows.append((label, torch.load(out)))
    print(f"| setup (global batch {WORLD * PER_RANK}) | median step | vs 1 process |")
    print("|---|---|---|")
    for label, t in rows:
        print(f"| {label} | {t * 1e3:.1f} ms | {t / rows[0][1]:.2f}x |")


if __name__ == "__main__":
    main()
