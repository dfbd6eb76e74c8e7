# `make run` and `make test` work on a fresh clone: each creates .venv when
# it is missing and installs the project with its dev extras first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEBIAN_PACKAGES := bubblewrap

.PHONY: run test lint up system-packages clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# compat mode puts the checkout on sys.path, so temporal/ is found too.
	$(BIN)/pip install -q -e '.[dev]' --config-settings editable_mode=compat
	touch $(STAMP)

# bubblewrap isolates local sandboxes; without it they run with rlimits only.
system-packages:
	@if command -v bwrap >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(DEBIAN_PACKAGES) \
		|| { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(DEBIAN_PACKAGES); }; \
	else echo "bwrap not found: install bubblewrap for isolated sandboxes" >&2; fi

run: system-packages $(STAMP)
	$(BIN)/nexus benchmark run --duration 3m

up: system-packages $(STAMP)
	$(BIN)/nexus up

# Three pytest-xdist processes, whole files each: most tests wait on servers
# and subprocesses, so three fit on two cores. On a 2-core machine the suite
# took 13 min 44 s this way against 33 min in one process (same load beside
# it). Run `make test PYTEST_WORKERS=` for one process.
PYTEST_WORKERS ?= -n 3 --dist loadfile

test: system-packages $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy app activities workflows workers
	$(BIN)/pytest $(PYTEST_WORKERS)

lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy app activities workflows workers

clean:
	rm -rf $(VENV) .nexus reports
