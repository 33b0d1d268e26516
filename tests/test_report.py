"""gradproj.lab.report: summaries over seeds, the defense table, the run record."""

import math

import pytest
import torch

from gradproj.lab import report


def test_summary_mean_std_and_count():
    rows = [{"a": 1.0, "b": 2.0}, {"a": 3.0, "b": 2.0}, {"a": 5.0, "b": 2.0}]
    s = report.summary(rows)
    assert s["a"] == {"mean": 3.0, "std": 2.0, "n": 3}
    assert s["b"] == {"mean": 2.0, "std": 0.0, "n": 3}


def test_summary_leaves_out_undefined_figures():
    nan = float("nan")
    s = report.summary([{"auc": nan, "x": 1.0}, {"auc": 0.5, "x": 2.0}, {"auc": nan, "x": 3.0}])
    assert s["auc"] == {"mean": 0.5, "std": 0.0, "n": 1}
    gone = report.summary([{"auc": nan}, {"auc": nan}])["auc"]
    assert math.isnan(gone["mean"]) and math.isnan(gone["std"]) and gone["n"] == 0


def test_defense_table_has_one_line_per_row_and_every_column():
    cell = {"mean": 0.25, "std": 0.05, "n": 3}
    summary = {row: {key: cell for key, _ in report.DEFENSE_COLUMNS} for row in ("a", "b")}
    lines = report.defense_table(summary).splitlines()
    assert len(lines) == 4
    assert lines[2].startswith("| a | 0.25 ± 0.05 |")
    assert lines[2].count("|") == len(report.DEFENSE_COLUMNS) + 2


def test_run_record_names_what_decides_the_numbers():
    pytest.importorskip("diffusers")
    rec = report.run_record(threads=3)
    assert rec["threads"] == 3
    assert rec["versions"]["torch"] == torch.__version__
    assert rec["machine"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert rec["deterministic_algorithms"] is torch.are_deterministic_algorithms_enabled()
    assert rec["projection_backend_cpu_fp32"] in ("cpp", "reference")
