# make repro   set up (apt + .venv) and run the pipeline: `dvc repro` on params.yaml
# make repro PRESET=cpu   the CPU preset (finishes in minutes on 2 cores) as a DVC experiment
# make test    set up and run the test suite
SHELL := /bin/bash
VENV ?= .venv
STAMP := $(VENV)/.installed
export PATH := $(abspath $(VENV))/bin:$(PATH)

# The CPU preset: a small U-Net, short training, a smaller sample matrix.
CPU_PRESET := -S model.ch=16 -S model.num_res_blocks=1 -S 'model.attn_resolutions=[7]' \
	-S train.steps=600 -S train.batch_size=64 -S train.warmup_steps=100 \
	-S '~train.ema' -S '+train.ema={kind: fixed, decay: 0.995}' -S train.ema_snapshot_every=50 \
	-S train.checkpoint_every=200 \
	-S classifier.steps=300 -S classifier.batch_size=128 \
	-S 'sample.steps=[10,20]' -S sample.num_samples=400 -S sample.batch_size=400 -S fid.kid_subset_size=200 \
	-S nll.num_images=16 -S nll.batch_size=16

.PHONY: setup repro test clean-venv

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
ifeq ($(PRESET),cpu)
	dvc exp run $(CPU_PRESET)
else
	dvc repro
endif

test: setup
	python -m pytest

clean-venv:
	rm -rf $(VENV)
