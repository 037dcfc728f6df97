# Quick start: `make demo` and `make test`. Both build .venv on first use and are
# idempotent: the install stamp is only redone when pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
TORCH_PIN := torch==2.13.0
FBGEMM_PIN := fbgemm-gpu-cpu==1.8.0
TORCHREC_PIN := torchrec==1.8.0
DEMO_DIR ?= runs/demo
ML100K ?= ../shared/data/ml-100k

.PHONY: venv test test-slow demo bench clean-demo failover gpu-smoke

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check $(TORCH_PIN) $(FBGEMM_PIN)
	$(PIP) install -q --disable-pip-version-check --no-deps $(TORCHREC_PIN)
	$(PIP) install -q --disable-pip-version-check -e '.[test,bench]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

demo: $(STAMP)
	$(PY) -m dig_torchrec.demo --out $(DEMO_DIR) --ml100k $(ML100K)

failover: $(STAMP)
	$(PY) -m pytest -q -m slow tests/test_failover.py

# On a host with >= 2 CUDA GPUs and a CUDA build of the stack in .venv (or PYTHON=...; e.g. the
# docker/Dockerfile image): 2-GPU train, --resume auto, dig eval on CPU, GPU train-throughput.
gpu-smoke:
	bash benchmarks/gpu_smoke.sh

clean-demo:
	rm -rf $(DEMO_DIR)
