# The two commands (README.md):  make run   (the main job on the embedded default)   make test   (the test suite)
# make test-fast: the tests that start no process of the pipeline and no cluster, in under two minutes
# Both create .venv and install what they need. Extra launch overrides: make run ARGS="-m nodes=1,2,4"
VENV ?= .venv
PY := $(VENV)/bin/python
# On machines without CUDA the CPU build of torch goes in first (a plain `torch` requirement would pull a
# multi-GB CUDA build). Elsewhere, point PIP_EXTRA_INDEX_URL at https://download.pytorch.org/whl/cpu for it.
TORCH_CPU ?= torch==2.13.0

.PHONY: install run test test-fast clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q "$(TORCH_CPU)"; fi
	$(PY) -m pip install -q -e ".[dev]"
	# Hydra's Optuna sweeper, which the tests run through the launcher: its release pins optuna<3, which lacks what
	# search=optuna needs (pyproject.toml); it works with the optuna installed above
	$(PY) -m pip install -q --no-deps "hydra-optuna-sweeper==1.3.0"
	touch $@

run: install
	$(PY) -m pipeline.launch $(ARGS)

# the suite on PYTEST_WORKERS xdist workers (each file's tests on one; tests/conftest.py), then the few tests that
# measure the machine, alone (pytest's exit status 5: PYTEST_ARGS chose none of a phase's tests)
# Three workers on two cores: a third of the suite's time is spent waiting (on Slurm, on ranks' start-up), and
# a third worker fills it (the first phase took 537 s on three, 642 s on two: docs/development.md).
PYTEST_WORKERS ?= 3
test: install
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadgroup --no-loadscope-reorder -m "not alone" --durations=20 $(PYTEST_ARGS) || [ $$? -eq 5 ]
	$(PY) -m pytest -q -m alone --durations=5 $(PYTEST_ARGS) || [ $$? -eq 5 ]

# the fast tier, for iterating: the tests that start no process of the pipeline and no cluster (tests/conftest.py)
test-fast: install
	$(PY) -m pytest -q --durations=10 -m "not e2e and not slurm and not gpu and not bench and not install" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) outputs multirun
