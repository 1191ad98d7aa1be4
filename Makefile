# Human entry points. Each target sets up its own virtual environment on first use.
# torch is pinned for this machine (a CPU build lies on its disk); the package itself
# declares torch>=2.8.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# timm needs torchvision, and the registry's torchvision loads only beside the registry's own
# torch builds (CUDA builds, which run on the CPU), never beside the CPU build pinned above.
# So timm's tests run in a second environment with such a pair (on this machine's disk for
# Python 3.11; about 3 minutes and 5.5 GB on x86_64): `pytest -m zoo` there.
ZOO := .venv-zoo
ZOO_STAMP := $(ZOO)/.installed
ifeq ($(shell uname -m),aarch64)
ZOO_TORCH ?= torch==2.9.1 torchvision==0.24.1
else
ZOO_TORCH ?= torch==2.14.1 torchvision==0.29.1
endif

# The oldest torch the package supports (pyproject: torch>=2.8; docs/development.md,
# "Supported PyTorch versions") and the newest the registry offers, each in its own environment,
# running the main suite without its slow tests. The registry holds only CUDA builds of
# these (about 5 GB each, downloaded); PIP_CONFIG_FILE=/dev/null steps past this machine's
# pip cap at torch 2.14.1.
VERSIONS ?= 2.8.0 2.15.0

.PHONY: demo test test-versions lint typecheck format bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev,cli]"
	touch $(STAMP)

$(ZOO_STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(ZOO)
	$(ZOO)/bin/pip install -q --upgrade pip
	$(ZOO)/bin/pip install -q $(ZOO_TORCH)
	$(ZOO)/bin/pip install -q -e ".[zoo]"
	touch $(ZOO_STAMP)

demo: $(STAMP)
	$(BIN)/torchmesa demo

test: $(STAMP) $(ZOO_STAMP) lint typecheck
	$(BIN)/python -m pytest
	$(ZOO)/bin/python -m pytest -m "zoo or all_environments" tests/zoo tests/test_script_names.py

test-versions:
	set -e; for v in $(VERSIONS); do \
	  env=.venv-torch$$v; \
	  test -f $$env/.installed || { \
	    $(PYTHON) -m venv $$env && \
	    PIP_CONFIG_FILE=/dev/null $$env/bin/pip install -q "torch==$$v" && \
	    PIP_CONFIG_FILE=/dev/null $$env/bin/pip install -q -e ".[dev]" "torch==$$v" && \
	    touch $$env/.installed; }; \
	  echo "== torch $$v"; \
	  $$env/bin/python -m pytest -q -m "not slow and not zoo" -p no:cacheprovider; \
	done

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) $(ZOO) .venv-torch* .pytest_cache .ruff_cache .mypy_cache src/*.egg-info
