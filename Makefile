# gradproj developer entry points. Every target sets up what it needs itself.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# csrc/cuda_emu is the tests' CUDA emulator, built by the test session (tests/cuda_emulation.py),
# not by setup.py: editing it does not reinstall the package.
SOURCES := setup.py pyproject.toml requirements-ci.txt \
	$(shell find csrc -path csrc/cuda_emu -prune -o -type f -print 2>/dev/null)

.PHONY: setup demo test lint format bench clean gpu-compile-check triton36-check perf-model \
	perf-model-cuda

setup: $(STAMP)

# --no-build-isolation: the extension builds against the torch in this venv
# (pip's isolated build env would fetch another, multi-GB torch).
$(STAMP): $(SOURCES)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements-ci.txt
	$(BIN)/pip install -q --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m gradproj demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: lint
	$(BIN)/python -m pytest -q

# CPU benchmarks: the pytest-benchmark suites, then the peer suite as JSON + plot
# under benchmarks/results/ (GPU: scripts/gpu_check.sh runs the same suite there).
BENCH_JSON := benchmarks/results/cpu-$(shell date +%F).json
bench: $(STAMP)
	$(BIN)/python -m pytest benchmarks -q --benchmark-only --benchmark-columns=min,median,rounds
	$(BIN)/python -m gradproj bench --reps 5 --out $(BENCH_JSON)

clean:
	rm -rf $(VENV) build *.egg-info gradproj/*.so .pytest_cache .benchmarks

# CUDA compile-and-link check for machines without a GPU (CI): builds csrc/ with
# GRADPROJ_FORCE_CUDA=1 against the CUDA build of torch in a venv outside the
# repo (created once, ~5.5 GB, then reused), in a temporary build dir, and loads
# the built library to prove it links. A .cu that does not compile fails it.
# The build runs with GRADPROJ_PTXAS_VERBOSE=1 (nvcc -Xptxas -v); its log is teed to
# the temp dir and scripts/cuda_compile_report.py prints registers, spills, shared
# memory and blocks per SM of every kernel and arch, and fails on a register spill,
# on static shared memory above the per-block limit, on a kernel missing from the
# log, or on a log without ptxas lines, unless scripts/cuda_compile_known.json lists
# it (a stale entry fails too). CUDA_REPORT_JSON=path keeps the report as JSON.
GRADPROJ_CUDA_VENV ?= $(HOME)/.cache/gradproj/venv-cuda
CUDA_HOME ?= /usr/local/cuda
CUDA_ARCHS ?= 8.0;9.0
CUDA_REPORT_JSON ?=
.PHONY: cuda-compile-check
cuda-compile-check:
	@set -eu; venv="$(GRADPROJ_CUDA_VENV)"; \
	if ! "$$venv/bin/python" -c 'import torch, sys; sys.exit(torch.__version__ != "2.14.1+cu130")' 2>/dev/null; then \
		echo "cuda-compile-check: creating $$venv (torch 2.14.1+cu130)"; \
		$(PY) -m venv "$$venv"; \
		"$$venv/bin/pip" install -q torch==2.14.1 numpy ninja setuptools wheel; \
	fi; \
	site=$$("$$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'); \
	tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	start=$$(date +%s); \
	{ GRADPROJ_FORCE_CUDA=1 GRADPROJ_PTXAS_VERBOSE=1 CUDA_HOME="$(CUDA_HOME)" \
		CPATH="$$site/nvidia/cu13/include" TORCH_CUDA_ARCH_LIST="$(CUDA_ARCHS)" MAX_JOBS=2 \
		"$$venv/bin/python" setup.py -q build_ext --build-temp "$$tmp/temp" --build-lib "$$tmp/lib" \
		2>&1 || echo $$? >"$$tmp/build.rc"; } | tee "$$tmp/build.log"; \
	if [ -s "$$tmp/build.rc" ]; then \
		echo "cuda-compile-check: FAILED: the build exited with $$(cat "$$tmp/build.rc")"; exit 1; \
	fi; \
	report=0; "$$venv/bin/python" scripts/cuda_compile_report.py "$$tmp/build.log" \
		--archs "$(CUDA_ARCHS)" $(if $(CUDA_REPORT_JSON),--json "$(CUDA_REPORT_JSON)") || report=$$?; \
	"$$venv/bin/python" -c 'import glob, sys, torch; \
		so = glob.glob(sys.argv[1] + "/gradproj/_C*.so")[0]; torch.ops.load_library(so); \
		ops = ("project_bucket_", "project_anchored_bucket_", "projected_adamw_bucket_", "surgery_bucket_"); \
		missing = [op for op in ops if not torch._C._dispatch_has_kernel_for_dispatch_key("gradproj::" + op, "CUDA")]; \
		sys.exit("built library has no CUDA kernel for " + ", ".join(missing) if missing else 0); \
		' "$$tmp/lib"; \
	if [ "$$report" -ne 0 ]; then \
		echo "cuda-compile-check: FAILED: kernel resource report (above)"; exit 1; \
	fi; \
	echo "cuda-compile-check: OK (compile+link+load+report $$(( $$(date +%s) - start )) s)"

# Triton kernels compiled for A100 (sm_80) and H100 (sm_90) on a machine without a GPU
# (scripts/gpu_compile_check.py: the stand-in driver of ../shared/ENV.md). Every launch
# configuration the tests and benchmarks use; fails on a compile error, on shared memory
# above the arch's per-block limit and on any register spill, unless the known list of
# the Triton version in use (scripts/gpu_compile_known.json) holds it. Cold: ~15 min on
# 2 cores; warm (kernels in ~/.triton): seconds.
gpu-compile-check: $(STAMP)
	$(BIN)/python scripts/gpu_compile_check.py

# The GPU machines run triton 3.6 (../shared/ENV.md). A second venv outside the repo
# (created once, then reused) with triton 3.6 and numpy < 2.4 (3.6's interpreter needs
# it): the Triton kernel tests in its interpreter, then the full compile check with 3.6
# (every launch: 3.6's ptxas spilled where 3.9's did not; 6 min from an empty Triton cache).
# The repo is installed into it without building the extension (GRADPROJ_SKIP_EXT=1):
# the extension `make setup` built in place is loaded (same torch).
GRADPROJ_TRITON36_VENV ?= $(HOME)/.cache/gradproj/venv-triton36
TRITON36_PINS := torch==2.13.0 triton==3.6.0 numpy==2.3.5 pytest==9.2.0 hypothesis==6.170.15 \
	safetensors==0.8.0 expecttest==0.3.0
triton36-check: $(STAMP)
	@set -eu; venv="$(GRADPROJ_TRITON36_VENV)"; \
	if ! "$$venv/bin/python" -c 'import triton, numpy, sys; sys.exit((triton.__version__, numpy.__version__) != ("3.6.0", "2.3.5"))' 2>/dev/null; then \
		echo "triton36-check: creating $$venv (triton 3.6.0)"; \
		$(PY) -m venv "$$venv"; \
		"$$venv/bin/pip" install -q $(TRITON36_PINS); \
	fi; \
	GRADPROJ_SKIP_EXT=1 "$$venv/bin/pip" install -q --no-build-isolation --no-deps -e .; \
	start=$$(date +%s); \
	"$$venv/bin/python" -m pytest -q -p no:cacheprovider -W ignore::DeprecationWarning \
		tests/test_project.py tests/test_adamw.py tests/test_surgery.py -k triton; \
	"$$venv/bin/python" scripts/gpu_compile_check.py; \
	echo "triton36-check: OK ($$(( $$(date +%s) - start )) s)"

# The static GPU performance model: every op's Triton kernels compiled for sm_80/sm_90, their
# SASS read for instructions, bytes and occupancy per element, a predicted fraction of the
# copy roofline. Writes benchmarks/results/perf_model.json and docs/perf_model.md, labelled
# "predicted from compiled code, not measured" (~6 min once the compile check warmed ~/.triton).
perf-model: $(STAMP)
	TRITON_INTERPRET=0 $(BIN)/python benchmarks/perf_model.py

# Its twin for the CUDA kernels: csrc/ built for sm_80/sm_90 with the venv and flags of
# cuda-compile-check (run that once first; the build is kept in ~/.cache/gradproj/
# perf_model_cuda, ~3 min when a .cu changed), each loop's trips from its `// model-trips:`
# comment. Writes benchmarks/results/perf_model_cuda.json and docs/perf_model_cuda.md.
perf-model-cuda: $(STAMP)
	$(BIN)/python benchmarks/perf_model_cuda.py
