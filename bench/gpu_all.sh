#!/usr/bin/env bash
# Issues 15 (encode), 16 (train) and 17 (sample) in ONE device call of under 8 minutes.
#
# A session lent a GPU has 15 minutes of device time in all, the machine's start and every idle
# second included, and one command may run 10 minutes: `gpu_perf.sh` (420 s) and `gpu_sample.sh`
# (450 s) one after the other do not fit. This driver runs both with budgets that do (each script
# runs its steps in order of importance and records the ones it had no time for as skipped), then
# packs what they wrote into a few files, because a device call brings back at most 8 files.
# Budgets: 300 s for encode + train (gpu_perf.sh: the long compiled encode, the DiT-XL/2 batch sweep
# and the two profiles come first), 180 s for sampling (gpu_sample.sh: e2e checks, then the sweep);
# the steps skipped are listed in perf_results.jsonl ("skipped": true) and the logs, for a second call.
#
#   bash ../shared/gpu-wheels.sh                      # here, once: diffusers, zarr, webdataset
#   run(command="bash bench/gpu_all.sh", carry=[".whl"], timeout_s=540)         # the device call
#   ONLY='bf16|cuda_graphs|encode_eager' PERF_BUDGET=240 SAMPLE_BUDGET=0 bash bench/gpu_all.sh
#                                       # a second call: the perf steps the first had no time for
#   SMALL=1 PERF_BUDGET=3000 SAMPLE_BUDGET=3000 bash bench/gpu_all.sh  # CPU dry run, toy sizes
#
# $OUT then holds: perf_results.jsonl and perf_table.txt (gpu_perf.sh), sample_results.json (every
# JSON gpu_sample.sh wrote, by file name), status.json (exit codes, seconds, budgets) and
# logs.tgz (both scripts' whole output folders, logs included).
set -uo pipefail
OUT=${OUT:-/tmp/gpu_all}
mkdir -p "$OUT"
PERF_BUDGET=${PERF_BUDGET:-300}
SAMPLE_BUDGET=${SAMPLE_BUDGET:-180}
PY=${PY:-python3}
export PY
W=$(mktemp -d)
start=$SECONDS
if [[ -f .whl/INSTALL ]]; then
  # shellcheck disable=SC1091
  source .whl/INSTALL  # installs into /tmp/site and exports PYTHONPATH for both scripts
  export WHEELS_INSTALLED=1
fi

perf_rc=skipped sample_rc=skipped perf_s=0 sample_s=0
if ((PERF_BUDGET > 0)); then
  t0=$SECONDS
  OUT=$W/perf BUDGET=$PERF_BUDGET bash bench/gpu_perf.sh
  perf_rc=$? perf_s=$((SECONDS - t0))
fi
if ((SAMPLE_BUDGET > 0)); then
  t0=$SECONDS
  OUT=$W/sample BUDGET=$SAMPLE_BUDGET bash bench/gpu_sample.sh
  sample_rc=$? sample_s=$((SECONDS - t0))
fi

[[ -f $W/perf/results.jsonl ]] && cp "$W/perf/results.jsonl" "$OUT/perf_results.jsonl"
[[ -f $W/perf/table.txt ]] && cp "$W/perf/table.txt" "$OUT/perf_table.txt"
$PY - "$W/sample" "$OUT/sample_results.json" <<'EOF'
import json, sys
from pathlib import Path
found = {}
for path in sorted(Path(sys.argv[1]).glob("*.json")):
    try:
        found[path.name] = json.loads(path.read_text())
    except ValueError as err:
        found[path.name] = {"unreadable": str(err)}
Path(sys.argv[2]).write_text(json.dumps(found, indent=2))
EOF
tar czf "$OUT/logs.tgz" -C "$W" .
cat >"$OUT/status.json" <<EOF
{"perf_exit": "$perf_rc", "perf_s": $perf_s, "perf_budget_s": $PERF_BUDGET,
 "sample_exit": "$sample_rc", "sample_s": $sample_s, "sample_budget_s": $SAMPLE_BUDGET,
 "total_s": $((SECONDS - start)), "small": "${SMALL:-0}"}
EOF
cat "$OUT/status.json"
rm -rf "$W"
[[ $perf_rc == 0 || $perf_rc == skipped ]] && [[ $sample_rc == 0 || $sample_rc == skipped ]]
