#!/usr/bin/env bash
# One device call: train and test on a small generated set on GPU 0 (plain and under torchrun).
# Usage (device tool, carry .whl): bash scripts/device_core.sh
set -euo pipefail
source scripts/device_setup.sh
python3 -c "from pathlib import Path; from tests.tiny_data import write_tiny_dataset as w; w(Path('/tmp/data'), identities=4, poses=6, subdivisions=4)"
common="--dataset_mode human --dataroot /tmp/data --checkpoints_dir /tmp/ckpt"
python3 train.py $common --output_dir /tmp/output --gpu_ids 0 --niter 2 --niter_decay 1 --epoch_size 64 --print_freq 64 2>&1 | tr "\r" "\n" | grep -v "it/s]" | tee $OUT/train.log
python3 test.py $common --gpu_ids 0 --test_list /tmp/data/test_list --results_dir /tmp/results 2>&1 | tr "\r" "\n" | grep -v "it/s]" | tee $OUT/test.log
torchrun --standalone --nproc_per_node=1 train.py $common --gpu_ids 0 --continue_train --niter 2 --niter_decay 2 \
  --epoch_size 64 --print_freq 64 2>&1 | tr "\r" "\n" | grep -v "it/s]" | tee $OUT/torchrun.log
