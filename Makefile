# The two commands for a fresh machine (see README.md):
#   make demo   create .venv, install fastddpm, sample digits with the shipped model -> samples.png
#   make test   create .venv, install with the test extras, run the test suite
# and, for CI and before a GPU window:
#   make device-stack   the lent GPU machine's stack on this CPU (see below)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The torch build pip resolves by default here (a CUDA build that also runs without a GPU and
# brings triton). It is pinned in the same pip command as the peers so they cannot swap it.
TORCH_SPEC ?= torch==2.14.1
export HF_HUB_OFFLINE := 1

BUILD_DEPS := $(TORCH_SPEC) setuptools wheel ninja
TEST_DEPS := pytest pytest-benchmark diffusers denoising-diffusion-pytorch scikit-learn
# k-diffusion, a test peer of fastddpm.ksamplers: its sampling module and what it imports, without its
# training stack (clip, kornia, wandb, ...), which the tests do not load (tests/test_ksamplers.py)
KDIFF_DEPS := k-diffusion==0.1.1.post1 torchsde==0.2.6 torchdiffeq==0.2.5 trampoline==0.1.2

# The lent GPU machine's stack, tested on a CPU: Python 3.12, torch 2.11.0 (its CUDA 13.0 build),
# triton 3.6.0, numpy >= 2.4, in .venv-device.  The extension is built in place for sm_90 (the .so the
# GPU check carries), the suite runs from the source checkout as scripts/gpu_check.py runs it (Triton
# through the interpreter, both fast backends required), and every Triton kernel variant is compiled
# for sm_90 and checked for spills and shared memory (scripts/compile_sm90.py).
# the first Python 3.12 that runs (a pyenv shim may exist and fail)
PYTHON_DEVICE ?= $(shell for p in $(HOME)/.pyenv/versions/3.12*/bin/python3.12 python3.12; do \
	"$$p" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null && { command -v "$$p"; break; }; done)
DEVICE_VENV ?= .venv-device
DEVICE_PY := $(DEVICE_VENV)/bin/python
DEVICE_SPEC := torch==2.11.0 torchvision==0.26.0 triton==3.6.0 'numpy>=2.4'
DEVICE_TEST_DEPS := $(TEST_DEPS) pytest-xdist pytest-timeout tqdm pillow safetensors setuptools wheel ninja

.PHONY: demo test install install-test bench clean device-stack

$(DEVICE_VENV)/.installed: pyproject.toml
	@test -n "$(PYTHON_DEVICE)" || { echo "make device-stack needs a python3.12 (PYTHON_DEVICE=...)"; exit 1; }
	$(PYTHON_DEVICE) -m venv $(DEVICE_VENV)
	$(DEVICE_PY) -m pip install -q $(DEVICE_SPEC) $(DEVICE_TEST_DEPS)
	$(DEVICE_PY) -m pip install -q --no-deps $(KDIFF_DEPS)
	touch $@

device-stack: $(DEVICE_VENV)/.installed
	@start=$$(date +%s); \
	FASTDDPM_REQUIRE_CUDA=1 FASTDDPM_CUDA_ARCHS=9.0 $(DEVICE_PY) setup.py -q build_ext --inplace && \
	FASTDDPM_REQUIRE_BACKENDS=cpp,triton PYTHONPATH=$(CURDIR) $(DEVICE_PY) -m pytest -q -n 2 -p no:cacheprovider && \
	$(DEVICE_PY) scripts/compile_sm90.py --json build/compile_sm90.json && \
	echo "device-stack: passed in $$(( $$(date +%s) - start )) s"

$(PY):
	$(PYTHON) -m venv $(VENV)

# --no-build-isolation: the extension must build against the torch installed here.
$(VENV)/.installed: $(PY) pyproject.toml setup.py $(wildcard csrc/*) fastddpm/ops/schemas.def
	$(PIP) install -q $(BUILD_DEPS)
	$(PIP) install -q --no-build-isolation -e '.[digits]' $(TORCH_SPEC)
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install -q $(TORCH_SPEC) $(TEST_DEPS)
	$(PIP) install -q --no-deps $(KDIFF_DEPS)
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: $(VENV)/.installed
	$(PY) -m fastddpm demo

test: $(VENV)/.installed-test
	$(PY) -m pytest -q

bench: $(VENV)/.installed-test
	$(PY) benchmarks/bench_ops.py

clean:
	rm -rf $(VENV) $(DEVICE_VENV) build *.egg-info fastddpm/_C*.so
