#!/usr/bin/env bash
# docs/results.md on the device, in three calls that follow each other on one warm machine (its /tmp stays
# between calls; each call ends within 10 minutes). Carry [".whl", ".whl_anny"] (bash scripts/fetch_device_wheels.sh --anny).
#   PHASE=1: make the animal and human sets, pack them, start the six trainings, follow them
#   PHASE=2: start whatever PHASE=1 had no time for, follow the trainings
#   PHASE=3: wait for the trainings (FINISH_WAIT seconds at most), test every model, write the report to $OUT
# Override EPOCHS and EPOCH_SIZE for another schedule (every model sees EPOCHS x EPOCH_SIZE pairs).
set -euo pipefail
source scripts/device_setup.sh
root=/tmp/repro
started=$SECONDS
case "${PHASE:?set PHASE=1, 2 or 3}" in
  1|2)
    timeout 540 python3 -m scripts.reproduce start --root "$root" --epochs "${EPOCHS:-8}" \
      --epoch_size "${EPOCH_SIZE:-4000}" 2>&1 | tr "\r" "\n" | grep -v -E "it/s\]|mesh/s\]" || true
    python3 -m scripts.reproduce wait --root "$root" --seconds $((570 - (SECONDS - started)))
    ;;
  3)
    python3 -m scripts.reproduce finish --root "$root" --out "$OUT" --seconds "${FINISH_WAIT:-300}" 2>&1 \
      | tr "\r" "\n" | grep -v -E "it/s\]" | grep -v "^meshes and the per-pair"
    tar -czf "$OUT/logs.tar.gz" -C "$root" schedule.json $(cd "$root" && ls -d runs/*/*/loss_log.txt \
      runs/*/*/opt.txt runs/*/*/data_stats.json runs/*/status.json runs/*/train.log data/*/metadata.json \
      data/*/split.json 2>/dev/null)
    ;;
esac
