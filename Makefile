# `make run` and `make test` work on a fresh clone: they build .venv from the pinned pyproject.
# `make run` installs the runtime only (`pip install -e .`); `make test` and `make bench` add the
# test stack (`pip install -e '.[test]'`, a superset). One stamp per level, each remade when
# pyproject.toml changes: `make test` after `make run` only adds the test stack, and `make run`
# after `make test` installs nothing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# tests/ are type-checked for the annotations they have: a fixture or helper may go unannotated
TESTS_TYPED := --allow-untyped-defs --allow-incomplete-defs --allow-untyped-calls --disable-error-code type-arg
RUN_STAMP := $(VENV)/.installed-run
TEST_STAMP := $(VENV)/.installed-test

.PHONY: setup setup-run setup-test run test bench clean

setup: setup-run
setup-run: $(RUN_STAMP)
setup-test: $(TEST_STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(RUN_STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e .
	touch $@

# '.[test]' holds the runtime too, so the run stamp is renewed with it (touched first: older).
$(TEST_STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[test]'
	touch $(RUN_STAMP) $@

run: $(RUN_STAMP)
	$(PY) -m pipeline run jobs/demo.toml

# First the bytecode: where PYTHONDONTWRITEBYTECODE is set (this machine sets it) no process writes
# it, so each of the suite's hundreds of `pipeline` processes would compile ~150 modules again
# (~0.1 s of CPU each); compiled once here (up-to-date files are skipped), they load. Then two
# passes: most tests wait on sockets, processes and sleeps, so 4 workers (pytest-xdist, one file per
# worker so a module's server or Ray cluster starts once) overlap them on 2 cores; then the tests
# marked `serial`, whose wall-clock or rate bounds CPU contention could break, alone, with the type
# check (mypy, configured in pyproject.toml: pipeline/ and bench/ strict, then tests/) on the core
# they leave idle, at the lowest priority; its verdict is printed after theirs and fails the target
# as a test would. `$(PY) -m pytest -q` alone still runs everything, one at a time.
test: $(TEST_STAMP)
	$(PY) -m compileall -q pipeline bench
	$(PY) -m pytest -q -n 4 --dist loadfile -m "not serial" --durations=15
	@typed=$$(mktemp); \
	nice -n 19 sh -c '$(PY) -m mypy && $(PY) -m mypy tests $(TESTS_TYPED)' >"$$typed" 2>&1 & checker=$$!; \
	echo "$(PY) -m pytest -q -m serial --durations=10   (mypy meanwhile, at the lowest priority)"; \
	$(PY) -m pytest -q -m serial --durations=10; tests=$$?; \
	wait $$checker; checked=$$?; echo "mypy:"; cat "$$typed"; rm -f "$$typed"; \
	test $$tests -eq 0 && test $$checked -eq 0

bench: $(TEST_STAMP)
	$(PY) -m bench

clean:
	rm -rf $(VENV) out .pytest_cache .mypy_cache
