# The two commands a newcomer needs (see README): `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STORAGE ?= runs/demo

.PHONY: setup java demo test lint format bench clean-demo

$(VENV)/.installed: pyproject.toml requirements-ci.txt
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
