# The commands people run; each installs what it needs first (scripts/install.sh).
PY ?= python3
PYTEST_ARGS ?=

.PHONY: install test demo bench

install:
	PYTHON=$(PY) bash scripts/install.sh

test: install
	$(PY) -m pytest -q tests $(PYTEST_ARGS)

demo: install
	$(PY) -m mmea_kernels demo

bench: install
	$(PY) -m pytest -q -p no:cacheprovider bench --benchmark-only -o testpaths=bench -s
