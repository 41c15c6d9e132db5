# Two commands on a fresh machine:
#   make demo   - build the venv if needed, then run the end-to-end TTFT demo
#   make test   - build the venv if needed, then run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: install demo test bench clean
install:
	@VENV=$(VENV) scripts/install.sh

demo: install
	$(PY) -m vua_nixl demo $(DEMO_ARGS)

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: install
	$(PY) benchmarks/store_io.py

clean:
	rm -rf $(VENV) results .pytest_cache
