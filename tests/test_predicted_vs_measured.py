"""benchmarks/predicted_vs_measured.py: every op of the static model has a case that runs.

The timing itself needs a GPU (``scripts/gpu_check.sh``); here each case runs once on a
small bucket through the Triton interpreter with a stand-in timer, so a model op without
a case, or a case that no longer runs, fails before the GPU run does.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import perf_model  # noqa: E402
import predicted_vs_measured as pvm  # noqa: E402


def test_arch_of_maps_capabilities_to_the_model_rows():
    assert pvm.arch_of((8, 0)) == "sm_80"
    assert pvm.arch_of((8, 6)) == "sm_80"
    assert pvm.arch_of((9, 0)) == "sm_90"
    with pytest.raises(ValueError, match=r"compute capability \(7, 5\)"):
        pvm.arch_of((7, 5))


def test_rows_for_refuses_an_arch_the_model_lacks():
    model = {"devices": ["sm_80"], "rows": [{"arch": "sm_80"}]}
    assert pvm.rows_for(model, "sm_80") == [{"arch": "sm_80"}]
    with pytest.raises(ValueError, match="no rows for sm_90"):
        pvm.rows_for(model, "sm_90")


@pytest.mark.parametrize("op", sorted(perf_model.OPS))
@pytest.mark.parametrize("backend", [None, "cpp"])
def test_every_model_op_has_a_case_that_runs(op, backend):
    """``None``: a Triton model row (no backend field); ``cpp`` stands in here for the CUDA
    model's ``backend="cuda"`` rows: the case runs on the row's backend."""
    shape = {"rows": 2 * 8, "d": 32}
    floor = perf_model.OPS[op].floor_streams
    row = {
        "arch": "sm_80",
        "op": op,
        "dtype": "fp32",
        "k": 3,
        "elements": shape["rows"] * shape["d"],
        "floor_bytes_per_elt": 4 * floor,
        "predicted_fraction_of_copy": 0.5,
        "limiter": "memory",
    }
    if backend is not None:
        row["backend"] = backend
    calls = []

    def bench(fn):  # stand-in timer: the op "takes" 4 ms, its peer 1 ms
        fn()
        calls.append(fn)
        return 4.0 if len(calls) % 2 else 1.0

    (result,) = pvm.compare([row], shape, torch.device("cpu"), bench)
    assert len(calls) == 2
    assert result["measured"] == pytest.approx(0.25)
    assert result["measured_over_predicted"] == pytest.approx(0.5)
    assert result["peer"] == ("torch fused AdamW" if op.startswith("ProjectedAdamW") else "copy")
    assert result["backend"] == (backend or "triton")
    assert "| 50% | 25% | 0.50 |" in pvm.markdown("cpu", {"torch": "x"}, [result])


def test_an_unknown_model_op_is_refused():
    row = {"op": "mystery input", "dtype": "fp32", "k": 1, "elements": 4, "floor_bytes_per_elt": 8}
    with pytest.raises(ValueError, match="no case for the model's op 'mystery input'"):
        pvm.case(row, {"rows": 2, "d": 2}, torch.device("cpu"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the script measures")
def test_main_says_it_needs_a_gpu(tmp_path, capsys):
    assert pvm.main(["--out", str(tmp_path)]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err


def test_a_row_that_fails_to_run_is_reported_not_dropped():
    row = {"backend": "no-such-backend", "op": "project_ input", "dtype": "fp32", "k": 2,
           "elements": 64, "floor_bytes_per_elt": 8, "predicted_fraction_of_copy": 0.5,
           "limiter": "memory"}  # fmt: skip
    (result,) = pvm.compare([row], {"rows": 4, "d": 16}, torch.device("cpu"), lambda fn: fn())
    assert result["backend"] == "no-such-backend" and "no-such-backend" in result["error"]
    assert "| no-such-backend | project_ input | 16 | fp32 | 2 | failed: " in pvm.markdown(
        "cpu", {}, [result]
    )


def test_scaled_grows_every_bucket_but_a_flat_one():
    shape = {"rows": 4096, "d": 768}
    row = {"op": "project_ input", "elements": 4096 * 768}
    big_row, big_shape = pvm.scaled(row, shape, 8)
    assert big_shape == {"rows": 8 * 4096, "d": 768} and shape["rows"] == 4096
    assert big_row["elements"] == 8 * 4096 * 768 and row["elements"] == 4096 * 768
    flat = {"op": "project_ flat", "elements": 4096 * 768}
    assert pvm.scaled(flat, shape, 8) == (flat, shape)
    assert pvm.scaled(row, shape, 1) == (row, shape)
    # a CUDA row that stages its basis is predicted again for the larger bucket (at_scale)
    with open(os.path.join(ROOT, "benchmarks", "results", "perf_model_cuda.json")) as f:
        cuda = json.load(f)["rows"]
    (staged,) = [r for r in cuda if (r["arch"], r["op"], r["dtype"], r["k"])
                 == ("sm_90", "project_ input", "bf16", 32)]  # fmt: skip
    big_row, _ = pvm.scaled(staged, shape, 8)
    assert big_row == perf_model.at_scale(staged, 8)
    assert big_row["predicted_fraction_of_copy"] > staged["predicted_fraction_of_copy"]


def test_compare_times_the_scaled_bucket_and_reports_progress():
    """The copy peer moves the scaled bucket's floor bytes, and ``progress`` sees every row."""
    shape = {"rows": 2 * 4, "d": 16}
    rows = [
        {"op": "project_ input", "dtype": "fp32", "k": k, "elements": 8 * 16,
         "floor_bytes_per_elt": 8.0, "predicted_fraction_of_copy": 0.5, "limiter": "memory"}
        for k in (1, 2)
    ]  # fmt: skip
    seen, sizes = [], []

    def bench(fn):
        out = fn()
        if isinstance(out, torch.Tensor):  # the copy peer returns its destination
            sizes.append(out.numel())
        return 1.0

    results = pvm.compare(rows, shape, torch.device("cpu"), bench, 3, lambda r: seen.append(len(r)))
    assert seen == [1, 2] and [r["elements"] for r in results] == [3 * 8 * 16] * 2
    assert sizes == [3 * 8 * 16 * 8 // 2] * 2  # read n bytes + write n bytes = floor x elements


def test_a_width_sweep_row_runs_on_its_own_d():
    row = {"op": "project_ input", "dtype": "fp32", "k": 2, "d": 24, "elements": 8 * 24,
           "floor_bytes_per_elt": 8.0, "predicted_fraction_of_copy": 0.5,
           "limiter": "memory"}  # fmt: skip
    (result,) = pvm.compare([row], {"rows": 8, "d": 16}, torch.device("cpu"), lambda fn: 1.0)
    assert result["d"] == 24 and "error" not in result
    assert "| triton | project_ input | 24 | fp32 | 2 | 50% | 100% | 2.00 |" in pvm.markdown(
        "cpu", {}, [result]
    )


def test_the_profilers_kernel_time_is_reported_beside_the_events():
    row = {"op": "project_ input", "dtype": "fp32", "k": 2, "elements": 8 * 16,
           "floor_bytes_per_elt": 8.0, "predicted_fraction_of_copy": 0.5,
           "limiter": "memory"}  # fmt: skip
    times = iter([4.0, 1.0])
    (result,) = pvm.compare(
        [row], {"rows": 8, "d": 16}, torch.device("cpu"), lambda fn: next(times),
        profile=lambda fn: (fn(), (2.0, {"rows_kernel": 1.0, "Memcpy HtoD": 1.0}))[1],
    )  # fmt: skip
    assert result["kernel_ms"] == 2.0 and result["kernel_measured"] == pytest.approx(0.5)
    assert result["measured"] == pytest.approx(0.25)
    assert "| 4.000 | 1.000 | 2.000 | 50% | 2 |" in pvm.markdown("cpu", {}, [result])


def test_select_names_rows_and_refuses_a_spec_that_names_none():
    rows = [
        {"op": "project_ input", "dtype": "bf16", "k": 8, "d": 768},
        {"op": "project_ input", "dtype": "bf16", "k": 8, "d": 2048},
        {"op": "project_ input", "dtype": "fp32", "k": 8, "d": 768},
    ]
    assert pvm.select(rows, None) == rows
    assert pvm.select(rows, "project_ input:bf16:8") == rows[:2]
    assert pvm.select(rows, "project_ input:bf16:8:2048") == [rows[1]]
    # several specs (--only A B): their rows in the specs' order
    both = ["project_ input:bf16:8:2048", "project_ input:bf16:8:768"]
    assert pvm.select(rows, both) == [rows[1], rows[0]]
    with pytest.raises(ValueError, match="no model row is 'project_ input:fp16:8'"):
        pvm.select(rows, "project_ input:fp16:8")
    with pytest.raises(ValueError, match="OP:DTYPE:K"):
        pvm.select(rows, "project_ input")


def test_run_once_runs_the_op_and_only_the_op():
    """``--once`` (the process ncu wraps): the row's op on the scaled bucket, no peer."""
    row = {"op": "project_ input", "dtype": "fp32", "k": 2, "elements": 8 * 16,
           "floor_bytes_per_elt": 8.0, "predicted_fraction_of_copy": 0.5,
           "limiter": "memory"}  # fmt: skip
    calls = []
    real = pvm.case

    def spy(r, shape, dev):
        op, peer = real(r, shape, dev)
        calls.append(shape["rows"])
        return (lambda: (calls.append("op"), op())), peer

    pvm.case, saved = spy, pvm.case
    try:
        pvm.run_once([row], {"rows": 8, "d": 16}, torch.device("cpu"), scale=2)
    finally:
        pvm.case = saved
    assert calls == [16, "op", "op", "op"]
