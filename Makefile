# carevault: `make run` serves a demo instance, `make test` runs the whole suite.
# Needs only python3 and make; everything else is installed into .venv by these targets.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: run test bench lint clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@rm -f $(VENV)/.installed-*
	@touch $@

run: $(STAMP)
	$(BIN)/carevault init --demo
	$(BIN)/carevault serve

# The probe prints which of PostgreSQL and Redis answer and exports their test URLs; cases
# that need a missing one are skipped with the reason shown in pytest's summary.
test: $(STAMP)
	@eval "$$($(BIN)/python tools/probe_services.py)" && \
		$(BIN)/python -m pytest -n 2 --dist loadgroup $(PYTEST_ARGS)

# The issue-8 suite by default (SQLite, and PostgreSQL when the probe finds it: skipped with the
# reason otherwise; 1 and 2 workers; ~20-30 minutes); BENCH_ARGS="--quick" for a smoke (3-5 min),
# BENCH_ARGS="fhir" (or auth, access, audit) for another scenario set.
bench: $(STAMP)
	@eval "$$($(BIN)/python tools/probe_services.py)" && \
		$(BIN)/python -m bench $(BENCH_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests bench tools

clean:
	rm -rf $(VENV) var .pytest_cache
