# `make run` and `make test` create the environment when it is missing; the stamp
# file makes them quick no-ops afterwards until pyproject.toml or the lock changes.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: venv run test bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[test]'
	touch $@

venv: $(STAMP)

run: $(STAMP)
	$(BIN)/python -m stages.demo --params params.yaml

test: $(STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python benchmarks/text_truncation.py
	$(BIN)/python benchmarks/batched_experts.py
	$(BIN)/python benchmarks/train_step.py

clean:
	rm -rf $(VENV) *.egg-info
