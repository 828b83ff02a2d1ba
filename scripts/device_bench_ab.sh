#!/usr/bin/env bash
# One device call that benchmarks this tree and another commit's on the same machine with the same
# arguments (a change's speed-up, measured in one call). Here, once:
#   rm -rf .other && mkdir .other && git archive REV | tar -x -C .other
# then, carrying .whl, .shared_copy and .other:
#   bash scripts/device_bench_ab.sh --variants fast-fp16-compiled --sweep "" --loader_pairs 0
# Writes $OUT/bench_this.json and $OUT/bench_other.json; this tree runs before and after the other, so a
# drift of the machine over the call shows as a difference between its two runs.
set -euo pipefail
source scripts/device_setup.sh
if [ ! -d .other ]; then
  echo "error: no .other folder; make it with 'git archive REV | tar -x -C .other' and carry it" >&2
  exit 2
fi
python3 -m util.bench --out "$OUT/bench_this.json" "$@"
(cd .other && PYTHONPATH="/tmp/site:$PWD" python3 -m util.bench --out "$OUT/bench_other.json" "$@")
python3 -m util.bench --out "$OUT/bench_this_again.json" "$@"
