# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export FLWR_TELEMETRY_ENABLED := 0
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup demo test test-long test-all test-fast bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade pip==26.3 -q
	# torch first: the pinned CPU wheel; an unpinned resolve would pull CUDA builds
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c requirements.lock -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fedgin demo --out demo-out

# two workers, one test file each at a time (module fixtures are built once): the Flower
# simulation tests spend part of their time waiting on Ray, the other worker trains; each worker
# gets half of the cores as torch threads (tests/conftest.py). `make test` leaves out the tests
# marked `long` (minutes each: Flower's deployment processes on loopback, torch.compile's
# compiler); `make test-long` runs them, and CI (.ci/run) runs both.
PYTEST_XDIST := -n 2 --dist loadgroup --no-loadscope-reorder

test: $(STAMP)
	$(PY) -m pytest -q -ra --durations=25 $(PYTEST_XDIST) -m "not long"

test-long: $(STAMP)
	$(PY) -m pytest -q -ra --durations=15 $(PYTEST_XDIST) -m long

test-all: test test-long

test-fast: $(STAMP)
	$(PY) -m pytest -q -ra -m "not slow and not long"

bench: $(STAMP)
	$(PY) benchmarks/gin_overhead.py

clean:
	rm -rf $(VENV) demo-out .pytest_cache
