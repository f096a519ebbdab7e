# The two commands (README.md):  make run   (the main job on the embedded default)   make test   (the test suite)
# Both create .venv and install what they need. Extra launch overrides: make run ARGS="-m nodes=1,2,4"
VENV ?= .venv
PY := $(VENV)/bin/python
# On machines without CUDA the CPU build of torch goes in first (a plain `torch` requirement would pull a
# multi-GB CUDA build). Elsewhere, point PIP_EXTRA_INDEX_URL at https://download.pytorch.org/whl/cpu for it.
TORCH_CPU ?= torch==2.13.0

.PHONY: install run test clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q "$(TORCH_CPU)"; fi
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

run: install
	$(PY) -m pipeline.launch $(ARGS)

test: install
	$(PY) -m pytest -q --durations=20 $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) outputs multirun
