# Quick start targets: each builds the virtual environment on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.robaudit-installed

.PHONY: demo test security bench screenshot clean

# The tested pair of torch and torchvision, installed first so that no extra pulls another torch; then robaudit
# with its tests and every model source (timm, torchvision, robustbench, transformers, onnx).
TORCH_PAIR ?= torch==2.14.1 torchvision==0.29.1

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_PAIR)
	$(BIN)/python -m pip install -q -e ".[test,all]"
	touch $(STAMP)

demo: $(STAMP)  ## analyze the example digits CNN; prints the MVL list and the run directory
	$(BIN)/robaudit analyze examples/digits_cnn.pt2 --dataset digits --force

test: $(STAMP)  ## run the test suite, one test file at a time on each of two processes
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

security: $(STAMP)  ## hostile model, run and data files through every loader (library models too), and the data-safety checks
	$(BIN)/python -m pytest -q tests/test_hostile.py tests/test_hostile_pt2.py tests/test_data_safety.py tests/test_hostile_runs.py \
		tests/test_source_onnx.py tests/test_source_hf.py tests/test_source_torchvision.py tests/test_source_robustbench.py

bench: $(STAMP)  ## side-by-side speed and memory ratios (not tests)
	$(BIN)/python benchmarks/bench_analyze.py
	$(BIN)/python benchmarks/bench_harden.py

CHROMIUM ?= $(shell command -v chromium || command -v chromium-browser)
SHOT_RUN := build/screenshot-run

screenshot: $(STAMP)  ## regenerate docs/report-digits.png (the top of the example report) with headless Chromium
	@test -n "$(CHROMIUM)" || { echo "error: chromium not found: install it (apt-get install chromium) or pass CHROMIUM=/path/to/chromium"; exit 1; }
	rm -rf $(SHOT_RUN) build/chromium-profile
	$(BIN)/robaudit analyze examples/digits_cnn.pt2 --dataset digits --out $(SHOT_RUN)
	$(CHROMIUM) --headless --no-sandbox --disable-gpu --hide-scrollbars --no-first-run --disable-background-networking \
		--user-data-dir=$(abspath build/chromium-profile) --window-size=1280,1640 \
		--screenshot=$(abspath docs/report-digits.png) file://$(abspath $(SHOT_RUN))/report.html
	rm -rf build/chromium-profile

clean:
	rm -rf $(VENV) build dist *.egg-info
