# The two commands of the quick start: `make demo` and `make test`.
# Both create .venv when it is missing and install the project into it.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test test-all lint bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch 2.14.1 + torchvision 0.29.1: the pair that gives the stock transformers processors
# (InternVL, Qwen-VL) their video processor; see README.md, Install.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --disable-pip-version-check "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/pip install -q --disable-pip-version-check -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/mpo demo --out runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_index.py

clean:
	rm -rf runs .pytest_cache
