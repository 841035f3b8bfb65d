# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export PIP_DISABLE_PIP_VERSION_CHECK := 1
# make demo / make up: `local` (LocalExecutor) or `celery` (Redis broker, two Celery workers as two
# hosts, batches through a local S3-protocol server)
EXECUTOR ?= local
export EXECUTOR
# Where the local model's ONNX export is kept (python -m capstone export-model writes it once; the
# workers of the local stack and the tests read it): inside the project, like its other data.
CAPSTONE_MODEL_CACHE ?= $(CURDIR)/.data/models
export CAPSTONE_MODEL_CACHE

.PHONY: test test-distributed test-package test-lowest test-fast lint typecheck demo demo-table up down validate schema clean db-stop

# pyproject.toml declares ranges (the package installs into a team's own Airflow); our own installs
# take the exact versions of constraints.txt, so that every machine and CI run the same set.
CONSTRAINTS := constraints.txt
PIP_INSTALL := $(PY) -m pip install -q -c $(CONSTRAINTS)

$(VENV)/.installed-dev: pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PIP_INSTALL) -e '.[dev]'
	touch $@

$(VENV)/.installed-local: $(VENV)/.installed-dev
	$(PIP_INSTALL) -e '.[dev,local]'
	$(PY) -m capstone export-model
	touch $@

## make constraints: write constraints.txt from the virtualenv as it is (after changing a pin)
.PHONY: constraints
constraints: $(VENV)/.installed-bench
	{ sed -n '/^#/p' $(CONSTRAINTS); $(PY) -m pip freeze --exclude-editable | sed 's/^torch==\([0-9.]*\)+cpu$$/torch==\1/'; } > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)

lint: $(VENV)/.installed-local
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(VENV)/.installed-local
	$(VENV)/bin/mypy

## chromium: the browser the UI test drives (Debian's; Playwright's own download is not reachable)
.PHONY: chromium
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  echo "installing Debian's chromium for the browser test of the Collections pages"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; }

## make test: lint, type-check and run the whole suite: unit, integration (real Postgres + pgvector,
## the local model), e2e (real Airflow services, and a real browser on its UI). It starts the
## embedded Postgres itself, and installs Debian's chromium where there is none.
test: lint typecheck chromium
	$(PY) -m pytest -q -m "not distributed and not package"

## make test-package: the wheel as a team installs it: into a clean virtualenv of each supported
## Airflow minor (which it must leave in place), and on the lowest, `airflow dags test` of a
## collection of its own against the embedded Postgres (~2 min)
test-package: $(VENV)/.installed-local
	$(PY) -m pytest -q -m package tests/package

## make test-lowest: the compatibility lane: the lowest supported Airflow with the lowest version of
## every dependency (constraints-lowest.txt), in a virtualenv of its own: the fast lane, and on real
## services the asset chain (and its Collections pages in a browser) and a followed table (~31 min:
## Airflow 3.2's dag.test() is slow)
LOWEST_VENV := .data/venv-lowest
LOWEST_PY := $(LOWEST_VENV)/bin/python
$(LOWEST_VENV)/.installed: pyproject.toml constraints-lowest.txt
	test -x $(LOWEST_PY) || $(PYTHON) -m venv $(LOWEST_VENV)
	$(LOWEST_PY) -m pip install -q --upgrade pip
	$(LOWEST_PY) -m pip install -q -c constraints-lowest.txt -e '.[dev,local]'
	touch $@

test-lowest: $(LOWEST_VENV)/.installed chromium
	$(LOWEST_PY) -m pytest -q tests/unit tests/integration -m "not slow and not e2e"
	$(LOWEST_PY) -m pytest -q tests/e2e/test_airflow_chain.py tests/e2e/test_table_source.py

## make test-distributed: the asset chain on the CeleryExecutor stack: a Redis broker, two workers
## as two hosts, batches through a local S3-protocol server, one worker killed mid-run (~4 min)
test-distributed: $(VENV)/.installed-local
	$(PY) -m pytest -q -m distributed tests/e2e

## make test-fast: unit and integration tests that take seconds (not slow, not e2e); under two minutes
test-fast: $(VENV)/.installed-local
	$(PY) -m pytest -q tests/unit tests/integration -m "not slow and not e2e"

## make demo: the asset chain on a real local Airflow: enrich -> documents -> documents.indexed
## (make demo EXECUTOR=celery: the same on the distributed stack)
demo: $(VENV)/.installed-local
	$(PY) -m dag_factory validate configs/
	$(PY) -m dag_factory.local.demo

## make demo-table: a collection that follows a table of an application: the first run by itself,
## then a row rewritten -> found by a search within seconds, a row deleted and one inserted (~3 min)
demo-table: $(VENV)/.installed-local
	$(PY) -m dag_factory.local.demo_table

## make up: like demo, then leave Airflow running for the UI; make down stops it
up: $(VENV)/.installed-local
	$(PY) -m dag_factory validate configs/
	$(PY) -m dag_factory.local.demo --keep-running

down: $(VENV)/.installed-dev
	$(PY) -m dag_factory.local.stack down

BENCHMARKS := load peers index_build pipeline incremental mapping embed embed_stage search search_quality version_switch parse peer_sync onnx_backend scheduler_idle chunking freshness ui_list
# Not part of make bench, each with a target of its own: quantization (~12 minutes at its default
# size) and embed_stage_gpu (needs a CUDA device; skips where there is none).
BENCH_EXTRA := quantization embed_stage_gpu
.PHONY: bench bench-smoke bench-embed-stage bench-quantization $(addprefix bench-,$(BENCHMARKS) embed_stage_gpu)

$(VENV)/.installed-bench: $(VENV)/.installed-local
	$(PIP_INSTALL) -e '.[dev,local,bench]'
	touch $@

## make bench: every benchmark in turn (each under 10 minutes on 2 cores); see benchmarks/RESULTS.md
bench: $(addprefix bench-,$(BENCHMARKS))

## make bench-<name>: one of them, e.g. make bench-peers (and make bench-embed_stage_gpu)
$(addprefix bench-,$(BENCHMARKS) embed_stage_gpu): bench-%: $(VENV)/.installed-bench
	$(PY) benchmarks/$*.py

## make bench-smoke: every benchmark (those of make bench, quantization, embed_stage_gpu) with --smoke,
## at a tiny size, one after the other, stopping at the first failure: a few minutes to check that they
## all still run to their end (their numbers mean nothing)
bench-smoke: $(VENV)/.installed-bench
	@for name in $(BENCHMARKS) $(BENCH_EXTRA); do \
	  echo "== bench-smoke: $$name"; started=$$(date +%s); \
	  $(PY) benchmarks/$$name.py --smoke || { echo "== bench-smoke: $$name FAILED"; exit 1; }; \
	  echo "== bench-smoke: $$name ok in $$(( $$(date +%s) - started ))s"; \
	done

## make bench-embed-stage: the embedding stage on real Airflow services vs a bare encode (~15 min)
bench-embed-stage: bench-embed_stage

## make bench-quantization: vector vs halfvec vs binary HNSW at 100k x 1536 (~12 minutes on 2 cores;
## not part of make bench). QUANTIZATION_ROWS=20000 takes 3 minutes.
QUANTIZATION_ROWS ?= 100000
bench-quantization: $(VENV)/.installed-bench
	$(PY) benchmarks/quantization.py --rows $(QUANTIZATION_ROWS)

validate: $(VENV)/.installed-dev
	$(PY) -m dag_factory validate configs/

schema: $(VENV)/.installed-dev
	$(PY) -m dag_factory schema --output configs/schema.json

db-stop: $(VENV)/.installed-dev
	$(PY) -m capstone db stop

clean: down db-stop
	rm -rf $(VENV) .data .airflow
