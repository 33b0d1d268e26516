"""``gradproj demo`` on its tiny configuration: outputs written, the guarantee holds."""

import json

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("matplotlib")

from gradproj.lab import demo


def test_tiny_demo_writes_its_outputs_and_keeps_the_guarantee(tmp_path):
    results = demo.run(demo.TINY, out=tmp_path)
    written = json.loads((tmp_path / "results.json").read_text())
    assert written["summary"].keys() == {"plain", "update"}
    for name in ("samples.png", "bars.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    drift = {arm: s["drift_over_w0"]["mean"] for arm, s in results["summary"].items()}
    assert drift["update"] <= 1e-6  # anchored update projection, fp32: ~1e-7 here
    assert drift["plain"] > 100 * drift["update"]  # the same measurement, unprotected
    for rate in ("mark_rate_concept_prompts", "mark_rate_attack"):
        assert 0.0 <= written["summary"]["update"][rate]["mean"] <= 1.0
    # what decides the numbers travels with them
    assert written["threads"] == demo.TINY.threads
    assert written["versions"]["torch"] and written["versions"]["diffusers"]
    assert written["machine"]["cpu_capability"] and written["machine"]["cores"] >= 1


def test_unknown_arm_is_an_error(tmp_path):
    from dataclasses import replace

    with pytest.raises(ValueError, match="unknown arm 'sgd'"):
        demo.run(replace(demo.TINY, arms=("sgd",)), out=tmp_path)
