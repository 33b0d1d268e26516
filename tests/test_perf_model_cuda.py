"""benchmarks/perf_model_cuda.py: C++ loop annotations, inline chains, trip counts, launches.

Everything here runs on hand-written sources and SASS; the real build (``make
perf-model-cuda``) needs the CUDA venv and takes minutes, so its committed result is
checked instead (no kernel missing, every loop with a trip count).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import perf_model as pm  # noqa: E402
import perf_model_cuda as pmc  # noqa: E402

TOY = textwrap.dedent(
    """\
    // for (this is a comment) { not a loop }
    __device__ int find(const int* t, int n) {  // model-uniform
      int lo = 0;
      while (lo < n) {  // model-trips: ceil(log2(entries))
        lo += t[lo];
      }
      return lo;
    }
    __global__ void kern(float* x, int n_chunks) {
      // model-trips: items
      for (int item = blockIdx.x; item < 100;
           item += gridDim.x) {
        for (int c = 0; c < n_chunks; ++c) {  // model-trips: kp / 8
          x[c] += find(nullptr, 2);  // model-binds: nk = kp if resident else 0
    #pragma unroll
          for (int v = 0; v < 4; ++v) x[v] *= 2.f;
        }
        if (x[0] > 0) {
          x[1] = 0;
        } else {  // model-cold-if: vec (the ragged end)
          x[2] = 0;
        }
        do { x[3] += 1; } while (x[3] < 2);
        const char* s = "for (a string)";
      }
    }
    void host(int n) {
      for (int i = 0; i < n; ++i) {}
    }
    """
)


@pytest.fixture
def toy_dir(tmp_path, monkeypatch):
    src = tmp_path / "cuda"
    src.mkdir()
    (src / "toy.cu").write_text(TOY)
    monkeypatch.setattr(pmc, "SOURCES", str(src))
    pmc._sources.cache_clear()
    pmc._spans.cache_clear()
    yield src / "toy.cu"
    pmc._sources.cache_clear()
    pmc._spans.cache_clear()


def test_cpp_loops_headers_bodies_unroll_and_trips(toy_dir):
    loops = {(lp.first, lp.last): lp for lp in pmc.cpp_loops(str(toy_dir))}
    # comments, strings and the while of a do-while are not loops
    assert sorted(loops) == [(4, 6), (11, 25), (13, 17), (16, 16), (28, 28)]
    assert loops[(4, 6)].trips == "ceil(log2(entries))"
    assert loops[(11, 25)].trips == "items"  # on the comment line above a two-line header
    assert loops[(13, 17)].trips == "kp / 8"
    assert loops[(16, 16)].unrolled and not loops[(13, 17)].unrolled
    assert loops[(28, 28)].trips is None  # host code: no annotation needed


def test_binds_cold_and_uniform_spans(toy_dir):
    assert pmc.cpp_binds(str(toy_dir)) == {14: ("nk", "kp if resident else 0")}
    assert pmc.cpp_spans(str(toy_dir)) == [(20, 22, "vec")]
    assert pmc.cpp_spans(str(toy_dir), pmc._UNIFORM) == [(2, 8, "True")]


def test_sass_chains_keep_every_inlined_frame():
    text = textwrap.dedent(
        """\
                .type           k,@function
        k:
        \t//## File "/b/csrc/cuda/tile.cuh", line 109 inlined at "/b/csrc/cuda/project.cu", line 59
        \t//## File "/b/csrc/cuda/project.cu", line 59 inlined at "/b/csrc/cuda/tile.cuh", line 253
                /*0000*/                   LDG.E.64 R2, desc[UR4][R2.64] ;
        \t//## File "/b/csrc/cuda/tile.cuh", line 260
                /*0010*/                   FFMA R1, R2, R3, R1 ;
        """
    )
    chains = pmc.sass_chains(text)["k"]
    assert chains[0x0] == (
        ("/b/csrc/cuda/tile.cuh", 109),
        ("/b/csrc/cuda/project.cu", 59),
        ("/b/csrc/cuda/tile.cuh", 253),
    )
    assert chains[0x10] == (("/b/csrc/cuda/tile.cuh", 260),)


def _toy_sass(path: str) -> str:
    """SASS of kern: the item loop (line 11) around the chunk loop (line 13), which ptxas
    unrolled twice (two copies of line 14's load), and the inlined while loop (line 4)."""
    f = path
    return textwrap.dedent(
        f"""\
                .type           kern,@function
        kern:
        \t//## File "{f}", line 9
                /*0000*/                   MOV R1, c[0x0][0x28] ;
        .L_x_0:
        \t//## File "{f}", line 12
                /*0010*/                   IADD3 R2, R2, 0x1, RZ ;
        .L_x_1:
        \t//## File "{f}", line 14
                /*0020*/                   LDG.E R4, desc[UR4][R6.64] ;
                /*0030*/                   LDG.E R5, desc[UR4][R8.64] ;
                /*0040*/                   FADD R4, R4, R5 ;
        .L_x_2:
        \t//## File "{f}", line 5 inlined at "{f}", line 14
                /*0050*/                   LDG.E R9, desc[UR4][R10.64] ;
                /*0060*/                   BRA `(.L_x_2) ;
        \t//## File "{f}", line 16
                /*0070*/                   FMUL R4, R4, 2 ;
        \t//## File "{f}", line 13
                /*0080*/                   BRA `(.L_x_1) ;
        \t//## File "{f}", line 19
                /*0090*/                   STG.E desc[UR4][R6.64], R4 ;
        \t//## File "{f}", line 21
                /*00a0*/                   STG.E desc[UR4][R6.64], R5 ;
        \t//## File "{f}", line 11
                /*00b0*/                   BRA `(.L_x_0) ;
                /*00c0*/                   EXIT ;
        .L_x_3:
                /*00d0*/                   BRA `(.L_x_3) ;
        """
    )


def test_trips_from_annotations_unrolled_copies_binds_and_cold(toy_dir):
    text = _toy_sass(str(toy_dir))
    sass = pm.parse_sass(text)
    chains = pmc.sass_chains(text)["kern"]
    cpp, binds = pmc._sources()
    env = {"items": 3.0, "kp": 32, "resident": False, "entries": 2, "vec": True}
    got = pmc.analyze_kernel(sass, chains, env, cpp, binds)
    trips = {lp["source"]: lp["trips"] for lp in got["loops"]}
    src = os.path.relpath(str(toy_dir), pmc.ROOT)
    assert trips[f"{src}:11"] == 3.0  # items
    assert trips[f"{src}:13"] == 2.0  # kp / 8 = 4, two copies of line 14's loads per pass
    assert trips[f"{src}:4"] == 1.0  # ceil(log2(2)), inlined through line 14
    # per block: MOV and EXIT once; item loop: IADD3, STG (line 19), BRA = 3 x 3; the cold else
    # branch (line 21) is not counted; chunk loop 5 instrs x 2 x 3; while 2 x 1 x 2 x 3
    assert got["per_block"]["global"] == pytest.approx(3 * 1 + 3 * 2 * 2 + 3 * 2 * 1)
    assert sum(got["per_block"].values()) == pytest.approx(2 + 3 * 3 + 3 * 2 * 5 + 3 * 2 * 2)
    # the while loop's load is a device-table lookup (model-uniform): not a data load
    issued = {r["region"]: r["load_bytes_per_thread"] for r in got["regions"]}
    assert sum(issued.values()) == pytest.approx(3 * 2 * 8)
    env["vec"] = False  # then the else branch runs
    got = pmc.analyze_kernel(sass, chains, env, cpp, binds)
    assert got["per_block"]["global"] == pytest.approx(3 * 2 + 3 * 2 * 2 + 3 * 2 * 1)


def test_instructions_by_source_line_add_up_to_the_kernel(toy_dir):
    """``--lines``: each instruction's weight goes to its kernel line, then its innermost
    line where it was inlined (``find``'s while loop, line 5, through line 14)."""
    text = _toy_sass(str(toy_dir))
    sass = pm.parse_sass(text)
    chains = pmc.sass_chains(text)["kern"]
    cpp, binds = pmc._sources()
    env = {"items": 3.0, "kp": 32, "resident": False, "entries": 2, "vec": True}
    by_line: dict[str, float] = {}
    got = pmc.analyze_kernel(sass, chains, env, cpp, binds, by_line)
    assert sum(by_line.values()) == pytest.approx(sum(got["per_block"].values()))
    name = os.path.basename(str(toy_dir))
    # the while loop's 2 instructions, 1 trip, inlined in the chunk loop (2 x 3)
    assert by_line[f"{name}:14 < {name}:5"] == pytest.approx(2 * 1 * 2 * 3)
    assert by_line[f"{name}:19"] == pytest.approx(3)  # the item loop's STG
    assert pmc._line_key([]) == "(no line)"
    assert pmc._line_key([("/x/a.cuh", 3), ("/x/k.cu", 9)]) == "k.cu:9 < a.cuh:3"
    assert pmc._line_key([("/x/k.cu", 9)]) == "k.cu:9"


def test_a_cut_inline_chain_takes_the_coldness_of_its_callers(toy_dir):
    """ptxas merges code of several call sites and keeps only the frames they share: such
    an instruction is cold where every longer chain it begins is (all its callers cold),
    else hot; a chain nothing extends is complete and stays as it is."""
    toy = str(toy_dir)
    chains = {
        1: ((toy, 21), (toy, 14)),  # the cold else branch, inlined at 14
        2: ((toy, 21),),  # cut: only 1 extends it, and 1 is cold
        3: ((toy, 5), (toy, 14)),  # hot
        4: ((toy, 5), (toy, 19)),  # cold
        5: ((toy, 5),),  # cut: 3 (hot) and 4 (cold) extend it
        6: ((toy, 19),),  # nothing extends it
    }
    live = [pm.Instr(a, "IADD3", "") for a in chains]
    assert pmc._cut_chains_cold(live, chains, {1, 4}) == {2}
    assert pmc._cut_chains_cold(live, chains, {1, 3, 4}) == {2, 5}


def test_the_async_staging_loops_count_every_unit():
    """mma_rows.cuh [async staging]: stage_async copies U four units a trip, then the rest
    one a trip, both loops kept loops by ``#pragma unroll 1`` (which cpp_loops must not
    take for an unrolled loop): their model-trips add up to a thread's units, as the plain
    copy's ceil(units / threads) did."""
    path = os.path.join(pmc.SOURCES, "mma_rows.cuh")
    lines = open(path).read().split("\n")
    start = next(n for n, ln in enumerate(lines, 1) if "void stage_async(" in ln)
    end = next(n for n, ln in enumerate(lines, 1) if n > start and ln.startswith("}"))
    staged = [lp for lp in pmc.cpp_loops(path) if start < lp.first < end and lp.trips]
    assert len(staged) == 2 and not any(lp.unrolled for lp in staged)
    four, one = staged
    cases = ((48, 4, 2, 512), (48, 2, 1, 512), (20, 4, 1, 256), (1, 1, 1, 256))
    for nblk, J, units, threads in cases:
        env = {"nblk": nblk, "J": J, "units": units, "threads": threads}
        want = math.ceil(nblk * J * 32 * units / threads)
        assert 4 * pmc._eval(four.trips, env) + pmc._eval(one.trips, env) == want


def test_a_model_scale_block_counts_its_factor(toy_dir):
    text = _toy_sass(str(toy_dir))
    sass = pm.parse_sass(text)
    chains = pmc.sass_chains(text)["kern"]
    env = {"items": 3.0, "kp": 32, "resident": False, "entries": 2, "vec": True, "half": 0.5}
    cpp, binds = pmc._sources()
    before = pmc.analyze_kernel(sass, chains, env, cpp, binds)
    # the unrolled v loop (line 16: the FMUL, 2 x 3 times a block) runs half as often
    src = toy_dir.read_text().split("\n")
    src[15] += "  // model-scale: half (e.g. slots past d skipped)"
    toy_dir.write_text("\n".join(src))
    pmc._sources.cache_clear()
    pmc._spans.cache_clear()
    assert pmc.cpp_spans(str(toy_dir), pmc._SCALE) == [(16, 16, "half")]
    cpp, binds = pmc._sources()
    after = pmc.analyze_kernel(sass, chains, env, cpp, binds)
    assert before["per_block"]["fma"] - after["per_block"]["fma"] == pytest.approx(0.5 * 2 * 3)
    assert sum(after["per_block"].values()) == pytest.approx(
        sum(before["per_block"].values()) - 0.5 * 2 * 3
    )
    with pytest.raises(NameError):  # a factor this launch cannot evaluate is an error
        pmc.analyze_kernel(sass, chains, {k: v for k, v in env.items() if k != "half"}, cpp, binds)
    # the busiest warp: every warp alike unless the launch says otherwise; here its warp
    # runs the block whole (its factor 1), so it issues what the block did before
    assert after["busiest_per_block"] == pytest.approx(sum(after["per_block"].values()))
    busiest = pmc.analyze_kernel(sass, chains, env | {"busiest": {"half": 1.0}}, cpp, binds)
    assert busiest["per_block"] == after["per_block"]
    assert busiest["busiest_per_block"] == pytest.approx(sum(before["per_block"].values()))


def test_the_rows_kernels_blocks_past_d_are_scaled():
    """mma_rows.cuh: a warp whose blocks reach past d skips them (the rows of 320 columns
    on 8 warps of 3 blocks: warp 6 holds 2, warp 7 none). Every branch that skips a block past d
    in a whole tile is in a model-scale block (blocks / NB: AdamW's loads, x' and m, v
    stores; every policy's loads), or is a model-cold-if (partial tiles, ragged rows), so
    the model counts the blocks that run, not NB a warp. AdamW's factor is blocks / NB;
    a projection converts its blocks past d anyway (factor 1)."""
    path = os.path.join(pmc.SOURCES, "mma_rows.cuh")
    lines = open(path).read().split("\n")
    scaled = pmc.cpp_spans(path, pmc._SCALE)
    cold = pmc.cpp_spans(path)
    # (not the ragged vector's j < d && j + V > d: load_ragged, called cold)
    skip = re.compile(r"if \((?:full \? )?(?:valid && )?(?:j \+ V <= d|j < d|b < nb)(?=\)| \|\|)")
    found = 0
    for n, line in enumerate(lines, 1):
        if not skip.search(line.split("//")[0]):
            continue
        found += 1
        assert any(f <= n <= la for f, la, _ in scaled + cold), (n, line.strip())
    assert found >= 7
    factors = {e for _, _, e in scaled}
    assert "blocks / NB if updates else 1" in factors
    for name, updates in (("AdamWPolicy<c10::BFloat16, true>", True),
                          ("ProjectPolicy<c10::BFloat16, true>", False)):  # fmt: skip
        (la,) = pmc.mma_launches(name, "bf16", 320, 1, 4096, 2, None, anchored=updates)
        env = la.env
        assert (env["NB"], env["W"], env["blocks"], env["updates"]) == (3, 8, 2.5, updates)
        want = 2.5 / 3 if updates else 1.0
        assert pmc._eval("blocks / NB if updates else 1", env) == want


def test_the_busiest_warp_bounds_the_occupancy():
    """A tile lasts as long as its busiest warp: mma_rows.cuh's warps whose blocks pass d
    skip them and its last warp looks up the row cache (model-scale: cache), so the
    launch's busiest warp is warp 0 with NB blocks, plus the lookups where the last warp
    holds NB blocks too; perf_model.bounds takes the occupancy bound from the busiest
    warp's instructions (docs/gpu.md [busiest-warp])."""
    path = os.path.join(pmc.SOURCES, "mma_rows.cuh")
    scaled = pmc.cpp_spans(path, pmc._SCALE)
    lines = open(path).read().split("\n")
    # the lookups (pol.row) scaled by the last warp's share; their call in the tile loop by
    # chunk 0 of every other tile
    lookups = [(f, la) for f, la, e in scaled if e == "cache"]  # warp 0's, the last warp's
    assert len(lookups) == 2
    assert all("pol.row(row)" in "\n".join(lines[f - 1 : la]) for f, la in lookups)
    in_loop = "max(0.0, items - 2) / items / lookup"
    (call,) = [f for f, _, e in scaled if e == in_loop]
    assert "cache_rows(" in lines[call]  # the line after the condition's
    # the lookups of tiles past the bucket's last find nothing (their rows fail the guard):
    # the tile loop's are of tiles it + 2 (and it + 3), so a CTA of two tiles or fewer makes
    # none there; its second tile's (warp 0's one-tile lookups) only where it has one
    # (by the last warp, W - 1, not the busiest: aside is 0 in the busiest warp's names)
    second = "min(1.0, max(0.0, items - 1)) * aside"
    (pro,) = [f for f, _, e in scaled if e == second]
    assert "cache_rows(blockIdx.x + gridDim.x, 1, W - 1)" in lines[pro - 1]
    for items, lookup, want in ((1.94, 2, 0.0), (2.0, 1, 0.0), (2.37, 1, 0.37 / 2.37),
                                (10.0, 2, 0.4), (10.0, 1, 0.8)):  # fmt: skip
        env = {"items": items, "lookup": lookup}
        assert pmc._eval(in_loop, env) == pytest.approx(want)
    assert [pmc._eval(second, {"items": i, "aside": 1.0}) for i in (1.0, 1.94, 2.0, 7.0)] == (
        pytest.approx([0.0, 0.94, 1.0, 1.0])
    )
    assert pmc._eval(second, {"items": 7.0, "aside": 0.0}) == 0.0
    (lead,) = [(f, la) for f, la, e in scaled if e == "lead"]
    assert "if (t == leader)" in lines[lead[0] - 1]
    assert "constexpr int kStageWarp = kLookupWarp == 0 ? 1 : 0;" in "\n".join(lines)
    assert "cp.async.bulk.shared::cluster.global" in "\n".join(lines[lead[0] - 1 : lead[1]])
    # d = 320 on 8 warps of 3 blocks: warp 6 holds 2, warp 7 none (the last warp's lookups
    # hide there); d = 768 on 16 warps of 3: all full
    for d, k, warps, nb, blocks, cache in ((320, 8, 8, 3, 2.5, 0.0), (768, 8, 16, 3, 3.0, 1.0)):
        (la,) = pmc.mma_launches("ProjectPolicy<c10::BFloat16, true>", "bf16", d, k, 4096, 2, None)
        env = la.env
        assert (env["W"], env["NB"], env["blocks"], env["cache"]) == (warps, nb, blocks, 1 / warps)
        # [async staging] the bulk copy's issue (sm_90) by a warp that makes no lookup: the
        # busiest counts it where it does not count the lookups
        lead = 1.0 - cache
        assert env["busiest"] == {"blocks": nb, "cache": cache, "aside": 0.0, "lead": lead}
        assert env["aside"] == 1.0  # the mean warp's share of the lookups aside counts them
        assert env["lead"] == 1 / warps
        assert env["lookup"] == 2  # a projection's lookup: two tiles (eight slots)
    (la,) = pmc.mma_launches("AdamWPolicy<c10::BFloat16, true>", "bf16", 768, 8, 4096, 2, None)
    assert la.env["lookup"] == 1  # AdamW's 64-byte rows: four slots, a tile a lookup
    # the bound: the busiest warp's instructions where given, never fewer than the mean's
    dev = pm.DEVICES["sm_90"]
    mean = pm.bounds(4.0, 1.0, [], dev, warps_per_sm=16)
    busy = pm.bounds(4.0, 1.0, [], dev, warps_per_sm=16, busiest_instrs_per_elt=1.5)
    assert busy["occupancy_s_per_elt"] == pytest.approx(1.5 * mean["occupancy_s_per_elt"])
    assert pm.bounds(4.0, 1.0, [], dev, warps_per_sm=16, busiest_instrs_per_elt=0.5) == mean
    kn = {"bytes_per_elt": {"read": 2.0, "write": 2.0}, "instrs_per_elt": {"total": 1.0},
          "blocks_per_sm": 1, "warps": 16, "busiest_instrs_per_elt": 1.5}  # fmt: skip
    assert pm.kernel_bounds(kn, dev) == busy


def test_a_loop_without_trips_is_counted_once_and_flagged(toy_dir):
    text = _toy_sass(str(toy_dir)).replace("line 13\n", "line 28\n")
    src = toy_dir.read_text().replace("  // model-trips: kp / 8", "")
    toy_dir.write_text(src)
    pmc._sources.cache_clear()
    sass = pm.parse_sass(text)
    cpp, binds = pmc._sources()
    env = {"items": 1.0, "kp": 32, "resident": False, "entries": 2, "vec": True}
    got = pmc.analyze_kernel(sass, pmc.sass_chains(text)["kern"], env, cpp, binds)
    assert any("no model-trips, counted once" in n for n in got["notes"])


def _constexprs() -> dict[str, int]:
    import cuda_compile_report as ccr

    out: dict[str, int] = {}
    for name in ("tile.cuh", "surgery.cu", "mma_rows.cuh"):
        text = open(os.path.join(ROOT, "csrc", "cuda", name)).read()
        for m in ccr._CONSTEXPR.finditer(ccr._strip_comments(text)):
            expr = re.sub(r"static_cast<\w+>\(([^)]*)\)", r"\1", m.group(2))
            expr = re.sub(r"sizeof\(float\)", "4", expr)
            v = ccr._eval_int(expr, out)
            if v is not None:
                out.setdefault(f"{name}:{m.group(1)}", v)
                out.setdefault(m.group(1), v)
    return out


def test_the_python_twin_uses_the_sources_constants():
    c = _constexprs()
    assert c["tile.cuh:kThreads"] == pmc.THREADS
    assert c["tile.cuh:kChunk"] == pmc.CHUNK
    assert c["tile.cuh:kEpt"] == pmc.EPT
    assert c["tile.cuh:kResidentBytes"] == pmc.RESIDENT_BYTES
    assert c["surgery.cu:kChunk"] == pmc.SURGERY_CHUNK
    assert c["mma_rows.cuh:kTileRows"] == pmc.MMA_TILE_ROWS
    assert c["mma_rows.cuh:kCoefChunk"] == pmc.MMA_COEF_CHUNK
    assert c["mma_rows.cuh:kWideWarps"] == pmc.MMA_WIDE_WARPS
    rows = open(os.path.join(ROOT, "csrc", "cuda", "mma_rows.cuh")).read()
    assert "constexpr int row_slots(size_t row_bytes) { return row_bytes <= 16 ? 8 : 4; }" in rows
    assert {b: pmc._row_slots(b) for b in pmc.MMA_ROW_SLOTS} == pmc.MMA_ROW_SLOTS
    assert c["mma_rows.cuh:kMaxRowBytes"] == pmc.MMA_MAX_ROW_BYTES
    assert c["mma_rows.cuh:kStageBarrierBytes"] == pmc.MMA_STAGE_BARRIER_BYTES
    assert "+ kStageBarrierBytes;" in rows  # smem_bytes counts it, as _mma_smem does


def test_launch_geometry_follows_run_rows_and_run_cols():
    # D = 768: a 2-warp row group (1024 columns), 4 groups of 2 rows, one segment
    (fused,) = pmc.rows_launches("P", 2, 768, 32, 4096, 2)
    assert fused.kernel.endswith("Mode)0, 8>") and fused.work == 4096 // 8
    assert fused.env | {} == fused.env and fused.env["wpr"] == 2 and fused.env["kp"] == 32
    assert fused.env["resident"] and fused.dynamic_smem == 32 * 768 * 4  # all of U^T: 96 KiB
    (wide,) = pmc.rows_launches("P", 2, 768, 64, 4096, 2)  # 192 KiB: a chunk at a time
    assert not wide.env["resident"] and wide.dynamic_smem == 8 * 768 * 4
    # a device allowing less per block (resident_limit): 96 KiB no longer fits
    (capped,) = pmc.rows_launches("P", 2, 768, 32, 4096, 2, resident_bytes=64 * 1024)
    assert not capped.env["resident"] and capped.dynamic_smem == 8 * 768 * 4
    (small,) = pmc.rows_launches("P", 2, 768, 8, 4096, 2)
    assert small.env["resident"] and small.dynamic_smem == 8 * 768 * 4
    # a flat vector of 1.5M elements: 4096-wide segments, partials + combine + apply
    split = pmc.rows_launches("P", 2, 2048 * 768, 32, 2, 2)
    assert [la.kernel.split("<")[0] for la in split] == ["rows_kernel", "combine_kernel",
                                                          "rows_kernel"]  # fmt: skip
    assert split[0].env["nseg"] == 384 and split[0].work == 384
    # slots of 4 columns a thread holds per row (S = 4), and those before d (model-scale)
    assert (fused.env["S"], fused.env["slots"]) == (4, 3)  # 768 of 1024 columns
    assert pmc.rows_launches("P", 2, 1024, 8, 64, 1)[0].env["slots"] == 4
    # d = 5000: two 4096-wide segments (slots of 1024 columns): 4 slots, then 1
    assert pmc.rows_launches("P", 2, 5000, 8, 64, 1)[0].env["slots"] == 2.5
    assert split[0].env["slots"] == 4
    # [small k] (tile::chunk_for): k = 1 in chunks of one coefficient, one staged row (16 KiB
    # of a 4096-wide segment where 8 took 128 KiB; resident: U's one row, not kp = 8); k = 3
    # in chunks of 4, k = 5 of 8
    one = pmc.rows_launches("P", 2, 2048 * 768, 1, 2, 2)
    assert [la.kernel.split(", ")[-1] for la in one] == ["1>", "combine_kernel<P >", "1>"]
    assert one[0].env["KC"] == 1 and one[0].dynamic_smem == 4096 * 4
    (resident_one,) = pmc.rows_launches("P", 2, 768, 1, 4096, 2)
    assert resident_one.env["resident"] and resident_one.dynamic_smem == 768 * 4
    assert split[0].env["KC"] == 8 and split[0].dynamic_smem == 8 * 4096 * 4
    (three,) = pmc.rows_launches("P", 2, 768, 3, 4096, 2)
    assert three.kernel.endswith("Mode)0, 4>") and three.dynamic_smem == 4 * 768 * 4
    assert pmc.rows_launches("P", 2, 768, 2, 4096, 2)[0].env["KC"] == 2
    assert pmc.rows_launches("P", 2, 768, 5, 4096, 2)[0].env["KC"] == 8
    # side output (block policies: 4 rows a group, 8 elements a thread): D = 768 is one
    # 1024-wide segment of 4-warp groups, 2 groups (8 rows) a CTA; its second slot runs
    # in the 2 warps whose columns start before 768 (a warp skips a slot whole)
    # the tensor-core rows kernel: 4 blocks a warp at 512 (8 warps), 3 at 768 (16 warps)
    (mma,) = pmc.mma_launches("P", "bf16", 512, 32, 4096, 2, None)
    assert (mma.env["NB"], mma.env["blocks"], mma.work, mma.threads) == (4, 4, 4096 // 16, 256)
    # [row cache]: a projection's 8 tiles of rows (two a lookup), a Row and an anchor address a
    # row; then [async staging]'s mbarrier (16 B)
    smem_tail = 8 * 16 * 24 + 16
    # [coefficients]: a projection's coefficient tile split, 2 kp floats a row (AdamW's kp + 4)
    assert mma.dynamic_smem == 4 * (32 * 4 * 128 + 8 * 16 * 16 + 16 * 64) + smem_tail
    (mma,) = pmc.mma_launches("P", "bf16", 768, 32, 4096, 2, None)
    assert (mma.env["NB"], mma.env["blocks"], mma.threads) == (3, 3, 512)
    assert mma.dynamic_smem == 4 * (48 * 4 * 128 + 16 * 16 * 16 + 16 * 64) + smem_tail
    # the projections at every k; AdamW's fp32 contiguous rows from k = 9 (the FMA engine)
    assert pmc.mma_launches("P", "fp32", 768, 1, 4096, 2, None) is not None
    first = {(op, k): pmc.op_launches(op, "fp32", k)[0].kernel
             for op in ("project_ input", "ProjectedAdamW input") for k in (8, 9)}  # fmt: skip
    assert first["project_ input", 8].startswith("mma_rows_kernel<")
    assert first["ProjectedAdamW input", 8].startswith("rows_kernel<")
    assert first["ProjectedAdamW input", 9].startswith("mma_rows_kernel<")
    # [wide] the projection takes 10 blocks a warp up to d = 1280 (1100: warps 0-5 hold 10,
    # warp 6 holds 9, warp 7 none); AdamW and the pair policies stop at 1024
    (wide,) = pmc.mma_launches("P", "fp32", 1100, 40, 4096, 2, None)
    assert (wide.env["NB"], wide.env["blocks"]) == (10, 69 / 8)
    assert wide.kernel == "mma_rows_kernel<P, 10, false, 8, false, false>"
    assert pmc.mma_launches("P", "fp32", 1281, 40, 4096, 2, None) is None  # d > 1280
    # [16 warps] 16-bit projection rows of 513-1024 columns (contiguous, strided, in row
    # pairs to 768; AdamW's too, its fp32 rows to 768): 16 warps a CTA, 3 or 4
    # blocks a warp, where their partial sums (16 KiB) fit beside the launch's columns
    bf16 = "ProjectPolicy<c10::BFloat16, true>"
    (w,) = pmc.mma_launches(bf16, "bf16", 768, 32, 4096, 2, None)
    assert (w.threads, w.env["NB"], w.env["blocks"], w.env["W"]) == (512, 3, 3, 16)
    # [pairs]: U twice fits
    assert w.kernel == f"mma_rows_kernel<{bf16}, 3, true, 16, false, false>"
    assert w.dynamic_smem == 4 * (48 * 4 * 128 * 2 + 16 * 16 * 16 + 16 * 64) + smem_tail
    (w,) = pmc.mma_launches(bf16, "bf16", 1000, 32, 4096, 2, None)
    assert (w.threads, w.env["NB"], w.env["blocks"]) == (512, 4, 63 / 16)
    # 2 x 128 KiB does not fit: [raw pairs], U once in pairs' order
    assert w.kernel.endswith(", 4, true, 16, false, true>")
    assert w.dynamic_smem == 4 * (63 * 4 * 128 + 16 * 16 * 16 + 16 * 64) + smem_tail
    # [fp32 pairs] fp32 projection rows of k = 32 at 768: U split twice (192 KiB) beside 16
    # warps keeps the SM's 16 (two 8-warp CTAs of the fragments); not at an A100's 163 KiB,
    # nor at k = 24 (padded to 32: a k-step more than the fragments' 24), nor anchored
    fp32 = "ProjectPolicy<float, true>"
    (w,) = pmc.mma_launches(fp32, "fp32", 768, 32, 4096, 2, None)
    assert w.kernel == f"mma_rows_kernel<{fp32}, 3, true, 16, false, false>"
    assert w.dynamic_smem == 4 * (48 * 4 * 128 * 2 + 16 * 16 * 16 + 16 * 64) + smem_tail
    (w,) = pmc.mma_launches(fp32, "fp32", 768, 32, 4096, 2, 163 * 1024)
    assert w.kernel == f"mma_rows_kernel<{fp32}, 3, false, 16, false, false>"
    for k, anchored in ((24, False), (32, True)):
        (w,) = pmc.mma_launches(fp32, "fp32", 768, k, 4096, 2, None, anchored=anchored)
        assert w.kernel == f"mma_rows_kernel<{fp32}, 6, false, 8, false, false>", (k, anchored)
    for d, dt, policy in ((512, "bf16", bf16), (1100, "bf16", bf16),
                          (1000, "fp32", "AdamWPolicy<float, true>"),
                          (1000, "fp32", "AdamWPolicy<float, false>")):  # fmt: skip
        (la,) = pmc.mma_launches(policy, dt, d, 32, 4096, 2, None)
        assert (la.threads, la.env["W"]) == (256, 8), (d, dt, policy)
    adamw = ("AdamWPolicy<{}, true>", "AdamWPolicy<{}, false>", "AdamWPairPolicy<{}>")
    for (d, blocks), (dt, t), policy in itertools.product(
        ((520, 33 / 16), (700, 44 / 16), (768, 3), (1000, 63 / 16)),
        (("bf16", "c10::Half"), ("fp32", "float")),
        adamw,
    ):
        name = policy.format(t)
        if d > 768 and (name.startswith("AdamWPolicy<float") or "Pair" in name):
            continue  # 8 warps (above); row pairs stop at 768 (kMaxPairD)
        (la,) = pmc.mma_launches(name, dt, d, 32, 4096, 2, None)
        nb = 3 if d <= 768 else 4
        assert (la.threads, la.env["NB"], la.env["blocks"]) == (512, nb, blocks), (d, dt, name)
        # AdamW's U in [raw pairs] only for 16-bit row pairs on 16 warps (mma_rows.cuh
        # kRawPairsAt: its rows there spilled on sm_90)
        raw = "true" if dt == "bf16" and "Pair" in name else "false"
        assert la.kernel.endswith(f", {nb}, {raw}, 16, false, {raw}>"), la.kernel
    for policy in ("ProjectPolicy<c10::Half, false>", "ProjectPairPolicy<c10::BFloat16>"):
        (la,) = pmc.mma_launches(policy, "bf16", 768, 32, 4096, 2, None)
        assert (la.threads, la.env["NB"]) == (512, 3), policy
        # row pairs stop at 768 (4 blocks spilled on sm_80); strided rows go on to 1024
        (la,) = pmc.mma_launches(policy, "bf16", 1000, 32, 4096, 2, None)
        assert (la.threads, la.env["NB"]) == ((256, 8) if "Pair" in policy else (512, 4)), policy
    # AdamW's later column blocks are project.cu's anchored projection: 16 warps; the
    # first too where the 8 KiB more fit (an H100: two launches of 64 columns), not on an
    # A100's 163 KiB (three launches of 48, 48, 32 columns sized for 8 warps)
    first, rest = pmc.mma_launches("AdamWPolicy<c10::BFloat16, true>", "bf16", 768, 128, 4096,
                                   2, None, True, bf16)  # fmt: skip
    assert (first.threads, rest.threads) == (512, 512)
    first, *rest = pmc.mma_launches("AdamWPolicy<c10::BFloat16, true>", "bf16", 768, 128, 4096,
                                    2, 163 * 1024, True, bf16)  # fmt: skip
    assert (first.threads, [la.threads for la in rest]) == (256, [256, 512])
    # they take 16 warps only where the 8 KiB more fit: k = 24 at 768 stages 72 KiB of U,
    # with 8 warps' partial sums, the split coefficient tile and the row cache 86 KiB,
    # with 16 94 KiB (each 16 B more: [async staging]'s mbarrier)
    for optin, threads in ((94 * 1024 + 16, 512), (94 * 1024 + 15, 256)):
        (la,) = pmc.mma_launches(bf16, "bf16", 768, 24, 4096, 2, optin)
        tail = f", false, {threads // 32}, false, false>"
        assert (la.threads, la.kernel.endswith(tail)) == (threads, True)
    for policy, nb in (("AdamWPolicy<float, true>", 8), ("ProjectPairPolicy<c10::BFloat16>", 8)):
        assert pmc.mma_launches(policy, "bf16", 1100, 40, 4096, 2, None) is None
        assert pmc.mma_launches(policy, "bf16", 1024, 40, 4096, 2, None)[0].env["NB"] == nb
    adamw_pairs = "AdamWPairPolicy<c10::BFloat16>"
    assert pmc.mma_launches(adamw_pairs, "bf16", 800, 40, 4096, 2, None) is None
    # [wide] fp32 AdamW past 1024: the step alone (rows kernel, no basis columns), then the
    # projection of p on tensor cores (one launch on an H100, two of 16 on an A100)
    for optin, widths in ((227 * 1024, [32]), (163 * 1024, [16, 16])):
        step, *project = pmc.op_launches("ProjectedAdamW input", "fp32", 32, d=1280,
                                         smem_optin=optin)  # fmt: skip
        assert step.kernel.startswith("rows_kernel<") and step.env["kp"] == 0
        assert [la.env["k"] for la in project] == widths
        assert all(la.kernel.startswith("mma_rows_kernel<") for la in project)
        moved = pmc.hbm_bytes("ProjectedAdamW input", "fp32", 32, d=1280, smem_optin=optin)
        assert moved[0] == {"read": 16, "write": 12, "note": moved[0]["note"]}
        assert [m["write"] for m in moved[1:]] == [4] * len(widths)
    # [wide] 16-bit AdamW rows past 1024 in the AdamW tensor-core kernel itself (10 blocks a
    # warp; no step-then-project: p would be rounded twice); on an A100 the second launch
    # of 16 columns projects the stepped p
    for optin, kernels in (
        (227 * 1024, ["AdamWPolicy"]),
        (163 * 1024, ["AdamWPolicy", "ProjectPolicy"]),
    ):
        launches = pmc.op_launches("ProjectedAdamW input", "bf16", 32, d=1280, smem_optin=optin)
        assert [la.kernel.split("namespace)::")[1].split("<")[0] for la in launches] == kernels
        assert all(
            la.kernel.startswith("mma_rows_kernel<") and la.env["NB"] == 10 for la in launches
        )
    (fma,) = pmc.op_launches("ProjectedAdamW input", "bf16", 32, d=1300)  # past 1280: FMA
    assert fma.kernel.startswith("rows_kernel<") and fma.env["k"] == 32
    # where U does not fit (k = 128 at d = 768: 384 KiB), a block of columns a launch, the
    # fewest launches: 2 of 64 at an H100's 227 KiB, 48 + 48 + 32 at an A100's 163 KiB
    for optin, widths in ((227 * 1024, [64, 64]), (163 * 1024, [48, 48, 32])):
        blocks = pmc.mma_launches("P", "fp32", 768, 128, 4096, 2, optin, True, "R")
        assert [la.env["k"] for la in blocks] == widths
        assert [la.kernel.split(", ")[0] for la in blocks] == ["mma_rows_kernel<P"] + [
            "mma_rows_kernel<R"
        ] * (len(widths) - 1)  # adamw.cu: the step in the first, then the projection
        assert all(la.dynamic_smem <= optin for la in blocks)
    assert len(pmc.mma_launches("P", "fp32", 1000, 40, 4096, 2, 163 * 1024)) == 2  # A100
    assert len(pmc.mma_launches("P", "fp32", 1000, 40, 4096, 2, 227 * 1024)) == 1  # H100
    # [pairs]: 16-bit projections whose U fits twice stage it split (k > 8, padded to 16)
    bf16 = "ProjectPolicy<c10::BFloat16, true>"
    (pairs,) = pmc.mma_launches(bf16, "bf16", 768, 20, 4096, 2, 227 * 1024)
    assert pairs.kernel.endswith(", 3, true, 16, false, false>") and pairs.env["kp"] == 32
    assert pairs.dynamic_smem == 4 * (48 * 4 * 128 * 2 + 16 * 16 * 16 + 16 * 64) + smem_tail
    for args in (("bf16", 768, 20, 163 * 1024), ("bf16", 768, 8, None), ("fp32", 768, 20, None)):
        dt, d, k, optin = args
        (split,) = pmc.mma_launches(bf16, dt, d, k, 4096, 2, optin)
        assert re.search(r", false, (8|16), (true|false), false>$", split.kernel), args
    # [stacked]: 16-bit projections of at most 8 columns, U hi and lo as two groups (kp = 16,
    # one k-step in pass 2); not fp32, not AdamW's
    (stacked,) = pmc.mma_launches(bf16, "bf16", 768, 8, 4096, 2, None)
    assert stacked.kernel.endswith(", 3, false, 16, true, false>") and stacked.env["kp"] == 16
    assert (stacked.env["steps"], stacked.env["J"]) == (1, 2)
    assert stacked.dynamic_smem == 4 * (48 * 2 * 128 + 16 * 16 * 16 + 16 * 32) + smem_tail
    assert pmc.mma_launches(bf16, "bf16", 768, 9, 4096, 2, None)[0].kernel.endswith(", false>")
    assert pmc.mma_launches(bf16, "fp32", 768, 8, 4096, 2, None)[0].kernel.endswith(", false>")
    adamw16 = "AdamWPolicy<c10::BFloat16, true>"
    assert pmc.mma_launches(adamw16, "bf16", 768, 8, 4096, 2, None)[0].kernel.endswith(", false>")
    # [row cache] AdamW's 64-byte Rows ([row addresses]): 4.5 KiB (a projection's: 1.5 KiB)
    (adamw,) = pmc.mma_launches("AdamWPolicy<c10::BFloat16, true>", "bf16", 768, 32, 4096, 2, None)
    # ([coefficients] AdamW's coefficient tile plain: kp + 4 floats a row)
    assert adamw.dynamic_smem == 4 * (48 * 4 * 128 + 16 * 16 * 16 + 16 * 36) + 4 * 16 * 72 + 16
    (anchored,) = pmc.mma_launches(bf16, "bf16", 768, 20, 4096, 2, None, anchored=True)
    assert anchored.kernel.endswith(", 3, false, 16, false, false>")  # k = 20: 32 > 24 padded
    # [raw pairs]: 16-bit projections of k > 8 where pairs do not fit (an A100 at k = 32) or
    # are not taken (anchored), U staged once in pairs' order, kp as the fragments'
    for optin, anchored in ((163 * 1024, False), (None, True)):
        (raw,) = pmc.mma_launches(bf16, "bf16", 768, 32, 4096, 2, optin, anchored=anchored)
        assert raw.kernel.endswith(", 3, true, 16, false, true>") and raw.env["kp"] == 32
        assert raw.env["units"] == 1
        assert raw.dynamic_smem == 4 * (48 * 4 * 128 + 16 * 16 * 16 + 16 * 64) + smem_tail
    # AdamW's 16-bit rows too where they compile without spills (kRawPairsAt): row pairs on
    # 16 warps, rows of at most 4 blocks a warp on 8; the shared memory the fragments'
    pair16 = "AdamWPairPolicy<c10::BFloat16>"
    (pair_raw,) = pmc.mma_launches(pair16, "bf16", 768, 32, 4096, 2, None, anchored=True)
    assert pair_raw.kernel.endswith(", 3, true, 16, false, true>") and pair_raw.env["units"] == 1
    assert pair_raw.dynamic_smem == adamw.dynamic_smem
    (rows,) = pmc.mma_launches(adamw16, "bf16", 512, 32, 4096, 2, None, anchored=True)
    assert rows.kernel.endswith(", 4, true, 8, false, true>"), rows.kernel
    fp32_rows = "AdamWPolicy<float, true>"
    for name, dt, d, k in ((adamw16, "bf16", 768, 32), (adamw16, "bf16", 768, 20),
                           (pair16, "bf16", 768, 8), (fp32_rows, "fp32", 512, 32)):  # fmt: skip
        (la,) = pmc.mma_launches(name, dt, d, k, 4096, 2, None, anchored=True)
        assert la.kernel.endswith(", false, false>") and ", true, " not in la.kernel, la.kernel
    assert pmc.mma_columns(1024, 1024, 163 * 1024) == 32
    assert pmc.mma_columns(1024, 1024, 33 * 1024) == 0  # not even 8 columns fit
    (cols,) = pmc.rows_launches("B", 4, 768, 8, 4096, 2, ept=8)
    assert (cols.env["wpr"], cols.env["nseg"], cols.work) == (4, 1, 4096 // 8)
    assert (cols.env["S"], cols.env["slots"]) == (2, 1.5)
    assert len(pmc.rows_launches("B", 4, 4096, 8, 64, 1, ept=8)) == 3  # beyond 2048: split


@pytest.mark.parametrize("op", pmc.OPS)
@pytest.mark.parametrize("dt", ["fp32", "bf16"])
def test_hbm_bytes_never_below_the_floor(op, dt):
    for k in pm.KS:
        launches = pmc.op_launches(op, dt, k)
        moved = pmc.hbm_bytes(op, dt, k)
        assert len(moved) == len(launches)
        total = sum(m["read"] + m["write"] for m in moved)
        assert total >= pm.OPS[op].floor_bytes(dt, k) - 1e-9
    if op == "project_ input":
        b = pm.ITEMSIZE[dt]
        # fp32 k = 8 at d = 2048, the FMA engine (wider than the tensor-core kernel's 1280):
        # read once, written once; the fp32 coefficients written in pass 1 and read in pass
        # 2; the basis once per launch
        (m,) = pmc.hbm_bytes(op, "fp32", 8, d=2048)
        assert pmc.op_launches(op, "fp32", 8, d=2048)[0].kernel.startswith("rows_kernel")
        assert m["read"] + m["write"] == pytest.approx(2 * 4 + 2 * 4 * 8 / 2048 + 4 * 8 / 4096)
        # k = 32, tensor cores: the coefficients stay in shared memory (the basis staged
        # twice, hi and lo, [pairs]; fp32 too, [fp32 pairs])
        (m,) = pmc.hbm_bytes(op, dt, 32)
        assert pmc.op_launches(op, dt, 32)[0].kernel.startswith("mma_rows_kernel")
        assert m["read"] + m["write"] == pytest.approx(2 * b + 4 * 32 * 2 / 4096)
    if op == "ProjectedAdamW input":
        b = pm.ITEMSIZE[dt]
        # tensor cores (AdamWPolicy): p, g, m, v read once, p, m, v written once, the
        # anchors (k fp32 a row) read, the basis once per launch
        (m,) = pmc.hbm_bytes(op, dt, 32)
        assert pmc.op_launches(op, dt, 32)[0].kernel.startswith("mma_rows_kernel<")
        assert m["read"] + m["write"] == pytest.approx(7 * b + 4 * 32 / 768 + 4 * 32 / 4096)


def test_committed_result_is_complete():
    path = pmc.DEFAULT_JSON
    with open(path) as f:
        result = json.load(f)
    assert result["title"] == pm.TITLE
    rows = result["rows"]
    assert len(rows) == len(pmc.OPS) * len(pm.DTYPES) * len(pm.KS) * len(pm.DEVICES)
    for r in rows:
        assert "error" not in r, r
        assert 0 < r["predicted_fraction_of_copy"] <= 1.0
        for kn in r["kernels"]:
            assert kn["spills"] == 0
            assert not [n for n in kn["notes"] if "no model-trips" in n], kn["kernel"]
            # a kernel's work loop runs (a loop exit taken for a slow path once judged the
            # tensor-core kernel's tile loop not run: 0.13 instructions per element)
            work = [lp for lp in kn["loops"] if lp["source"] and _runs_items(lp["source"])]
            assert work and max(lp["trips"] for lp in work) > 0, (kn["kernel"], kn["loops"])


def test_the_grid_twin_is_launch_cuh_balanced_grid():
    """launch.cuh [grid]: the fewest blocks, at most the resident ones, that take as many
    rounds of the work; past one block an SM, whole blocks an SM."""
    cases = {
        (108, 256, 108): 86,  # an A100's 256 tiles: 3 rounds either way (86 x 3 >= 256)
        (132, 256, 132): 128,  # an H100's: 2 rounds
        (216, 256, 108): 216,  # two blocks an SM: 128 would put 2 on 20 SMs, 1 on the rest
        (108, 2048, 108): 108,  # 19 rounds need them all
        (108, 50, 108): 50,  # less work than blocks: one item each
        (108, 0, 108): 1,
        (6, 8, 3): 6,
        (3, 4, 3): 2,
    }
    for (resident, work, sms), want in cases.items():
        got = pmc.balanced_grid(resident, work, sms)
        assert got == want, (resident, work, sms, got)
        full = max(1, min(resident, work))
        assert -(-work // got) == -(-work // full) and got <= full  # no more rounds, no more blocks
    # the model's launches take it: bf16 k = 32 on an A100, 86 blocks copy the basis
    with open(pmc.DEFAULT_JSON) as f:
        rows = json.load(f)["rows"]
    (a100,) = [r for r in rows if (r["arch"], r["op"], r["dtype"], r["k"])
               == ("sm_80", "project_ input", "bf16", 32)]  # fmt: skip
    assert a100["kernels"][0]["grid"] == 86


def test_the_staged_basis_is_each_blocks_copy():
    """[async staging] / tile.cuh's resident U^T: what every block copies from L2 before its
    first tile (env "staged"), the basis part of the kernel's shared memory; the stored
    model counts it for the grid (staged_bytes_per_elt) and adds its time at the device's
    L2 rate (perf_model.bounds: staging)."""
    bf16 = "ProjectPolicy<c10::BFloat16, true>"
    # [pairs] (H100, k = 32): U hi and lo, 8 bytes a basis value; [raw pairs] (A100): 4
    (pairs,) = pmc.mma_launches(bf16, "bf16", 768, 32, 4096, 2, 227 * 1024)
    assert pairs.env["units"] == 2 and pairs.env["staged"] == 768 * 32 * 8
    (raw,) = pmc.mma_launches(bf16, "bf16", 768, 32, 4096, 2, 163 * 1024)
    assert raw.env["units"] == 1 and raw.env["staged"] == 768 * 32 * 4
    # [stacked] (k <= 8): hi and lo as two groups of 8, kp = 16; fp32 k = 8: kp = 8
    (stacked,) = pmc.mma_launches(bf16, "bf16", 768, 8, 4096, 2, None)
    assert stacked.env["staged"] == 768 * 16 * 4
    (fp32,) = pmc.mma_launches("P", "fp32", 768, 8, 4096, 2, None)
    assert fp32.env["staged"] == 768 * 8 * 4
    # d padded to blocks of 16 rows; the rest of the shared memory is not staged
    (odd,) = pmc.mma_launches("P", "fp32", 770, 8, 4096, 2, None)
    assert odd.env["staged"] == 784 * 8 * 4 < odd.dynamic_smem
    for la in (pairs, raw, stacked, fp32):
        assert la.env["staged"] == pmc._mma_staged(la.env["nblk"], la.env["kp"],
                                                   la.env["units"] == 2)  # fmt: skip
    # the FMA engine: resident U^T's k rows (staged before the first tile); a chunk at a time
    # within each tile is not such a copy
    (fused,) = pmc.rows_launches("P", 2, 768, 32, 4096, 2)
    assert fused.env["resident"] and fused.env["staged"] == 32 * 768 * 4
    (three,) = pmc.rows_launches("P", 2, 768, 3, 4096, 2)
    assert three.env["staged"] == 4 * 768 * 4  # k rounded up to KC = 4
    (wide,) = pmc.rows_launches("P", 2, 768, 64, 4096, 2)
    assert "staged" not in wide.env
    # the stored model: the grid's copies over the bucket, their time added at L2's rate
    with open(pmc.DEFAULT_JSON) as f:
        rows = json.load(f)["rows"]
    seen = 0
    for r in rows:
        device = pm.DEVICES[r["arch"]]
        for kn in r["kernels"]:
            if kn["kernel"] != "mma_rows_kernel":
                continue
            seen += 1
            assert kn["staged_bytes_per_elt"] > 0, (r["op"], r["dtype"], r["k"])
            assert kn["bounds"]["staging_s_per_elt"] == pytest.approx(
                kn["staged_bytes_per_elt"] / device.l2_bytes_per_s
            )
            own = ("s_per_elt", "staging_s_per_elt")
            others = max(v for key, v in kn["bounds"].items()
                         if key.endswith("_s_per_elt") and key not in own)  # fmt: skip
            assert kn["bounds"]["s_per_elt"] == pytest.approx(
                others + kn["bounds"]["staging_s_per_elt"]
            )
    assert seen > 50
    # bf16 k = 32 on H100: 128 blocks (one an SM) each copy 192 KiB of a 4096 x 768 bucket
    (h100,) = [r for r in rows if (r["arch"], r["op"], r["dtype"], r["k"])
               == ("sm_90", "project_ input", "bf16", 32)]  # fmt: skip
    (kn,) = h100["kernels"]
    assert kn["grid"] == 128  # launch.cuh balanced_grid: 256 tiles in 2 rounds
    assert kn["staged_bytes_per_elt"] == pytest.approx(128 * 768 * 32 * 8 / (4096 * 768))


def test_the_bulk_staging_is_modelled_on_sm90_only():
    """mma_rows.cuh [async staging]: on sm_90 one thread issues U's copy (cp.async.bulk, a
    UBLKCP inside ptxas's loop over a uniform operand's values, BRA.U.ANY: once) and every
    thread spins on the mbarrier (a loop in PTX, its `asm`'s model-trips: 1); sm_80 keeps its
    LDGSTS loops."""
    with open(pmc.DEFAULT_JSON) as f:
        rows = json.load(f)["rows"]
    seen = set()
    for r in rows:
        for kn in r["kernels"]:
            if kn["kernel"] != "mma_rows_kernel":
                continue
            uniform = [n for n in kn["notes"] if "BRA.U.ANY" in n]
            assert len(uniform) == (1 if r["arch"] == "sm_90" else 0), (r["arch"], kn["notes"])
            staging = [lp for lp in kn["loops"] if lp["source"] and _stages(lp["source"])]
            seen.add((r["arch"], len(staging)))
            if r["arch"] == "sm_80":
                assert len(staging) == 2  # the four-unit loop and the rest
            else:
                assert [lp["trips"] for lp in staging] == [1.0]  # the wait
    assert seen == {("sm_80", 2), ("sm_90", 1)}


def _stages(source: str) -> bool:
    """Whether the C++ loop at ``file:line`` is one of [async staging]'s."""
    path, line = source.rsplit(":", 1)
    if not path.endswith("mma_rows.cuh"):
        return False
    with open(os.path.join(ROOT, path)) as f:
        text = f.read()
    lines = text.split("\n")
    start = next(n for n, ln in enumerate(lines, 1) if "void stage_async(" in ln)
    end = next(n for n, ln in enumerate(lines, 1) if n > start and "void stage_publish(" in ln)
    end = next(n for n, ln in enumerate(lines, 1) if n > end and ln.startswith("}"))
    return start < int(line) < end


def _runs_items(source: str) -> bool:
    """Whether the C++ loop at ``file:line`` is a kernel's grid-stride work loop."""
    path, line = source.rsplit(":", 1)
    with open(os.path.join(ROOT, path)) as f:
        lines = f.read().split("\n")
    n = int(line)
    return any("model-trips: items" in t for t in lines[n - 2 : n + 1])


def test_resource_usage_from_the_cubin():
    text = textwrap.dedent(
        """\
        Resource usage:
         Common:
          GLOBAL:0
         Function _Z4kernPf:
          REG:40 STACK:0 SHARED:1024 LOCAL:0 CONSTANT[0]:368 TEXTURE:0 SURFACE:0 SAMPLER:0
         Function _Z5spillPf:
          REG:255 STACK:16 SHARED:0 LOCAL:24 CONSTANT[0]:368 TEXTURE:0 SURFACE:0 SAMPLER:0
        """
    )
    got = pmc.parse_res_usage(text)
    assert got == {
        "_Z4kernPf": pmc.Usage(40, 0, 1024),
        "_Z5spillPf": pmc.Usage(255, 24, 0),
    }


def test_per_iteration_listing_reads_the_build_of_load_build(toy_dir, monkeypatch):
    """perf_model --cuda lists each innermost loop per iteration from the same Build."""
    text = _toy_sass(str(toy_dir))
    name = "void gradproj::cuda::kern(float*, int)"
    build = pmc.Build(
        sass={"sm_90": {name: pm.parse_sass(text)}},
        chains={"sm_90": {name: pmc.sass_chains(text)["kern"]}},
        usage={(name, "sm_90"): pmc.Usage(registers=40, local_bytes=0, static_smem=0)},
        so="toy.so",
    )
    monkeypatch.setattr(pmc, "load_build", lambda so: build)
    (kern,) = pm.cuda_kernels("toy.so")
    assert (kern["arch"], kern["name"], kern["regs"], kern["local_bytes"]) == (
        "sm_90",
        name,
        40,
        0,
    )
    # only innermost loops: the inlined while loop (line 5), not the chunk and item loops
    loops = {lp["sass"]: lp for lp in kern["inner_loops"]}
    assert list(loops) == ["0x50-0x60"]
    (lp,) = loops.values()
    assert lp["instrs_per_iter"]["global"] == 1 and lp["load_bytes_per_thread_iter"] == 4
    assert "| sm_90 |" in pm.format_cuda_table([kern])


def test_transposed_views_take_the_engine_project_cu_and_adamw_cu_choose():
    """side output: tensor cores with strided rows (every k; 16-bit in
    row pairs: the bucket's views have even row counts; ProjectedAdamW 16-bit in row pairs up
    to D = 768, beyond from k = 33), otherwise the block policies; at k = 128 the basis does
    not fit shared memory: a block of its columns a launch (mma_rows.cuh [columns])."""

    def kernel(op, dt, k, d=pm.D):
        return pmc.op_launches(op, dt, k, d=d)[0].kernel

    assert kernel("project_ output", "fp32", 32).startswith("mma_rows_kernel<")
    assert "ProjectPolicy<float, false>" in kernel("project_ output", "fp32", 32)
    assert kernel("project_ output", "bf16", 1).startswith("mma_rows_kernel<")
    assert "ProjectPolicy<float, false>" in kernel("project_ output", "fp32", 8)
    assert "AdamWPolicy<float, false>" in kernel("ProjectedAdamW output", "fp32", 1)
    assert "ProjectBlockPolicy" in kernel("project_ output", "fp32", 8, d=2048)
    wide = [la.kernel for la in pmc.op_launches("project_ output", "bf16", 128)]
    assert len(wide) == 2 and all("ProjectPairPolicy<c10::BFloat16>" in n for n in wide)
    wide = [la.kernel for la in pmc.op_launches("ProjectedAdamW output", "fp32", 128)]
    assert "AdamWPolicy<float, false>" in wide[0] and "ProjectPolicy<float, false>" in wide[1]
    assert "AdamWPolicy<float, false>" in kernel("ProjectedAdamW output", "fp32", 32)
    assert "AdamWPairPolicy<c10::BFloat16>" in kernel("ProjectedAdamW output", "bf16", 1)
    wide = [la.kernel for la in pmc.op_launches("ProjectedAdamW output", "bf16", 128)]
    assert "AdamWPairPolicy" in wide[0] and "ProjectPairPolicy<c10::BFloat16>" in wide[1]
    # wider than kMaxPairD: the block policy up to k = 32, then unpaired strided rows
    wide = pmc.op_launches("ProjectedAdamW output", "bf16", 32, d=1024)[0].kernel
    assert "AdamWBlockPolicy" in wide
    wide = pmc.op_launches("ProjectedAdamW output", "bf16", 40, d=1024)[0].kernel
    assert "AdamWPolicy<c10::BFloat16, false>" in wide
    # tensor cores: the element read once and written once, no coefficient workspace
    (m,) = pmc.hbm_bytes("project_ output", "bf16", 32)
    assert m["read"] + m["write"] == pytest.approx(2 * 2 + 2 * 4 * 32 / 4096)  # U hi and lo
