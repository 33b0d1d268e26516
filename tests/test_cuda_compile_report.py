"""scripts/cuda_compile_report.py on small synthetic ptxas logs (no nvcc needed).

The logs are in the format nvcc 13.0's ``-Xptxas -v`` prints (checked against a real
build): an entry's "Compiling", "Function properties", stack/spill and "Used" lines,
and a device function's properties after the kernel that calls it.
"""

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "cuda_compile_report.py"
_spec = importlib.util.spec_from_file_location("cuda_compile_report", SCRIPT)
report = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = report  # dataclasses look their module up there
_spec.loader.exec_module(report)

needs_cxxfilt = pytest.mark.skipif(
    shutil.which("c++filt") is None and shutil.which("cu++filt") is None,
    reason="no c++filt / cu++filt to demangle with",
)

# _Z5cleanPfi = clean(float*, int); _Z5spillPfi = spill(float*, int);
# _Z6helperPfi = helper(float*, int);
# _ZN12_GLOBAL__N_14tileIfEEvPT_ = (anonymous namespace)::tile<float>(float*).
CU = """\
constexpr int kThreads = 128;
constexpr int kHalf = kThreads / 2;
__device__ float helper(float* p, int i) { return p[i]; }
__global__ void clean(float* x, int n) { x[threadIdx.x] = helper(x, n); }
__global__ void __launch_bounds__(kThreads) spill(float* x, int n) {
  extern __shared__ float d[];
  x[0] = d[n];
}
namespace {
template <typename T>
__global__ void tile(T* x) { x[0] = 0; }
}
size_t pick(int64_t n) {
  if (n * 4 > prop->sharedMemPerBlockOptin) return 0;
  return n * 4;
}
void run(float* x, int n) {
  clean<<<1, kHalf, 0, stream>>>(x, n);  // 64 threads
  const size_t smem = pick(n);
  spill<<<grid(2, 3), kThreads, smem, stream>>>(x, n);
  auto kernel = tile<float>;
  kernel<<<1, dim3(32, 2), 0, stream>>>(x);
}
"""


def entry(name: str, arch: str, regs: int, smem: int = 0, spill: tuple = (0, 0)) -> str:
    smem_part = f", {smem} bytes smem" if smem else ""
    return (
        f"ptxas info    : Compiling entry function '{name}' for '{arch}'\n"
        f"ptxas info    : Function properties for {name}\n"
        f"    {spill[0] + 8 if any(spill) else 0} bytes stack frame, {spill[0]} bytes spill "
        f"stores, {spill[1]} bytes spill loads\n"
        f"ptxas info    : Used {regs} registers, used 1 barriers{smem_part}, 364 bytes cmem[0]\n"
        f"ptxas info    : Compile time = 1.234 ms\n"
    )


def helper_props(spill: tuple = (0, 0)) -> str:
    return (
        "ptxas info    : Function properties for _Z6helperPfi\n"
        f"    0 bytes stack frame, {spill[0]} bytes spill stores, {spill[1]} bytes spill loads\n"
    )


def log(arch: str = "sm_80", spill: tuple = (0, 0), smem: int = 4096, helper=(0, 0)) -> str:
    return (
        "[1/3] /usr/local/cuda/bin/nvcc -c csrc/cuda/x.cu -Xptxas -v\n"
        "ptxas info    : 0 bytes gmem\n"
        + entry("_Z5cleanPfi", arch, 10)
        + helper_props(helper)
        + entry("_Z5spillPfi", arch, 40, smem=smem, spill=spill)
        + entry("_ZN12_GLOBAL__N_14tileIfEEvPT_", arch, 255)
    )


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "x.cu").write_text(CU)
    return tmp_path


def run(tree: Path, text: str, known: list | None = None, archs: str = "", capsys=None) -> int:
    (tree / "build.log").write_text(text)
    (tree / "known.json").write_text(json.dumps(known or []))
    args = [str(tree / "build.log"), "--sources", str(tree / "src")]
    args += ["--known", str(tree / "known.json"), "--json", str(tree / "out.json")]
    if archs:
        args += ["--archs", archs]
    return report.main(args)


def test_parse_log_reads_every_field() -> None:
    recs = {(r.mangled, r.arch): r for r in report.parse_log(log(spill=(16, 12)) + log("sm_90"))}
    assert len(recs) == 8  # 3 kernels + 1 device function, 2 archs
    s80 = recs[("_Z5spillPfi", "sm_80")]
    assert (s80.entry, s80.registers, s80.static_smem) == (True, 40, 4096)
    assert (s80.stack, s80.spill_stores, s80.spill_loads) == (24, 16, 12)
    assert recs[("_Z5spillPfi", "sm_90")].spill_stores == 0
    helper = recs[("_Z6helperPfi", "sm_80")]
    assert not helper.entry and helper.registers is None
    assert recs[("_Z5cleanPfi", "sm_80")].static_smem == 0  # no "bytes smem" on the line


def test_parse_log_ignores_other_lines() -> None:
    assert report.parse_log("") == []
    assert report.parse_log("[1/3] c++ -c ops.cpp\nwarning: unused variable\n") == []


def test_short_names() -> None:
    assert report.short_name("clean(float*, int)") == "clean"
    assert (
        report.short_name(
            "void gradproj::cuda::(anonymous namespace)::k<c10::BFloat16, true>(long, int*)"
        )
        == "k<c10::BFloat16, true>"
    )
    assert report.base_name("k<c10::BFloat16, true>") == "k"


def test_template_args() -> None:
    assert report._template_args("k<A<x, y>, 3, false>") == ["A<x, y>", "3", "false"]
    assert report._template_args("k<ns::(anonymous namespace)::P<float, true>, 16>") == [
        "ns::(anonymous namespace)::P<float, true>",
        "16",
    ]
    assert report._template_args("clean") == []


def test_demangle_falls_back_to_mangled_names(monkeypatch) -> None:
    monkeypatch.setattr(report.shutil, "which", lambda name: None)
    assert report.demangle(["_Z5cleanPfi"]) == {"_Z5cleanPfi": "_Z5cleanPfi"}


def test_blocks_per_sm_from_registers() -> None:
    sm80 = report.ARCHS["sm_80"]
    # 32 regs: 1024 per warp, 16 warps per sub-partition -> 64 warps = 8 blocks of 256.
    assert report.blocks_per_sm_regs(32, 256, sm80) == 8
    # 40 regs: 1280 per warp -> 12 warps per sub-partition -> 48 warps = 6 blocks of 256.
    assert report.blocks_per_sm_regs(40, 256, sm80) == 6
    assert report.blocks_per_sm_regs(64, 256, sm80) == 4
    assert report.blocks_per_sm_regs(255, 256, sm80) == 1
    assert report.blocks_per_sm_regs(256, 256, sm80) == 0
    rec = report.Record("k", "sm_80", True, registers=16, static_smem=40 * 1024)
    assert report.blocks_per_sm(rec, 128, sm80) == (4, "smem")  # 164 KiB / (40 + 1) KiB
    rec.static_smem = 0
    assert report.blocks_per_sm(rec, 128, sm80) == (16, "threads")


def test_scan_sources_finds_block_sizes_and_dynamic_smem(tree: Path) -> None:
    src = report.scan_sources(tree / "src", root=tree)
    assert set(src) == {"clean", "spill", "tile"}
    assert (src["clean"].threads, src["clean"].where) == (64, "src/x.cu:4")
    assert src["clean"].threads_from == "launch src/x.cu:18"
    assert src["spill"].threads == 128
    assert src["tile"].threads == 64  # dim3(32, 2) through `auto kernel = tile<float>`
    assert src["clean"].dynamic_smem is None
    assert src["spill"].dynamic_capped
    assert "smem = pick(n) (src/x.cu:19)" in src["spill"].dynamic_smem
    assert "sharedMemPerBlockOptin) return 0;` (src/x.cu:14)" in src["spill"].dynamic_smem


def test_scan_sources_of_the_repo() -> None:
    """The heuristics still read csrc/cuda: every kernel has its launch block size."""
    src = report.scan_sources(report.DEFAULT_SOURCES)
    assert {"rows_kernel", "combine_kernel", "surgery_apply_kernel"} <= set(src)
    assert all(k.threads or k.threads_expr for k in src.values()), {
        k: v.threads for k, v in src.items()
    }
    # mma_rows_kernel<P, NB, kPairs, W, kStacked, kRaw>: W * 32 threads, bound per instantiation
    mma = src["mma_rows_kernel"]
    assert (mma.threads, mma.threads_expr, mma.template_params[-3]) == (None, "W * 32", "W")
    policy = "gradproj::cuda::(anonymous namespace)::ProjectPolicy<c10::BFloat16, true>"
    assert mma.threads_of(f"mma_rows_kernel<{policy}, 3, false, 16, false, false>") == 512
    assert mma.threads_of(f"mma_rows_kernel<{policy}, 6, true, 8, false, true>") == 256
    assert mma.threads_of(f"mma_rows_kernel<{policy}, 2, false, 8, true, false>") == 256
    assert mma.threads_of("mma_rows_kernel<P, 6>") is None  # not its template's arity
    assert src["rows_kernel"].threads_of("rows_kernel<anything>") == src["rows_kernel"].threads
    # the row engines (csrc/cuda/tile.cuh, mma_rows.cuh) stage the basis in dynamic
    # shared memory
    assert {k for k, v in src.items() if v.dynamic_smem} == {"rows_kernel", "mma_rows_kernel"}
    assert all(v.dynamic_capped for v in src.values() if v.dynamic_smem)


@needs_cxxfilt
def test_clean_log_passes(tree: Path, capsys) -> None:
    assert run(tree, log() + log("sm_90"), archs="8.0;9.0") == 0
    out = capsys.readouterr().out
    assert "cuda-compile-report: OK" in out
    assert "tile<float>" in out
    data = json.loads((tree / "out.json").read_text())
    assert data["ok"] and len(data["kernels"]) == 6
    spill80 = next(k for k in data["kernels"] if k["short"] == "spill" and k["arch"] == "sm_80")
    assert (spill80["threads"], spill80["blocks_per_sm_regs"]) == (128, 12)
    assert spill80["dynamic_smem_max"] == 163 * 1024
    assert spill80["blocks_per_sm_at_max_dynamic"] == 1


@needs_cxxfilt
def test_spilling_kernel_fails(tree: Path, capsys) -> None:
    assert run(tree, log(spill=(16, 12)) + log("sm_90")) == 1
    out = capsys.readouterr().out
    assert "FAIL spill: spill (sm_80): 16 bytes spill stores, 12 bytes spill loads" in out
    assert "FAIL spill: spill (sm_90)" not in out


def test_spilling_device_function_fails(tree: Path) -> None:
    assert run(tree, log(helper=(0, 4))) == 1


@needs_cxxfilt
def test_known_spill_passes_and_stale_entry_fails(tree: Path, capsys) -> None:
    known = [{"kernel": "spill", "arch": "sm_80", "kind": "spill", "note": "ticket 12"}]
    assert run(tree, log(spill=(16, 12)), known) == 0
    assert "known spill: spill (sm_80)" in capsys.readouterr().out
    # The kernel was fixed: the entry excuses nothing now, and the ratchet fails.
    assert run(tree, log(), known) == 1
    assert "FAIL stale known entry" in capsys.readouterr().out
    # The mangled name works as the kernel too, and so does {"entries": [...]}.
    known[0]["kernel"] = "_Z5spillPfi"
    assert run(tree, log(spill=(16, 12)), known) == 0
    (tree / "wrapped.json").write_text(json.dumps({"entries": known}))
    args = [str(tree / "build.log"), "--sources", str(tree / "src")]
    assert report.main([*args, "--known", str(tree / "wrapped.json")]) == 0


def test_malformed_known_entry_fails(tree: Path, capsys) -> None:
    assert run(tree, log(), [{"kernel": "spill", "arch": "sm_80", "kind": "spill"}]) == 1
    assert "lacks note" in capsys.readouterr().out
    assert run(tree, log(), [{"kernel": "k", "arch": "sm_80", "kind": "regs", "note": "x"}]) == 1


def test_static_smem_above_the_limit_fails(tree: Path, capsys) -> None:
    assert run(tree, log(smem=48 * 1024)) == 0
    assert run(tree, log(smem=48 * 1024 + 4)) == 1
    assert "FAIL smem" in capsys.readouterr().out


def test_empty_log_fails(tree: Path, capsys) -> None:
    assert run(tree, "") == 1
    assert "no ptxas lines in the log" in capsys.readouterr().out
    assert run(tree, "[1/3] nvcc -c x.cu\nbuilding 'gradproj._C' extension\n") == 1


def test_missing_arch_or_unknown_arch_fails(tree: Path, capsys) -> None:
    assert run(tree, log(), archs="8.0;9.0") == 1
    assert "no ptxas lines for sm_90" in capsys.readouterr().out
    assert run(tree, log("sm_52")) == 1
    assert "no limits known for sm_52" in capsys.readouterr().out


@needs_cxxfilt
def test_kernel_missing_from_the_log_fails(tree: Path, capsys) -> None:
    text = entry("_Z5cleanPfi", "sm_80", 10) + entry("_Z5spillPfi", "sm_80", 40)
    assert run(tree, text) == 1
    out = capsys.readouterr().out
    assert "FAIL missing: tile (sm_80): defined at " in out
    assert "src/x.cu:11, not in the log" in out
