#!/usr/bin/env bash
# Issue 4's training check: the reference path (--precision fp32 --ot dense --compile off) against the fast
# path (the defaults), trained STEPS steps from the same seeds on the same packed quadruped set, every run
# at once on the GPU. PATHS may also name storedfp32 (--precision fp32 --ot stored --compile off: the faithful
# float32 computation summed in another order), which measures how far rounding alone moves a run's loss. Carry .whl.
#   PHASE=once: all in one call: make the set (VERTICES per mesh, default 2000), pack it, start the runs, follow
#            them (FOLLOW seconds from the start, default 480), then what PHASE=2 does with the logs so far. The
#            device now gives a machine back 30 s after a call (2026-12-07), so runs cannot outlive their call.
#   PHASE=1: the same up to following the runs (FOLLOW default 560), left detached for a second call on the same
#            warm machine.
#   PHASE=2: wait for them, copy every loss log to $OUT (every phase also does while it follows, so a call
#            cut off still returns them), test seed 1's fast checkpoint with both paths where its run finished, and
#            print the comparison (scripts/compare_losses.py)
# Example: PHASE=once PATHS="reference storedfp32" SEEDS="1 2" STEPS=2000 bash scripts/device_train_compare.sh.
# Pace on an H100 (2026-12-06): three reference runs beside three fast ones take 0.033 s a pair, 8.8 minutes for
# 2000 steps, longer than one call leaves after PHASE=1; give the reference runs a call of their own
# (PATHS=reference). scripts/compare_losses.py compares cut-off runs over the pairs every run reached.
set -euo pipefail
source scripts/device_setup.sh
steps=${STEPS:-2000}
seeds=${SEEDS:-1 2 3}
paths=${PATHS:-reference fast}
data=/tmp/compare/quad
started=$SECONDS

copy_logs() {  # every loss log so far into $OUT, so a call cut off by its time limit still returns them
  for log in /tmp/compare/runs/*/animal/loss_log.txt; do
    [ -f "$log" ] || continue
    cp "$log" "$OUT/loss_$(basename "$(dirname "$(dirname "$log")")").txt"  # loss_<path>_seed<k>.txt
  done
}

follow() {  # seconds: wait until no run is left or the time is up, printing each run's last log line
  while [ $((SECONDS - started)) -lt "$1" ]; do
    copy_logs
    running=0
    for pid_file in /tmp/compare/*.pid; do
      kill -0 "$(cat "$pid_file")" 2>/dev/null && running=$((running + 1))
    done
    echo "$(date +%T) $running running; $(for log in /tmp/compare/runs/*/animal/loss_log.txt; do
      [ -f "$log" ] && printf '%s: %s; ' "$(basename "$(dirname "$(dirname "$log")")")" "$(tail -n 1 "$log" | cut -c1-60)"
      done)"
    [ "$running" -eq 0 ] && return
    sleep 30
  done
}

start_runs() {  # make and pack the set, start every run detached
  mkdir -p /tmp/compare/runs
  python3 -m data.generate --source quadruped --out "$data" --identities 12 --poses 100 \
    --vertices "${VERTICES:-2000}" --device cuda 2>&1 | tail -1
  python3 -m data.packed --dataroot "$data" --dataset_mode animal --workers 8 2>&1 | tail -1
  for path in $paths; do
    case "$path" in
      reference) flags="--ot dense --precision fp32 --compile off" ;;
      storedfp32) flags="--ot stored --precision fp32 --compile off" ;;  # faithful float32, summed otherwise
      fast) flags="" ;;
      *) echo "error: unknown path $path in PATHS (reference, storedfp32, fast)" >&2; exit 2 ;;
    esac
    for seed in $seeds; do
      setsid nohup python3 train.py --dataset_mode animal --dataroot "$data" --gpu_ids 0 --loader packed \
        --niter 1 --niter_decay 0 --epoch_size $((steps * 8)) --print_freq 8 --display_freq 100000000 \
        --save_latest_freq 100000000 --seed "$seed" --checkpoints_dir "/tmp/compare/runs/${path}_seed$seed" $flags \
        > "/tmp/compare/${path}_seed$seed.log" 2>&1 &
      echo $! > "/tmp/compare/${path}_seed$seed.pid"
    done
  done
}

finish() {  # the logs so far into $OUT, seed 1's fast checkpoint tested with both paths, the comparison
  copy_logs
  if [ -f /tmp/compare/runs/fast_seed1/animal/latest_net_G.pth ]; then
    for path in reference fast; do
      flags=""; [ "$path" = reference ] && flags="--ot dense --precision fp32"
      python3 test.py --dataset_mode animal --dataroot "$data" --gpu_ids 0 --checkpoints_dir /tmp/compare/runs/fast_seed1 \
        --test_list "$data/test_list" --results_dir "/tmp/compare/results_$path" $flags 2>&1 | grep "mean PMD" \
        | sed "s/^/$path path: /" | tee -a "$OUT/test_pmd.txt"
    done
  fi
  python3 scripts/compare_losses.py "$OUT" --windows
}

case "${PHASE:?set PHASE=once, 1 or 2}" in
  once)
    start_runs
    follow "${FOLLOW:-480}"
    finish
    ;;
  1)
    start_runs
    follow "${FOLLOW:-560}"
    ;;
  2)
    follow 420
    finish
    ;;
esac
