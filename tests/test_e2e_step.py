"""``benchmarks/e2e_step.py --quick``: every variant timed, and its memory accounting exact.

Timings are not asserted (a unit test is no benchmark); completeness and the bytes are:
the anchors found by walking each optimizer must be rows × k × 4 bytes, and the profiler
must see exactly them appear during the first step (two independent measurements).
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("diffusers")

from benchmarks import e2e_step

ROUNDS = 2


def test_quick_run_fields_and_memory(tmp_path):
    out = tmp_path / "e2e.json"
    e2e_step.main(
        ["--quick", "--rounds", str(ROUNDS), "--set-rounds", str(ROUNDS), "--out", str(out)]
    )
    result = json.loads(out.read_text())
    env = result["environment"]
    for key in ("device", "cpu_model", "torch_threads", "torch", "diffusers", "date"):
        assert env[key], key
    assert "shared" in env["note"]
    check = result["profiler_check"]
    assert check["peak_bytes"] == check["expected_peak_bytes"] and check["net_bytes"] == 0

    ks = result["settings"]["ks"]
    expected = ["AdamW", *(["AdamW fused"] if result["settings"]["fused_adamw"] else [])]
    expected += [f"ProjectedAdamW k={k}" for k in ks]
    inner = "AdamW fused" if result["settings"]["fused_adamw"] else "AdamW"
    expected += [f"{inner}+ProjectedOptimizer k={k}" for k in ks]
    unet = result["sd15_unet"]
    rows_of = {
        "sd15_unet": unet["protected"]["rows"],
        "sdxl_kv": sum(o for _, o, _ in result["sdxl_kv"]["shapes"]),
        "flux_text": sum(o for _, o, _ in result["flux_text"]["shapes"]),
    }
    # to_k, to_v of the tiny UNet's 4 attn2: 1 down block, the mid block, 2 in the up block
    assert unet["protected"]["tensors"] == 2 * 4
    for section, rows in rows_of.items():
        sec = result[section]
        assert [v["variant"] for v in sec["variants"]] == expected, section
        timed = ("whole_step", "optimizer_step") if section == "sd15_unet" else ("optimizer_step",)
        for v in sec["variants"]:
            for what in timed:
                t = v[what]
                assert t["samples"] == ROUNDS == len(t["all_ms"]) and t["median_ms"] > 0
            mem = v["memory"]
            anchors = 0 if v["k"] is None else rows * v["k"] * 4
            assert mem["persistent"]["anchors"] == anchors, (section, v["variant"])
            assert mem["first_step"]["net_bytes"] == anchors, (section, v["variant"])
            assert mem["step_temporaries"]["net_bytes"] == 0, (section, v["variant"])
            assert mem["persistent"]["other"] == 0, mem["persistent"]["other_paths"]
        assert sec["variants"][0]["optimizer_step"]["ratio_to_AdamW"] == 1.0
