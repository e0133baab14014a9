# The two commands a newcomer needs (see README): `make demo` and `make test`.
# A Python the whole stack supports: 3.10 to 3.13 (CI runs 3.11). The first of these found on
# PATH is used; `make setup PY=/path/to/python3.12` picks another.
SUPPORTED := (3, 10) <= sys.version_info[:2] <= (3, 13)
PY ?= $(firstword $(foreach p,python3.11 python3.12 python3.13 python3.10 python3,\
	$(shell command -v $(p) >/dev/null 2>&1 && $(p) -c 'import sys; sys.exit(not ($(SUPPORTED)))' \
	2>/dev/null && echo $(p))))
VENV ?= .venv
BIN := $(VENV)/bin
STORAGE ?= runs/demo

.PHONY: setup java demo test lint format bench clean-demo

$(VENV)/.installed: pyproject.toml requirements-ci.txt
	@test -n "$(PY)" || { echo "error: no Python 3.10 to 3.13 on PATH: install one (e.g. python3.11) or run make PY=/path/to/python3.11"; exit 1; }
	@$(PY) -c 'import sys; v = "%d.%d" % sys.version_info[:2]; sys.exit(0 if $(SUPPORTED) else f"error: $(PY) is Python {v}; owl supports 3.10 to 3.13: run make PY=python3.11 (or another 3.10-3.13)")'
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch==2.13.0 is the CPU wheel; GPU users install their CUDA build of torch first.
	$(BIN)/pip install -q torch==2.13.0 -r requirements-ci.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $@

setup: $(VENV)/.installed java

# Caption metrics run COCO's PTB tokenizer, a Java program: without Java they are refused.
java:
	@command -v java >/dev/null 2>&1 || { echo "java not found: caption metrics need it; install a JRE (e.g. sudo apt-get install default-jre-headless)"; exit 1; }

demo: setup
	$(BIN)/owl run jobs/demo.yaml --set storage=$(STORAGE)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: setup lint
	$(BIN)/pytest -q

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: setup
	@echo "see BENCHMARKS.md for each benchmark's command"

clean-demo:
	rm -rf $(STORAGE)
