"""``gradproj`` / ``python -m gradproj``: the command-line entry points."""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gradproj", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    demo = sub.add_parser(
        "demo",
        help="one training step of a small diffusers UNet, projected with every backend",
    )
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--k", type=int, default=4, help="concept subspace dimension")
    args = parser.parse_args(argv)

    command = args.command or "demo"
    if command == "demo":
        # Without a GPU, Triton kernels can still be shown working through the
        # interpreter; the flag must be set before triton is imported.
        import torch

        if not torch.cuda.is_available():
            os.environ.setdefault("TRITON_INTERPRET", "1")
        from gradproj import demo as demo_module

        results = demo_module.run(seed=getattr(args, "seed", 0), k=getattr(args, "k", 4))
        # fp32 kernels agree with float64 to ~1e-9 here (|G| ~ 1e-2); 1e-6 would be a bug.
        return 0 if all(err < 1e-6 for err, _ in results.values()) else 1
    parser.error(f"unknown command {command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
