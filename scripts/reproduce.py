"""The comparison of docs/results.md: 3D-CoreNet and NPT (both variants) trained on a generated Anny human set
and a quadruped animal set, every model seeing the same pairs, tested for poses seen and not seen in training.

    python -m scripts.reproduce start  --root /tmp/repro [--gpu 0] [--epochs 8] [--epoch_size 4000]
    python -m scripts.reproduce wait   --root /tmp/repro --seconds 560
    python -m scripts.reproduce finish --root /tmp/repro --out results/ [--seconds 300]
    python -m scripts.reproduce report --root /tmp/repro --out results/

`start` makes both sets with python -m data.generate (a finished set is kept), packs them, and starts the
six trainings as processes of their own, so that they outlive the command that started them (a device call
ends after 10 minutes; the machine and its /tmp stay while calls follow each other). Every training runs
train.py with the model's published optimiser, loss weights and learning-rate schedule, the same seed and
the same --epochs x --epoch_size pairs; the GPU is shared by whichever trainings run at the time.
`wait` returns when every started training has ended or after --seconds. `finish` waits likewise, then
tests every model of a set at the last epoch all of them saved (the final one when all finished; trainings
still running are stopped, so that a set cut short by the time limit is still compared at equal pairs
seen) with test.py on the set's test_list (identities and poses unseen) and test_list_seen_poses (unseen
identities in training poses), on the faithful path (--precision fp32 --ot dense), then writes the report.
`report` writes, from what is under --root: results.json, results.md (the PMD table), loss_curves.png
and test_pairs_<set>.png (identity | pose | ground truth | each model's output).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from data.packed import has_packed
from data.pair_dataset import read_centred
from test import point_mesh_distance_per_axis
from util.atomic import atomic_write, atomic_write_text
from util.cli import OneLineErrorParser, run_main
from util.render import render_grid

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SETS = {  # name -> generator source and data layout
    "human": {"source": "anny", "dataset_mode": "human"},
    "animal": {"source": "quadruped", "dataset_mode": "animal"},
}
MODELS = {  # name -> (label, model flags)
    "corenet": ("3D-CoreNet", ["--model", "ver2ver"]),
    "npt": ("NPT", ["--model", "npt"]),
    "npt_maxpool": ("NPT max-pool", ["--model", "npt", "--npt_variant", "maxpool"]),
}
# Training arithmetic: 3D-CoreNet on its default fast path, NPT in fp32 as published (its first runs here,
# docs/results.md, trained so).
TRAINING_FLAGS = {"corenet": [], "npt": ["--precision", "fp32"], "npt_maxpool": ["--precision", "fp32"]}
TEST_LISTS = {"unseen": "test_list", "seen": "test_list_seen_poses"}  # poses unseen / seen in training
FIGURE_PAIRS = 4
TEST_PROCESSES = 6
SMOOTHING = 10  # logged steps per point of the loss curves
LOSS_LINE = re.compile(r"\(epoch: (\d+), iters: (\d+),.*?\) (.*) lr:")
STATUS_FILE = "status.json"
TESTED_FILE = "tested.json"  # which checkpoint finish tested, and whether the training was stopped for it


def run_dir(root: Path, set_name: str, model: str) -> Path:
    return root / "runs" / f"{set_name}_{model}"


def data_dir(root: Path, set_name: str) -> Path:
    return root / "data" / set_name


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def run_step(command: list[str], what: str) -> None:
    """Run a project command from the project root; RuntimeError with one line when it fails (it printed why)."""
    returncode = subprocess.run([sys.executable, *command], cwd=PROJECT_ROOT).returncode
    if returncode != 0:
        raise RuntimeError(f"{what} failed (exit {returncode}); its output above says why")


def read_schedule(root: Path) -> dict:
    """The schedule `start` wrote under root; FileNotFoundError with one line when there is none."""
    schedule = read_json(root / "schedule.json")
    if schedule is None:
        raise FileNotFoundError(f"{root} holds no reproduction (no schedule.json); run "
                                f"'python -m scripts.reproduce start --root {root}' first")
    return schedule


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def run_state(directory: Path) -> str:
    """'done', 'failed', 'running' or 'not started', from the run's status file."""
    status = read_json(directory / STATUS_FILE)
    if status is None:
        return "not started"
    if "returncode" in status:
        return "done" if status["returncode"] == 0 else "failed"
    return "running" if process_alive(status["pid"]) else "failed"


def make_set(root: Path, set_name: str, args: argparse.Namespace) -> Path:
    """Generate (or continue) and pack one data set; return its folder."""
    data, layout = data_dir(root, set_name), SETS[set_name]
    counts = [flag for name in ("identities", "poses", "vertices") if getattr(args, name) is not None
              for flag in (f"--{name}", str(getattr(args, name)))]
    started = time.perf_counter()
    devices = ["cuda", "cpu"] if args.gpu != "-1" else ["cpu"]
    for device in devices:  # the body model on the GPU, else (it failed there) on the CPU; the generator resumes
        generate = subprocess.run([sys.executable, "-m", "data.generate", "--out", str(data), "--source",
                                   layout["source"], "--device", device, "--workers", str(args.workers), *counts],
                                  cwd=PROJECT_ROOT)
        if generate.returncode == 0:
            break
        if device == devices[-1]:
            raise RuntimeError(f"python -m data.generate failed for the {set_name} set (exit {generate.returncode})")
        print(f"{set_name}: generating on {device} failed; going on on the CPU", flush=True)
    print(f"{set_name}: data.generate took {time.perf_counter() - started:.0f} s", flush=True)
    if not has_packed(data):
        started = time.perf_counter()
        run_step(["-m", "data.packed", "--dataroot", str(data), "--dataset_mode", layout["dataset_mode"],
                  "--workers", str(args.workers)], f"packing the {set_name} set")
        print(f"{set_name}: data.packed took {time.perf_counter() - started:.0f} s", flush=True)
    return data


def training_command(root: Path, set_name: str, model: str, schedule: dict) -> list[str]:
    epochs = schedule["epochs"]
    directory = run_dir(root, set_name, model)
    return [sys.executable, "train.py", "--dataset_mode", SETS[set_name]["dataset_mode"],
            "--dataroot", str(data_dir(root, set_name)), "--gpu_ids", schedule["gpu"],
            "--checkpoints_dir", str(directory), "--output_dir", str(directory / "output"),
            "--niter", str(epochs - epochs // 2), "--niter_decay", str(epochs // 2),
            "--epoch_size", str(schedule["epoch_size"]), "--seed", str(schedule["seed"]),
            "--print_freq", str(schedule["print_freq"]), "--display_freq", str(10 ** 12),
            "--save_latest_freq", str(schedule["epoch_size"]), "--save_epoch_freq", "1",
            "--overwrite",  # a failed run starts again from scratch in its folder
            *MODELS[model][1], *TRAINING_FLAGS[model]]


def launch_trainings(root: Path, set_name: str, schedule: dict) -> None:
    """Start every model's training on one set that has not run yet, each in a session of its own."""
    for model in MODELS:
        directory = run_dir(root, set_name, model)
        if run_state(directory) in ("done", "running"):
            continue
        directory.mkdir(parents=True, exist_ok=True)
        with open(directory / "train.log", "w") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "scripts.reproduce", "train-one", "--root", str(root), "--set", set_name,
                 "--model", model], cwd=PROJECT_ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, "OMP_NUM_THREADS": "2", "PYTHONUNBUFFERED": "1"})
        atomic_write_text(json.dumps({"pid": process.pid}) + "\n", directory / STATUS_FILE)
        print(f"started {set_name} {MODELS[model][0]} (pid {process.pid})", flush=True)


def train_one(args: argparse.Namespace) -> None:
    """Run one training to its end and record its wall time and exit status."""
    root = Path(args.root)
    schedule = read_schedule(root)
    directory = run_dir(root, args.set, args.model)
    started = time.time()
    returncode = subprocess.run(training_command(root, args.set, args.model, schedule), cwd=PROJECT_ROOT).returncode
    status = {"pid": os.getpid(), "returncode": returncode, "started": started, "wall_s": time.time() - started}
    atomic_write_text(json.dumps(status) + "\n", directory / STATUS_FILE)


def start(args: argparse.Namespace) -> None:
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    schedule = {"epochs": args.epochs, "epoch_size": args.epoch_size, "batch_size": 8, "seed": args.seed,
                "gpu": args.gpu, "print_freq": args.print_freq}
    stored = read_json(root / "schedule.json")
    if stored is not None and stored != schedule:
        raise ValueError(f"{root} holds runs with another schedule {stored}; use another --root")
    atomic_write_text(json.dumps(schedule) + "\n", root / "schedule.json")
    for set_name in args.sets:  # the animal set first: it is quick to make, and its trainings start early
        make_set(root, set_name, args)
        launch_trainings(root, set_name, schedule)


def wait(root: Path, seconds: float) -> None:
    """Until every started training has ended or seconds have passed, print each run's progress now and then."""
    deadline = time.monotonic() + seconds
    while True:
        states = {directory.name: run_state(directory) for directory in sorted((root / "runs").glob("*_*"))}
        running = [name for name, state in states.items() if state == "running"]
        progress = []
        for name, state in states.items():
            log = root / "runs" / name / SETS[name.split("_")[0]]["dataset_mode"] / "loss_log.txt"
            last = log.read_text().splitlines()[-1] if log.is_file() and log.stat().st_size else ""
            match = LOSS_LINE.search(last)
            progress.append(f"{name} {state}" + (f" epoch {match[1]} iters {match[2]}" if match else ""))
        print(time.strftime("%H:%M:%S"), "; ".join(progress), flush=True)
        if not running or time.monotonic() >= deadline:
            return
        time.sleep(min(30.0, max(1.0, deadline - time.monotonic())))


def saved_epoch(directory: Path, dataset_mode: str) -> int:
    """The last epoch whose numbered checkpoint (<epoch>_net_*.pth) a training has written; 0 if none."""
    labels = (path.name.split("_", 1)[0] for path in (directory / dataset_mode).glob("*_net_*.pth"))
    return max((int(label) for label in labels if label.isdigit()), default=0)


def stop_training(directory: Path) -> None:
    """End a running training (train-one and its train.py, one process group of their own)."""
    try:
        os.killpg(read_json(directory / STATUS_FILE)["pid"], signal.SIGTERM)
    except ProcessLookupError:
        pass


def choose_checkpoints(root: Path, set_name: str) -> int:
    """The epoch at which every started, not failed, training of a set is tested: the last epoch all of them
    saved, so that the models compared have seen the same pairs (the final one when all finished). The
    trainings still running are stopped and every tested run gets its TESTED_FILE. Returns 0 when there is none.
    """
    dataset_mode = SETS[set_name]["dataset_mode"]
    runs = {model: run_dir(root, set_name, model) for model in MODELS}
    states = {model: run_state(directory) for model, directory in runs.items()}
    stopped_before = {model for model, directory in runs.items()
                      if (read_json(directory / TESTED_FILE) or {}).get("stopped")}
    tested = {model: runs[model] for model, state in states.items()
              if state in ("done", "running") or model in stopped_before}
    epoch = min((saved_epoch(directory, dataset_mode) for directory in tested.values()), default=0)
    if epoch == 0:
        return 0
    epoch_size = read_schedule(root)["epoch_size"]
    for model, directory in tested.items():
        if states[model] == "running":
            stop_training(directory)
        atomic_write_text(json.dumps({"which_epoch": epoch, "pairs": epoch * epoch_size,
                                      "stopped": states[model] == "running" or model in stopped_before}) + "\n",
                           directory / TESTED_FILE)
    return epoch


def test_dir(directory: Path, which: str, epoch: int) -> Path:
    return directory / f"test_{which}_epoch{epoch}"


def test_run(root: Path, set_name: str, model: str, which: str, epoch: int) -> Path:
    """Test one model's <epoch> checkpoint on one test list with the faithful path; return the per-pair table."""
    schedule = read_schedule(root)
    directory, data = run_dir(root, set_name, model), data_dir(root, set_name)
    results = test_dir(directory, which, epoch)
    dataset_mode = SETS[set_name]["dataset_mode"]
    table = results / dataset_mode / "pmd.csv"
    if not table.is_file():
        run_step(["test.py", "--dataset_mode", dataset_mode, "--dataroot", str(data), "--gpu_ids", schedule["gpu"],
                  "--checkpoints_dir", str(directory), "--test_list", str(data / TEST_LISTS[which]),
                  "--results_dir", str(results), "--which_epoch", str(epoch), "--nThreads", "2",
                  "--precision", "fp32", "--ot", "dense",
                  *MODELS[model][1]], f"testing {set_name} {MODELS[model][0]} on {TEST_LISTS[which]}")
    return table


def read_table(table: Path) -> dict:
    with open(table, newline="") as handle:
        rows = list(csv.DictReader(handle))
    summary = {"pairs": len(rows), **{key: statistics.fmean(float(row[key]) for row in rows)
                                      for key in ("pmd", "pmd_x", "pmd_y", "pmd_z")}}
    if "warp_pmd" in rows[0]:
        summary["warp_pmd"] = statistics.fmean(float(row["warp_pmd"]) for row in rows)
    return summary


def loss_curve(directory: Path, dataset_mode: str, epoch_size: int) -> tuple[list[int], list[float]]:
    """Pairs seen and the unweighted reconstruction loss (mean squared error) at each logged step."""
    options = read_json(directory / dataset_mode / "opt.json")
    pairs, losses = [], []
    for line in (directory / dataset_mode / "loss_log.txt").read_text().splitlines():
        match = LOSS_LINE.search(line)
        if match:
            values = dict(re.findall(r"(\w+): ([0-9.eE+-]+)", match[3]))
            pairs.append((int(match[1]) - 1) * epoch_size + int(match[2]))
            losses.append(float(values["rec"]) / options["lambda_rec"])
    return pairs, losses


def plot_loss_curves(root: Path, schedule: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot

    logs = {set_name: {label: directory for model, (label, _) in MODELS.items()
                       if ((directory := run_dir(root, set_name, model)) / SETS[set_name]["dataset_mode"]
                           / "loss_log.txt").is_file()}
            for set_name in SETS}
    logs = {set_name: runs for set_name, runs in logs.items() if runs}  # one panel per set trained
    if not logs:
        return
    figure, axes = pyplot.subplots(1, len(logs), figsize=(6 * len(logs), 4), squeeze=False)
    for axis, (set_name, runs) in zip(axes[0], logs.items()):
        for label, directory in runs.items():
            pairs, losses = loss_curve(directory, SETS[set_name]["dataset_mode"], schedule["epoch_size"])
            window = min(SMOOTHING, len(losses))  # a running mean: one batch's loss is noisy
            axis.plot(pairs[window - 1:], np.convolve(losses, np.ones(window) / window, mode="valid"), label=label)
        axis.set(title=f"{set_name} set", xlabel="training pairs seen", yscale="log",
                 ylabel=f"reconstruction MSE (running mean of {SMOOTHING} logs)")
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    with atomic_write(path) as handle:
        figure.savefig(handle, format="png", dpi=100)
    pyplot.close(figure)


def pose_copy_pmd(data: Path, list_name: str) -> dict:
    """Mean PMD (and per axis) of the answer "the pose mesh unchanged" on a test list of a generated set.

    Every mesh of a generated set shares one vertex order, so the pose mesh itself is a trivial answer: the
    pose right, the body the pose mesh's own. A transfer that does not beat it has not changed the body.
    """
    errors = []
    for line in (data / list_name).read_text().split("\n"):
        if line.strip():
            _, pose, truth = line.split()
            errors.append(point_mesh_distance_per_axis(read_centred(data / pose)[0][None],
                                                       read_centred(data / truth)[0][None])[0])  # (3,)
    per_axis = torch.stack(errors).double().mean(dim=0)
    return {"pairs": len(errors), "pmd": per_axis.mean().item(),
            **{f"pmd_{axis}": value for axis, value in zip("xyz", per_axis.tolist())}}


def render_test_pairs(root: Path, set_name: str, path: Path) -> None:
    """The first FIGURE_PAIRS pairs of the unseen test list: identity | pose | ground truth | each output."""
    data, dataset_mode = data_dir(root, set_name), SETS[set_name]["dataset_mode"]
    lines = (data / TEST_LISTS["unseen"]).read_text().split("\n")[:FIGURE_PAIRS]
    rows, titles = [], []
    for line in lines:
        identity, pose, truth = line.split()
        meshes = [read_centred(data / name) for name in (identity, pose, truth)]
        row_titles = ["identity", "pose", "ground truth"]
        for model, (label, _) in MODELS.items():
            directory = run_dir(root, set_name, model)
            tested = read_json(directory / TESTED_FILE)
            output = (test_dir(directory, "unseen", tested["which_epoch"]) / dataset_mode
                      / Path(truth).with_suffix(".obj")) if tested else None
            if output is not None and output.is_file():
                meshes.append(read_centred(output))
                row_titles.append(label)
        rows.append([(vertices.numpy(), faces.numpy()) for vertices, faces in meshes])
        titles.append(row_titles)
    render_grid(rows, titles, path, size=(240, 300))


def report(root: Path, out: Path) -> dict:
    """Write results.json, results.md, loss_curves.png and test_pairs_<set>.png into out; return the results."""
    schedule = read_schedule(root)
    out.mkdir(parents=True, exist_ok=True)
    results = {"schedule": schedule, "pairs_seen": schedule["epochs"] * schedule["epoch_size"], "runs": []}
    for set_name in SETS:
        for model, (label, _) in MODELS.items():
            directory = run_dir(root, set_name, model)
            status = read_json(directory / STATUS_FILE)
            if status is None:
                continue
            log = directory / SETS[set_name]["dataset_mode"] / "loss_log.txt"
            pairs = loss_curve(directory, SETS[set_name]["dataset_mode"], schedule["epoch_size"])[0] \
                if log.is_file() else []
            tested = read_json(directory / TESTED_FILE)
            entry = {"set": set_name, "model": label,
                     "state": "stopped" if tested and tested["stopped"] else run_state(directory),
                     "pairs_trained": pairs[-1] if pairs else 0,
                     "pairs_tested": tested["pairs"] if tested else 0,
                     "wall_s": round(status["wall_s"], 1) if "wall_s" in status else None}
            for which in TEST_LISTS:
                table = (test_dir(directory, which, tested["which_epoch"]) / SETS[set_name]["dataset_mode"]
                         / "pmd.csv") if tested else None
                if table is not None and table.is_file():
                    entry[which] = read_table(table)
            results["runs"].append(entry)
    for set_name in SETS:
        data = data_dir(root, set_name)
        if all((data / name).is_file() for name in TEST_LISTS.values()):
            results.setdefault("pose_copy", {})[set_name] = {which: pose_copy_pmd(data, name)
                                                             for which, name in TEST_LISTS.items()}
    atomic_write_text(json.dumps(results, indent=1) + "\n", out / "results.json")
    atomic_write_text(results_table(results), out / "results.md")
    plot_loss_curves(root, schedule, out / "loss_curves.png")
    for set_name in SETS:
        if (data_dir(root, set_name) / TEST_LISTS["unseen"]).is_file():
            render_test_pairs(root, set_name, out / f"test_pairs_{set_name}.png")
    return results


def results_table(results: dict) -> str:
    """The PMD table in Markdown: mean PMD x 1e-4 per set, model and test list; warp_out alone beside it."""
    def cell(entry: dict, which: str, key: str) -> str:
        return f"{entry[which][key] / 1e-4:.3f}" if key in entry.get(which, {}) else "-"

    lines = ["| set | model | pairs seen (tested checkpoint) | PMD unseen poses | PMD seen poses | "
             "warp alone, unseen | warp alone, seen | training wall (s) |", "|---|---|---|---|---|---|---|---|"]
    for entry in results["runs"]:
        wall = entry["wall_s"] if entry["wall_s"] is not None else entry["state"]
        lines.append(f"| {entry['set']} | {entry['model']} | {entry['pairs_tested']:,} | "
                     f"{cell(entry, 'unseen', 'pmd')} | {cell(entry, 'seen', 'pmd')} | "
                     f"{cell(entry, 'unseen', 'warp_pmd')} | {cell(entry, 'seen', 'warp_pmd')} | {wall} |")
    for set_name, entry in results.get("pose_copy", {}).items():
        lines.append(f"| {set_name} | the pose mesh unchanged (no transfer) | - | {cell(entry, 'unseen', 'pmd')} | "
                     f"{cell(entry, 'seen', 'pmd')} | - | - | - |")
    return "\n".join(lines) + "\n"


def finish(args: argparse.Namespace) -> None:
    root = Path(args.root)
    read_schedule(root)
    wait(root, args.seconds)
    tests = []
    for set_name in SETS:
        epoch = choose_checkpoints(root, set_name)
        tests += [(set_name, model, which, epoch) for model in MODELS for which in TEST_LISTS
                  if epoch and (run_dir(root, set_name, model) / TESTED_FILE).is_file()]
    # Several test processes at once: each spends most of its time starting up and writing meshes.
    with ThreadPoolExecutor(max_workers=TEST_PROCESSES) as pool:
        for table in pool.map(lambda test: test_run(root, *test), tests):
            print(f"tested: {table}", flush=True)
    results = report(root, Path(args.out))
    print(results_table(results), end="")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="python -m scripts.reproduce", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    start_parser = commands.add_parser("start", help="make the sets and start the trainings")
    start_parser.add_argument("--root", required=True, help="folder for the data sets and runs")
    start_parser.add_argument("--gpu", default="0", help="--gpu_ids of every training and test (-1: the CPU)")
    start_parser.add_argument("--epochs", type=int, default=8, help="epochs of every training (half at the "
                              "initial learning rate, half decaying, as published for 3D-CoreNet)")
    start_parser.add_argument("--epoch_size", type=int, default=4000, help="pairs per epoch")
    start_parser.add_argument("--seed", type=int, default=0)
    start_parser.add_argument("--print_freq", type=int, default=200, help="log the losses every this many pairs")
    start_parser.add_argument("--sets", nargs="+", default=["animal", "human"], choices=tuple(SETS))
    start_parser.add_argument("--workers", type=int, default=min(12, os.cpu_count() or 1))
    for name in ("identities", "poses", "vertices"):
        start_parser.add_argument(f"--{name}", type=int, default=None,
                                  help=f"--{name} of python -m data.generate (default: its own)")
    wait_parser = commands.add_parser("wait", help="follow the trainings")
    finish_parser = commands.add_parser("finish", help="wait, test every model, write the report")
    report_parser = commands.add_parser("report", help="write the report from what is under --root")
    for sub in (wait_parser, finish_parser, report_parser):
        sub.add_argument("--root", required=True)
    for sub in (wait_parser, finish_parser):
        sub.add_argument("--seconds", type=float, default=560.0, help="wait at most this long for the trainings")
    for sub in (finish_parser, report_parser):
        sub.add_argument("--out", required=True, help="folder for the report")
    train_parser = commands.add_parser("train-one", help="(internal) one training, started by start")
    train_parser.add_argument("--root", required=True)
    train_parser.add_argument("--set", required=True, choices=tuple(SETS))
    train_parser.add_argument("--model", required=True, choices=tuple(MODELS))
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "start":
        start(args)
    elif args.command == "wait":
        read_schedule(Path(args.root))
        wait(Path(args.root), args.seconds)
    elif args.command == "finish":
        finish(args)
    elif args.command == "report":
        report(Path(args.root), Path(args.out))
    else:
        train_one(args)


if __name__ == "__main__":
    run_main(main)
