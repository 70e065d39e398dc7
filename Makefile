# gRPC Mastery: every target sets up what it needs. See README.md.
#   make tour [STEP=NN]     run every step's server and client demo (or one step)
#   make test [STEP=NN]     every step's tests, each in its own process, and the repo tests
#                           ([JOBS=N] at once; default cores + 2)
#   make up STEP=NN         one step's whole stack on loopback (Prometheus, traces, broker,
#                           Envoy as the step has them) until Ctrl-C
#   make diff STEP=NN       what step NN adds to the step before it (generated code left out)
#   make protos             regenerate the checked-in gRPC code of every step
#   make lint               ruff over the whole repo, mypy over every step's code
#   make mutate STEP=NN MODULE=name   mutation testing of one module against its tests
#   make lock               re-resolve the locks from pyproject.toml (pip-compile, with hashes)
#   make bench [STEP=NN]    what each step's features cost per call (bench/results.md),
#                           and a leak check (bench/leaks.md)

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# The stamp records that .venv holds exactly requirements.lock (and .venv/checkov
# requirements-checkov.lock): the install reruns only when a lock changes.
STAMP  := $(VENV)/.installed-from-lock

.PHONY: tour test up diff protos lint lock stats venv bench mutate

venv: $(STAMP)

$(STAMP): requirements.lock requirements-checkov.lock
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is needed, found " + sys.version.split()[0])'
	@echo "installing requirements.lock into $(VENV) (once per lock change) ..."
	@$(PYTHON) tools/install.py
	@touch $(STAMP)

tour: $(STAMP)
	@$(PY) tools/tour.py $(STEP)

test: $(STAMP)
	@$(PY) tools/run_tests.py $(if $(JOBS),--jobs $(JOBS)) $(STEP)

up: $(STAMP)
	@test -n "$(STEP)" || { echo "usage: make up STEP=NN"; exit 2; }
	@$(PY) tools/up.py $(STEP)

diff: $(STAMP)
	@test -n "$(STEP)" || { echo "usage: make diff STEP=NN"; exit 2; }
	@$(PY) tools/ladder.py diff $(STEP)

stats: $(STAMP)
	@$(PY) tools/ladder.py stats

bench: $(STAMP)
	@$(PY) tools/bench.py $(STEP)
	@$(PY) tools/bench.py leaks $(STEP)

protos: $(STAMP)
	@$(PY) tools/codegen.py

mutate: $(STAMP)
	@test -n "$(STEP)" -a -n "$(MODULE)" || { echo "usage: make mutate STEP=NN MODULE=name [TESTS=tests/test_x.py] [SAMPLE=N]"; exit 2; }
	@$(PY) tools/mutate.py $(STEP) $(MODULE) $(if $(TESTS),--tests $(TESTS)) $(if $(SAMPLE),--sample $(SAMPLE))

lint: $(STAMP)
	@$(PY) -m ruff check .
	@$(PY) -m ruff format --check .
	@$(PY) tools/typecheck.py

lock:
	@$(PYTHON) tools/lock.py
