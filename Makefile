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

.PHONY: help setup shards inspect verify train eval all test bench clean

help:
	@echo "make setup    create .venv with the pinned requirements"
	@echo "make shards   render $(DATA) from $(SHARDS_CONFIG) (WORKERS=$(WORKERS), ENGINE=$(ENGINE))"
	@echo "make inspect  summary of $(DATA) and a contact sheet of its first test sample"
	@echo "make train    train on $(DATA) with $(TRAIN_CONFIG) into $(RUN)"
	@echo "make eval     evaluate $(RUN)/best.pt on the test split against baselines"
	@echo "make all      setup, shards, train, eval on the embedded default data"
	@echo "make test     run the test suite"
	@echo "make bench    run the benchmarks in bench/"

setup: $(STAMP)

$(STAMP): requirements.txt
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt
	touch $(STAMP)

shards: $(STAMP)
	$(BIN)/python -m pipeline render --config $(SHARDS_CONFIG) --out $(DATA) --workers $(WORKERS) --engine $(ENGINE)

inspect: $(STAMP)
	$(BIN)/python -m pipeline inspect $(DATA)
	$(BIN)/python -m pipeline inspect $(DATA) --split test --index 0 --out $(DATA)-sample.png

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

clean:
	rm -rf $(VENV)
