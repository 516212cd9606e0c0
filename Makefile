# Every target sets up what it needs: on a fresh machine `make train-local` and `make test` are enough.
PYTHON  ?= python3
VENV    ?= .venv
PY      := $(VENV)/bin/python
DATA    ?= data/fashion-mnist
OUTPUT  ?= runs/local
FLAGS   ?=
# EPOCHS, WORKERS, MODEL: passed to the job only when you set them (else the job's defaults, 10,
# 2 and seed, or a --recipe's in FLAGS, hold).
given = $(if $(filter command line environment,$(origin $(1))),$(2) $($(1)))
JOB_CHOICES = $(call given,EPOCHS,--epochs) $(call given,WORKERS,--num-workers) $(call given,MODEL,--model)
# Extra flags for the job (train-local, submit, gpu-check), e.g. FLAGS="--fast --seed 3".
DEBIAN_DATA := /usr/share/datasets/fashion-mnist
SUDO    := $(if $(filter 0,$(shell id -u)),,sudo)

.PHONY: setup data train-local seeds gpu-check test test-fast docs lint fashion-mnist-source image k8s-render bench cluster-up cluster-down hosts-up hosts-down submit

setup: $(VENV)/.installed

# PYTHON: a Python >= 3.11 (e.g. PYTHON=python3.12); on Debian/Ubuntu its venv module comes
# with the package python3-venv, installed here if missing.
$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || { \
	  echo "error: $(PYTHON) is not Python >= 3.11 (the job needs it): set PYTHON=python3.11 or newer" >&2; \
	  exit 2; }
	@$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || { \
	  echo "installing Debian package python3-venv (Python's venv module)"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq python3-venv >/dev/null; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# The official IDX files: $FASHION_MNIST_DIR if set, else Debian's dataset-fashion-mnist package.
fashion-mnist-source:
	@if [ -z "$$FASHION_MNIST_DIR" ] && [ ! -e $(DEBIAN_DATA)/train-images-idx3-ubyte.gz ]; then \
	  if command -v apt-get >/dev/null; then \
	    echo "installing Debian package dataset-fashion-mnist"; \
	    $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	  else \
	    echo "error: no Fashion-MNIST IDX files: set FASHION_MNIST_DIR to a directory holding them" >&2; \
	    exit 2; \
	  fi; \
	fi

# LIMIT=N: only the first N train and N test images (smoke runs; tests/test_docs.py).
data: setup fashion-mnist-source
	$(PY) -m job prepare-data --out $(DATA)$(if $(LIMIT), --limit $(LIMIT))

train-local: data
	$(PY) -m job train --data $(DATA) $(JOB_CHOICES) --output $(OUTPUT) $(FLAGS)

# Costs against plain Keras, collectives per step, time to 0.90, the all-reduce over a 1 Gbit/s
# link and scaling over 1-3 hosts (as root) -> bench/results.json (50-100 min).
# Prints the targets it missed; CHECK=1 makes a miss fail.
bench: setup fashion-mnist-source
	$(PY) -m bench.run $(if $(CHECK),--check)

# One recipe over seeds, full data, as train-local runs it: the table of test accuracy (mean, sd,
# min), steps and wall time -> runs/seeds/RECIPE.md (~5 min a seed of the default here).
RECIPE ?= default
SEEDS   ?= 0 1 2 3 4
seeds: data
	$(PY) -m bench.seeds --recipe $(RECIPE) --seeds $(SEEDS) --data $(DATA) -- $(FLAGS)

# On a machine with NVIDIA GPUs: what TensorFlow sees, short real runs per recipe, one table.
gpu-check: data
	$(PY) -m pip install -q -e '.[gpu,dev]'
	$(PY) bench/gpu_check.py --data $(DATA) --epochs $(if $(filter command line,$(origin EPOCHS)),$(EPOCHS),3) -- $(FLAGS)

test: setup fashion-mnist-source
	$(PY) -m pytest

# The edit-run loop: unit and config tests, no Ray cluster or training run (< 1 min on 2 cores).
test-fast: setup fashion-mnist-source
	$(PY) -m pytest -m "not slow"

# docs/cli.md, generated from the parser (tests/test_docs.py checks it is current).
docs: setup
	$(PY) -c "from job.cli import reference_markdown; print(reference_markdown(), end='')" > docs/cli.md

lint: setup
	$(PY) -m ruff check job tests cluster bench k8s

# A Ray cluster on this machine (loopback only, token auth): head + NODES worker nodes of 1 CPU.
NODES   ?= 2
cluster-up: setup
	cluster/local.sh up $(NODES)

cluster-down:
	cluster/local.sh down

# A Ray cluster of hosts on this machine (root): each node in its own network namespace with its
# own address on a private bridge, for trying faults (`python -m cluster.hosts -h`: cut, isolate,
# throttle, shape).  make hosts-up NODES=3; make hosts-down
hosts-up: setup
	$(PY) -m cluster.hosts up $(NODES)

hosts-down: setup
	$(PY) -m cluster.hosts down

# Submit the job to a Ray cluster (default: the one cluster-up started), follow its logs, exit
# with its status. For a remote cluster set ADDRESS and RAY_AUTH_TOKEN_PATH (or RAY_AUTH_TOKEN).
ADDRESS ?= $(shell cat runs/cluster/address 2>/dev/null || echo http://127.0.0.1:8265)
RAY_AUTH_TOKEN_PATH ?= $(abspath runs/cluster/auth_token)
SUBMIT_OUTPUT ?= $(abspath runs/submitted)
STORAGE ?= $(abspath runs/cluster/checkpoints)
# A URI (s3://, gs://) passes through untouched and needs no local data; a path is made absolute.
is_uri = $(findstring ://,$(1))
submit: setup $(if $(call is_uri,$(DATA)),,data)
	RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$(RAY_AUTH_TOKEN_PATH) $(VENV)/bin/ray job submit \
	  --address $(ADDRESS) --working-dir . --runtime-env cluster/runtime_env.yaml -- \
	  python -m job train --data $(if $(call is_uri,$(DATA)),$(DATA),$(abspath $(DATA))) \
	  $(JOB_CHOICES) --output $(SUBMIT_OUTPUT) \
	  --storage-path $(if $(call is_uri,$(STORAGE)),$(STORAGE),$(abspath $(STORAGE))) --max-failures 2 $(FLAGS)

# The container image for KubeRay (needs a Docker engine). Its tag carries the pinned Ray version.
RAY_VERSION := $(shell sed -n 's/.*"ray\[.*\]==\([0-9.]*\)".*/\1/p' pyproject.toml)
IMAGE ?= fashion-job:$(RAY_VERSION)-py311-tf-cuda
image:
	docker build -f k8s/image/Dockerfile --build-arg RAY_VERSION=$(RAY_VERSION) -t $(IMAGE) .

# After editing k8s/job.toml or k8s/variants/ray-job.train-now.yaml: regenerate what embeds them.
# Cluster-specific values, set in every manifest at once: IMAGE (registry/name:tag of `make image`),
# STORAGE_CLASS (an RWX class for the PVCs), OPERATOR_NAMESPACE (the KubeRay operator's namespace).
# Needs only what k8s/render.py imports (PyYAML), in a venv of its own.
RENDER_VENV ?= .venv-render
$(RENDER_VENV)/.installed:
	$(PYTHON) -m venv $(RENDER_VENV)
	$(RENDER_VENV)/bin/python -m pip install -q 'pyyaml>=6'
	touch $@

k8s-render: $(RENDER_VENV)/.installed
	$(RENDER_VENV)/bin/python k8s/render.py $(if $(filter command line,$(origin IMAGE)),--image $(IMAGE)) \
	  $(if $(STORAGE_CLASS),--storage-class $(STORAGE_CLASS)) \
	  $(if $(OPERATOR_NAMESPACE),--operator-namespace $(OPERATOR_NAMESPACE))
