#!/usr/bin/env bash
# What only a GPU can show: the CUDA paths end to end, and throughput on real hardware.
#
#   bash bench/gpu_check.sh e2e     # demo on the GPU; encode in bf16 on CUDA; torchrun (NCCL)
#                                   # training with --data gpu --compile, resumed; sampling in bf16
#   bash bench/gpu_check.sh bench   # bench_train (DiT-XL/2, DiT-B/2; eager, compiled, --data gpu),
#                                   # bench_encode (SD-VAE layout, 256 px, bf16), bench_sample
#                                   # (DiT-XL/2 + SD-VAE decoder, bf16), bench_store on the host
#   bash bench/gpu_check.sh next    # not yet run on a GPU: encode over 16,384 images, eager and
#                                   # --compile; DiT-XL/2 at batch 128, compiled, logging every 5
#                                   # steps (no sync per step), --data memory and --data gpu
#
# Run from the repository root with torch (CUDA build), diffusers, zarr and webdataset importable
# (`pip install -e .` with a CUDA torch, or PYTHONPATH). Logs to $OUT (default /tmp/gpu_check):
# one log per part and the demo's grid and report. SMALL=1 shrinks every size to check the script
# itself on a CPU machine (its figures mean nothing).
set -uo pipefail
part=${1:?usage: bash bench/gpu_check.sh e2e|bench|next}
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
T=$(mktemp -d)
PY=${PY:-python3}
LOG="$OUT/$part.log"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
failed=0

if [[ ${SMALL:-0} == 1 ]]; then
  DEV=cpu STEPS=6 XL=DiT-S/8 B=DiT-S/8 TB=8 ENC_IMAGES=32 ENC_CH=16,32,32,32 ENC_BS=8 ENC_W=1
  DEMO=(--quick) SAMPLE_ARGS=(--model DiT-S/8 --latent-size 8 --images 8 --rows euler:2:8)
  STORE_N=4096 COMPILE=() DATA_GPU=memory LONG=64 TB_NEXT=8
else
  DEV=cuda STEPS=300 XL=DiT-XL/2 B=DiT-B/2 TB=64 ENC_IMAGES=4096 ENC_CH=128,256,512,512 ENC_BS=128
  ENC_W=12 DEMO=() STORE_N=262144 COMPILE=(--compile) DATA_GPU=gpu LONG=16384 TB_NEXT=128
  SAMPLE_ARGS=(--model DiT-XL/2 --latent-size 32 --sd-vae --images 256
               --rows euler:2:64,heun:50:64,euler:50:128,heun:50:256)
fi

step() {  # step NAME CMD...: run with a time limit, log it, keep going on failure
  local name=$1 t0=$SECONDS rc
  shift
  echo "=== $name: $*" | tee -a "$LOG"
  timeout "${LIMIT:-400}" "$@" >>"$LOG" 2>&1
  rc=$?
  echo "=== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$LOG"
  [[ $rc == 0 ]] || failed=1
}

{
  date -u
  nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"
  $PY -c "import torch, diffusers, zarr; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'diffusers', diffusers.__version__, 'zarr', zarr.__version__)"
  nproc
} >>"$LOG" 2>&1

if [[ $part == e2e ]]; then
  D=$T/demo
  # the whole demo; its train and sample steps pick CUDA (bf16 autocast) when it is there
  step demo $PY cli.py demo --out "$D" "${DEMO[@]}"
  cp "$D/grid.png" "$OUT/demo_grid.png" 2>/dev/null
  cp "$D/report.json" "$OUT/demo_report.json" 2>/dev/null
  # the demo's images again, encoded on the GPU in bf16 (the demo encodes on the CPU in fp32)
  step encode_cuda_bf16 $PY cli.py encode "$D/data/train" --out "$T/gpu.zarr" \
    --vae demo/assets/vae --image-size 32 --classes "$D/data/LOC_synset_mapping.txt" \
    --device "$DEV" --dtype bf16 --workers 4 --batch-size 500 --shard-size 1024 --chunk-size 256
  step validate $PY cli.py validate "$T/gpu.zarr" --decode-check 64
  step compare_stores $PY - "$D/store.zarr" "$T/gpu.zarr" <<'EOF'
import sys
import numpy as np
from latent_store import load_latents
x, y = (load_latents(p) for p in sys.argv[1:3])
assert (x.labels == y.labels).all(), "labels differ"
a = x.latents
d = np.abs(a.astype(np.int16) - y.latents.astype(np.int16))
print(f"bf16 CUDA vs fp32 CPU codes: {(d == 0).mean():.4f} equal, {(d <= 1).mean():.4f} within 1, "
      f"max |diff| {d.max()} (uint8 codes; {a.size} values)")
EOF
  # training through torchrun (NCCL on a GPU), data on the GPU, compiled; then resumed
  train=(--store "$T/gpu.zarr" --run "$T/run" --model DiT-S/2 --hidden-size 128 --depth 4
         --num-heads 4 --batch-size 64 --lr 0.002 --warmup-steps 50 --ema-decay 0.99
         --data "$DATA_GPU" "${COMPILE[@]}" --log-every 50 --ckpt-every 100)
  step train_torchrun $PY -m torch.distributed.run --standalone --nproc_per_node=1 cli.py -- \
    train "${train[@]}" --steps "$STEPS"
  step train_resume $PY -m torch.distributed.run --standalone --nproc_per_node=1 cli.py -- \
    train "${train[@]}" --steps $((STEPS + 100))
  grep -h '"step"' "$T/run/log.jsonl" | tail -n 3 >>"$LOG"
  step sample_bf16 $PY cli.py sample "$T/run" --out "$T/samples" --vae demo/assets/vae \
    --class 0 --class 5 --n 8 --steps 20 --cfg 2.0 --device "$DEV" --precision bf16
fi

if [[ $part == bench ]]; then
  tb=(--batch-size "$TB" --steps 10 --warmup 3 --samples 2048)
  step train_eager $PY bench/bench_train.py --models "$XL" "$B" "${tb[@]}"
  step train_compiled $PY bench/bench_train.py --models "$XL" "${tb[@]}" "${COMPILE[@]}"
  step train_data_gpu $PY bench/bench_train.py --models "$XL" "${tb[@]}" --data "$DATA_GPU"
  step encode $PY bench/bench_encode.py --images "$ENC_IMAGES" --channels "$ENC_CH" --dtype bf16 \
    --batch-size "$ENC_BS" --workers "$ENC_W" --threads 4 --device "$DEV"
  step sample $PY bench/bench_sample.py "${SAMPLE_ARGS[@]}" --cfg 4 --device "$DEV" \
    --precision bf16
  step store $PY bench/bench_store.py --samples "$STORE_N" --out "$T/bench_store.zarr"
fi

if [[ $part == next ]]; then
  enc=(--images "$LONG" --channels "$ENC_CH" --dtype bf16 --batch-size "$ENC_BS" --workers "$ENC_W"
       --threads 4 --device "$DEV")
  step encode_long $PY bench/bench_encode.py "${enc[@]}"
  step encode_long_compiled $PY bench/bench_encode.py "${enc[@]}" "${COMPILE[@]}"
  tn=(--models "$XL" --batch-size "$TB_NEXT" --steps 15 --warmup 5 --log-every 5 --samples 4096)
  step train_unsynced $PY bench/bench_train.py "${tn[@]}" "${COMPILE[@]}"
  step train_unsynced_data_gpu $PY bench/bench_train.py "${tn[@]}" "${COMPILE[@]}" --data "$DATA_GPU"
fi

rm -rf "$T"
echo "=== $part done; failed=$failed" | tee -a "$LOG"
exit $failed
