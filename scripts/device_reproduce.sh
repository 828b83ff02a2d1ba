#!/usr/bin/env bash
# docs/results.md on the device, in three calls that follow each other on one warm machine (its /tmp stays
# between calls; each call ends within 10 minutes). Carry [".whl", ".whl_anny"] (bash scripts/fetch_device_wheels.sh --anny).
#   PHASE=1: make the animal and human sets, pack them, start the six trainings, follow them
#   PHASE=2: start whatever PHASE=1 had no time for, follow the trainings
#   PHASE=3: wait for the trainings (FINISH_WAIT seconds at most), test every model (a set cut short at the
#            last epoch all its models saved), write the report to $OUT
# GPU_CHECKS=1 with PHASE=1 also runs scripts/device_gpu_checks.sh while the sets are made.
# Override EPOCHS and EPOCH_SIZE for another schedule (every model sees EPOCHS x EPOCH_SIZE pairs), SETS
# (default "animal human") to make and train one set only, e.g. PHASE=1 SETS=human.
set -euo pipefail
source scripts/device_setup.sh
root=/tmp/repro
started=$SECONDS
case "${PHASE:?set PHASE=1, 2 or 3}" in
  1|2)
    if [ "$PHASE" = 1 ] && [ "${GPU_CHECKS:-0}" = 1 ]; then
      bash scripts/device_gpu_checks.sh &  # the GPU idles while the sets are made
    fi
    timeout 540 python3 -m scripts.reproduce start --root "$root" --epochs "${EPOCHS:-8}" \
      --epoch_size "${EPOCH_SIZE:-4000}" --sets ${SETS:-animal human} 2>&1 | tr "\r" "\n" | grep -v -E "it/s\]|mesh/s\]" || true
    python3 -m scripts.reproduce wait --root "$root" --seconds $((570 - (SECONDS - started)))
    wait || true  # the GPU checks, if started, end within 420 s
    ;;
  3)
    timeout 570 python3 -m scripts.reproduce finish --root "$root" --out "$OUT" --seconds "${FINISH_WAIT:-420}" 2>&1 \
      | tr "\r" "\n" | grep -v -E "it/s\]" | grep -v "^meshes and the per-pair" || true
    [ -f "$OUT/results.json" ] || python3 -m scripts.reproduce report --root "$root" --out "$OUT"
    # Everything `python -m scripts.reproduce report` reads except the meshes (the figures are made here).
    tar -czf "$OUT/logs.tar.gz" -C "$root" schedule.json $(cd "$root" && ls -d runs/*/*/loss_log.txt \
      runs/*/*/opt.txt runs/*/*/opt.json runs/*/*/data_stats.json runs/*/status.json runs/*/tested.json runs/*/test_*/*/pmd.csv \
      data/*/metadata.json data/*/split.json 2>/dev/null)
    # Time left in this call (the machine is already up): check and time CUDA-graph inference (issue 4).
    if [ $((SECONDS - started)) -lt "${EXTRA_BEFORE:-200}" ]; then
      timeout 100 python3 -m pytest -q -x -p no:cacheprovider tests/models/test_cuda_graphs.py 2>&1 \
        | tail -5 | tee "$OUT/cuda_graphs_test.txt" || true
      timeout 170 python3 -m util.bench --skip_train --variants reference,fast-fp16-compiled,fast-bf16-compiled \
        --sweep "" --loader_pairs 0 --out "$OUT/bench_inference_graphs.json" 2>&1 | tail -12 || true
    fi
    ;;
esac
