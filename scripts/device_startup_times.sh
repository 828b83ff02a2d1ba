#!/usr/bin/env bash
# What a user waits for on a GPU beyond the arithmetic: test.py over a test list and transfer.py on one pair,
# each with the defaults, with --compile on (whether compiling pays for a test list) and with the reference
# warp (--ot dense, nothing compiled), each twice: the first run with torch.compile's caches cold, the second
# warm. One device call; carry .whl. test.py prints its own split (the model and metric, the first batch,
# reading and writing meshes); every run's wall time goes to $OUT/startup_times.txt.
set -euo pipefail
source scripts/device_setup.sh
data=/tmp/startup/quad
export TORCHINDUCTOR_CACHE_DIR=/tmp/startup/inductor_cache
rm -rf /tmp/startup && mkdir -p /tmp/startup
python3 -m data.generate --source quadruped --out "$data" --identities 4 --poses 100 --vertices "${VERTICES:-3889}" \
  --device cuda 2>&1 | tail -1
python3 train.py --dataset_mode animal --dataroot "$data" --gpu_ids 0 --niter 1 --niter_decay 0 --epoch_size 16 \
  --compile off --checkpoints_dir /tmp/startup/ckpt 2>&1 | tail -1
common=(--dataset_mode animal --gpu_ids 0 --checkpoints_dir /tmp/startup/ckpt)
pair=$(head -n 1 "$data/test_list")
read -r identity pose _ <<< "$pair"
for flags in "" "--compile on" "--ot dense"; do
  for cache in cold warm; do
    started=$SECONDS
    python3 test.py "${common[@]}" --dataroot "$data" --test_list "$data/test_list" \
      --results_dir "/tmp/startup/test_${cache}${flags// /}" $flags 2>&1 | grep -E "mean PMD|^time" \
      | sed "s/^/test.py ${flags:-defaults} ($cache): /" | tee -a "$OUT/startup_times.txt"
    echo "test.py ${flags:-defaults} ($cache): $((SECONDS - started)) s wall" | tee -a "$OUT/startup_times.txt"
    started=$SECONDS
    python3 transfer.py "${common[@]}" --identity "$data/$identity" --pose "$data/$pose" \
      --out "/tmp/startup/out_${cache}${flags// /}.obj" $flags > /dev/null 2>&1
    echo "transfer.py one pair ${flags:-defaults} ($cache): $((SECONDS - started)) s wall" | tee -a "$OUT/startup_times.txt"
  done
  rm -rf "$TORCHINDUCTOR_CACHE_DIR"
done
