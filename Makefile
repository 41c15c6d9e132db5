# Two commands on a fresh machine:
#   make demo   - build the venv if needed, then run the end-to-end TTFT demo
#   make test   - build the venvs if needed, lint, then run every test suite (what CI runs)
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: install install-engines lint demo test bench clean
install:
	@VENV=$(VENV) scripts/install.sh

# vLLM and SGLang pin versions that conflict with the main venv: each gets its own.
install-engines:
	@scripts/install-vllm.sh
	@scripts/install-sglang.sh

lint: install
	$(PY) -m ruff check .
	$(PY) -m mypy

demo: install
	$(PY) -m vua_nixl demo $(DEMO_ARGS)

test: install install-engines lint
	$(PY) scripts/run_tests.py $(PYTEST_ARGS)

bench: install
	$(PY) benchmarks/store_io.py

clean:
	rm -rf $(VENV) .venv-vllm .venv-sglang results .pytest_cache
