"""``gradproj unlearn`` / ``gradproj evaluate`` on tiny configurations: every row built,
measured, written; models reused from the models folder."""

import json
from dataclasses import replace

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("matplotlib")

from gradproj.lab import evaluate as comparison
from gradproj.lab.defenses import DEFENSES, model_file


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
    assert models == sorted([
        "plain-seed0.pt", "update-seed0.pt", model_file("unlearning", cfg, 0),
        model_file("unlearning+surgery", cfg, 0),
    ])  # fmt: skip
    for row, s in results["summary"].items():
        for key in ("mark_rate_concept_prompts", "mark_rate_attack", "colour_accuracy"):
            assert 0.0 <= s[key]["mean"] <= 1.0, (row, key)
        assert s["sampling_cost"]["mean"] > 0
    assert results["summary"]["baseline"]["sampling_cost"]["mean"] == 1.0
    # The same models folder again: nothing is trained or derived, the figures repeat.
    again = comparison.run(cfg, out=tmp_path / "again", models=tmp_path / "run" / "models",
                           progress=False)  # fmt: skip
    for row in comparison.UNLEARN_ROWS:
        for key in ("mark_rate_concept_prompts", "mark_rate_attack", "frechet_distance"):
            assert again["per_seed"][row][0][key] == results["per_seed"][row][0][key], (row, key)


def test_derived_models_are_named_by_their_settings():
    """A models folder never hands back a derived model made with other settings."""
    official, previous = comparison.UNLEARN, comparison.PREVIOUS_UNLEARN
    for row in ("unlearning", "unlearning+surgery"):
        assert model_file(row, official, 0) != model_file(row, previous, 0)
        assert model_file(row, official, 0) == model_file(row, comparison.ComparisonConfig(), 0)
        assert model_file(row, official, 0).startswith(f"{row}-")
        # settings the unlearning does not read leave the name alone
        assert model_file(row, replace(official, attack_steps=3), 1) == model_file(row, official, 1)
    # adversarial fine-tuning reads the attack's settings (its inner DoRI search)
    evaluate_previous = replace(comparison.ComparisonConfig(), **comparison.PREVIOUS_SETTINGS)
    official_ft = model_file("adversarial-ft", comparison.ComparisonConfig(), 2)
    assert official_ft != model_file("adversarial-ft", evaluate_previous, 2)
    assert official_ft.startswith("adversarial-ft-") and official_ft.endswith("-seed2.pt")
    assert model_file("baseline", previous, 2) == "baseline-seed2.pt"


def test_previous_settings_reach_unlearn_concept_as_the_previous_recipe(monkeypatch):
    from gradproj.lab import defenses
    from gradproj.methods.unlearn import PREVIOUS_RECIPE

    seen = []
    monkeypatch.setattr(
        defenses, "unlearn_demo_concept", lambda *a, **kw: seen.append(kw) or [{"unlearn": 0.0}]
    )
    for row, surgery in (("unlearning", False), ("unlearning+surgery", True)):
        DEFENSES[row].derive(None, None, None, comparison.PREVIOUS_UNLEARN, None)
        kwargs = seen.pop()
        assert {k: kwargs[k] for k in PREVIOUS_RECIPE} == PREVIOUS_RECIPE
        assert (kwargs["surgery"], kwargs["steps"], kwargs["lr"]) == (surgery, 150, 3e-3)


def test_unknown_row_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="unknown row 'erase'"):
        comparison.run(replace(comparison.TINY, rows=("erase",)), out=tmp_path, progress=False)


def test_every_evaluate_row_is_built_and_measured(tmp_path):
    results = comparison.run(comparison.TINY, out=tmp_path, progress=False)
    assert list(results["summary"]) == list(comparison.EVALUATE_ROWS)
    check = results["amg_detector_on_held_out_real"]
    assert 0.0 <= check["roc_auc_marked_vs_unmarked"] <= 1.0
    assert check["flagged_unmarked"] <= 0.1  # calibrated to flag 5 % of real unmarked images
    # Plain sampling: one conditional and one unconditional image a step. Guidance costs
    # extra UNet passes a step; wall time (sampling_cost) depends on the machine's load,
    # the pass count does not.
    steps = comparison.TINY.model.sample_steps
    for row in ("baseline", "projection"):
        assert results["summary"][row]["unet_passes_per_image"]["mean"] == 2 * steps
    for row in ("amg", "projection+amg"):
        assert results["summary"][row]["unet_passes_per_image"]["mean"] > 2 * steps
        assert results["summary"][row]["sampling_cost"]["mean"] > 0
    for key in ("auc_learned", "auc_pixel", "auc_pixel_contrast", "auc_noise_magnitude"):
        assert key in results["per_seed"]["baseline"][0]


def test_detector_aucs_against_a_direct_computation(trained_demo):
    """On the trained plain model: labels from the mark rule, scores from each detector."""
    import torch

    from gradproj.lab import measure, probes, shapes
    from gradproj.lab import world as lab_world
    from gradproj.methods import detectors as ev

    world = trained_demo.world
    g = torch.Generator().manual_seed(4)
    c, s, b, _ = shapes.sample_labels(24, marked_fraction=0, generator=g)
    noise = torch.randn(24, 3, 16, 16, generator=g)
    labels = list(zip(c.tolist(), s.tolist(), b.tolist(), strict=True))
    ctx = shapes.encode([shapes.caption(*x, True) for x in labels], world.tok, world.encoder)
    x = lab_world.sample(
        trained_demo.unet, trained_demo.noise_scheduler, ctx, world.null_context, noise,
        steps=8, guidance=3.0,
    )  # fmt: skip
    marked = probes.read(world.probe, x)["marked"]
    assert 0 < int(marked.sum()) < 24  # both classes present (measured: 13 of 24)
    detectors = measure.concept_detectors(world)
    aucs = measure.detector_aucs(
        trained_demo.unet, trained_demo.noise_scheduler, world, detectors, 8, x, marked, ctx,
        noise,
    )  # fmt: skip
    for name, det in detectors.items():
        assert aucs[f"auc_{name}"] == ev.roc_auc(det.score(x), marked)
    assert aucs["auc_pixel_contrast"] > 0.85, aucs  # measured: 0.98 (15 steps, 64 samples)
