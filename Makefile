# Surge drills and benchmarks (see README "Surge drills and benchmarks" and docs/benchmarks.md).
# The system under drill is brought up and torn down by the scripts themselves; nothing here needs ./dev up.
# Prerequisites: .venv/bin/pip install -e '.[load]'; for the benchmarks also wrk (Debian: apt-get install wrk).

PYTHON ?= .venv/bin/python

.PHONY: help drill-short drill-full drill-steady drill-multi drill-failover bench bench-kernel bench-web bench-overload bench-e2e bench-sweep

help:
	@echo "make drill-short   deadline spike, ~2 minutes, SLO gate as exit code"
	@echo "make drill-full    deadline spike, ~11 minutes, gateway faults on"
	@echo "make drill-steady  a steady busy day, ~2 minutes"
	@echo "make drill-multi   deadline spike on many nodes behind nginx, two nodes killed, ~3 minutes"
	@echo "make drill-failover deadline spike while Redis, PostgreSQL, PgBouncer and the store are lost in turn, ~5 minutes"
	@echo "make bench         all benchmarks (kernel, web, overload, e2e, sweep); figures go in docs/benchmarks.md"

drill-short:
	$(PYTHON) -m loadtests.drill --profile short

drill-full:
	$(PYTHON) -m loadtests.drill --profile full

drill-steady:
	$(PYTHON) -m loadtests.drill --profile short --shape steady

# Needs Debian's redis-server (Sentinel too) and pgbouncer besides PostgreSQL; SeaweedFS comes with the test extra.
drill-multi:
	$(PYTHON) -m loadtests.drill --profile multi

drill-failover:
	$(PYTHON) -m loadtests.drill --profile failover

# Each benchmark exits non-zero when its target is missed; run them all and report every result.
bench:
	@status=0; \
	for b in bench-kernel bench-web bench-overload bench-e2e bench-sweep; do \
		$(MAKE) --no-print-directory $$b || status=1; \
	done; \
	exit $$status

bench-kernel:
	./bench

bench-web:
	$(PYTHON) -m loadtests.bench.web

bench-overload:
	$(PYTHON) -m loadtests.bench.overload

bench-e2e:
	$(PYTHON) -m loadtests.bench.e2e

bench-sweep:
	$(PYTHON) -m loadtests.bench.sweep
