#!/usr/bin/env bash
# Nsight Compute's hardware counters of fused.py's kernels at their default layouts, batch 8, N = M = 6890, on the
# fixed-point C (as a half-precision training step runs them): throughput against the peaks, occupancy, warp stall
# reasons, issue slots, pipes and the source lines where warps stall. Launches each kernel three times and profiles
# the second round (the first compiles). Writes $OUT/fused_counters.txt. Sourced setup expected
# (scripts/device_setup.sh); needs ncu on the PATH and a GPU whose counters it can read.
set -uo pipefail

ncu --clock-control none -k "regex:_row_column|_fixed_point_|_plan_|_similarity_gradient" --launch-skip 7 \
  --launch-count 7 --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
  --section SchedulerStats --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
  --section InstructionStats --section SourceCounters --print-details all \
  python3 -m util.bench --fused_launches 3 "$@" > "$OUT/fused_counters.txt" 2>&1
echo "ncu exit $?; $(grep -c '^  _\|_kernel' "$OUT/fused_counters.txt") kernel lines in $OUT/fused_counters.txt"
