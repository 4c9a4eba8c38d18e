# make repro              set up (apt + .venv) and run the pipeline: with a CUDA GPU the full
#                         experiment (params.yaml), without one the CPU preset (it says so)
# make repro PRESET=full  the full experiment, `dvc repro` on params.yaml (hours on a CPU)
# make repro PRESET=cpu   the CPU preset (minutes on 2 cores) as a DVC experiment (python -m pipeline exp-run)
# make ui                 the MLflow UI on this workspace's runs (python -m pipeline ui): prints their address
# make test               set up and run the whole test suite (what CI runs), on TEST_WORKERS
#                         pytest-xdist workers, with the 25 slowest tests at the end
# make test-fast          the math, library and CLI tests (not marked slow): the loop while editing
# make gpu-check          the GPU figures in one run (≤ 8 min; .venv's Python, else the system python3: no install);
#                         GPU_CHECK_ARGS=--dry-run tries its code paths on a CPU in about a minute
# make docs               set up and build the docs site into site/ (mkdocs --strict, offline; open site/index.html)
SHELL := /bin/bash
VENV ?= .venv
STAMP := $(VENV)/.installed
export PATH := $(abspath $(VENV))/bin:$(PATH)

# The CPU preset: a small U-Net, short training, a smaller sample matrix.
CPU_PRESET := -S prediction=v -S model.ch=16 -S model.num_res_blocks=1 -S 'model.attn_resolutions=[7]' \
	-S model.dropout=0.0 -S train.steps=1200 -S train.batch_size=64 -S train.lr=2.0e-3 -S train.warmup_steps=100 \
	-S train.ema_snapshot_every=100 -S train.checkpoint_every=300 \
	-S classifier.arch.width=16 -S classifier.steps=1000 -S classifier.batch_size=128 -S classifier.lr=3.0e-3 \
	-S 'sample.steps=[10,20]' -S sample.num_samples=400 -S sample.batch_size=400 -S fid.kid_subset_size=200 \
	-S nll.num_images=16 -S nll.batch_size=16

# auto: full with CUDA, cpu without
PRESET ?= auto
DVC ?= dvc
# dvc exp run, its params checked first and DVC's warning for every output of a fresh clone one line
EXP_RUN ?= python -m pipeline exp-run

.PHONY: setup repro ui test test-deps test-fast gpu-check docs clean-venv

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	@if [ ! -d /usr/share/datasets/fashion-mnist ]; then \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist; \
	fi
	@[ -x $(VENV)/bin/python ] || python3 -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -r requirements.txt
	@# the project itself, editable: `python -m pipeline` and `ddpm-pipeline` from any directory
	$(VENV)/bin/python -m pip install -q --no-deps --no-build-isolation -e .
	@touch $(STAMP)

repro: setup
	@preset=$(PRESET); \
	if [ "$$preset" = auto ]; then \
		if python -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then preset=full; else \
			echo "make repro: no CUDA GPU here, so this runs the CPU preset (a small U-Net, short training: minutes on 2 cores)."; \
			echo "make repro: the full experiment of params.yaml is sized for a GPU (hours on a CPU): make repro PRESET=full"; \
			preset=cpu; \
		fi; \
	fi; \
	case "$$preset" in \
		full) echo "+ $(DVC) repro"; $(DVC) repro ;; \
		cpu) echo "+ $(EXP_RUN) $(CPU_PRESET)"; $(EXP_RUN) $(CPU_PRESET) ;; \
		*) echo "make repro: unknown PRESET=$$preset; choose full, cpu or auto" >&2; exit 2 ;; \
	esac || exit $$?; \
	echo; \
	echo "make repro: done. Where the results are:"; \
	echo "  reports/report.html           the report: open it in a browser (reports/report.md beside it)"; \
	echo "  python -m pipeline exp-show   the experiments in one screen: best FID, key metrics, changed params"; \
	echo "  make ui                       the MLflow UI (= python -m pipeline ui): prints the address of the training runs"

ui: setup
	python -m pipeline ui

GPU_CHECK_ARGS ?=
gpu-check:
	@py=$$([ -x $(VENV)/bin/python ] && echo $(VENV)/bin/python || echo python3); \
	echo "+ $$py -m benchmarks gpu-check --out gpu-check $(GPU_CHECK_ARGS)"; \
	$$py -m benchmarks gpu-check --out gpu-check $(GPU_CHECK_ARGS)

# one xdist worker per core, at most 4 (the suite is sized for 2 cores: CI's); TEST_WORKERS=0 runs
# in one process. --dist loadfile runs each test file whole on one worker (its module fixtures
# built once), --no-loadscope-reorder keeps conftest's order (the end-to-end chains first).
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); [ $$n -gt 4 ] && n=4; echo $$n)
PYTEST_PARALLEL = -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# the tests' own Debian packages (never needed by make repro): SLURM and munge for tests/test_slurm.py, which
# starts a single-node cluster (it is skipped, with the reason, where they cannot be installed)
test-deps:
	@if ! command -v sbatch >/dev/null || [ ! -x /usr/sbin/munged ]; then \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO apt-get install -y -qq slurm-wlm munge >/dev/null 2>&1 || \
		{ $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq slurm-wlm munge >/dev/null 2>&1; } || \
		echo "make test: could not install slurm-wlm and munge: the SLURM tests will be skipped"; \
	fi

test: setup test-deps
	python -m pytest $(PYTEST_PARALLEL) --durations=25 $(PYTEST_ARGS)

test-fast: setup
	python -m pytest $(PYTEST_PARALLEL) -m "not slow" --durations=10 $(PYTEST_ARGS)

# the docs site: docs/ plus the reference pages generated from the code (scripts/docs_site.py, a hook);
# --strict: a broken link, a missing page or anchor fails. NO_MKDOCS_2_WARNING: no banner about MkDocs 2.
docs: setup
	NO_MKDOCS_2_WARNING=1 python -m mkdocs build --strict

clean-venv:
	rm -rf $(VENV)
