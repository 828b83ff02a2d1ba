#!/usr/bin/env bash
# One device call: make a quadruped set on the GPU, pack it, train 2000 steps with the reference path and
# with the fast path from the same seed, compare the mean loss of the last 200 steps, and test one
# checkpoint with both paths. Carry .whl.
set -euo pipefail
source scripts/device_setup.sh
steps=${STEPS:-2000}
python3 -m data.generate --source quadruped --out /tmp/quad --identities 12 --poses 100 --device cuda 2>&1 | tail -2
python3 -m data.packed --dataroot /tmp/quad --dataset_mode animal --workers 8
common="--dataset_mode animal --dataroot /tmp/quad --gpu_ids 0 --loader packed --niter 1 --niter_decay 0
  --epoch_size $((steps * 8)) --print_freq 8 --display_freq 100000 --save_latest_freq 1000000 --seed 1"
/usr/bin/time -f "reference wall %e s" python3 train.py $common --checkpoints_dir /tmp/ref --ot dense --precision fp32 \
  --compile off 2>&1 | tr "\r" "\n" | grep -E "^training|wall" || true
/usr/bin/time -f "fast wall %e s" python3 train.py $common --checkpoints_dir /tmp/fast 2>&1 | tr "\r" "\n" \
  | grep -E "^training|wall" || true
python3 - <<'PY' | tee $OUT/train_compare.txt
import re
def last_losses(path, count=200):
    rows = [line for line in open(path) if line.startswith("(epoch")]
    totals = [sum(float(v) for v in re.findall(r"(?:rec|edge): ([0-9.eE+-]+)", row)) for row in rows]
    return sum(totals[-count:]) / len(totals[-count:]), len(totals)
ref, n_ref = last_losses("/tmp/ref/animal/loss_log.txt")
fast, n_fast = last_losses("/tmp/fast/animal/loss_log.txt")
print(f"steps logged: reference {n_ref}, fast {n_fast}")
print(f"mean loss over the last 200 steps: reference {ref:.4f}, fast {fast:.4f}, fast/reference - 1 = {fast / ref - 1:+.2%}")
PY
for path in reference fast; do
  if [ $path = reference ]; then flags="--ot dense --precision fp32"; else flags=""; fi
  python3 test.py --dataset_mode animal --dataroot /tmp/quad --gpu_ids 0 --checkpoints_dir /tmp/fast \
    --test_list /tmp/quad/test_list --results_dir /tmp/results_$path $flags 2>&1 | grep "PMD" | sed "s/^/$path path: /" \
    | tee -a $OUT/train_compare.txt
done
cp /tmp/ref/animal/loss_log.txt $OUT/loss_reference.txt; cp /tmp/fast/animal/loss_log.txt $OUT/loss_fast.txt
