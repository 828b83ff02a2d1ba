#!/usr/bin/env bash
# One device call that benchmarks this tree and other commits' trees on the same machine with the same
# arguments (a change's speed-up, measured in one call). Here, once per other commit:
#   rm -rf .other && mkdir .other && git archive REV | tar -x -C .other
# then, carrying .whl, .shared_copy and each tree folder (TREES, default ".other"; name others .tree_*, which
# git ignores as it must for the device tool to carry them; it carries at most 8 paths):
#   TREES=".other" bash scripts/device_bench_ab.sh --variants fast-fp16-compiled --sweep "" --loader_pairs 0
# GOLDEN=1 first checks every tree's variants on the golden fixture ($OUT/golden_this.json, golden_<tree>.json).
# SAME_BENCH=1 runs this checkout's util/bench.py in every tree (copied over the tree's own), so that all report the
# same figures (the GPU's kernel time per step, which compares across hosts, since 6d9f471); the trees' models must
# take the same arguments.
# Writes $OUT/bench_this.json, $OUT/bench_<tree>.json for each tree (its leading dot dropped) and
# $OUT/bench_this_again.json: this tree runs first and last, so a drift of the machine over the call shows
# as a difference between its two runs.
set -euo pipefail
source scripts/device_setup.sh
trees=${TREES:-.other}
for tree in $trees; do
  if [ ! -d "$tree" ]; then
    echo "error: no $tree folder; make it with 'git archive REV | tar -x -C $tree' and carry it" >&2
    exit 2
  fi
  if [ "${SAME_BENCH:-0}" = 1 ]; then cp util/bench.py "$tree/util/bench.py"; fi
done
if [ "${GOLDEN:-0}" = 1 ]; then  # each tree's variants on the golden fixture first (the same arguments)
  python3 -m util.bench --golden --out "$OUT/golden_this.json" "$@"
  for tree in $trees; do
    echo "== golden $tree"
    (cd "$tree" && PYTHONPATH="/tmp/site:$PWD" python3 -m util.bench --golden --out "$OUT/golden_${tree#.}.json" "$@")
  done
fi
python3 -m util.bench --out "$OUT/bench_this.json" "$@"
for tree in $trees; do
  echo "== $tree"
  (cd "$tree" && PYTHONPATH="/tmp/site:$PWD" python3 -m util.bench --out "$OUT/bench_${tree#.}.json" "$@")
done
echo "== this tree again"
python3 -m util.bench --out "$OUT/bench_this_again.json" "$@"
