# `make demo` and `make test` each set everything up first (scripts/bootstrap.sh, idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python
NP ?= 4
PYTEST_ARGS ?=

.PHONY: setup demo test test-mpich test-impi bench clean

setup:
	@bash scripts/bootstrap.sh

demo: setup
	@$(PY) -m hvd_unreliable.demo --np $(NP)

test: setup
	@$(PY) -m pytest $(PYTEST_ARGS)

test-mpich test-impi:  # the suite on MPICH / Intel MPI (a venv of its own, no Horovod); not part of CI
	@bash scripts/test_other_mpi.sh $(@:test-%=%) $(PYTEST_ARGS)

bench: setup
	@$(PY) bench/bench_transport.py --runs 3
	@$(PY) bench/bench_ops.py --runs 3
	@$(PY) bench/bench_train_step.py
	@$(PY) bench/bench_ps_runtime.py
	@$(PY) bench/bench_long_run.py --runs 3

clean:
	rm -rf $(VENV) .venv-mpich .venv-impi .pytest_cache outputs multirun bench/results
