#!/usr/bin/env bash
# GPU runbook: build gradproj's extension with its CUDA kernels, run the kernel tests on the
# GPU, measure every row of the static models against their predictions, and write it all
# under $OUT (default: ./gpu-results) with the device name and versions.
#
# Made for the lent GPU machine (see ../shared/ENV.md): torch 2.11 + triton 3.6 + Python
# 3.12, pytest / pytest-benchmark / pytest-xdist / pytest-timeout installed, nothing
# downloadable. So: no pip installs, the extension is built in place against the torch there.
#
#   OUT=/some/dir [BUDGET_S=560] [FULL=1] [PROFILE=1] [PACK_TO=/dir] scripts/gpu_check.sh
#
# PACK_TO: after every stage, everything under $OUT is packed into PACK_TO/gpu-results.tgz
# (the device tool brings back at most 8 files from its $OUT; point OUT elsewhere then).
#
# A lease is short (15 device-minutes a session, 10 a command), so the stages are ordered
# by what a run must bring back and each gets at most what is left of BUDGET_S:
#   1. the build starts in the background ($OUT/build.log); the GPU is idle meanwhile, so
#   2. the Triton rows of the static model are measured (benchmarks/predicted_vs_measured.py
#      --model perf_model.json: $OUT/pvm_triton.{json,md}), then the Triton kernel tests run
#      on the GPU (-k "cuda and triton": $OUT/pytest_triton.{log,xml}), then the row
#      kernel's tile candidates are compiled in parallel and timed against each other
#      (benchmarks/tile_sweep.py: $OUT/tile_sweep.{json,md});
#   3. once the build is in: $OUT/summary.json (device, versions, each CUDA backend's max
#      error against the float64 reference, and whether any call synchronized with the host);
#      if its calls do not finish in time (a hung kernel), the CUDA stages below are skipped
#      ($OUT/cuda_skipped.txt) and the run ends with what it has,
#   4. the other GPU tests (-k "cuda and not triton": $OUT/pytest_cuda.{log,xml}), then
#      with PROFILE=1 Nsight Compute on four CUDA launches ($OUT/ncu_*.txt),
#   5. the CUDA rows of the model ($OUT/pvm_cuda.{json,md}), then the model re-bounded for
#      this GPU against both backends' kernel times ($OUT/model_check.md); with PROFILE=1 the same with
#      the tensor cores off (GRADPROJ_CUDA_TENSOR_CORES=0: $OUT/pvm_cuda_fma.*) and the
#      model's width sweep ($OUT/pvm_widths.*): the second H200 run (2026-12-04b) measured
#      those, so a run spends its minutes on what is new unless asked; then three CUDA rows
#      on 1x and 2x the model's bucket, where the basis's staging weighs 8x and 4x what it
#      does in pvm_cuda ($OUT/pvm_cuda_scale{1,2}.*); then the host time a
#      call takes (benchmarks/bench_host.py: $OUT/bench_host.json),
#   6. with FULL=1 only: the whole suite and the benchmark suites.
# Every stage writes as it goes, so a stage cut short still leaves what it measured.
# Exit status: non-zero when the build fails or any test that ran failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-results}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
BUDGET_S="${BUDGET_S:-540}"
t0=$(date +%s)
left() { echo $(( BUDGET_S - ($(date +%s) - t0) )); }
# at most $1 seconds, and never past the budget (less 10 s for the summary lines)
cap() { local l; l=$(( $(left) - 10 )); (( l < $1 )) && echo $(( l > 1 ? l : 1 )) || echo "$1"; }
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# Test dependencies the GPU image lacks travel as wheels in .whl/ (an ignored folder the
# device tool carries): expecttest, which torch's OptimizerInfo registry needs
# (tests/test_optim_contract.py). pip download --no-deps --only-binary=:all: -d .whl
# expecttest==0.3.0 (requirements-ci.txt's pin) on a machine with an index.
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/gradproj-wheels \
    .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/gradproj-wheels"
fi
"$PY" -c 'import expecttest' 2>/dev/null \
  || echo "note: expecttest is missing: tests/test_optim_contract.py will fail to import"
pack() { [ -n "${PACK_TO:-}" ] && tar czf "$PACK_TO/gpu-results.tgz" -C "$OUT" . ; true; }
export GRADPROJ_CUDA_EMULATION=0  # the real kernels run here; the emulator is for CPU machines
# gradproj.kernels is the folder kernels/ (setup.py's package_dir): with the package not
# installed, a link for this run makes it importable from the checkout.
made_link=0
if [ ! -e gradproj/kernels ]; then ln -s ../kernels gradproj/kernels && made_link=1; fi
trap '[ "$made_link" = 1 ] && rm -f gradproj/kernels' EXIT

{
  date -u; nvidia-smi; nvcc --version | tail -1
  "$PY" -c 'import platform, torch, triton, numpy; print("python", platform.python_version(),
    "torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__,
    "numpy", numpy.__version__, torch.cuda.get_device_name(), torch.cuda.get_device_properties(0))'
  git log -1 --format='gradproj %H %s' 2>/dev/null | cut -c1-120
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# 1. Build for the GPU that is here only (faster than the CI arch list). The toolkit's
# include folder may lack the cuSPARSE / cuBLAS headers torch's includes name; the
# nvidia-* wheels beside torch carry them.
arch=$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')
site=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if [ ! -f "$(dirname "$(command -v nvcc)")/../include/cusparse.h" ] \
  && [ -d "$site/nvidia/cu13/include" ]; then
  export CPATH="$site/nvidia/cu13/include${CPATH:+:$CPATH}"
fi
echo "== building gradproj._C in place for sm_${arch/./} (background)"
(
  start=$(date +%s)
  GRADPROJ_FORCE_CUDA=1 GRADPROJ_PTXAS_VERBOSE=1 TORCH_CUDA_ARCH_LIST="$arch" \
    MAX_JOBS="${MAX_JOBS:-8}" "$PY" setup.py build_ext --inplace >"$OUT/build.log" 2>&1
  rc=$?
  echo "build_seconds=$(( $(date +%s) - start )) rc=$rc" >>"$OUT/build.log"
  echo "$rc" >"$OUT/build.rc"
) &
build_pid=$!

pvm() {  # $1: model json, $2: output stem, $3: seconds at most, then more arguments
  echo "== measured against predicted: $1 ${*:4} (at most $3 s)"
  timeout -s INT -k 10 "$3" "$PY" benchmarks/predicted_vs_measured.py \
    --model "benchmarks/results/$1" --out "$OUT" --name "$2" "${@:4}" 2>&1 \
    | tee "$OUT/$2.log" | grep -v '^$' | tail -n 3
}
tests() {  # $1: name, $2: -k expression, $3: seconds at most
  echo "== GPU tests -k '$2' (at most $3 s)"
  timeout -s INT -k 15 "$3" "$PY" -m pytest -v -p no:cacheprovider -n "${WORKERS:-8}" --timeout 300 -rfE \
    --junitxml="$OUT/pytest_$1.xml" -k "$2" "${KERNEL_TESTS[@]}" >"$OUT/pytest_$1.log" 2>&1
  local rc=$?
  tail -n 15 "$OUT/pytest_$1.log"
  return "$rc"
}
KERNEL_TESTS=(tests/test_project.py tests/test_adamw.py tests/test_ops.py tests/test_surgery.py
  tests/test_inplace.py tests/test_optim.py tests/test_optim_contract.py tests/test_fuzz.py
  tests/test_precision_split.py tests/test_extension.py tests/test_subspace.py
  tests/test_reference.py)

# 2. While nvcc works: the Triton rows, then the Triton kernel tests.
pvm perf_model.json pvm_triton "$(cap 105)"; pack
tests triton "cuda and triton" "$(cap 60)"; triton_status=$?; pack
# The tile sweep: its candidates compiled in parallel through the stand-in driver (the
# device's own target: the timed run finds them in Triton's cache), then timed.
# TRITON_DEFAULT_FP_FUSION=1 (Triton's default) as the compile check sets it: one cache key.
echo "== tile sweep ($(left) s left)"
export TRITON_DEFAULT_FP_FUSION=1
timeout -k 10 "$(cap 60)" env TRITON_INTERPRET=0 "$PY" benchmarks/tile_sweep.py --compile-only \
  --arch "sm_${arch/./}" --jobs "${SWEEP_JOBS:-6}" --json "$OUT/tile_compile.json" \
  >"$OUT/tile_compile.log" 2>&1 || echo "tile sweep compile: rc $? (the timed run compiles the rest)"
sweep_s=$(cap 130)
timeout -s INT -k 10 "$sweep_s" "$PY" benchmarks/tile_sweep.py --out "$OUT" \
  --budget-s $(( sweep_s - 20 )) 2>&1 | tee "$OUT/tile_sweep.log" | tail -n 7; pack

# 3. The build.
echo "== waiting for the build ($(left) s left)"
while kill -0 "$build_pid" 2>/dev/null && (( $(left) > 20 )); do sleep 2; done
if [ "$(cat "$OUT/build.rc" 2>/dev/null)" != "0" ]; then
  echo "build failed or unfinished; see $OUT/build.log" >&2
  tail -n 30 "$OUT/build.log" >&2
  pack
  exit 1
fi
tail -n 1 "$OUT/build.log"
grep -E "Used [0-9]+ registers|spill" "$OUT/build.log" | grep -v " 0 bytes spill" | head -n 5

echo "== summary"
timeout -k 10 "$(cap 40)" "$PY" - "$OUT" <<'EOF'
import json, platform, sys

import torch

import gradproj
from gradproj import _extension, backends
from gradproj import reference as R

out = sys.argv[1]
dev = torch.device("cuda")
summary = {
    "device": torch.cuda.get_device_name(dev),
    "capability": "%d.%d" % torch.cuda.get_device_capability(dev),
    "python": platform.python_version(),
    "torch": torch.__version__,
    "cuda": torch.version.cuda,
    "extension_has_cuda": _extension.has_cuda(),
}
try:
    import triton

    summary["triton"] = triton.__version__
except ImportError:
    summary["triton"] = None

# Max error of each CUDA backend against the float64 reference, relative to the input's max|g|,
# over odd shapes, every side, dtype and both projectors; and whether any op call
# synchronized with the host (sync debug mode "error" raises if one does).
torch.manual_seed(0)
errors = {}
sync_free = {}
for name in backends.registered():
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        if backends.get(name).unsupported_reason("project_bucket_", dev, dtype) is not None:
            continue
        worst = 0.0
        for shape, side, k in [((37, 129), "input", 7), ((300, 768), "input", 32),
                               ((129, 37), "output", 5), ((3, 5), "flat", 15),
                               ((64, 1000), "flat", 8), ((320, 768), "input", 768),
                               ((4096, 2048), "input", 32), ((2048, 1280), "output", 128)]:
            d = {"input": shape[1], "output": shape[0], "flat": shape[0] * shape[1]}[side]
            q, _ = torch.linalg.qr(torch.randn(d, min(k, d), dtype=torch.float64))
            u = q.to(dev, torch.float32)
            for weights in (None, torch.rand(q.shape[1], device=dev)):
                g = torch.randn(shape, device=dev).to(dtype)
                scale = g.double().abs().max().item()  # the input's: k = d takes g to ~0
                ref = R.project(g.double(), q.to(dev), side=side,
                                weights=None if weights is None else weights.double())
                torch.cuda.set_sync_debug_mode("error")
                try:
                    gradproj.project_(g, u, side=side, weights=weights, backend=name)
                    sync_free[name] = sync_free.get(name, True)
                except RuntimeError as exc:
                    if "synchroniz" not in str(exc):
                        raise
                    sync_free[name] = False
                    gradproj.project_(g, u, side=side, weights=weights, backend=name)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
                err = (g.double() - ref).abs().max().item() / scale
                worst = max(worst, err)
        errors[f"{name}/{str(dtype).removeprefix('torch.')}"] = worst
summary["max_error_vs_float64_reference_rel_to_input_max_abs_g"] = errors
summary["no_host_sync"] = sync_free
with open(f"{out}/summary.json", "w") as f:
    json.dump(summary, f, indent=2)
print(json.dumps(summary, indent=2))
EOF
summary_status=$?; pack
# A summary cut off by its timeout (124, or 137 once killed) ran a CUDA kernel that did not
# finish: the sm_90 staging's mbarrier wait (mma_rows.cuh [async staging]) had never run on a
# GPU before. The CUDA stages would spend the lease waiting on it, so they are skipped.
cuda_ok=1
if [ "$summary_status" = 124 ] || [ "$summary_status" = 137 ]; then
  cuda_ok=0
  echo "the CUDA backend did not finish the summary's calls in time (a kernel hung?):" \
    "CUDA stages skipped" | tee "$OUT/cuda_skipped.txt" >&2
fi

# 4. The other GPU tests (the CUDA kernels have never run on hardware before: first);
# 5. the CUDA rows of the model, then its width sweep (d = 320 ... 2048).
cuda_status=1
if [ "$cuda_ok" = 1 ]; then
  tests cuda "cuda and not triton" "$(cap 100)"; cuda_status=$?; pack
fi
# Nsight Compute on four launches the first run measured far below the model, D = 768: the
# tensor cores at bf16 k = 1 and k = 8 (one kernel, one padded geometry, k = 8 3x slower),
# at fp32 k = 32, and the FMA engine at fp32 k = 8: where each spends its time (stall
# reasons, occupancy, DRAM throughput).
# --clock-control none: the card's clocks are left as they are.
if [ "$cuda_ok" = 1 ] && [ "${PROFILE:-0}" = 1 ] && command -v ncu >/dev/null; then
  for spec in "project_ input:bf16:8" "project_ input:bf16:1" "project_ input:fp32:32" \
    "project_ input:fp32:8"; do
    (( $(left) > 60 )) || break
    name=$(echo "$spec" | tr -c 'a-z0-9\n' '_' | tr -s '_')
    echo "== ncu: $spec"
    timeout -k 5 "$(cap 40)" ncu --clock-control none -k regex:rows_kernel --launch-skip 2 \
      --launch-count 1 \
      --section SpeedOfLight --section Occupancy --section LaunchStats \
      --section WarpStateStats --section MemoryWorkloadAnalysis --section SchedulerStats \
      "$PY" benchmarks/predicted_vs_measured.py --model benchmarks/results/perf_model_cuda.json \
      --out "$OUT" --only "$spec" --once >"$OUT/ncu_$name.txt" 2>&1
    grep -E "Duration|Memory Throughput|DRAM Throughput|Achieved Occupancy|Registers Per|Grid Size" \
      "$OUT/ncu_$name.txt" | head -n 8
  done
  pack
fi
[ "$cuda_ok" = 1 ] && { pvm perf_model_cuda.json pvm_cuda "$(cap 70)"; pack; }
# the static model re-bounded for this GPU (the copy rate measured here) against these kernel
# times: $OUT/model_check.md (benchmarks/model_check.py; CPU only, seconds)
mc_backends=()
for b in triton cuda; do [ -s "$OUT/pvm_$b.json" ] && mc_backends+=("$b"); done
if (( ${#mc_backends[@]} )); then
  timeout -k 5 "$(cap 30)" "$PY" benchmarks/model_check.py --run "$OUT" \
    --backend "${mc_backends[@]}" --md "$OUT/model_check.md" | sed -n 5,7p
  pack
fi
# the basis's staging (docs/gpu.md #staging-counted): a fixed cost per launch the model adds
# (perf_model.at_scale), so three tensor-core rows again on 1x and 2x the model's bucket
# beside pvm_cuda's 8x: $OUT/pvm_cuda_scale{1,2}.*, each row predicted for its own bucket
for scale in 1 2; do
  (( cuda_ok && $(left) > 70 )) || break
  pvm perf_model_cuda.json "pvm_cuda_scale$scale" "$(cap 35)" --scale "$scale" --no-profile \
    --only "project_ input:bf16:8" "project_ input:bf16:32" "project_ input:fp32:32"; pack
done
# host time a call (benchmarks/bench_host.py: 32 and 128 tiny tensors, nothing synchronized in
# the timing): the per-call host work the 2026-12-04 runs saw exceed many kernels
if (( cuda_ok && $(left) > 40 )); then
  timeout -k 5 "$(cap 40)" "$PY" -m pytest -q -p no:cacheprovider benchmarks/bench_host.py \
    --benchmark-only --benchmark-group-by=param:n --benchmark-columns=min,median \
    --benchmark-json="$OUT/bench_host.json" 2>&1 | grep -E "test_host|passed|failed"
  pack
fi
# the same rows with the tensor cores switched off (mma_rows.cuh tensor_cores_enabled): the
# FMA engine's times beside the tensor cores' of the run above
if [ "$cuda_ok" = 1 ] && [ "${PROFILE:-0}" = 1 ]; then
  (export GRADPROJ_CUDA_TENSOR_CORES=0; pvm perf_model_cuda.json pvm_cuda_fma "$(cap 55)" --rep 50); pack
  pvm perf_model_cuda.json pvm_widths "$(cap 150)" --widths --rep 40 --no-profile; pack
fi

# 6. Only when asked (a lease of its own): the whole suite and the benchmark suites.
if [ "$cuda_ok" = 1 ] && [ "${FULL:-0}" = 1 ]; then
  "$PY" -m pytest -q -p no:cacheprovider -n "${WORKERS:-8}" --junitxml="$OUT/pytest.xml" tests \
    >"$OUT/pytest.log" 2>&1
  tail -n 15 "$OUT/pytest.log"
  "$PY" -m pytest -q -p no:cacheprovider benchmarks/bench_project.py --benchmark-only \
    --benchmark-group-by=param:k --benchmark-json="$OUT/bench_project.json" 2>&1 | tail -n 30
  dev_name=$("$PY" -c 'import torch; print(torch.cuda.get_device_name().replace(" ", "-"))')
  "$PY" -m gradproj bench --out "$OUT/suite-${dev_name}-$(date +%F).json" 2>&1 | tail -n 40
  pack
fi
echo "== done in $(( $(date +%s) - t0 )) s: triton tests rc $triton_status, summary rc" \
  "$summary_status, cuda tests rc $cuda_status"
[ "$triton_status" -eq 0 ] && [ "$summary_status" -eq 0 ] && [ "$cuda_status" -eq 0 ]
