"""Mean training loss of the last steps of loss_<path>_seed<k>.txt logs, per path: mean and spread over seeds.

    python scripts/compare_losses.py DIR [DIR ...] [--last 200] [--windows]

Each log line "(epoch: e, iters: i, ...) edge: x rec: y lr: z" is one logged step; the loss is rec + edge
(both logged with their weights). With the reference present it prints, for every other path (fast, storedfp32),
path / reference - 1 and its standard error from the spread over seeds, and the same paired by seed: a seed gives
both paths the same initial weights and the same pairs in the same order (train.py --seed, the packed sampler),
which is issue 4's comparison ("trained 2000 steps from the same seed and data"), so the seeds' spread of pair draws
cancels within each pair of runs.
Runs that stopped at different points (a run cut off by a time limit) are compared over the same pairs: every mean
is then taken up to the last point every run reached, and a line says so. --windows also prints, seed by seed, each
path / reference - 1 over every window of --last steps: how far two runs drift apart before the last window.
"""
import argparse
import math
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

LOSS = re.compile(r"(?:rec|edge): ([0-9.eE+-]+)")
PAIRS = re.compile(r"iters: (\d+)")
NAME = re.compile(r"loss_(?P<path>\w+?)_seed(?P<seed>\d+)\.txt$")


def logged_steps(path: Path) -> list[tuple[int, float]]:
    """(pairs seen, rec + edge) of every logged step of one log; ValueError if it logged none."""
    steps = [(int(PAIRS.search(line)[1]), sum(map(float, LOSS.findall(line))))
             for line in path.read_text().splitlines() if line.startswith("(epoch")]
    if not steps:
        raise ValueError(f"{path} has no logged training steps")
    return steps


def last_mean(path: Path, count: int, until: int | None = None) -> float:
    """Mean loss of the last `count` logged steps of one log at or before `until` pairs (None: its end)."""
    totals = [total for pairs, total in logged_steps(path) if until is None or pairs <= until]
    if not totals:
        raise ValueError(f"{path} has no logged training steps up to {until} pairs")
    return statistics.mean(totals[-count:])


def window_means(path: Path, count: int, until: int | None = None) -> list[tuple[int, float]]:
    """(pairs seen at its last step, mean loss) of each window of `count` logged steps of one log at or before
    `until` pairs (None: its end), consecutive and the last ending there; a shorter first remainder is left out."""
    steps = [(pairs, total) for pairs, total in logged_steps(path) if until is None or pairs <= until]
    return [(steps[end - 1][0], statistics.mean(total for _, total in steps[end - count:end]))
            for end in range(len(steps), count - 1, -count)][::-1]


def relative_difference(fast: list[float], reference: list[float]) -> tuple[float, float]:
    """mean(fast) / mean(reference) - 1 and its standard error from the seeds' spread (nan with one seed)."""
    mean_fast, mean_reference = statistics.mean(fast), statistics.mean(reference)
    if min(len(fast), len(reference)) < 2:
        return mean_fast / mean_reference - 1, math.nan
    error = math.sqrt(statistics.variance(fast) / len(fast) + statistics.variance(reference) / len(reference))
    return mean_fast / mean_reference - 1, error / mean_reference


def paired_difference(fast: dict[int, float],
                      reference: dict[int, float]) -> tuple[dict[int, float], float, float]:
    """fast / reference - 1 for each seed both paths ran, their mean and its standard error from their spread (nan
    with one seed; both nan with none)."""
    differences = {seed: fast[seed] / reference[seed] - 1 for seed in sorted(fast.keys() & reference.keys())}
    if not differences:
        return differences, math.nan, math.nan
    values = list(differences.values())
    error = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.nan
    return differences, statistics.mean(values), error


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--last", type=int, default=200, help="logged steps averaged at the end of each run")
    parser.add_argument("--windows", action="store_true", help="also print each path / reference - 1 seed by seed "
                        "over every window of --last logged steps, not only the last: how far runs drift apart")
    args = parser.parse_args()
    logs = [log for folder in args.folders for log in folder.glob("loss_*_seed*.txt")]
    if not logs:
        print(f"error: no loss_<path>_seed<k>.txt logs in {', '.join(map(str, args.folders))}", file=sys.stderr)
        sys.exit(2)
    runs = defaultdict(dict)
    try:
        ends = {log: logged_steps(log)[-1][0] for log in logs}
        common_end = min(ends.values())
        if max(ends.values()) > common_end:
            print(f"the runs stopped at different points ({min(ends, key=ends.get).name} at {common_end} pairs, "
                  f"{max(ends, key=ends.get).name} at {max(ends.values())}); every mean below is over the last "
                  f"{args.last} logged steps up to {common_end} pairs, which every run reached")
        windows = defaultdict(dict)
        sources = {}
        for log in logs:
            match = NAME.search(log.name)
            run = (match["path"], int(match["seed"]))
            if run in sources:
                raise ValueError(f"two logs of {run[0]} seed {run[1]}: {sources[run]} and {log}; pass folders that "
                                 f"hold each path's seed once")
            sources[run] = log
            runs[match["path"]][int(match["seed"])] = last_mean(log, args.last, common_end)
            if args.windows:
                windows[match["path"]][int(match["seed"])] = window_means(log, args.last, common_end)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    for path, by_seed in sorted(runs.items()):
        values = [by_seed[seed] for seed in sorted(by_seed)]
        spread = statistics.stdev(values) if len(values) > 1 else float("nan")
        print(f"{path:10} seeds {sorted(by_seed)}: last-{args.last} mean loss {statistics.mean(values):.4f} "
              f"(std over seeds {spread:.4f}; per seed {', '.join(f'{v:.4f}' for v in values)})")
    for path in sorted(runs.keys() - {"reference"}) if "reference" in runs else []:
        ratio, error = relative_difference(list(runs[path].values()), list(runs["reference"].values()))
        print(f"{path} / reference - 1 = {ratio:+.2%}, standard error {error:.2%} (issue 4 asks for |.| <= 5%)")
        differences, paired, paired_error = paired_difference(runs[path], runs["reference"])
        if differences:
            per_seed = ", ".join(f"{difference:+.1%}" for difference in differences.values())
            print(f"paired by seed {list(differences)}: mean of {path} / reference - 1 = {paired:+.2%}, standard "
                  f"error {paired_error:.2%} (per seed {per_seed})")
        for seed in sorted(windows[path].keys() & windows["reference"].keys()):
            pairs = [(mine, theirs) for mine, theirs in zip(windows[path][seed], windows["reference"][seed])
                     if mine[0] == theirs[0]]
            print(f"{path} / reference - 1, seed {seed}, windows of {args.last} logged steps ending at pairs "
                  + ", ".join(f"{end}: {mean / reference - 1:+.1%}" for (end, mean), (_, reference) in pairs))


if __name__ == "__main__":
    main()
