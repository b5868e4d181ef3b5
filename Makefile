# Quick start targets: each builds the virtual environment on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.robaudit-installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)  ## analyze the example digits CNN; prints the MVL list and the run directory
	$(BIN)/robaudit analyze examples/digits_cnn.pt2 --dataset digits

test: $(STAMP)  ## run the test suite
	$(BIN)/python -m pytest -q

bench: $(STAMP)  ## side-by-side speed and memory ratios (not tests)
	$(BIN)/python benchmarks/bench_analyze.py
	$(BIN)/python benchmarks/bench_harden.py

clean:
	rm -rf $(VENV) build dist *.egg-info
