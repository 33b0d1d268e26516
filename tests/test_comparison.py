"""``gradproj unlearn`` / ``gradproj evaluate`` on tiny configurations: every row built,
measured, written; models reused from the models folder."""

import json
from dataclasses import replace

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("matplotlib")

from gradproj import comparison


def test_unlearn_rows_write_their_table_and_reuse_models(tmp_path):
    cfg = replace(comparison.TINY, rows=comparison.UNLEARN_ROWS)
    results = comparison.run(cfg, out=tmp_path / "run", progress=False)
    written = json.loads((tmp_path / "run" / "results.json").read_text())
    assert list(written["summary"]) == list(comparison.UNLEARN_ROWS)
    table = (tmp_path / "run" / "table.md").read_text()
    for row in comparison.UNLEARN_ROWS:
        assert f"| {row} |" in table
    assert (tmp_path / "run" / "bars.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    models = sorted(p.name for p in (tmp_path / "run" / "models").iterdir())
    assert models == [
        "plain-seed0.pt", "unlearning+surgery-seed0.pt", "unlearning-seed0.pt", "update-seed0.pt"
    ]  # fmt: skip
    for row, s in results["summary"].items():
        for key in ("mark_rate_concept_prompts", "mark_rate_dori", "colour_accuracy"):
            assert 0.0 <= s[key]["mean"] <= 1.0, (row, key)
        assert s["sampling_cost"]["mean"] > 0
    assert results["summary"]["baseline"]["sampling_cost"]["mean"] == 1.0
    # The same models folder again: nothing is trained or derived, the figures repeat.
    again = comparison.run(cfg, out=tmp_path / "again", models=tmp_path / "run" / "models",
                           progress=False)  # fmt: skip
    for row in comparison.UNLEARN_ROWS:
        for key in ("mark_rate_concept_prompts", "mark_rate_dori", "frechet_distance"):
            assert again["per_seed"][row][0][key] == results["per_seed"][row][0][key], (row, key)


def test_unknown_row_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="unknown row 'erase'"):
        comparison.run(replace(comparison.TINY, rows=("erase",)), out=tmp_path, progress=False)
