# The README's two commands: `make demo` runs the main job, `make test` runs the suite.
# Both install into .venv/ first. torch is installed before the package so that a CPU machine gets
# the CPU wheel (a bare `torch` requirement would pull a multi-GB CUDA build).

VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
# No NVIDIA driver: ask the PyTorch CPU index too (its +cpu build wins over PyPI's CUDA one).
TORCH_INDEX ?= $(if $(shell command -v nvidia-smi 2>/dev/null),,--extra-index-url https://download.pytorch.org/whl/cpu)

.PHONY: install demo test lint clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "torch==$(TORCH_VERSION)" $(TORCH_INDEX)
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/opd demo

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) runs
