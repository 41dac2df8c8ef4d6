# The two commands for a fresh machine (see README.md):
#   make demo   create .venv, install fastddpm, sample digits with the shipped model -> samples.png
#   make test   create .venv, install with the test extras, run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The torch build pip resolves by default here (a CUDA build that also runs without a GPU and
# brings triton). It is pinned in the same pip command as the peers so they cannot swap it.
TORCH_SPEC ?= torch==2.14.1
export HF_HUB_OFFLINE := 1

BUILD_DEPS := $(TORCH_SPEC) setuptools wheel ninja pybind11
TEST_DEPS := pytest pytest-benchmark diffusers denoising-diffusion-pytorch scikit-learn

.PHONY: demo test install install-test bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# --no-build-isolation: the extension must build against the torch installed here.
$(VENV)/.installed: $(PY) pyproject.toml setup.py $(wildcard csrc/*)
	$(PIP) install -q $(BUILD_DEPS)
	$(PIP) install -q --no-build-isolation -e . $(TORCH_SPEC)
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install -q $(TORCH_SPEC) $(TEST_DEPS)
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
	rm -rf $(VENV) build *.egg-info fastddpm/_C*.so
