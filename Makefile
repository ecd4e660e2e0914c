PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_PIN := torch==2.13.0

.PHONY: venv install test demo bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

install: $(BIN)/python
	$(BIN)/pip install -q $(TORCH_PIN)
	$(BIN)/pip install -q -e ".[test]"

test: install
	$(BIN)/python -m pytest -q
	# the flash-vs-reference suite again with the native engine in the flash engine's place (tiny tiles)
	FASCORE_SUITE_ENGINE=native $(BIN)/python -m pytest -q tests/test_flash_engine.py

demo: install
	$(BIN)/python -m fascore.tools.demo

bench: install
	$(BIN)/python benchmarks/bench.py --out bench_out

clean:
	rm -rf $(VENV) bench_out
