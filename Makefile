# Two entry points for a fresh machine:  `make train` (set up + run the main job)
# and `make test` (set up + run the whole test suite, as CI does).
PYTHON ?= python3
VENV ?= .venv
# torch 2.13 (CI gets the local CPU wheel). CPU-only elsewhere:
#   TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
TORCH ?= torch==2.13.0
SHARED_OMNIGLOT := $(abspath ../shared/data/omniglot)
# Use the shared Omniglot copy when it sits beside the checkout; otherwise the loader downloads it.
export DISTMETA_OMNIGLOT ?= $(if $(wildcard $(SHARED_OMNIGLOT)/images_background.zip),$(SHARED_OMNIGLOT),)
SHARED_TATOEBA := $(abspath ../shared/data/translation/tatoeba_x2en.parquet)
export DISTMETA_TRANSLATION ?= $(wildcard $(SHARED_TATOEBA))

.PHONY: setup train test bench
setup: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet $(TORCH)
	$(VENV)/bin/pip install --quiet -e ".[test]"
	touch $@

train: setup
	$(VENV)/bin/distmeta train jobs/omniglot_5w1s_smoke.yaml --workers 2

test: setup
	$(VENV)/bin/python -m pytest -q

# The benchmark runs in its own venv with the anchors (learn2learn, TorchOpt, higher) beside distmeta.
bench:
	bash bench/install_anchors.sh .venv-bench/bin/python
	.venv-bench/bin/pip install --quiet -c bench/constraints.txt pyyaml tensorboardX matplotlib
	.venv-bench/bin/pip install --quiet --no-deps -e .
	.venv-bench/bin/python bench/meta_step.py
