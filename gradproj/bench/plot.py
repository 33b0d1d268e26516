"""GB/s against bucket size per contender, with the copy roofline, from a suite JSON.

    python -m gradproj.bench.plot benchmarks/results/<device>-<date>.json [--out FILE.png]

Reads the ``uniform_*MiB`` cases of :mod:`gradproj.bench.suite` (one ``k``, fp32) and
draws one line per contender; the device copy is drawn as the roofline. A run without
them (``gradproj bench --quick``) is drawn as one bar per contender of its first case.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict


def series(rows: list[dict], k: int) -> dict[str, list[tuple[float, float]]]:
    """``{contender: [(MiB, GB/s), ...]}`` for the uniform buckets at ``k``."""
    out: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for row in rows:
        m = re.fullmatch(r"uniform_(\d+)MiB", row["case"])
        if m and row["k"] == k and row["dtype"] == "float32":
            out[row["contender"]].append((float(m.group(1)), row["GBps"]))
    return {name: sorted(points) for name, points in out.items()}


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results")
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--out", default=None, help="default: the JSON path with .png")
    args = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(args.results) as f:
        data = json.load(f)
    lines = series(data["rows"], args.k)
    env = data["environment"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if lines:
        for name, points in sorted(lines.items()):
            xs, ys = zip(*points, strict=True)
            style = {"color": "black", "linestyle": "--", "linewidth": 2} if name == "copy" else {}
            label = "copy (roofline)" if name == "copy" else name
            ax.plot(xs, ys, marker="o", label=label, **style)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("bucket size (MiB, fp32)")
        ax.set_title(f"project_, side=input, k={args.k}: {env['device']}, {env['date']}")
        ax.legend(fontsize=8)
    else:
        if not data["rows"]:
            raise SystemExit(f"{args.results} has no projection rows")
        first = data["rows"][0]
        rows = [r for r in data["rows"] if (r["case"], r["k"], r["dtype"]) == (
            first["case"], first["k"], first["dtype"])]  # fmt: skip
        names = [r["contender"] for r in rows]
        ax.barh(names, [r["GBps"] for r in rows],
                color=["black" if n == "copy" else "C0" for n in names])  # fmt: skip
        ax.set_xlabel("GB/s (one read + one write per element)")
        ax.set_title(
            f"project_ {first['case']}, k={first['k']}, {first['dtype']}: {env['device']}, "
            f"{env['date']}"
        )
    if lines:
        ax.set_ylabel("GB/s (one read + one write per element)")
    ax.grid(True, alpha=0.3)
    out = args.out or args.results.removesuffix(".json") + ".png"
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(out)
    return out


if __name__ == "__main__":
    main()
