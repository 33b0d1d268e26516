#!/usr/bin/env bash
# GPU runbook: build gradproj's extension with its CUDA kernels, run the whole test
# suite on the GPU, measure max errors and the project_ benchmark, and write it all
# under $OUT (default: ./gpu-results) with the device name and versions.
#
# Made for the lent GPU machine (see ../shared/ENV.md): torch 2.11 + triton 3.6 +
# Python 3.12, pytest/pytest-benchmark/hypothesis installed, nothing downloadable.
# So: no pip installs, the extension is built in place against the torch present.
#
#   OUT=/some/dir scripts/gpu_check.sh
#
# Results: $OUT/summary.json (device, versions, pass counts, max errors per backend),
# $OUT/pytest.xml + pytest.log, $OUT/bench_project.json, $OUT/build.log,
# $OUT/predicted_vs_measured.{json,md} (both static models' predictions, Triton and CUDA, against
# this run).
# Exit status: non-zero when the build fails or any test fails.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-results}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"

# Build for the GPU that is here only (faster than the CI arch list).
arch=$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')
echo "== building gradproj._C in place for sm_${arch/./}" | tee "$OUT/build.log"
start=$(date +%s)
if ! GRADPROJ_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS="${MAX_JOBS:-8}" \
    "$PY" setup.py build_ext --inplace >>"$OUT/build.log" 2>&1; then
  echo "build failed; see $OUT/build.log" >&2
  tail -40 "$OUT/build.log" >&2
  exit 1
fi
echo "build_seconds=$(( $(date +%s) - start ))" | tee -a "$OUT/build.log"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

echo "== test suite (every backend vs the float64 reference, CPU and CUDA)"
"$PY" -m pytest -q -p no:cacheprovider --junitxml="$OUT/pytest.xml" tests 2>&1 | tee "$OUT/pytest.log"
tests_status=${PIPESTATUS[0]}

echo "== benchmark: project_ on the SD-1.5-like K/V bucket"
"$PY" -m pytest -q -p no:cacheprovider benchmarks/bench_project.py --benchmark-only \
  --benchmark-group-by=param:k --benchmark-json="$OUT/bench_project.json" 2>&1 | tail -30

echo "== benchmark suite: every backend vs eager, torch.compile, grouped eager, copy roofline"
dev_name=$("$PY" -c 'import torch; print(torch.cuda.get_device_name().replace(" ", "-"))')
suite_json="$OUT/suite-${dev_name}-$(date +%F).json"
"$PY" -m gradproj bench --out "$suite_json" 2>&1 | tail -40

echo "== measured against the static models' predictions (benchmarks/perf_model.py, perf_model_cuda.py)"
"$PY" benchmarks/predicted_vs_measured.py --out "$OUT" 2>&1 | tail -40 \
  || echo "predicted_vs_measured failed (see above)"

echo "== summary"
"$PY" - "$OUT" <<'EOF'
import json, platform, subprocess, sys, xml.etree.ElementTree as ET

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
try:
    summary["nvcc"] = subprocess.run(
        ["nvcc", "--version"], capture_output=True, text=True
    ).stdout.strip().splitlines()[-1]
except OSError:
    summary["nvcc"] = None

suite = ET.parse(f"{out}/pytest.xml").getroot()
suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
summary["pytest"] = counts

# Max error of each CUDA backend against the float64 reference, relative to max|g|,
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
                               ((64, 1000), "flat", 8), ((320, 768), "input", 768)]:
            d = {"input": shape[1], "output": shape[0], "flat": shape[0] * shape[1]}[side]
            q, _ = torch.linalg.qr(torch.randn(d, min(k, d), dtype=torch.float64))
            u = q.to(dev, torch.float32)
            for weights in (None, torch.rand(q.shape[1], device=dev)):
                g = torch.randn(shape, device=dev).to(dtype)
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
                err = (g.double() - ref).abs().max().item() / g.double().abs().max().item()
                worst = max(worst, err)
        errors[f"{name}/{str(dtype).removeprefix('torch.')}"] = worst
summary["max_error_vs_float64_reference_rel_to_max_abs_g"] = errors
summary["no_host_sync"] = sync_free
with open(f"{out}/summary.json", "w") as f:
    json.dump(summary, f, indent=2)
print(json.dumps(summary, indent=2))
EOF
summary_status=$?
[ "$tests_status" -eq 0 ] && [ "$summary_status" -eq 0 ]
