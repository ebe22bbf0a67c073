# `make run` and `make test` create the environment when it is missing; the stamp
# file makes them quick no-ops afterwards until pyproject.toml or the lock changes.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: venv run test test-fast lint bench clean compare plots figures

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[pipeline,test]'
	touch $@

# `dvc plots show` fills this page (.dvc/config: plots.html_template): the vega libraries inlined, no CDN
PLOTS_PAGE := .dvc/offline-plots.html
$(PLOTS_PAGE): $(STAMP) scripts/plots.py
	$(BIN)/python scripts/plots.py template --out $@

venv: $(STAMP) $(PLOTS_PAGE)

# params.yaml from conf/ first (stages/compose.py); then what a Prefect flow run already made for these settings
# is taken from its store (flows/exchange.py, nothing without a store); DVC runs each stage's
# `python -m stages.<name>`: the environment's python must come first on PATH.
run: $(STAMP) $(PLOTS_PAGE)
	$(BIN)/python -m stages.compose
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m flows.exchange restore
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro
	$(BIN)/python -m stages.report --summary-only --reports reports

# Two pytest workers (pytest-xdist), one torch thread each (tests/conftest.py). A file's tests run on one worker
# (its fixtures are built once), files handed out in collection order: the slow tier's first (tests/conftest.py)
TWO_WORKERS := -n 2 --dist loadfile --no-loadscope-reorder
test: $(STAMP)
	$(BIN)/python -m pytest $(TWO_WORKERS)

# everything but the slow tier (DVC projects, a Prefect server): a quicker loop while working
test-fast: $(STAMP)
	$(BIN)/python -m pytest $(TWO_WORKERS) -m "not slow"

# ruff (lint and format) and mypy on everything (settings in pyproject.toml)
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# The plots of the last run: dvc_plots/index.html (offline), and PNG renders for README (docs/figures/).
plots: $(STAMP) $(PLOTS_PAGE)
	$(BIN)/dvc plots show

figures: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python scripts/plots.py figures --out docs/figures

bench: $(STAMP)
	$(BIN)/python benchmarks/text_truncation.py
	$(BIN)/python benchmarks/batched_experts.py
	$(BIN)/python benchmarks/train_step.py
	$(BIN)/python benchmarks/frozen_prefix.py
	$(BIN)/python benchmarks/prefect_vs_dvc.py

clean:
	rm -rf $(VENV) *.egg-info

# Every experiment (dvc exp run, the queue) as one Markdown table of what matters: the params that
# differ most often and each method's metrics. Add a param with KEEP='...|retrieval\.k'; experiments
# made on earlier commits with ARGS=-A (DVC shows those of the current commit by default).
KEEP ?= seed|expert\.kind|train\.(templates_per_step|negatives)|retrieval\.(k|temperature)|benchmark\.preset
compare: $(STAMP)
	COLUMNS=400 $(BIN)/dvc exp show --no-pager --md --drop '.*' \
		--keep 'Experiment|$(KEEP)|(zeroshot|finetune|oracle|moder|no_composition)\.(transfer|transfer_new|avg|last|future)|composition\.transfer(_new)?|hub\.parameters' $(ARGS)


# The suite (docs/suite.md, docs/suite.csv): 9 embedded worlds x test seeds 0-4 as queued DVC experiments, two at
# a time with one thread each (scripts/run_suite.py says why), one run again at two threads, then the table.
# Defaults are chosen on other seeds: scripts/validate.py.
.PHONY: suite
suite: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/python scripts/run_suite.py --jobs 2

# The ablation (docs/ablation.md): one change to the defaults per row, both embedded sequences, seeds 0-2, run
# as the suite is.
.PHONY: ablation
ablation: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/python scripts/run_ablation.py --jobs 2

# The real MTIL Order I and Split ImageNet-R shapes through the stage functions on the CPU: time, memory and
# sizes per stage (BENCHMARKS.md, "MTIL-scale run"). One epoch, extrapolated to params.yaml's; hours longer without.
.PHONY: bench-scale
bench-scale: $(STAMP)
	$(BIN)/python benchmarks/mtil_scale.py --sequence mtil-order1 --epochs 1
	$(BIN)/python benchmarks/mtil_scale.py --sequence classil-imagenet-r --epochs 1
