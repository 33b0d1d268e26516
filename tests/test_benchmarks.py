"""The benchmark suite's smoke run: every contender produced a row and matched the reference.

Timings are not asserted (a unit test is no benchmark); correctness and completeness are.
"""

from __future__ import annotations

import json

import torch

from benchmarks import harness, plot, suite

# max |out − float64 ref| / max|g|: fp32 accumulation for fp32 grads, one bf16
# rounding (2⁻⁸ relative; a full ulp for the Triton interpreter's truncation).
BOUND = {"float32": 1e-6, "bfloat16": 2.0**-7}


def test_smoke_suite_rows_complete_and_correct(tmp_path):
    out = tmp_path / "smoke.json"
    result = suite.main(["--smoke", "--device", "cpu", "--reps", "2", "--out", str(out)])
    assert json.loads(out.read_text()) == result
    env = result["environment"]
    assert env["torch"] == torch.__version__ and env["device_type"] == "cpu"
    backends = harness.runnable_backends("project_bucket_", torch.device("cpu"), torch.float32)
    expected = {"copy", "eager", "grouped", *(f"gradproj:{b}" for b in backends)}
    by_case: dict[tuple, set[str]] = {}
    for row in result["rows"]:
        by_case.setdefault((row["case"], row["k"], row["dtype"]), set()).add(row["contender"])
        assert row["ms"] > 0 and row["bytes"] > 0 and row["GBps"] > 0
        if row["contender"] != "copy":
            assert row["max_rel_error"] <= BOUND[row["dtype"]], row
    assert len(by_case) == 4
    assert all(found == expected for found in by_case.values()), by_case


def test_plot_draws_uniform_cases(tmp_path):
    rows = [
        {"case": f"uniform_{m}MiB", "k": 32, "dtype": "float32", "contender": c, "GBps": g}
        for m in (1, 4)
        for c, g in (("copy", 10.0), ("gradproj:cpp", 5.0))
    ]
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"environment": {"device": "cpu", "date": "x"}, "rows": rows}))
    png = plot.main([str(path)])
    assert png.endswith(".png") and (tmp_path / "r.png").stat().st_size > 1000
    assert plot.series(rows, 32)["copy"] == [(1.0, 10.0), (4.0, 10.0)]
