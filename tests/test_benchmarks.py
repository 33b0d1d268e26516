"""The benchmark suite's smoke run: every contender produced a row and matched the reference.

Timings are not asserted (a unit test is no benchmark); correctness and completeness are.
"""

from __future__ import annotations

import json
import os
import sys

import torch

from gradproj import backends as registry
from gradproj.bench import harness, peers, plot, suite

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
    # an emulated backend (this session's "cuda-emulated") is correct but never timed
    emulated = [n for n in registry.registered() if registry.get(n).emulated]
    assert backends and not set(emulated) & set(backends)
    expected = {"copy", "eager", "grouped", "compiled", "compiled_max_autotune"}
    expected |= {f"gradproj:{b}" for b in backends}
    by_case: dict[tuple, set[str]] = {}
    for row in result["rows"]:
        by_case.setdefault((row["case"], row["k"], row["dtype"]), set()).add(row["contender"])
        assert row["ms"] > 0 and row["bytes"] > 0 and row["GBps"] > 0
        if row["contender"] != "copy":
            assert row["max_rel_error"] <= BOUND[row["dtype"]], row
    assert len(by_case) == 4
    assert all(found == expected for found in by_case.values()), by_case
    assert {r["contender"] for r in result["surgery"]} >= {"loop", "no_sync"}
    for r in result["surgery"]:
        assert r["max_abs_diff_vs_loop"] <= 1e-5, r
    assert [r["contender"] for r in result["optimizer"]] == list(suite.OPTIMIZERS)
    table = suite.summary_table(result)
    assert table.count("| tiny |") == 4 and "vs compiled_max_autotune" in table
    forms = {r["peer_form"] for r in result["rows"] if r["contender"] == "eager"}
    assert forms and forms <= {"native", "upcast"}
    assert "adamw_fused+eager_anchored" in table


def test_eager_peers_are_in_place_and_exact():
    """The strongest eager forms compute the projection (fp32: to rounding) in place."""
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(7, 12, generator=g), torch.randn(3, 12, generator=g)]
    u = torch.linalg.qr(torch.randn(12, 4, generator=g, dtype=torch.float64))[0]
    want = [x.double() - (x.double() @ u) @ u.T for x in grads]
    ptrs = [x.data_ptr() for x in grads]
    peers.eager_project_(grads, u.float())
    assert [x.data_ptr() for x in grads] == ptrs
    for x, w in zip(grads, want, strict=True):
        torch.testing.assert_close(x.double(), w, rtol=0, atol=1e-6)
    low = [x.to(torch.bfloat16) for x in grads]
    want = [x.double() - (x.double() @ u) @ u.T for x in low]
    peers.eager_upcast_project_(low, u.float())
    for x, w in zip(low, want, strict=True):  # one bf16 rounding of the result
        torch.testing.assert_close(x.double(), w, rtol=2**-8, atol=1e-6)
    w = [torch.randn(5, 12, generator=g)]
    c = [torch.randn(5, 4, generator=g)]
    peers.anchored_project_(w, c, u.float())
    torch.testing.assert_close(w[0] @ u.float(), c[0], rtol=0, atol=1e-5)


def test_summary_table_marks_missing_peers():
    rows = [
        {"case": "c", "k": 8, "dtype": "float32", "contender": n, "ms": ms, "pct_of_copy": 50.0}
        for n, ms in (("copy", 1.0), ("eager", 4.0), ("gradproj:cpp", 2.0))
    ]
    table = suite.summary_table({"rows": rows})
    assert "| c | 8 | float32 | cpp | 2.00 | 50% | 2.00× | — | — | — |" in table


def test_gradproj_bench_cli_writes_json_plot_and_table(tmp_path, monkeypatch, capsys):
    from gradproj import cli

    monkeypatch.setattr(suite, "SD15_KV", ((6, 16), (10, 16)))  # --quick's bucket, shrunk
    out = tmp_path / "b.json"
    argv = ["bench", "--quick", "--no-compile", "--reps", "2", "--device", "cpu"]
    assert cli.main([*argv, "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert {r["case"] for r in data["rows"]} == {"sd15_kv"}
    assert (tmp_path / "b.png").stat().st_size > 1000
    captured = capsys.readouterr()
    assert "| sd15_kv | 8 | float32 |" in captured.out and "[####" in captured.err
    assert cli.main([*argv, "--out", str(tmp_path / "b.txt")]) == 2


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


def test_host_benchmark_calls_do_the_work_they_time():
    """benchmarks/bench_host.py: each timed call does what it names (it is no empty loop)."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
    import bench_host

    named = harness.runnable_backends("project_bucket_", torch.device("cpu"), torch.float32)[-1]
    cases = bench_host.CASES + [(c, named) for c in bench_host.CALLS if c not in bench_host.PEERS]
    for call, backend in cases:
        run, tensors, u = bench_host._setup(call, 3, backend)
        before = [t.detach().clone() for t in tensors]
        along = [t.detach() @ u for t in tensors]
        run()
        for t, b, a in zip(tensors, before, along, strict=True):
            t = t.detach()
            if call == "project_":  # onto U's complement
                assert (t @ u).abs().max() < 1e-5, call
            elif call in ("project_anchored_", "wrapper", "fused"):  # W U kept at its anchor
                torch.testing.assert_close(t @ u, a, rtol=0, atol=1e-5)
            if call in ("adamw_foreach", "wrapper", "fused"):
                assert not torch.equal(t, b), call  # the step moved it
