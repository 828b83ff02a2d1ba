#!/usr/bin/env bash
# One device call: the variants (all, or --variants a,b) on the golden fixture, then the benchmark (training
# step, inference, the vertex sweep and the data path); arguments go to both. Carry .whl and .shared_copy
# (a copy of ../shared).
set -euo pipefail
source scripts/device_setup.sh
python3 -m util.bench --golden --out $OUT/golden.json "$@"
python3 -m util.bench --out $OUT/bench.json "$@"
