# Burst deblurring: offline shards + streaming trainer. `make help` lists the targets.
SHELL := /bin/bash
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
SHARDS_CONFIG ?= configs/shards/default.toml
TRAIN_CONFIG  ?= configs/train/default.toml
DATA    ?= shards/default
RUN     ?= runs/default
WORKERS ?= 2
ENGINE  ?= ray

.PHONY: help setup shards inspect verify train eval all test bench quality pretrained gpu-session clean

help:
	@echo "make setup    create .venv with the pinned requirements and the package (editable)"
	@echo "make shards   render $(DATA) from $(SHARDS_CONFIG) (WORKERS=$(WORKERS), ENGINE=$(ENGINE))"
	@echo "make inspect  summary of $(DATA) and a contact sheet of a test sample of median blur"
	@echo "make train    train on $(DATA) with $(TRAIN_CONFIG) into $(RUN)"
	@echo "make eval     evaluate $(RUN)/best.pt on the test split against baselines"
	@echo "make all      setup, shards, train, eval on the embedded default data"
	@echo "make test     run the test suite"
	@echo "make bench    run the benchmarks in bench/"
	@echo "make quality  the quality benchmark: shipped and make-all models vs FBA on real photos"
	@echo "make pretrained  reproduce the shipped model models/burst-deblur.pt (four stages, ~2 h on a CPU)"
	@echo "make gpu-session  one timed GPU session (render, train benchmark, deblur timing, training) into $(GPU_OUT)"

setup: $(STAMP)

# The pinned lock first, then this project as an editable package (its own dependencies are
# ranges that the lock satisfies: --no-deps), so the console scripts exist and imports work
# from any directory.
$(STAMP): requirements.txt pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

shards: $(STAMP)
	$(BIN)/python -m pipeline render --config $(SHARDS_CONFIG) --out $(DATA) --workers $(WORKERS) --engine $(ENGINE)

inspect: $(STAMP)
	$(BIN)/python -m pipeline inspect $(DATA)
	$(BIN)/python -m pipeline inspect $(DATA) --sheet --split test --out $(DATA)-sample.png

verify: $(STAMP)
	$(BIN)/python -m pipeline verify $(DATA)

# A second `make train` resumes the run in $(RUN) (and does nothing if it is finished).
train: $(STAMP)
	$(BIN)/python -m trainer train --config $(TRAIN_CONFIG) --data $(DATA) --out $(RUN) \
		$(if $(wildcard $(RUN)/last.pt),--resume)

eval: $(STAMP)
	$(BIN)/python -m trainer evaluate --checkpoint $(RUN)/best.pt --data $(DATA) --split test --out $(RUN)/eval

all: setup shards inspect train eval

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

bench: $(STAMP)
	$(BIN)/python bench/bench_render.py
	$(BIN)/python bench/bench_train.py --device cpu --batch 2 --size 64 --width 16 --steps 3
	$(BIN)/python bench/bench_deblur.py
	$(BIN)/python bench/bench_warp.py

# The quality benchmark (bench/quality.py): the shipped model and the `make all` model against
# FBA, the mean and the best frame on four renderings of the test photographs.
quality: $(STAMP)
	$(BIN)/python bench/quality.py --checkpoint shipped=models/burst-deblur.pt \
		$(if $(wildcard $(RUN)/best.pt),--checkpoint make-all=$(RUN)/best.pt) --workers $(WORKERS)

# The shipped model, in five stages (each resumes): train a "mean" base on shards/pretrained,
# grow it into a "select" base and fine-tune on shards/finetune, then grow that into
# "select_fba" and train only the FBA candidate's logit (same data), then give that logit the
# misalignment cue and train only the two (same data), then fine-tune every weight on
# shards/photomix (half bundled training photographs, half dead leaves); export weights + config.
pretrained: $(STAMP)
	$(BIN)/python -m pipeline render --config configs/shards/pretrained.toml --out shards/pretrained \
		--workers $(WORKERS) --engine $(ENGINE)
	$(BIN)/python -m trainer train --config configs/train/pretrained.toml --data shards/pretrained \
		--out runs/pretrained $(if $(wildcard runs/pretrained/last.pt),--resume)
	$(BIN)/python -m pipeline render --config configs/shards/finetune.toml --out shards/finetune \
		--workers $(WORKERS) --engine $(ENGINE)
	$(BIN)/python -m trainer train --config configs/train/finetune.toml --data shards/finetune \
		--out runs/pretrained-ft $(if $(wildcard runs/pretrained-ft/last.pt),--resume)
	$(BIN)/python -m trainer train --config configs/train/fba_head.toml --data shards/finetune \
		--out runs/pretrained-fba $(if $(wildcard runs/pretrained-fba/last.pt),--resume)
	$(BIN)/python -m trainer train --config configs/train/fba_cue.toml --data shards/finetune \
		--out runs/pretrained-cue $(if $(wildcard runs/pretrained-cue/last.pt),--resume)
	$(BIN)/python -m pipeline render --config configs/shards/photomix.toml --out shards/photomix \
		--workers $(WORKERS) --engine $(ENGINE)
	$(BIN)/python -m trainer train --config configs/train/photomix.toml --data shards/photomix \
		--out runs/pretrained-photo $(if $(wildcard runs/pretrained-photo/last.pt),--resume)
	$(BIN)/python -m trainer export --checkpoint runs/pretrained-photo/best.pt --out models/burst-deblur.pt

# One GPU session inside GPU_BUDGET seconds (bench/gpu_session.py; docs/benchmarks.md, GPU section).
# GPU_ARGS=--tiny runs it at tiny size on a CPU in about a minute.
GPU_OUT    ?= runs/gpu-session
GPU_BUDGET ?= 600
GPU_ARGS   ?=
gpu-session: $(STAMP)
	$(BIN)/python bench/gpu_session.py --budget-s $(GPU_BUDGET) --out $(GPU_OUT) $(GPU_ARGS)

clean:
	rm -rf $(VENV)
