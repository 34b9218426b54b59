#!/usr/bin/env bash
# Sampling on one GPU, everything issue 17 asks to measure, in under 8 minutes; JSON under $OUT.
#
#   bash bench/gpu_sample.sh            # OUT=/tmp/gpu_sample by default
#   SMALL=1 bash bench/gpu_sample.sh    # the same steps at toy sizes on the CPU (checks the script)
#
# Steps, in order of importance (each gets the time left of BUDGET seconds, then is cut):
#   e2e       a tiny checkpoint through `latentdit sample` on the GPU: torchrun (NCCL, 1 rank)
#             against a plain run (same .npz bytes?), and --compile reduce-overhead (CUDA graphs)
#             and --cast-weights against eager (largest uint8 difference), --auto-batch against
#             the plain batch (same images within rounding?)                        -> e2e.json
#             sync points of `latentdit sample` by source line, without and with a guidance
#             interval (none expected between batches; one per model call with it) -> syncs.json
#   sweep     DiT-XL/2 + SD-VAE decoder, bf16: kernel classes of one guided DDPM step at batch 256
#             and of the decoder; DDPM 250 steps + cfg 1.5 at batch 256..1024 (6 or 4 timed steps,
#             projected to 250), eager and with cast bf16 weights                    -> sweep.json
#   auto      DiT-XL/2: --auto-batch 2048, the sampler's probe (guided call of 2b rows + decode
#             of b, doubling from 64, then bisecting); its trials, peak memory, the batch found,
#             and DDPM 250 + cfg 1.5 timed at that batch (2 steps, projected)          -> auto.json
#   heun      Heun 50 + cfg 1.8 guided on t in [0, 0.7] at batch 256 in full; Heun 50 + cfg 4
#             (the H100 row of bench/RESULTS.md) from 10 timed steps                  -> heun.json
#   compiled  eager against torch.compile reduce-overhead (CUDA graphs), then mode default:
#             DDPM 250 + cfg 1.5 at batch 512; compile time is `warmup_s`         -> compiled.json
#
# Run from the repository root with torch (CUDA build); diffusers comes from .whl/ when it is there
# (bash ../shared/gpu-wheels.sh, then carry [".whl"]). bench/gpu_all.sh runs this after gpu_perf.sh.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_sample}
mkdir -p "$OUT"
PY=${PY:-python3}
BUDGET=${BUDGET:-450}
if [[ -f .whl/INSTALL && -z ${WHEELS_INSTALLED:-} ]]; then  # the wheels the GPU image lacks
  # shellcheck disable=SC1091
  source .whl/INSTALL
fi
T=$(mktemp -d)
LOG="$OUT/gpu_sample.log"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
failed=0
start=$SECONDS

if [[ ${SMALL:-0} == 1 ]]; then
  DEV=cpu BIG=(--model DiT-S/8 --latent-size 8 --threads 2) N=12 BS=4
  SWEEP=ddpm:250:4:timed=2:cfg=1.5,ddpm:250:8:timed=2:cfg=1.5
  HEUN=heun:4:4:cfg=1.8:interval=0-0.7,heun:50:4:cfg=4:timed=2
  COMPILED=ddpm:250:4:timed=2:cfg=1.5 CG=compile:default
  AUTO=(--auto-batch 64 --auto-start 4 --rows ddpm:250:auto:timed=2:cfg=1.5)
else
  DEV=cuda BIG=(--model DiT-XL/2 --latent-size 32 --sd-vae) N=48 BS=16
  SWEEP=ddpm:250:256:timed=6:cfg=1.5,ddpm:250:512:timed=6:cfg=1.5,ddpm:250:1024:timed=4:cfg=1.5
  HEUN=heun:50:256:cfg=1.8:interval=0-0.7,heun:50:256:cfg=4:timed=10
  COMPILED=ddpm:250:512:timed=6:cfg=1.5 CG=compile:reduce-overhead,compile:default
  AUTO=(--auto-batch 2048 --auto-start 64 --rows ddpm:250:auto:timed=2:cfg=1.5)
fi

step() {  # step NAME CMD...: run within the time left, log it, keep going on failure
  local name=$1 t0=$SECONDS left rc
  shift
  left=$((BUDGET - (SECONDS - start)))
  if ((left < 20)); then
    echo "=== $name: skipped, budget spent" | tee -a "$LOG"
    failed=1
    return
  fi
  echo "=== $name ($left s left): $*" | tee -a "$LOG"
  timeout "$left" "$@" >>"$LOG" 2>&1
  rc=$?
  echo "=== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$LOG"
  [[ $rc == 0 ]] || failed=1
}

{
  date -u
  nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"
  $PY -c "import torch, diffusers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'diffusers', diffusers.__version__)"
} >>"$LOG" 2>&1

# --- e2e: the real command on the device --------------------------------------------------------
step e2e_setup $PY - "$T" <<'EOF'
import sys
from pathlib import Path
from testkit import make_checkpoint, make_tiny_vae
t = Path(sys.argv[1])
make_checkpoint(t / "run", make_tiny_vae(t / "vae"))
EOF
args=(sample "$T/run" --fid-samples "$N" --npz --no-png --batch-size "$BS" --steps 8 --cfg 2.0
      --device "$DEV")
step e2e_torchrun $PY -m torch.distributed.run --standalone --nproc_per_node=1 cli.py -- \
  "${args[@]}" --out "$T/torchrun"
step e2e_plain $PY cli.py "${args[@]}" --out "$T/plain"
step e2e_cuda_graphs $PY cli.py "${args[@]}" --out "$T/graphs" --compile reduce-overhead
step e2e_cast $PY cli.py "${args[@]}" --out "$T/cast" --cast-weights --precision bf16
step e2e_auto $PY cli.py "${args[@]}" --out "$T/auto" --auto-batch 64
step e2e_syncs $PY bench/sample_syncs.py "$T/run" --out "$T/syncs" --json "$OUT/syncs.json"
step e2e_compare $PY - "$T" "$OUT/e2e.json" "$LOG" <<'EOF'
import json, sys
from pathlib import Path
import numpy as np
t = Path(sys.argv[1])
npz = {d: next((t / d).glob("*.npz"), None) for d in ("torchrun", "plain", "graphs", "cast", "auto")}
report = {"npz": {d: str(p) if p else None for d, p in npz.items()}}
if npz["torchrun"] and npz["plain"]:
    report["torchrun_npz_equals_plain"] = npz["torchrun"].read_bytes() == npz["plain"].read_bytes()
for d in ("graphs", "cast", "auto"):
    if npz[d] and npz["plain"]:
        a, b = (np.load(npz[k])["arr_0"].astype(int) for k in (d, "plain"))
        report[f"{d}_vs_plain"] = {"max_abs_uint8": int(np.abs(a - b).max()),
                                   "equal_fraction": float((a == b).mean())}
log = Path(sys.argv[3]).read_text(errors="replace").splitlines()
report["auto_batch_log"] = [line for line in log if "sampler.batch_size" in line]
Path(sys.argv[2]).write_text(json.dumps(report, indent=2))
print(json.dumps(report))
EOF

# --- throughput at real sizes ---------------------------------------------------------------------
bench=($PY bench/bench_sample.py --device "$DEV" --precision bf16 "${BIG[@]}")
step sweep "${bench[@]}" --profile --rows "$SWEEP" --variants eager,cast --json "$OUT/sweep.json"
step auto "${bench[@]}" "${AUTO[@]}" --variants eager --json "$OUT/auto.json"
step heun "${bench[@]}" --rows "$HEUN" --variants eager --json "$OUT/heun.json"
step compiled "${bench[@]}" --rows "$COMPILED" --variants "eager,$CG" --json "$OUT/compiled.json"

rm -rf "$T"
echo "=== done in $((SECONDS - start)) s; failed=$failed" | tee -a "$LOG"
exit $failed
