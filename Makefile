# Two commands do all the set-up on a fresh machine:
#   make demo   create .venv, install, run the whole workflow on the built-in demo brains
#   make test   create .venv, install, run the linters (make lint), then the test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(abspath $(VENV))/bin
STAMP := $(VENV)/.installed
# The workflow's shell rules call `cytonet`, so the venv comes first on PATH.
export PATH := $(BIN):$(PATH)

.PHONY: venv demo test lint pytest dry-run report clean-results

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[workflow,dev]'
	@touch $(STAMP)

venv: $(STAMP)

demo: venv
	$(BIN)/snakemake --profile profiles/local
	$(BIN)/snakemake --profile profiles/local --report results/report.html
	@echo
	@echo "Done. Results are in $(CURDIR)/results/ and the demo brains in $(CURDIR)/resources/demo/:"
	@echo "  results/report.html                 everything below in one HTML report"
	@echo "  results/evaluation/summary.md       CytoNet vs baselines on known and unknown brains"
	@echo "  results/summary/                    section metrics per brain, maps index, montage per brain"
	@echo "  results/maps/cytonet/<brain>/       OME-Zarr probabilities, area/entropy maps, overlays"
	@echo "  results/embedding/                  UMAP plots and FA-PB separation"
	@echo "  results/masks/<brain>/*_qc.png      tissue masks over the sections"
	@echo "  resources/demo/previews/*.png       one section per demo brain beside its area ground truth"

report: venv
	$(BIN)/snakemake --profile profiles/local --report results/report.html
	@echo "Report: $(CURDIR)/results/report.html"

dry-run: venv
	$(BIN)/snakemake --profile profiles/local -n

# ruff (pyproject.toml [tool.ruff]), snakefmt (pyproject.toml [tool.snakefmt]) and Snakemake's own linter on the
# default (demo) config; `snakemake --lint` exits non-zero on any finding.
lint: venv
	$(BIN)/ruff check cytonet tests benchmarks scripts
	$(BIN)/snakefmt --check Snakefile workflow/rules
	$(BIN)/snakemake --lint

# CI (`bash .ci/run`) runs `make test`: the linters first, then the test suite.
test: lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The test suite alone, without the linters.
pytest: venv
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean-results:
	rm -rf results .snakemake
