"""benchmarks/tile_sweep.py and the row kernel's tile override it runs through.

The sweep times on a GPU; here every candidate it would time runs in the interpreter on a
small bucket against float64 (a candidate the kernel cannot serve correctly must not reach
a GPU run as a figure), the override's checks and scope are tested, and the compile-only
mode compiles two candidates for sm_90 in a subprocess (it needs ``TRITON_INTERPRET=0``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from .test_project import assert_matches, orthonormal, ref64

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import tile_sweep  # noqa: E402

pytest.importorskip("triton")
from gradproj.kernels import project as P  # noqa: E402

interpreting = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="runs the candidates in the interpreter"
)


def test_candidates_start_with_the_launchers_choice_and_are_valid():
    for case in (tile_sweep.Case("fp32", 32), tile_sweep.Case("bf16", 8)):
        for arch in (80, 90):
            elsize = 4 if case.dtype == "fp32" else 2
            chosen = P._row_tiles(arch, elsize, 768, case.k, 1, False, 16 // elsize)
            found = tile_sweep.candidates(case, arch)
            assert found[0] == chosen
            assert len(found) == len(set(found)) > 20
            for tiles in found:
                P._check_tiles(tiles, 768, case.k, 1, 16 // elsize)
    # the resident kernel's own variants where the launcher takes it (bf16 k = 8 at 768)
    resident = tile_sweep.candidates(tile_sweep.Case("bf16", 8), 90)
    assert resident[0].resident and sum(t.resident for t in resident) == 4
    # (plain 16-bit blocks of 3 tiles of 256 capped: RESIDENT_16BIT_PLAIN_MAXNREG)
    want = (P.RESIDENT_WARPS[2], P.RESIDENT_16BIT_PLAIN_MAXNREG)
    assert (resident[0].warps, resident[0].maxnreg) == want == (8, 192)
    assert resident[0]._replace(maxnreg=None) in resident
    assert resident[0]._replace(warps=4, maxnreg=P.RESIDENT_MAXNREG) in resident
    # few rows on sm_90: the 4-warp block first (kernels/project.py RESIDENT_WARPS)
    few = tile_sweep.candidates(tile_sweep.Case("bf16", 8), 90, few_rows=True)
    assert (few[0].warps, few[0].maxnreg, few[1]) == (4, P.RESIDENT_MAXNREG, resident[0])
    # fp32's 8-warp blocks (uncapped), and the 4-warp ones it took before (cap 192)
    fp32 = tile_sweep.candidates(tile_sweep.Case("fp32", 8), 90)
    assert fp32[0].resident and fp32[0].warps == 8 and fp32[0].maxnreg is None
    assert fp32[0]._replace(warps=4, maxnreg=P.RESIDENT_MAXNREG) in fp32
    assert sum(t.resident for t in fp32) == 4
    assert {t.stages for t in resident} == {1, 2}
    assert (
        tile_sweep.candidates(tile_sweep.Case("fp32", 32), 90, limit=3)
        == (tile_sweep.candidates(tile_sweep.Case("fp32", 32), 90)[:3])
    )


def test_a_few_rows_bucket_puts_the_launchers_few_rows_tiles_first():
    """--predict --rows N / a GPU run on a bucket of few rows for its device (docs/gpu.md
    #few-rows): the launcher's choice there first, its tiles for many rows next."""
    case = tile_sweep.Case("fp32", 32)
    few = tile_sweep.candidates(case, 90, few_rows=True)
    assert (
        few[0]
        == P._row_tiles(90, 4, 768, 32, 1, False, 4, True)
        == P._few_rows_tiles(90, 4, 32, 1, False)
    )
    assert few[1] == P._row_tiles(90, 4, 768, 32, 1, False, 4) == tile_sweep.candidates(case, 90)[0]
    assert set(few) == set(tile_sweep.candidates(case, 90))  # the same candidates, reordered


def test_cases_parse_and_refuse_bad_specs():
    specs = ["fp32:32", "bf16:8", "bf16:32:anchored", "bf16:8:output"]
    assert [c.label for c in tile_sweep.cases(specs)] == specs
    assert tile_sweep.cases(["bf16:32:anchored"])[0] == tile_sweep.Case("bf16", 32, True)
    out = tile_sweep.cases(["fp32:16:output"])[0]
    assert out == tile_sweep.Case("fp32", 16, output=True)
    assert (out.side, out.contig) == ("output", 0)
    every = tile_sweep.cases(None)
    n = len(tile_sweep.KS) + len(tile_sweep.ANCHORED_KS) + len(tile_sweep.OUTPUT_KS)
    assert len(every) == len(tile_sweep.DTYPES) * n
    assert sum(c.anchored for c in every) == len(tile_sweep.DTYPES) * len(tile_sweep.ANCHORED_KS)
    assert sum(c.output for c in every) == len(tile_sweep.DTYPES) * len(tile_sweep.OUTPUT_KS)
    for bad in ("fp64:8", "fp32", "fp32:0", "bf16:x", "fp32:8:soft", "fp32:8:anchored:output"):
        with pytest.raises(ValueError, match="DTYPE:K"):
            tile_sweep.cases([bad])
    with pytest.raises(ValueError, match="not both"):
        tile_sweep.Case("fp32", 8, True, True)


def test_output_candidates_are_the_transposed_launchers_and_valid():
    # side output: the launcher's choice for transposed views (CONTIG = 0) first, and the
    # resident block both where the launcher takes it (bf16 k = 8) and where it does not
    # (bf16 k = 16), so the sweep times the crossover
    for dtype, k in (("bf16", 8), ("bf16", 16), ("fp32", 16)):
        case = tile_sweep.Case(dtype, k, output=True)
        elsize = 4 if dtype == "fp32" else 2
        for arch in (80, 90):
            found = tile_sweep.candidates(case, arch)
            assert found[0] == P._row_tiles(arch, elsize, 768, k, 0, False, 16 // elsize)
            assert len(found) == len(set(found)) > 20
            assert any(t.resident for t in found) and any(not t.resident for t in found)
            for tiles in found:
                P._check_tiles(tiles, 768, k, 0, 16 // elsize)
    assert not tile_sweep.candidates(tile_sweep.Case("bf16", 16, output=True), 90)[0].resident


@interpreting
@pytest.mark.parametrize(("dtype", "k"), [(torch.float32, 32), (torch.bfloat16, 8)], ids=str)
def test_every_candidate_matches_float64(dtype, k):
    # d = 160: past the one-pass tile, so the two-pass kernel and (bf16 k = 8) the resident
    # one run with each candidate's rows, columns and chunks; 19 and 3 rows: ragged blocks
    d = 160
    case = tile_sweep.Case("fp32" if dtype == torch.float32 else "bf16", k)
    gen = torch.Generator().manual_seed(k)
    grads = [torch.randn(r, d, generator=gen).to(dtype) for r in (19, 3)]
    u = orthonormal(d, k).contiguous()
    for tiles in tile_sweep.candidates(case, 90, d=d):
        work = [g.clone() for g in grads]
        with P.row_tiles_override(tiles):
            P.project_bucket_(work, u, None, "input")
        for g, out in zip(grads, work, strict=True):
            assert_matches(out, ref64(g, u, "input"), g, k, backend="triton", d=d)


@interpreting
@pytest.mark.parametrize(("dtype", "k"), [(torch.float32, 16), (torch.bfloat16, 8)], ids=str)
def test_every_output_candidate_matches_float64(dtype, k):
    # side output as the backends pass it: transposed views (rows along the unit stride),
    # 24 and 8 rows so the 16-byte vectors (and with them the resident block) apply;
    # d = 160: past the one-pass tile
    d = 160
    case = tile_sweep.Case("fp32" if dtype == torch.float32 else "bf16", k, output=True)
    gen = torch.Generator().manual_seed(k + 2)
    grads = [torch.randn(d, r, generator=gen).to(dtype).T for r in (24, 8)]
    u = orthonormal(d, k).contiguous()
    found = tile_sweep.candidates(case, 90, d=d)
    assert any(t.resident for t in found)
    for tiles in found:
        work = [g.clone() for g in grads]
        assert all(w.stride() == g.stride() for w, g in zip(work, grads, strict=True))
        with P.row_tiles_override(tiles):
            tile_sweep.project(work, u, None, "output")
        for g, out in zip(grads, work, strict=True):
            assert_matches(out, ref64(g, u, "input"), g, k, backend="triton", d=d)
        assert (
            tile_sweep.max_error(grads, u, tiles, None, "output")
            <= (tile_sweep.ERROR_BOUND[case.dtype])
        )


@interpreting
@pytest.mark.parametrize(("dtype", "k"), [(torch.float32, 32), (torch.bfloat16, 16)], ids=str)
def test_every_anchored_candidate_matches_float64(dtype, k):
    # the anchored projection's candidates (its own launcher's choice first): x - U (U^T x - C)
    from gradproj import reference as R

    d = 160
    case = tile_sweep.Case("fp32" if dtype == torch.float32 else "bf16", k, True)
    gen = torch.Generator().manual_seed(k + 1)
    grads = [torch.randn(r, d, generator=gen).to(dtype) for r in (19, 3)]
    anchors = [torch.randn(r, k, generator=gen) for r in (19, 3)]
    u = orthonormal(d, k).contiguous()
    found = tile_sweep.candidates(case, 90, d=d)
    assert found[0] == P._row_tiles(90, 4 if dtype == torch.float32 else 2, d, k, 1, True, 4)
    for tiles in found:
        work, c_work = [g.clone() for g in grads], [c.clone() for c in anchors]
        with P.row_tiles_override(tiles):
            tile_sweep.project(work, u, c_work)
        for g, out, c, c_out in zip(grads, work, anchors, c_work, strict=True):
            p_ref, _ = R.project_anchored(g.double(), c.double(), u.double())
            assert_matches(out, p_ref, g, k, backend="triton", d=d)
            assert torch.equal(c_out, c)  # hard projection: the anchors stay
        # the sweep's own error measure agrees (its float64 reference of the same math)
        assert tile_sweep.max_error(grads, u, tiles, anchors) <= tile_sweep.ERROR_BOUND[case.dtype]


def test_override_refuses_tiles_the_kernel_cannot_run_and_changes_nothing():
    g = torch.randn(6, 160)
    u = orthonormal(160, 24).contiguous()
    bad = [
        (P._Tiles(False, 16, 8, 32, 4, 1), ">= 16"),  # tl.dot needs 16
        (P._Tiles(False, 24, 32, 32, 4, 1), "powers of two"),
        (P._Tiles(True, 16, 128, 32, 4, 1), "one pass holds the whole row"),
        (P._Tiles(False, 8, 64, 16, 4, 1, None, True, 3), "holds all of k"),
        (P._Tiles(False, 8, 32, 32, 4, 1, None, True, 3), "must cover d"),
    ]
    for tiles, why in bad:
        out = g.clone()
        with pytest.raises(ValueError, match=why), P.row_tiles_override(tiles):
            P.project_bucket_([out], u, None, "input")
        assert torch.equal(out, g)
    with pytest.raises(TypeError, match="_Tiles"), P.row_tiles_override((False, 16)):
        pass


def test_override_is_scoped():
    tiles = P._Tiles(False, 16, 32, 32, 4, 1)
    assert P._ROW_TILES_OVERRIDE.get() is None
    with pytest.raises(RuntimeError, match="inside"), P.row_tiles_override(tiles):
        assert P._ROW_TILES_OVERRIDE.get() == tiles
        raise RuntimeError("inside")
    assert P._ROW_TILES_OVERRIDE.get() is None


def test_markdown_ranks_by_kernel_time_and_marks_the_launchers_choice():
    rows = [
        {"tiles": "a", "chosen": True, "kernel_ms": 0.2, "fraction_of_copy": 0.25,
         "max_error": 1e-7, "ok": True, "regs": 128, "spills": 0},
        {"tiles": "b", "kernel_ms": 0.1, "fraction_of_copy": 0.5, "max_error": 3e-5,
         "ok": False, "regs": 200, "spills": 8},
        {"tiles": "c", "error": "CompilationError: out of resources"},
    ]  # fmt: skip
    text = tile_sweep.markdown("H200", {"triton": "3.6.0"}, {"fp32:32": rows})
    body = text.split("## fp32:32", 1)[1]
    assert body.index("| b |") < body.index("| a ✓ |") < body.index("| c |")
    assert "(over bound)" in body and "out of resources" in body and "(measured)" in text


def test_compile_only_reports_registers_and_spills(tmp_path):
    out = tmp_path / "rows.json"
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    cmd = [
        sys.executable,
        os.path.join(ROOT, "benchmarks", "tile_sweep.py"),
        "--compile-only",
        "--arch",
        "sm_90",
        "--only",
        "fp32:32",
        "--limit",
        "2",
        "--jobs",
        "1",
        "--json",
        str(out),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [r["case"] for r in rows] == ["fp32:32", "fp32:32"]
    for r in rows:
        assert r["regs"] > 0 and r["spill_stores"] == 0 and r["blocks_per_sm"] >= 1, r
        assert r["violations"] == [] and r["error"] is None


def test_predicted_markdown_ranks_by_prediction_and_spills_last():
    rows = [
        {"case": "bf16:8", "tiles": "a", "chosen": True, "predicted_fraction_of_copy": 0.45,
         "limiter": "occupancy", "instrs_per_elt": 1.5, "bytes_per_elt": 4.0, "regs": 116,
         "spills": 0, "blocks_per_sm": 4, "warps": 4},
        {"case": "bf16:8", "tiles": "b", "chosen": False, "predicted_fraction_of_copy": 1.1,
         "limiter": "occupancy", "instrs_per_elt": 0.3, "bytes_per_elt": 0.9, "regs": 255,
         "spills": 1216, "blocks_per_sm": 2, "warps": 4},
        {"case": "bf16:8", "tiles": "c", "chosen": False, "predicted_fraction_of_copy": 0.67,
         "limiter": "memory", "instrs_per_elt": 0.7, "bytes_per_elt": 6.0, "regs": 96,
         "spills": 0, "blocks_per_sm": 5, "warps": 4},
        {"case": "bf16:8", "tiles": "d", "chosen": False, "error": "no block fits an SM"},
        {"case": "bf16:8", "tiles": "e", "chosen": False, "predicted_fraction_of_copy": 0.93,
         "limiter": "occupancy", "instrs_per_elt": 0.17, "bytes_per_elt": 0.76, "regs": 132,
         "spills": 0, "blocks_per_sm": 3, "warps": 4, "below_floor": True},
    ]  # fmt: skip
    text = tile_sweep.predicted_markdown("sm_90", rows)
    body = text.split("## bf16:8", 1)[1]
    assert body.index("| c |") < body.index("| a ✓ |") < body.index("| e |")
    assert body.index("| a ✓ |") < body.index("| b |")
    assert "110% (spills)" in body and "fails: no block fits an SM" in body
    assert "93% (below the byte floor: mis-traced)" in body
    assert "predicted from compiled code, not measured" in text


def test_predict_ranks_compiled_candidates_through_the_static_model(tmp_path):
    out, md = tmp_path / "rows.json", tmp_path / "pred.md"
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "tile_sweep.py"), "--predict",
           str(md), "--arch", "sm_90", "--only", "bf16:8", "--limit", "2", "--jobs", "1",
           "--json", str(out), "--rows", "1024"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [(r["case"], r["chosen"]) for r in rows] == [("bf16:8", True), ("bf16:8", False)]
    assert {r["rows"] for r in rows} == {1024} and "768, 1024 rows" in md.read_text()
    for r in rows:
        assert "error" not in r, r
        assert 0.0 < r["predicted_fraction_of_copy"] <= 1.0, r
        assert r["limiter"] in ("memory", "issue", "latency", "occupancy", "tensor"), r
        assert r["instrs_per_elt"] > 0 and r["bytes_per_elt"] >= 4.0 and r["regs"] > 0, r
        assert r["below_floor"] is False, r
    assert "✓" in md.read_text() and "not measured" in md.read_text()


TWO_STAGE_VIEWS = """
import json, sys
sys.path.insert(0, sys.argv[1])
import tile_sweep
from gradproj.kernels import project as P

case = tile_sweep.Case("bf16", 8, output=True)
tiles = P._Tiles(False, 32, 64, 16, 4, 2)
print(json.dumps(tile_sweep._predict_item((case, tiles, "sm_90", 4096))))
"""


def test_two_stage_transposed_views_are_modelled_at_their_bytes():
    """perf_model's unroll detection once took a two-stage transposed-view kernel's pipelined
    copies (one of a tile's 8 in a stretch outside the loop) for a loop unrolled 8 times,
    and counted an eighth of its bytes: 0.76 B an element for bf16, predicted 93 % of copy.
    The asynchronous copies are no evidence now: the two passes' 6 B (read twice, written
    once)."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    cmd = [sys.executable, "-c", TWO_STAGE_VIEWS, os.path.join(ROOT, "benchmarks")]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    row = json.loads(done.stdout.strip().splitlines()[-1])
    assert "error" not in row, row
    assert row["bytes_per_elt"] == pytest.approx(6.0, abs=0.02), row
    assert row["below_floor"] is False and row["predicted_fraction_of_copy"] < 0.67, row
