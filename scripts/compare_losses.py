"""Mean training loss of the last steps of loss_<path>_seed<k>.txt logs, per path: mean and spread over seeds.

    python scripts/compare_losses.py DIR [DIR ...] [--last 200]

Each log line "(epoch: e, iters: i, ...) edge: x rec: y lr: z" is one logged step; the loss is rec + edge.
"""
import argparse
import re
import statistics
from collections import defaultdict
from pathlib import Path

LOSS = re.compile(r"(?:rec|edge): ([0-9.eE+-]+)")
NAME = re.compile(r"loss_(?P<path>\w+?)_seed(?P<seed>\d+)\.txt$")


def last_mean(path: Path, count: int) -> float:
    totals = [sum(map(float, LOSS.findall(line))) for line in path.read_text().splitlines() if line.startswith("(epoch")]
    return statistics.mean(totals[-count:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--last", type=int, default=200, help="logged steps averaged at the end of each run")
    args = parser.parse_args()
    runs = defaultdict(dict)
    for folder in args.folders:
        for log in folder.glob("loss_*_seed*.txt"):
            match = NAME.search(log.name)
            runs[match["path"]][int(match["seed"])] = last_mean(log, args.last)
    for path, by_seed in sorted(runs.items()):
        values = [by_seed[seed] for seed in sorted(by_seed)]
        spread = statistics.stdev(values) if len(values) > 1 else float("nan")
        print(f"{path:10} seeds {sorted(by_seed)}: last-{args.last} mean loss {statistics.mean(values):.4f} "
              f"(std over seeds {spread:.4f}; per seed {', '.join(f'{v:.4f}' for v in values)})")
    if {"reference", "fast"} <= runs.keys():
        ratio = statistics.mean(runs["fast"].values()) / statistics.mean(runs["reference"].values()) - 1
        print(f"fast / reference - 1 = {ratio:+.2%} (issue 4 asks for |.| <= 5%)")


if __name__ == "__main__":
    main()
