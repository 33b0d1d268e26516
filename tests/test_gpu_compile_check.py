"""scripts/gpu_compile_check.py can fail: toy kernels through its own functions.

The check compiles for sm_80 / sm_90 through a stand-in driver, which needs
``TRITON_INTERPRET=0`` before triton is imported, while this test process runs
with the interpreter on (``tests/conftest.py``). So one subprocess compiles the
toys and reports JSON; the tests read it. The toys, each chosen to compile in
about a second of CPU:

* ``smem_hog``: one fp16 ``tl.dot`` of (64 × 512) by (512 × 128): both operands
  staged in shared memory, 192 KiB, over A100's 163 KiB per block, under H100's 227 KiB;
* ``spiller``: four loop-carried fp32 accumulators of 2048 values in one warp
  (256 registers a thread for them alone): ptxas must spill;
* ``mma_sum``: a tf32 ``tl.dot`` over a loop of K tiles, its running sum kept three ways
  (``HOW``): chained through the MMA accumulator (0), ``acc += tl.dot(a, b)`` (1: Triton's
  combine pass folds it into the chain), or a two-dot product from zero added in fp32 (2,
  as the row kernel's ``_dot_split``); and ``ieee`` dots chained (3: FMA units, exempt).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TOYS = textwrap.dedent(
    """
    import json
    import sys
    from dataclasses import asdict

    sys.path.insert(0, sys.argv[1])
    import gpu_compile_check as gcc  # refuses to load unless TRITON_INTERPRET is 0

    import torch
    import triton
    import triton.language as tl


    @triton.jit
    def smem_hog(a_ptr, b_ptr, c_ptr, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr):
        m = tl.arange(0, M)
        n = tl.arange(0, N)
        k = tl.arange(0, K)
        a = tl.load(a_ptr + m[:, None] * K + k[None, :])
        b = tl.load(b_ptr + k[:, None] * N + n[None, :])
        tl.store(c_ptr + m[:, None] * N + n[None, :], tl.dot(a, b))


    @triton.jit
    def spiller(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        a = tl.zeros([BLOCK], tl.float32)
        b = tl.zeros([BLOCK], tl.float32)
        c = tl.zeros([BLOCK], tl.float32)
        d = tl.zeros([BLOCK], tl.float32)
        for i in range(n):
            x = tl.load(x_ptr + i * BLOCK + offs)
            a += x
            b += x * a
            c += x * b
            d += x * c
        tl.store(out_ptr + offs, a + b + c + d)


    @triton.jit
    def mma_sum(a_ptr, b_ptr, c_ptr, n, HOW: tl.constexpr):
        m = tl.arange(0, 16)
        k = tl.arange(0, 16)
        acc = tl.zeros((16, 16), tl.float32)
        for i in range(n):
            a = tl.load(a_ptr + i * 256 + m[:, None] * 16 + k[None, :])
            b = tl.load(b_ptr + i * 256 + k[:, None] * 16 + m[None, :])
            if HOW == 0:
                acc = tl.dot(a, b, acc, input_precision="tf32")
            elif HOW == 1:
                acc += tl.dot(a, b, input_precision="tf32")
            elif HOW == 2:
                part = tl.dot(a, b - a, input_precision="tf32")
                acc += tl.dot(a, a, part, input_precision="tf32")
            else:
                acc = tl.dot(a, b, acc, input_precision="ieee")
        tl.store(c_ptr + m[:, None] * 16 + m[None, :], acc)


    def launch_mma_sum(how):
        def call():
            a, b = torch.empty(4 * 256), torch.empty(4 * 256)
            mma_sum[(1,)](a, b, torch.empty(256), 4, HOW=how, num_warps=4)

        return call


    def launch_hog():
        a = torch.empty(64, 512, dtype=torch.float16)
        b = torch.empty(512, 128, dtype=torch.float16)
        smem_hog[(1,)](a, b, torch.empty(64, 128), M=64, N=128, K=512, num_warps=8)


    def launch_spiller():
        spiller[(1,)](torch.empty(4 * 2048), torch.empty(2048), 4, BLOCK=2048, num_warps=1)


    rows = gcc.check_launches([gcc.Launch("toy smem", launch_hog)], ["sm_80", "sm_90"])
    rows += gcc.check_launches([gcc.Launch("toy spill", launch_spiller)], ["sm_80"])
    by = {(r.kernel, r.arch): r for r in rows}
    known = [
        {  # listed, still occurs: passes
            "kernel": "spiller",
            "config": by["spiller", "sm_80"].config,
            "arch": "sm_80",
            "kind": "spill",
            "note": "toy: spills on purpose",
        },
        {  # listed, checked, does not occur (192 KiB fits H100): stale
            "kernel": "smem_hog",
            "config": by["smem_hog", "sm_90"].config,
            "arch": "sm_90",
            "kind": "smem",
            "note": "toy: fits on sm_90, so this entry is stale",
        },
        {  # listed, no such kernel compiled in a complete run: stale
            "kernel": "spiller",
            "config": "BLOCK=4096",
            "arch": "sm_80",
            "kind": "spill",
            "note": "toy: a config that no longer exists",
        },
    ]
    verdict = gcc.judge(rows, known, complete=True)
    mma = gcc.check_launches(
        [gcc.Launch(f"toy mma {how}", launch_mma_sum(how)) for how in range(4)], ["sm_80"]
    )
    from gradproj.kernels import project as P

    sms = {}
    for name, arch in gcc.ARCHS.items():  # what the launchers read under the stand-in
        with gcc.compiling_for(arch):
            sms[name] = P._sm_count(torch.device("cpu"))
    print(
        json.dumps(
            {
                "rows": [asdict(r) for r in rows],
                "mma": {r.config: [v["kind"] for v in r.violations] for r in mma},
                "mma_detail": {r.config: [v["detail"] for v in r.violations] for r in mma},
                "new": verdict.new,
                "known": verdict.known,
                "stale": verdict.stale,
                "ok": verdict.ok,
                "report": gcc.report(verdict),
                "table": gcc.format_table(rows),
                "known_paths": {v: gcc.known_path_for(v) for v in ("3.9.0", "3.6.0")},
                "known_triton": gcc.KNOWN_TRITON,
                "sms": sms,
                "stand_in_sms": {str(c): n for c, n in gcc.STAND_IN_SMS.items()},
                "bucket_rows": [list(gcc.ROWS), list(gcc.MANY_ROWS)],
                "many_rows_launches": sum("many rows" in x.label for x in gcc.launches()),
                "occupancy": {
                    "255 regs, 4 warps": gcc.blocks_per_sm(255, 4, 0, gcc.ARCHS["sm_80"]),
                    "32 regs, 4 warps": gcc.blocks_per_sm(32, 4, 0, gcc.ARCHS["sm_80"]),
                    "40 regs, 1 warp": gcc.blocks_per_sm(40, 1, 0, gcc.ARCHS["sm_90"]),
                    "100 KiB smem": gcc.blocks_per_sm(32, 4, 100 * 1024, gcc.ARCHS["sm_80"]),
                    "200 KiB smem sm_80": gcc.blocks_per_sm(32, 4, 200 * 1024, gcc.ARCHS["sm_80"]),
                },
            }
        )
    )
    """
)


@pytest.fixture(scope="module")
def toy_check(tmp_path_factory) -> dict:
    pytest.importorskip("triton")
    tmp = tmp_path_factory.mktemp("gpu_compile_check")
    script = tmp / "toys.py"  # triton.jit needs the kernels' source in a file
    script.write_text(TOYS)
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    out = subprocess.run(
        [sys.executable, str(script), os.path.join(ROOT, "scripts")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _row(result: dict, kernel: str, arch: str) -> dict:
    return next(r for r in result["rows"] if r["kernel"] == kernel and r["arch"] == arch)


def test_shared_memory_over_the_sm80_limit_fails(toy_check):
    hog = _row(toy_check, "smem_hog", "sm_80")
    assert hog["smem"] > hog["smem_limit"] == 163 * 1024
    assert hog["blocks_per_sm"] == 0 and hog["limiter"] == "smem"
    assert [v["kind"] for v in hog["violations"]] == ["smem"]
    assert [(v["kernel"], v["arch"], v["kind"]) for v in toy_check["new"]] == [
        ("smem_hog", "sm_80", "smem")
    ]
    assert "FAIL smem: smem_hog" in toy_check["report"] and not toy_check["ok"]
    # the same kernel fits an H100 block (227 KiB)
    assert _row(toy_check, "smem_hog", "sm_90")["violations"] == []


def test_register_spills_are_flagged(toy_check):
    spill = _row(toy_check, "spiller", "sm_80")
    assert spill["spill_stores"] > 0 and spill["spill_loads"] > 0
    assert spill["warps"] == 1
    assert [v["kind"] for v in spill["violations"]] == ["spill"]
    # listed in the known list: reported as known, not as a failure
    assert [(v["kernel"], v["kind"]) for v in toy_check["known"]] == [("spiller", "spill")]


def test_stale_known_entries_are_reported(toy_check):
    stale = {(e["kernel"], e["config"], e["arch"]): e["why"] for e in toy_check["stale"]}
    hog90 = _row(toy_check, "smem_hog", "sm_90")["config"]
    assert stale == {
        ("smem_hog", hog90, "sm_90"): "checked and no longer violated",
        ("spiller", "BLOCK=4096", "sm_80"): "no kernel with this name and config was compiled",
    }
    assert toy_check["report"].count("FAIL stale known entry") == 2


def test_blocks_per_sm(toy_check):
    occ = {k: tuple(v) for k, v in toy_check["occupancy"].items()}
    assert occ["255 regs, 4 warps"] == (2, "regs")  # 8192 regs a warp: 8 warps
    assert occ["32 regs, 4 warps"] == (16, "regs")  # and 16 by threads too
    assert occ["40 regs, 1 warp"] == (32, "blocks")  # the 32-block cap
    assert occ["100 KiB smem"] == (1, "smem")  # 164 KiB / (100 + 1) KiB
    assert occ["200 KiB smem sm_80"] == (0, "smem")
    assert "smem_hog" in toy_check["table"] and "!smem" in toy_check["table"]


def test_each_triton_version_has_its_own_known_list(toy_check):
    # another Triton compiles differently: its violations are judged against its own list
    paths = toy_check["known_paths"]
    assert toy_check["known_triton"] == "3.9.0"
    assert paths["3.9.0"] == os.path.join(ROOT, "scripts", "gpu_compile_known.json")
    assert paths["3.6.0"] == os.path.join(ROOT, "scripts", "gpu_compile_known-triton3.6.0.json")


def test_tensor_core_dots_chained_through_a_running_sum_are_flagged(toy_check):
    # HOW=0 chains the MMA accumulator; HOW=1 writes acc += dot(...), which Triton's
    # combine pass folds into the same chain; HOW=2 adds a from-zero product in fp32;
    # HOW=3 chains ieee (FMA) dots, which round to nearest
    kinds = {int(re.search(r"HOW=(\d+)", c)[1]): v for c, v in toy_check["mma"].items()}
    assert kinds == {0: ["mma-chain"], 1: ["mma-chain"], 2: [], 3: []}
    detail = next(d for c, d in toy_check["mma_detail"].items() if "HOW=1" in c)
    assert "loop-carried value" in detail[0]


def test_the_stand_in_reports_its_devices_sms_and_the_check_compiles_both_bucket_sizes(toy_check):
    """kernels/project.py reads the SMs (FEW_ROWS_PER_SM) under the stand-in as on a GPU: the
    perf model's A100 and H100. The check's small bucket is few rows on both, its MANY_ROWS
    bucket many, so both tile choices compile (docs/gpu.md #few-rows)."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import perf_model

    from gradproj.kernels import project as P

    assert toy_check["sms"] == {"sm_80": 108, "sm_90": 132}
    for arch, sms in toy_check["sms"].items():
        assert perf_model.DEVICES[arch].sms == sms
        assert toy_check["stand_in_sms"][arch.removeprefix("sm_")] == sms
    small, many = (sum(r) for r in toy_check["bucket_rows"])
    assert small < P.FEW_ROWS_PER_SM * min(toy_check["sms"].values())
    assert many >= P.FEW_ROWS_PER_SM * max(toy_check["sms"].values())
    assert toy_check["many_rows_launches"] > 0
