# The two commands a newcomer needs (see README): `make demo` and `make test`.
# A Python the whole stack supports: 3.10 to 3.13 (CI runs 3.11, and tests/unit on 3.13 with
# `make test-newest` below). The first of these found on PATH is used; `make setup
# PY=/path/to/python3.12` picks another.
SUPPORTED := (3, 10) <= sys.version_info[:2] <= (3, 13)
PY ?= $(firstword $(foreach p,python3.11 python3.12 python3.13 python3.10 python3,\
	$(shell command -v $(p) >/dev/null 2>&1 && $(p) -c 'import sys; sys.exit(not ($(SUPPORTED)))' \
	2>/dev/null && echo $(p))))
VENV ?= .venv
BIN := $(VENV)/bin
STORAGE ?= runs/demo

# `make test-newest`: the fast tests (tests/unit) on the newest supported Python, in their own
# environment (.venv-3.13), installed with uv (parallel downloads: on 3.13 PyPI's torch 2.13.0
# is the CUDA build, ~4 GB with its nvidia-* wheels). python3.13 on PATH or in pyenv;
# `make test-newest PY_NEWEST=/path/to/python3.13` picks another.
NEWEST := 3.13
UV_VERSION := 0.13.8
PY_NEWEST ?= $(firstword $(foreach p,python$(NEWEST) $(wildcard $(or $(PYENV_ROOT),$(HOME)/.pyenv)/versions/$(NEWEST)*/bin/python$(NEWEST)),\
	$(shell command -v $(p) >/dev/null 2>&1 && $(p) -c 'import sys; sys.exit("%d.%d" % sys.version_info[:2] != "$(NEWEST)")' \
	2>/dev/null && echo $(p))))
VENV_NEWEST ?= .venv-$(NEWEST)
BIN_NEWEST := $(VENV_NEWEST)/bin
# --system-certs: trust the machine's certificate store, as pip does (uv's default is its own
# bundled roots, which refuse a TLS-inspecting proxy whose CA only the machine trusts).
UV_INSTALL = $(BIN_NEWEST)/uv pip install -q --system-certs --python $(BIN_NEWEST)/python
# The two environments may be built at once (.ci/run): their editable installs both write
# owl.egg-info into the checkout, so they take turns (flock, where there is one).
TURN := $(if $(shell command -v flock),flock pyproject.toml)

.PHONY: setup java chromium demo test test-slow setup-newest test-newest lint format bench gpu-check clean-demo

$(VENV)/.installed: pyproject.toml requirements-ci.txt
	@test -n "$(PY)" || { echo "error: no Python 3.10 to 3.13 on PATH: install one (e.g. python3.11) or run make PY=/path/to/python3.11"; exit 1; }
	@$(PY) -c 'import sys; v = "%d.%d" % sys.version_info[:2]; sys.exit(0 if $(SUPPORTED) else f"error: $(PY) is Python {v}; owl supports 3.10 to 3.13: run make PY=python3.11 (or another 3.10-3.13)")'
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch==2.13.0 is the CPU wheel; GPU users install their CUDA build of torch first.
	$(BIN)/pip install -q torch==2.13.0 -r requirements-ci.txt
	$(TURN) $(BIN)/pip install -q --no-deps -e .
	touch $@

$(VENV_NEWEST)/.installed: pyproject.toml requirements-ci.txt
	@test -n "$(PY_NEWEST)" || { echo "error: no Python $(NEWEST) found (python$(NEWEST) on PATH, or pyenv's versions/$(NEWEST).*): install one (e.g. pyenv install $(NEWEST)) or run make test-newest PY_NEWEST=/path/to/python$(NEWEST)"; exit 1; }
	@$(PY_NEWEST) -c 'import sys; v = "%d.%d" % sys.version_info[:2]; sys.exit(0 if v == "$(NEWEST)" else f"error: $(PY_NEWEST) is Python {v}; make test-newest needs $(NEWEST): run make test-newest PY_NEWEST=/path/to/python$(NEWEST)")'
	$(PY_NEWEST) -m venv $(VENV_NEWEST)
	$(BIN_NEWEST)/pip install -q uv==$(UV_VERSION)
	# The same pins as .venv; torch==2.13.0 comes from PyPI (on $(NEWEST), its CUDA build).
	$(UV_INSTALL) torch==2.13.0 -r requirements-ci.txt
	$(TURN) $(UV_INSTALL) --no-deps -e .
	touch $@

# The fast tests (tests/unit) on Python $(NEWEST). CI (.ci/run) builds the environment
# (`make setup-newest`) while `make test` runs, and runs these tests after it.
setup-newest: $(VENV_NEWEST)/.installed

test-newest: $(VENV_NEWEST)/.installed
	$(BIN_NEWEST)/pytest -q tests/unit

setup: $(VENV)/.installed java

# Caption metrics run COCO's PTB tokenizer, a Java program: without Java they are refused.
java:
	@command -v java >/dev/null 2>&1 || { echo "java not found: caption metrics need it; install a JRE (e.g. sudo apt-get install default-jre-headless)"; exit 1; }

# The MLflow UI test (tests/integration/test_mlflow.py (its UI test)) opens owl's links in headless
# Chromium: installed with apt-get where that works (as root), else the test skips saying why.
chromium:
	@command -v chromium-headless-shell >/dev/null 2>&1 || command -v chromium >/dev/null 2>&1 || \
	{ [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium-headless-shell; } || \
	echo "chromium not installed: tests/integration/test_mlflow.py (its UI test) will skip (apt-get install chromium-headless-shell)"

demo: setup
	$(BIN)/owl run jobs/demo.yaml --set storage=$(STORAGE)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: setup chromium lint
	$(BIN)/pytest -q

# The slow tests (@pytest.mark.slow), which `make test` and a plain `pytest` leave out (pyproject's
# addopts: -m "not slow"). Each says in its docstring which test of the default run proves the
# same guarantee; run them when changing what they cover (ZeRO-3 stage 2, LoRA under ZeRO-3).
test-slow: setup
	$(BIN)/pytest -q -m slow

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: setup
	@echo "see BENCHMARKS.md for each benchmark's command"

# On one CUDA GPU, in under 8 minutes: the demo job in bf16 through owl run, the stage-2 step at
# 7B width (tokens/s, MFU, peak memory vs the memory plan), generation speed (BENCHMARKS.md,
# "The GPU check"). Prints a table; the results go to $(GPU_CHECK_OUT) as JSON.
GPU_CHECK_OUT ?= gpu-check.json
# Needs no Java: without it the job's caption metrics use the approximate tokenizer.
gpu-check: $(VENV)/.installed
	PYTHONPATH=$(CURDIR) $(BIN)/python bench/gpu_check.py --out $(GPU_CHECK_OUT)

clean-demo:
	rm -rf $(STORAGE)
