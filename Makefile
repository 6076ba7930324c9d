# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.saferlhf-installed
# The CPU wheel lies on local disk; naming it stops pip from pulling the multi-GB CUDA build.
TORCH_CPU ?= torch==2.13.0
JOBS   ?= 2

.PHONY: install demo test test-fast bench cuda-check ctest clean triton-check

$(VPY):
	$(PYTHON) -m venv --system-site-packages $(VENV)

$(STAMP): $(VPY) setup.py pyproject.toml $(wildcard csrc/*)
	@# A machine that already has torch (e.g. a CUDA build) keeps it; otherwise take the CPU wheel.
	$(VPY) -c "import torch" 2>/dev/null || $(VPY) -m pip install -q $(TORCH_CPU)
	@# Triton: GPU machines keep the one shipped with their torch; CPU machines get a recent one for the interpreter.
	$(VPY) -c "import triton" 2>/dev/null || $(VPY) -m pip install -q "triton>=3.8"
	$(VPY) -m pip install -q setuptools wheel ninja
	TV=$$($(VPY) -c "import torch; print(torch.__version__)"); \
	MAX_JOBS=$(JOBS) $(VPY) -m pip install -q --no-build-isolation -e ".[dev,hf]" "torch==$$TV"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(VPY) -m pytest -q tests -m "not slow"

demo: $(STAMP)
	$(VPY) -m saferlhf_fast.cli demo

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
