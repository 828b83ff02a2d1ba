#!/usr/bin/env bash
# GPU checks that need no quiet machine (no timings): the GPU tests of the Triton kernels (the Sinkhorn passes, Corr's
# layers, the ElaIN maps), the split and aligned products, the CUDA graphs (inference and the graphed training step)
# and util.bench's kernel time, and torch.profiler kernel tables (where the time goes) of the fast path's training
# step and of its inference at one pair and at 8. Writes $OUT/gpu_checks.txt. Sourced setup expected
# (scripts/device_setup.sh); scripts/device_reproduce.sh PHASE=1 runs it alongside the data generation when
# GPU_CHECKS=1.
set -uo pipefail

kernel_table() {  # seconds, then util.bench's profile options: the per-kernel table of its output
  local seconds=$1
  shift
  timeout "$seconds" python3 -m util.bench "$@" 2>&1 | grep -v -i warn | sed -n '/^Device kernels per call/,$p' \
    | head -60
}

{
  echo "== GPU tests: Corr's layer kernels and the ElaIN kernel"
  timeout 120 python3 -m pytest -q -p no:cacheprovider tests/models/networks/test_feature_kernels.py \
    tests/models/networks/test_elain_kernels.py 2>&1 | tail -5
  echo "== GPU tests: Triton kernels, split and aligned products, stored warp, CUDA graphs, the graphed training step"
  timeout 300 python3 -m pytest -q -p no:cacheprovider tests/models/networks/test_ot_fused.py \
    tests/models/networks/test_layers.py tests/models/networks/test_ot.py tests/models/test_cuda_graphs.py \
    tests/util/test_bench.py tests/models/test_train_step.py \
    -k "fused or gpu or cuda or graphs or similarity_gradient or padded_rows or kernel_time or replayed" 2>&1 \
    | tail -15
  echo "== training step profile, fast-fp16-compiled, batch 8, 6890 vertices"
  kernel_table 180 --profile fast-fp16-compiled
  for pairs in 1 8; do
    echo "== inference profile, fast-fp16-compiled, $pairs pairs of 6890 vertices"
    kernel_table 120 --profile_inference fast-fp16-compiled --batch "$pairs"
  done
} > "$OUT/gpu_checks.txt" 2>&1
