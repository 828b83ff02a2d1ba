#!/usr/bin/env bash
# One device call: make a quadruped set on the GPU, pack it, train STEPS steps with each path in PATHS
# (reference: --precision fp32 --ot dense --compile off; fast: the defaults) for each seed in SEEDS, keep
# every loss log in $OUT, then test the last fast checkpoint with both paths. Compare the logs with
# `python scripts/compare_losses.py DIR...` (several seeds per path: one seed is not enough, see
# docs/benchmarks.md). Carry .whl. Example: PATHS=reference SEEDS="1 2 3" STEPS=1000 bash scripts/device_train_compare.sh
set -euo pipefail
source scripts/device_setup.sh
steps=${STEPS:-2000}
python3 -m data.generate --source quadruped --out /tmp/quad --identities 12 --poses 100 --device cuda 2>&1 | tail -1
python3 -m data.packed --dataroot /tmp/quad --dataset_mode animal --workers 8 2>&1 | tail -1
common="--dataset_mode animal --dataroot /tmp/quad --gpu_ids 0 --loader packed --niter 1 --niter_decay 0
  --epoch_size $((steps * 8)) --print_freq 8 --display_freq 100000000 --save_latest_freq 100000000"
for path in ${PATHS:-reference fast}; do
  flags=""; [ "$path" = reference ] && flags="--ot dense --precision fp32 --compile off"
  for seed in ${SEEDS:-1}; do
    /usr/bin/time -f "$path seed $seed wall %e s" python3 train.py $common --seed "$seed" \
      --checkpoints_dir "/tmp/$path$seed" $flags 2>&1 | tr "\r" "\n" | grep -E "wall" || true
    cp "/tmp/$path$seed/animal/loss_log.txt" "$OUT/loss_${path}_seed$seed.txt"
  done
done
last_fast=$(ls -d /tmp/fast* 2>/dev/null | tail -1)
if [ -n "$last_fast" ]; then
  for path in reference fast; do
    flags=""; [ "$path" = reference ] && flags="--ot dense --precision fp32"
    python3 test.py --dataset_mode animal --dataroot /tmp/quad --gpu_ids 0 --checkpoints_dir "$last_fast" \
      --test_list /tmp/quad/test_list --results_dir "/tmp/results_$path" $flags 2>&1 | grep "mean PMD" \
      | sed "s/^/$path path: /" | tee -a "$OUT/test_pmd.txt"
  done
fi
python3 scripts/compare_losses.py "$OUT"
