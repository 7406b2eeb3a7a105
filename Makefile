# dials-gapfill: the two commands of the README.
#   make demo   simulate a small gapped sweep and process it with dials.process_gapped
#   make test   run the test suite (make test-fast: the quick subset)
# Both first run scripts/bootstrap.sh (idempotent): DIALS from Debian if missing, a venv, the package.
# Where Debian has no DIALS package (Debian 13 and newer), or with GAPFILL_DIALS=root, the same
# targets run inside a Debian 12 root with DIALS (scripts/dials-root.sh), with the venv .venv-root.

ROUTE := $(shell bash scripts/bootstrap.sh --route)
NPROC ?= 2
DEMO ?= demo

.PHONY: setup setup-test demo test test-fast bench clean

ifeq ($(ROUTE),root)
VENV ?= .venv-root
setup setup-test demo test test-fast bench:
	@bash scripts/dials-root.sh run make --no-print-directory $@ VENV=$(VENV) NPROC=$(NPROC) DEMO=$(DEMO)
else
VENV ?= .venv
PY := $(VENV)/bin/python

setup:
	@VENV=$(VENV) bash scripts/bootstrap.sh

setup-test:
	@VENV=$(VENV) WITH_TEST_TOOLS=1 bash scripts/bootstrap.sh

demo: setup
	rm -rf $(DEMO)/images
	$(VENV)/bin/dials.simulate_sweep output.directory=$(DEMO)/images omit=41:45,81:83
	$(VENV)/bin/dials.process_gapped images=$(DEMO)/images nproc=$(NPROC) output.directory=$(DEMO)/processed
	@echo "The results are in $(DEMO)/processed: integrated.mtz (BATCH = image number), integrated.expt/.refl,"
	@echo "dials.process_gapped.log and a report to open in a browser: $(DEMO)/processed/dials.process_gapped.html"
	@echo "The commands are in $(VENV)/bin: source $(VENV)/bin/activate, or type $(VENV)/bin/dials.process_gapped"

test: setup-test
	$(PY) -m pytest -ra --durations=30 -n $(NPROC) --dist loadgroup tests

test-fast: setup-test
	$(PY) -m pytest -ra -n $(NPROC) --dist loadgroup -m "not slow" tests

bench: setup
	$(PY) benchmarks/benchmark.py --nproc $(NPROC)
endif

clean:
	rm -rf $(DEMO) .pytest_cache
