"""Benchmark the reference (published) path against the fast path on one device, in one call.

    python -m util.bench --out bench.json                 # everything, on the GPU
    python -m util.bench --device cpu --vertices 500 --sweep "" --loader_pairs 0   # a quick CPU check
    python -m util.bench --fused_passes                   # the fused Sinkhorn kernels alone (a GPU)
    python -m util.bench --feature_layers                 # one of Corr's layers: compiled against its kernel
    python -m util.bench --elain_maps                     # the generator's ElaIN maps: compiled against the kernel
    ncu -k regex:_kernel python -m util.bench --fused_launches 3   # their hardware counters (Nsight Compute)
    python -m util.bench --profile fast-fp16-compiled     # where a training step's time goes: operators,
                                                          # kernels, matrix products by shape and their rates

Tables printed (and written as JSON with --out):
- training step (forward, losses, backward, Adam) at --batch and --vertices: ms, pairs/s, peak GiB, the
  ratio to the reference and model FLOP utilisation, for the reference (fp32, dense OT) and fast variants,
  the mean ms of steps issued back to back (synchronised once, as a training loop runs) and the GPU's kernel time
  a step, eager and (on a GPU, "+graphs") replayed from one CUDA graph;
- inference: one pair, a batch and a --big_batch (64 by default, where compiled inference passes 1000 pairs/s on the
  H100; a batch that does not fit, as the dense reference's 64 on 80 GB, reads "out of memory"), per variant, eager
  and (on a GPU) replayed from CUDA graphs;
- an inference sweep over vertex counts for the memory-linear path (and the reference until it runs out);
- the data path: pairs/s of the packed sampler on the device and of the OBJ loader with --workers.
Inputs are random points with random faces, made on the device; timing does not depend on their values.
Times are medians over --repeats after --warmup steps, with CUDA events (a synchronised clock on the CPU).
Work per pair at 6890 vertices is about 256 GFLOP forward and 3x that for a training step (issue 4), and
scales linearly with the vertex count for the generator; MFU divides by --peak_tflops (the H100's
measured bf16 matrix rate).
"""
from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch

from models.cuda_graphs import GraphedTransfer, TransferFunction
from models.pose_transfer_model import PoseTransferModel
from models.train_step import WARMUP_STEPS, GraphedTrainingStep, training_step
from util.cli import OneLineErrorParser, run_main

FORWARD_GFLOP_PER_PAIR_6890 = 256.0
# Tiles (rows, columns, warps) of the dL/dC kernel that --fused_passes times besides the default.
GRADIENT_TILES = [(32, 256, 4), (16, 256, 4), (16, 512, 4), (32, 512, 8), (64, 128, 4), (64, 256, 8), (128, 128, 8),
                  (16, 128, 4)]

# Tiles (rows, columns, contraction, warps) of the fixed-point product that --fused_passes times besides the default.
PRODUCT_TILES = [(128, 256, 64, 8), (256, 128, 64, 8), (64, 128, 64, 4), (128, 128, 32, 4), (128, 64, 64, 4)]
# Tiles (vertices, output channels, input channels, warps) and pipeline stages of Corr's layer kernel timed besides its
# default (`--feature_layers`).
FEATURE_LAYER_TILES = [(128, 128, 64, 8), (64, 128, 64, 4)]
FEATURE_LAYER_STAGES = (2, 3)
# Tiles (vertices, output channels, feature channels, warps) and stages of the ElaIN kernel timed besides its default
# (`--elain_maps`), and the generator's ElaIN widths at ngf 64.
ELAIN_MAP_TILES = [((128, 128, 32, 8), 3), ((128, 64, 64, 8), 3), ((64, 128, 64, 8), 3), ((128, 64, 64, 8), 4)]
ELAIN_MAP_CHANNELS = (1024, 512, 256)

# name -> (ot, precision, compile, tf32, fold_linear). The first is the faithful reference every ratio is
# against: exact float32 (TF32 off), as train.py and test.py run it. "reference-tf32" is the same code with
# PyTorch's default TF32 convolutions, as the published code ran on this GPU. Half-precision variants fold
# the generator's affine layers as --fold_linear auto does; "-unfolded" ones do not.
VARIANTS = {
    "reference": ("dense", "fp32", False, False, False),
    "reference-tf32": ("dense", "fp32", False, True, False),
    "fast-fp32": ("stored", "fp32", False, False, False),
    "fast-fp32-folded": ("stored", "fp32", False, False, True),
    "fast-fp16": ("stored", "fp16", False, False, True),
    "fast-fp16-compiled-unfolded": ("stored", "fp16", True, False, False),
    "fast-fp16-compiled": ("stored", "fp16", True, False, True),
    "fast-bf16-compiled": ("stored", "bf16", True, False, True),
    "chunked-fp16-compiled": ("chunked", "fp16", True, False, True),
}


def synthetic_batch(batch: int, vertices: int, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random identity/pose/gt points (B, N, 3) and faces (B, 2N, 3) of distinct corners."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    points = [torch.rand(batch, vertices, 3, generator=generator) - 0.5 for _ in range(3)]
    order = torch.randperm(vertices, generator=generator)
    corners = order[(torch.arange(2 * vertices)[:, None] + torch.arange(3)) % vertices]  # (2N, 3) distinct
    sample = {"identity_points": points[0], "pose_points": points[1], "gt_points": points[2],
              "identity_faces": corners.expand(batch, -1, -1).contiguous()}
    return {key: value.to(device) for key, value in sample.items()}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def host_launch_us(device: torch.device, launches: int = 2000) -> float:
    """Microseconds the host takes to issue one small operator (an in-place add to one element), the median of 5 runs
    of `launches` while the GPU keeps up: a gauge of the host, not the GPU. A compiled training step issues about 870
    kernels, so a slow host bounds it: on the host of the eighteenth session's call, where eager one-pair inference
    took 16 to 19 ms (5.8 ms in the seventeenth session), main's step took 53 and 47 ms against 32.6 ms
    (docs/benchmarks.md). Every result records this figure, at the start and at the end of its run."""
    counter = torch.zeros(1, device=device)
    runs = []
    for _ in range(5):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(launches):
            counter.add_(1)
        runs.append((time.perf_counter() - start) / launches * 1e6)
    synchronize(device)
    return statistics.median(runs)


def time_median(step: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    """Median milliseconds of step() after warm-up."""
    for _ in range(warmup):
        step()
    synchronize(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            started = time.perf_counter()
            step()
            times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)


def tile_time(step: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float | None:
    """`time_median` of a kernel launched at one tile, or None where the tile needs more shared memory than the GPU
    has (Triton refuses such a launch, which feature_kernels.py reports as KernelsDoNotFit), so that one tile too
    large does not end a sweep of them."""
    from triton.runtime.errors import OutOfResources

    from models.networks.feature_kernels import KernelsDoNotFit

    try:
        return time_median(step, device, warmup, repeats)
    except (OutOfResources, KernelsDoNotFit):
        return None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def build(variant: str, device: torch.device) -> PoseTransferModel:
    """The variant's model; also sets the process-wide TF32 switches it runs under."""
    ot, precision, compiled, tf32, fold_linear = VARIANTS[variant]
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = tf32
    torch._dynamo.reset()  # compiled graphs of the previous variant must not be reused under other settings
    torch.manual_seed(0)
    model = PoseTransferModel(ot=ot, precision=precision, fold_linear=fold_linear).to(device)
    if compiled:
        model.compile_networks()
    return model


class GraphCaptureError(RuntimeError):
    """A training step that `GraphedTrainingStep` could not capture."""


def make_training_step(model: PoseTransferModel, batch: dict, device: torch.device,
                       graphs: bool = False) -> Callable[[], object]:
    """A function taking one full step on the batch as train.py does (models/train_step.py): forward, losses,
    backward and the published Adam update (fused on a GPU), with fp16 loss scaling; with graphs, replayed from one
    CUDA graph (`GraphedTrainingStep`), after the eager steps its capture needs."""
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), **model.OPTIMIZER, fused=device.type == "cuda",
                                 capturable=graphs)
    scaler = torch.amp.GradScaler(device.type, enabled=model.generator_dtype == torch.float16)
    if not graphs:
        return functools.partial(training_step, model, optimizer, scaler, batch)
    step = GraphedTrainingStep(model, optimizer, scaler)
    for _ in range(WARMUP_STEPS + 1):  # the last one captures
        step(batch)
    if step.graph is None:
        raise GraphCaptureError("the training step could not be captured as a CUDA graph (see the warning above)")
    return functools.partial(step, batch)


def layer_times(step: Callable[[], object], device: torch.device, warmup: int,
                repeats: int) -> dict[str, float] | None:
    """A kernel layout's `tile_time` (None where it does not fit the GPU) and its `time_back_to_back`, in ms."""
    ms = tile_time(step, device, warmup, repeats)
    return None if ms is None else {"ms": ms, "back_to_back_ms": time_back_to_back(step, device, repeats)}


def time_back_to_back(step: Callable[[], object], device: torch.device, steps: int) -> float:
    """Mean milliseconds of `steps` calls issued back to back and synchronised once, as a training loop runs
    between its loss prints: where the GPU is the bottleneck, launching the next kernels overlaps its work."""
    synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return (time.perf_counter() - started) * 1e3 / steps


def kernel_ms(step: Callable[[], object], device: torch.device, calls: int = 3) -> float:
    """Milliseconds of GPU kernels per call of step() (the sum of their device times under torch.profiler, over
    `calls` calls), NaN on a CPU: what a step costs the GPU whatever the host, which a slow host hides under the time
    it takes to issue the kernels (`host_launch_us`). Changes to the kernels compare on it across hosts."""
    if device.type != "cuda":
        return float("nan")
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]  # as `_profile` records
    with torch.profiler.profile(activities=activities) as profiler:
        for _ in range(calls):
            step()
        synchronize(device)
    return sum(event.self_device_time_total for event in _device_kernels(profiler.key_averages())) / 1e3 / calls


def bench_training(model: PoseTransferModel, batch: dict, device: torch.device, warmup: int,
                   repeats: int, graphs: bool = False) -> dict[str, float]:
    """Median ms of one synchronised step, mean ms of --repeats steps back to back, peak memory and the GPU's kernel
    time per step (`kernel_ms`) of `make_training_step`."""
    reset_peak(device)  # before the step is made: a graphed step's capture allocates its memory
    step = make_training_step(model, batch, device, graphs)
    ms = time_median(step, device, warmup, repeats)
    return {"ms": ms, "back_to_back_ms": time_back_to_back(step, device, repeats), "peak_gib": peak_gib(device),
            "kernel_ms": kernel_ms(step, device)}


def bench_inference(transfer: TransferFunction, batch: dict, device: torch.device, warmup: int,
                    repeats: int) -> dict[str, float]:
    """transfer (a model's, in eval mode, or a GraphedTransfer) on the batch; warmup >= 2 lets a graph be captured."""
    def step():
        with torch.no_grad():
            transfer(batch["identity_points"], batch["pose_points"])
    reset_peak(device)
    ms = time_median(step, device, warmup, repeats)
    return {"ms": ms, "peak_gib": peak_gib(device)}


def out_of_memory(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err)


def or_out_of_memory(measure: Callable[[], dict], device: torch.device) -> dict:
    """measure()'s row, or {"ms": None, "peak_gib": None, "oom": True} where the device has no memory for it (a
    sweep's largest meshes; the dense reference's batch of 64 on 80 GB): the table goes on and says so."""
    try:
        return measure()
    except (RuntimeError, torch.OutOfMemoryError) as err:
        if not out_of_memory(err):
            raise
    reset_peak(device)  # outside the except clause, whose traceback holds the failed step's tensors
    return {"ms": None, "peak_gib": None, "oom": True}


def _rate_or_out_of_memory(infer: dict) -> str:
    return f"{'out of memory':>18}" if infer.get("oom") else f"{infer['pairs_per_s']:18.1f}"


def bench_loaders(device: torch.device, vertices: int, batch: int, pairs: int, workers: int) -> dict:
    """Pairs/s of the packed sampler (on device) and of the OBJ file loader, on a written random set."""
    from data import DATASETS, FileBatches, TrainPairDataset
    from data.packed import PackedPairSampler, pack_dataset
    from util.mesh_io import write_mesh
    layout = DATASETS["human"]
    identities, poses = list(range(4)), list(range(8))
    faces = synthetic_batch(1, vertices, torch.device("cpu"))["identity_faces"][0].numpy()
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        rng = np.random.default_rng(0)
        for i in identities:
            for p in poses:
                write_mesh(Path(folder) / layout.file_name(i, p), rng.random((vertices, 3)), faces)
        pack_dataset(folder, layout, workers=workers)
        sampler = PackedPairSampler(folder, layout, identities, poses, pairs, batch, 0, device)
        iterations = max(1, pairs // batch)
        ms = time_median(lambda: [sampler.batch(1, k) for k in range(iterations)], device, 1, 3)
        results["packed"] = {"pairs_per_s": iterations * batch / ms * 1e3}
        files = FileBatches(TrainPairDataset(folder, layout, identities, poses, pairs, seed=0), batch, workers, False)
        started = time.perf_counter()
        count = sum(len(b["identity_name"]) for b in files.epoch_batches(1))
        results["files"] = {"pairs_per_s": count / (time.perf_counter() - started), "workers": workers}
    return results


def _profile(run: Callable[[], object], device: torch.device, calls: int) -> str:
    """torch.profiler tables of `calls` runs of run(): operators by total device time, then the operators
    and kernels with their input shapes by self time (which matrix product, which pass, at what size)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities, record_shapes=True) as profiler:
        for _ in range(calls):
            run()
        synchronize(device)
    clock = "cuda" if device.type == "cuda" else "cpu"
    averages = profiler.key_averages()
    by_operator = averages.table(sort_by=f"{clock}_time_total", row_limit=30, max_name_column_width=70)
    by_shape = profiler.key_averages(group_by_input_shape=True).table(
        sort_by=f"self_{clock}_time_total", row_limit=25, max_name_column_width=50, max_shapes_column_width=60)
    return (f"{by_operator}\nBy input shape ({calls} calls):\n{by_shape}\n"
            f"{_kernel_table(averages, calls)}\n"
            f"{_product_table(profiler.key_averages(group_by_input_shape=True), calls, device.type == 'cuda')}")


def product_flops(name: str, shapes: list[list[int]]) -> int:
    """Multiply-adds times 2 of one matrix-product operator from its recorded input shapes (0 for others):
    bmm (B, M, K) x (B, K, N), mm (M, K) x (K, N), and baddbmm / addmm with the added tensor first."""
    operands = {"aten::bmm": shapes[:2], "aten::mm": shapes[:2], "aten::baddbmm": shapes[1:3],
                "aten::addmm": shapes[1:3]}.get(name)
    if not operands or any(len(shape) < 2 for shape in operands):
        return 0
    left, right = operands
    return 2 * math.prod(left) * right[-1]


def _product_table(events: list, calls: int, on_device: bool) -> str:
    """Matrix-product operators grouped by input shapes, by time per call (their kernels' device time, or the
    CPU's without a GPU), with the rate each reached: which products run far below the tensor cores' rate
    (small outputs, thin operands)."""
    rows = sorted(((getattr(event, "device_time_total" if on_device else "cpu_time_total") / 1e3 / calls, event)
                   for event in events if product_flops(event.key, event.input_shapes)),
                  key=lambda row: row[0], reverse=True)
    total = sum(ms for ms, _ in rows)
    lines = [f"Matrix products by input shapes, per call ({total:.3f} ms in all):"]
    for ms, event in rows:
        rate = product_flops(event.key, event.input_shapes) * event.count / calls / (ms * 1e-3) / 1e12 if ms else 0.0
        shapes = [shape for shape in event.input_shapes if shape]
        lines.append(f"{ms:9.3f} ms {event.count // calls:4d}x {rate:6.0f} TFLOP/s  {event.key} {shapes}")
    return "\n".join(lines)


def _device_kernels(events: list) -> list:
    """The profiler events that are device kernels. Annotations on the device span kernels and are not kernels:
    "## Call CompiledFxGraph ..." rows, and record_function ranges such as "Optimizer.step#Adam.step" (listed at
    0.65 ms in an eager training step's profile on the H100, twenty-third session) where the profiler marks them as
    user annotations (`is_user_annotation`)."""
    return [event for event in events if event.device_type != torch.autograd.DeviceType.CPU
            and not event.key.startswith("## ") and not getattr(event, "is_user_annotation", False)]


def _kernel_table(events: list, calls: int, rows: int = 80) -> str:
    """Device kernels by self time per call, with their share and launches per call: the breakdown of the
    compiled graphs' fused kernels, which the operator tables lump together."""
    kernels = sorted(_device_kernels(events), key=lambda event: event.self_device_time_total, reverse=True)
    total = sum(event.self_device_time_total for event in kernels) or 1
    lines = [f"{event.self_device_time_total / 1e3 / calls:9.3f} ms {100 * event.self_device_time_total / total:5.1f}%"
             f" {event.count // calls:4d}x  {event.key[:150]}" for event in kernels[:rows]]
    launches = sum(event.count for event in kernels) // calls
    return "\n".join([f"Device kernels per call ({total / 1e3 / calls:.3f} ms, {launches} launches in all):", *lines])


def profile_training(variant: str, batch: dict, device: torch.device, steps: int = 3) -> str:
    """Profile tables (`_profile`) of a few training steps after warm-up: where the time of a step goes."""
    step = make_training_step(build(variant, device), batch, device)
    for _ in range(2):
        step()
    return _profile(step, device, steps)


def profile_inference(variant: str, batch: dict, device: torch.device, calls: int = 5) -> str:
    """Profile tables (`_profile`) of eager inference calls after warm-up: which kernels a transfer spends
    its time in."""
    model = build(variant, device).eval()
    bench_inference(model.transfer, batch, device, warmup=2, repeats=1)
    with torch.no_grad():
        return _profile(lambda: model.transfer(batch["identity_points"], batch["pose_points"]), device, calls)


class FusedPassInputs(NamedTuple):
    """What the fused Sinkhorn kernels read at batch B and N = M vertices (`fused_pass_inputs`)."""
    similarity: torch.Tensor  # C, float32 (B, N, M), a view of rows padded to a multiple of 8
    padding: int  # the pad lanes of each row of C
    log_b: torch.Tensor  # (B, M)
    shift: torch.Tensor  # (B,), bounded_shift of log b at |C| <= 1
    row_factors: torch.Tensor  # U of dL/dC, (B, N, rank)
    column_factors: torch.Tensor  # V of dL/dC, (B, M, rank) stored pose-major


def fused_pass_inputs(device: torch.device, batch: int, vertices: int) -> FusedPassInputs:
    """C of random unit 256-channel features as the split product leaves it on a GPU, a log b near -log M, and
    dL/dC factors of the rank five Sinkhorn iterations give (seeded: the same on every call)."""
    from models.networks.layers import padded
    from models.networks.ot import stored
    from models.networks.ot.common import bounded_shift

    generator = torch.Generator(device=device).manual_seed(0)
    theta, phi = (torch.nn.functional.normalize(torch.randn(batch, 256, vertices, device=device, generator=generator),
                                                dim=1) for _ in range(2))
    padded_phi = padded(phi)
    similarity = torch.bmm(theta.transpose(1, 2), padded_phi)[..., :vertices]
    log_b = -math.log(vertices) + 0.1 * torch.randn(batch, vertices, device=device, generator=generator)
    shift = bounded_shift(log_b, 1.0, stored.SINKHORN_EPSILON)  # cosine similarities: |C| <= 1
    rank = 4 + 2 * stored.SINKHORN_ITERATIONS - 1
    row_factors = torch.rand(batch, vertices, rank, device=device, generator=generator)
    column_factors = stored._pose_major(torch.rand(batch, vertices, rank, device=device, generator=generator))
    return FusedPassInputs(similarity, padded_phi.shape[2] - vertices, log_b, shift, row_factors, column_factors)


def bench_fused_passes(device: torch.device, batch: int, vertices: int, warmup: int, repeats: int) -> dict:
    """A fused row + column Sinkhorn pass (models/networks/ot/fused.py) against the compiled row pass, vector
    step and column pass it replaces (stored.py's own, as they run without it), on `fused_pass_inputs`: ms of
    each, for the default number of programs per batch element and a few others, for 2 to 4 pipeline stages (6
    too on the fixed-point C) and for 8 to 32 warps; and ms of the dL/dC kernel (written in fp16) with its
    default tile and GRADIENT_TILES; and ms of the final softmax's warp and of its backward's column sums, each the
    compiled pass ("compiled") against the kernel by warps ("default", 8, 16). The fused kernels are timed on the
    float32 C (results' "float32") and on its 16-bit fixed-point copy, as half precision stores it
    ("fixed_point"). Last, C's split product followed by the fixed-point column pass against the fixed-point
    product that replaces both, by tile ("product")."""
    from models.networks.layers import float_product_of_halves, split_operands
    from models.networks.ot import fused, stored
    from models.networks.ot.common import fixed_point_similarity

    run = functools.partial(stored._run_pass, True)
    similarity, padding, log_b, shift, row_factors, column_factors = fused_pass_inputs(device, batch, vertices)

    def separate() -> None:
        maximum, total = run(stored._row_normaliser, similarity, log_b, stored.SINKHORN_EPSILON, shift)
        log_a, column_shift = run(stored._marginal_step, maximum, total, 1.0, stored.SINKHORN_EPSILON)
        run(stored._column_normaliser, similarity, log_a, stored.SINKHORN_EPSILON, column_shift)

    points = stored._pose_major(torch.randn(batch, vertices, 3, device=device))
    row_weights = torch.randn(batch, vertices, 4, device=device)
    shift_rows = shift.unsqueeze(1).expand(batch, vertices)
    results = {"separate_ms": time_median(separate, device, warmup, repeats)}
    program_counts = [None]  # the default rule, then 1, 2 and 4 programs per SM over the batch
    if device.type == "cuda":
        sm_count = torch.cuda.get_device_properties(device).multi_processor_count
        program_counts += [max(1, per_sm * sm_count // batch) for per_sm in (1, 2, 4)]
    # Pipeline stages to time: a float32 row of 8192 lanes takes 32 KiB of shared memory a stage, a fixed-point one 16.
    forms = {"float32": (similarity, (2, 3, 4)), "fixed_point": (fixed_point_similarity(similarity), (2, 3, 4, 6))}
    for form, (stored_similarity, stage_counts) in forms.items():
        row_sum, log_a, column_shift, _ = fused.fused_row_column_forward(stored_similarity, log_b, shift,
                                                                         stored.SINKHORN_EPSILON, 1.0)
        backward_inputs = (stored_similarity, log_a, column_shift, torch.randn_like(log_b), shift, row_sum, log_b,
                           stored.SINKHORN_EPSILON, 1.0)

        def pass_times(**layout) -> dict[str, float]:
            return {"forward_ms": time_median(lambda: fused.fused_row_column_forward(
                        stored_similarity, log_b, shift, stored.SINKHORN_EPSILON, 1.0, **layout), device, warmup,
                        repeats),
                    "backward_ms": time_median(lambda: fused.fused_row_column_backward(*backward_inputs, **layout),
                                               device, warmup, repeats)}
        results[form] = {
            "fused": {str(programs or "default"): pass_times(programs_per_batch=programs)
                      for programs in program_counts},
            "stages": {str(stages): pass_times(pipeline_stages=stages) for stages in stage_counts},
            "warps": {str(warps): pass_times(num_warps=warps) for warps in (8, 16, 32)},
            "similarity_gradient": {
                "x".join(map(str, tile)): time_median(
                    lambda: fused.fused_similarity_gradient(stored_similarity, row_factors, column_factors,
                                                            stored.SINKHORN_EPSILON, 1.0, torch.float16, padding,
                                                            tile=tile),
                    device, warmup, repeats)
                for tile in dict.fromkeys([fused.GRADIENT_TILE, *GRADIENT_TILES])},
            "plan_warp": {
                "compiled": time_median(lambda: run(stored._plan_warp, stored_similarity, log_b, points,
                                                    stored.SINKHORN_EPSILON, shift), device, warmup, repeats),
                **{str(warps or "default"): time_median(lambda: fused.fused_plan_warp(
                    stored_similarity, log_b, shift, points, stored.SINKHORN_EPSILON, num_warps=warps), device,
                    warmup, repeats) for warps in (None, 8, 16)}},
            "plan_column_sums": {
                "compiled": time_median(lambda: run(stored._plan_column_sums, stored_similarity, log_b, shift_rows,
                                                    row_weights, stored.SINKHORN_EPSILON), device, warmup, repeats),
                **{str(warps or "default"): time_median(lambda: fused.fused_plan_column_sums(
                    stored_similarity, log_b, shift, row_weights, stored.SINKHORN_EPSILON, num_warps=warps), device,
                    warmup, repeats) for warps in (None, 8, 16)}}}
    generator = torch.Generator(device=device).manual_seed(2)
    theta_rows, phi = (torch.nn.functional.normalize(torch.randn(batch, 256, vertices, device=device,
                                                                 generator=generator), dim=1) for _ in range(2))
    left, right = split_operands(theta_rows.transpose(1, 2).contiguous(), phi)
    results["product"] = {
        "separate": time_median(lambda: fused.fused_fixed_point_column_pass(
            float_product_of_halves(left, right)[..., :vertices], stored.SINKHORN_EPSILON), device, warmup, repeats),
        **{"x".join(map(str, tile)): tile_time(lambda: fused.fused_fixed_point_product(
            left, right, vertices, stored.SINKHORN_EPSILON, tile=tile), device, warmup, repeats)
           for tile in dict.fromkeys([fused.PRODUCT_TILE, *PRODUCT_TILES])}}
    return results


def bench_feature_layers(device: torch.device, batch: int, vertices: int, warmup: int, repeats: int) -> dict:
    """One of Corr's 256-channel layers on both meshes of `batch` pairs (2 x batch rows, as its feature pass runs
    them), its input normalised, added to a residual (the block's first convolution, whose input is kept) or not,
    and activated: the layer as torch.compile makes it of the autograd path's arithmetic (on a GPU the split product)
    with its output's instance-norm statistics, against feature_kernels.normalized_convolution by tile and pipeline
    stages (None where the GPU cannot launch them). Each in ms by events (`time_median`: a wrapper's host time counts
    where the GPU waits for it) and back to back (`time_back_to_back`: the GPU's time where it is the bottleneck)."""
    import torch.nn.functional as F

    from models.networks import feature_kernels
    from models.networks.layers import INSTANCE_NORM_EPS, PointwiseConv1d, aligned

    generator = torch.Generator(device=device).manual_seed(3)
    rows, channels, columns = 2 * batch, 256, aligned(vertices)
    x, residual = (torch.randn(rows, channels, columns, device=device, generator=generator) for _ in range(2))
    statistics = feature_kernels.Statistics(torch.randn(rows, channels, device=device, generator=generator),
                                            torch.rand(rows, channels, device=device, generator=generator) + 0.5)
    slope = torch.full((1,), 0.25, device=device)
    conv = PointwiseConv1d(channels, channels, half_dtype=torch.float16).to(device)
    weight = feature_kernels.kernel_weight(conv.weight.detach().squeeze(2))

    @torch.compile
    def layer(x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        activated = (x - statistics.mean.unsqueeze(2)) * statistics.rstd.unsqueeze(2)
        activated = F.prelu(activated if residual is None else activated + residual, slope)
        out = conv(activated)
        variance, mean = torch.var_mean(out[..., :vertices], dim=2, unbiased=False)
        return out, mean, torch.rsqrt(variance + INSTANCE_NORM_EPS), activated

    results = {}
    times = functools.partial(layer_times, device=device, warmup=warmup, repeats=repeats)
    with torch.no_grad():
        for kept in (True, False):
            residual_input = residual if kept else None
            row = {"compiled": times(lambda: layer(x, residual_input))}
            for tile, stages in itertools.product(dict.fromkeys([feature_kernels.CONVOLUTION_TILE,
                                                                 *FEATURE_LAYER_TILES]), FEATURE_LAYER_STAGES):
                row[f"{'x'.join(map(str, tile))}, {stages} stages"] = times(
                    lambda: feature_kernels.normalized_convolution(
                        x, weight, conv.bias, vertices, statistics=statistics, residual=residual_input, slope=slope,
                        keep_input=kept, tile=tile, stages=stages))
            results["kept" if kept else "not_kept"] = row
    return results


def bench_elain_maps(device: torch.device, batch: int, vertices: int, warmup: int, repeats: int) -> dict:
    """One ElaIN of each of the generator's widths at `batch` pairs, as fp16 inference runs it: the condition's
    product and the map with its activation as the compiled generator makes them of the autograd path's arithmetic
    (cuBLAS's product, then Inductor's pass; the condition's mean included), against elain_kernels.activated_elain_map
    by tile and pipeline stages, with the identity features in float32 (as the generator passes them) and in fp16
    (converted beforehand). x's statistics are given to both. Times as `bench_feature_layers`'s."""
    from models.networks import elain_kernels
    from models.networks.generator import LEAKY_SLOPE, ElaIN, _ActivatedElaINMap
    from models.networks.layers import aligned

    generator = torch.Generator(device=device).manual_seed(4)
    columns = aligned(vertices)
    features = torch.randn(batch, 256, columns, device=device, generator=generator)
    half_features = features.half()

    times = functools.partial(layer_times, device=device, warmup=warmup, repeats=repeats)
    results = {}
    for channels in ELAIN_MAP_CHANNELS:
        norm = ElaIN(channels, 256, fold_linear=True).to(device)
        x = torch.randn(batch, channels, columns, device=device, generator=generator).half()
        with torch.no_grad(), torch.autocast(device.type, torch.float16, enabled=device.type == "cuda"):
            weight, bias = norm.folded_condition()
            statistics = norm.statistics(x, norm.condition_mean(features, vertices), vertices)
        weight = weight.half().contiguous()

        @torch.compile
        def products_then_map(x: torch.Tensor) -> torch.Tensor:
            with torch.autocast(device.type, torch.float16, enabled=device.type == "cuda"):
                return _ActivatedElaINMap.apply(x, *norm.folded_identity_products(features, vertices)[:4],
                                                *statistics)

        with torch.no_grad():
            row = {"compiled": times(lambda: products_then_map(x))}
            for (tile, stages), (kind, identity) in itertools.product(
                    dict.fromkeys([(elain_kernels.ELAIN_TILE, elain_kernels.ELAIN_STAGES), *ELAIN_MAP_TILES]),
                    (("float32", features), ("fp16", half_features))):
                row[f"{'x'.join(map(str, tile))}, {stages} stages, {kind} features"] = times(
                    lambda: elain_kernels.activated_elain_map(x, identity, weight, bias, *statistics, LEAKY_SLOPE,
                                                              tile=tile, stages=stages))
        results[str(channels)] = row
    return results


def launch_fused_passes(device: torch.device, batch: int, vertices: int, launches: int) -> None:
    """Each kernel of fused.py at its default layout, `launches` times, untimed, on `fused_pass_inputs`: the
    fixed-point product of random features, the fixed-point conversion with the first column pass, then the forward
    pass, the final softmax's warp and its backward's column sums, the backward pass and dL/dC on the fixed-point C,
    as a half-precision training step runs them (for a profiler such as Nsight Compute)."""
    from models.networks.layers import split_operands
    from models.networks.ot import fused, stored

    inputs = fused_pass_inputs(device, batch, vertices)
    epsilon = stored.SINKHORN_EPSILON
    points = stored._pose_major(torch.randn(batch, vertices, 3, device=device))
    left, right = split_operands(torch.randn(batch, vertices, 256, device=device),
                                 torch.randn(batch, 256, vertices, device=device))
    for _ in range(launches):
        fused.fused_fixed_point_product(left, right, vertices, epsilon)
        fixed_point, _ = fused.fused_fixed_point_column_pass(inputs.similarity, epsilon)
        row_sum, log_a, column_shift, column_sum = fused.fused_row_column_forward(fixed_point, inputs.log_b,
                                                                                  inputs.shift, epsilon, 1.0)
        warp, _ = fused.fused_plan_warp(fixed_point, inputs.log_b, inputs.shift, points, epsilon)
        fused.fused_plan_column_sums(fixed_point, inputs.log_b, inputs.shift, torch.cat([warp, warp[..., :1]], 2),
                                     epsilon)
        fused.fused_row_column_backward(fixed_point, log_a, column_shift, column_sum, inputs.shift, row_sum,
                                        inputs.log_b, epsilon, 1.0)
        fused.fused_similarity_gradient(fixed_point, inputs.row_factors, inputs.column_factors, epsilon, 1.0,
                                        torch.float16, inputs.padding)
    synchronize(device)


def golden_check(device: torch.device, variants: list[str]) -> dict:
    """The variants on the golden fixture (tests/golden.py): max |diff| and relative L2 of warp_out and the
    output against the published code's, and the output's relative L2 to the first variant's (our reference)."""
    from tests.golden import GOLDEN_DIR, golden_inputs, load_golden_model
    batch = {key: value.to(device) for key, value in golden_inputs().items()}
    expected = {name: torch.from_numpy(np.load(GOLDEN_DIR / f"expected_{name}.npy")).double().to(device)
                for name in ("warp_out", "fake_points")}
    results, reference_output = {}, None
    for name in variants:
        model = load_golden_model(build(name, device)).eval()
        with torch.no_grad():
            outputs = model.transfer(batch["identity_points"], batch["pose_points"])
        row = {}
        for key, target in expected.items():
            actual = outputs[key][0].double()
            row[key] = {"max_diff": (actual - target).abs().max().item(),
                        "relative_l2": (torch.linalg.norm(actual - target) / torch.linalg.norm(target)).item()}
        reference_output = outputs["fake_points"].double() if reference_output is None else reference_output
        row["output_relative_l2_to_reference"] = (torch.linalg.norm(outputs["fake_points"].double() - reference_output)
                                                  / torch.linalg.norm(reference_output)).item()
        results[name] = row
        print(f"golden {name:24} warp max {row['warp_out']['max_diff']:.2e} rel {row['warp_out']['relative_l2']:.2e} | "
              f"out max {row['fake_points']['max_diff']:.2e} rel {row['fake_points']['relative_l2']:.2e} | "
              f"out vs reference {row['output_relative_l2_to_reference']:.2e}", flush=True)
    return results


def golden_gradients(device: torch.device, variants: list[str]) -> dict:
    """The variants' training-mode losses and gradient norms on the golden fixture (expected.json)."""
    from tests.golden import GOLDEN_DIR, golden_inputs, load_golden_model
    expected = json.loads((GOLDEN_DIR / "expected.json").read_text())
    batch = {key: value.to(device) for key, value in golden_inputs().items()}
    results = {}
    for name in variants:
        model = load_golden_model(build(name, device).cpu()).to(device).train()
        _, losses = model(batch)
        sum(losses.values()).backward()
        norms = {network: math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in module.parameters()))
                 for network, module in model.checkpoint_networks().items()}
        results[name] = {"rec": losses["rec"].item() / expected["train_mode_rec_loss_x1000"] - 1,
                         "edge": losses["edge"].item() / expected["train_mode_edge_loss_x0.5"] - 1,
                         "grad_G": norms["G"] / expected["grad_norm_G"] - 1,
                         "grad_Corr": norms["Corr"] / expected["grad_norm_Corr"] - 1}
        print(f"golden train {name:24} " + " ".join(f"{k} {v:+.2e}" for k, v in results[name].items()), flush=True)
    return results


def check_arguments(args: argparse.Namespace) -> None:
    """One-line errors for arguments that would fail only after minutes of benchmarking (or deep inside it)."""
    named = [name for name in args.variants.split(",") if name] + [args.sweep_variant]
    named += [name for name in (args.profile, args.profile_inference) if name]
    unknown = [name for name in named if name not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant {unknown[0]!r}; choose among {', '.join(VARIANTS)}")
    for flag, least in (("batch", 1), ("vertices", 3), ("repeats", 1), ("warmup", 0), ("big_batch", 0),
                        ("loader_pairs", 0), ("workers", 0), ("fused_launches", 0)):
        if getattr(args, flag) < least:
            raise ValueError(f"--{flag} must be at least {least}, got {getattr(args, flag)}")
    if args.out and not Path(args.out).parent.is_dir():
        raise ValueError(f"--out {args.out}: folder {Path(args.out).parent} does not exist; create it first")


def main() -> None:
    parser = OneLineErrorParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--vertices", type=int, default=6890)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names of VARIANTS (\"\": none)")
    parser.add_argument("--big_batch", type=int, default=64, help="a larger inference batch (0 to skip)")
    parser.add_argument("--skip_train", action="store_true", help="inference, sweep and loaders only")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--sweep", default="6890,13780,27560,55120,110240,220480",
                        help="vertex counts for the one-pair inference sweep ('' to skip)")
    parser.add_argument("--sweep_variant", default="chunked-fp16-compiled")
    parser.add_argument("--loader_pairs", type=int, default=256, help="pairs for the data-path test (0 to skip)")
    parser.add_argument("--workers", type=int, default=8, help="OBJ loader worker processes")
    parser.add_argument("--peak_tflops", type=float, default=800.0)
    parser.add_argument("--golden", action="store_true", help="only check the variants on the golden fixture")
    parser.add_argument("--profile", default="", help="only print a profile of this variant's training step")
    parser.add_argument("--profile_inference", default="", help="only print a profile of this variant's "
                        "inference at --batch pairs")
    parser.add_argument("--fused_passes", action="store_true", help="only time the fused Sinkhorn row + column "
                        "pass against the separate passes (by programs, stages and warps) and the dL/dC kernel (by "
                        "tile), at --batch and at one pair (a GPU with triton)")
    parser.add_argument("--fused_launches", type=int, default=0, help="only launch each fused Sinkhorn kernel this "
                        "many times at its default layout, untimed, at --batch (for a profiler such as ncu)")
    parser.add_argument("--feature_layers", action="store_true", help="only time one of Corr's 256-channel "
                        "layers on both meshes of --batch pairs: the compiled arithmetic against the layer kernel "
                        "(feature_kernels.py) by tile and pipeline stages (a GPU with triton)")
    parser.add_argument("--elain_maps", action="store_true", help="only time one ElaIN of each of the generator's "
                        "widths on --batch pairs: the compiled product and map against the ElaIN kernel "
                        "(elain_kernels.py) by tile, pipeline stages and the features' dtype (a GPU with triton)")
    parser.add_argument("--out", default="", help="write the results as JSON here")
    args = parser.parse_args()
    check_arguments(args)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device} needs a CUDA GPU and torch sees none; run with --device cpu")
    if args.profile:
        print(profile_training(args.profile, synthetic_batch(args.batch, args.vertices, device), device))
        return
    if args.profile_inference:
        print(profile_inference(args.profile_inference, synthetic_batch(args.batch, args.vertices, device), device))
        return
    if args.fused_passes or args.fused_launches:
        from models.networks.ot import fused
        reason = fused.unsupported_reason(torch.empty(1, 1, 1, device=device))
        if reason is not None:
            raise RuntimeError(reason)
    if args.fused_launches:
        launch_fused_passes(device, args.batch, args.vertices, args.fused_launches)
        return
    if args.feature_layers or args.elain_maps:
        from models.networks import elain_kernels, feature_kernels
        if args.feature_layers:
            reason = feature_kernels.unsupported_reason(torch.empty(1, device=device))
            bench_layers = bench_feature_layers
            labels = {kept: f"feature layer, {2 * args.batch} x 256 x {args.vertices}, input {kept.replace('_', ' ')}"
                      for kept in ("kept", "not_kept")}
        else:
            reason = elain_kernels.unsupported_reason(torch.empty(1, device=device, dtype=torch.float16))
            bench_layers = bench_elain_maps
            labels = {str(channels): f"ElaIN map, {args.batch} x {channels} x {args.vertices}"
                      for channels in ELAIN_MAP_CHANNELS}
        if reason is not None:
            raise RuntimeError(reason)
        results = bench_layers(device, args.batch, args.vertices, args.warmup, args.repeats)
        for key, row in results.items():
            print(f"{labels[key]}: " + ", ".join(f"{name} " + ("does not fit" if ms is None else
                                                 f"{ms['ms']:.3f} ms ({ms['back_to_back_ms']:.3f} back to back)")
                                                 for name, ms in row.items()))
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=1))
        return
    if args.fused_passes:
        results = {size: bench_fused_passes(device, size, args.vertices, args.warmup, args.repeats)
                   for size in sorted({args.batch, 1}, reverse=True)}
        for size, row in results.items():
            print(f"batch {size}: separate row + column passes (float32 C) {row['separate_ms']:.3f} ms")
            for form in ("float32", "fixed_point"):
                for key, label in (("fused", "programs per batch element"), ("stages", "pipeline stages"),
                                   ("warps", "warps")):
                    print(f"batch {size}, {form} C: fused, by {label}: "
                          + ", ".join(f"{value} {times['forward_ms']:.3f} ms forward {times['backward_ms']:.3f} ms "
                                      "backward" for value, times in row[form][key].items()))
                print(f"batch {size}, {form} C: dL/dC kernel, by tile (rows x columns x warps): "
                      + ", ".join(f"{tile} {ms:.3f} ms" for tile, ms in row[form]["similarity_gradient"].items()))
                for key, label in (("plan_warp", "warp"), ("plan_column_sums", "column sums")):
                    print(f"batch {size}, {form} C: final softmax's {label}, by warps: "
                          + ", ".join(f"{name} {ms:.3f} ms" for name, ms in row[form][key].items()))
            print(f"batch {size}: C's split product and the fixed-point column pass, then the fixed-point product by "
                  f"tile (rows x columns x contraction x warps): "
                  + ", ".join(f"{name} " + ("out of shared memory" if ms is None else f"{ms:.3f} ms")
                              for name, ms in row["product"].items()))
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=1))
        return
    if args.golden:
        variants = args.variants.split(",")
        results = {"eval": golden_check(device, variants), "train": golden_gradients(device, variants)}
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=1))
        return
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "batch": args.batch, "vertices": args.vertices,
               "date": time.strftime("%Y-%m-%d"), "host_launch_us": {"start": host_launch_us(device)}, "train": {},
               "infer_one": {}, "infer_batch": {}, "sweep": {}}
    print(f"host: {results['host_launch_us']['start']:.1f} us to issue an operator", flush=True)
    step_gflop = 3 * FORWARD_GFLOP_PER_PAIR_6890 * args.vertices / 6890 * args.batch
    batch = synthetic_batch(args.batch, args.vertices, device)
    one = {key: value[:1] for key, value in batch.items()}
    big = synthetic_batch(args.big_batch, args.vertices, device) if args.big_batch else None

    def training_row(label: str, model: PoseTransferModel, graphs: bool) -> None:
        train = bench_training(model, batch, device, args.warmup, args.repeats, graphs)
        train.update(pairs_per_s=args.batch / train["ms"] * 1e3, mfu=step_gflop / train["ms"] / args.peak_tflops)
        results["train"][label] = train
        print(f"{label:30} train {train['ms']:8.2f} ms ({train['back_to_back_ms']:8.2f} back to back) "
              f"{train['pairs_per_s']:8.1f} pairs/s {train['peak_gib']:6.2f} GiB", flush=True)

    for name in filter(None, args.variants.split(",")):  # --variants "": the data path alone
        model = build(name, device)
        if not args.skip_train:
            training_row(name, model, graphs=False)
        model.eval()
        transfers = {name: model.transfer}
        if device.type == "cuda":
            transfers[f"{name}+graphs"] = GraphedTransfer(model)
        for label, transfer in transfers.items():
            results["infer_one"][label] = bench_inference(transfer, one, device, args.warmup, args.repeats)
            for key, inputs in (("infer_batch", batch), ("infer_big_batch", big)):
                if inputs is not None:
                    measure = functools.partial(bench_inference, transfer, inputs, device, args.warmup, args.repeats)
                    infer = measure() if key == "infer_batch" else or_out_of_memory(measure, device)
                    pairs = len(inputs["identity_points"])
                    infer["pairs_per_s"] = None if infer["ms"] is None else pairs / infer["ms"] * 1e3
                    results.setdefault(key, {})[label] = infer
            print(f"{label:24} infer 1 pair {results['infer_one'][label]['ms']:7.2f} ms | batch "
                  f"{results['infer_batch'][label]['pairs_per_s']:8.1f} pairs/s", flush=True)
        del model, transfers
        if device.type == "cuda" and not args.skip_train:  # the step replayed from a CUDA graph, on a fresh model
            try:
                training_row(f"{name}+graphs", build(name, device), graphs=True)
            except GraphCaptureError as error:  # the table goes on without the row
                print(f"{name}+graphs: no training row ({error})", flush=True)
    for name in ("reference", args.sweep_variant):
        for vertices in [int(v) for v in args.sweep.split(",") if v]:
            row = or_out_of_memory(lambda: bench_inference(build(name, device).eval().transfer,
                                                           synthetic_batch(1, vertices, device), device, 1, 3), device)
            results["sweep"].setdefault(name, {})[vertices] = row
            reset_peak(device)
            if row["ms"] is None:
                break
            print(f"sweep {name:24} N={vertices:7d} {row['ms']:9.2f} ms {row['peak_gib']:7.2f} GiB", flush=True)
    if args.loader_pairs:
        results["loaders"] = bench_loaders(device, args.vertices, args.batch, args.loader_pairs, args.workers)
    reference = results["train"].get("reference")
    print(f"\n{'training step':30} {'ms':>8} {'pairs/s':>8} {'peak GiB':>9} {'ratio':>6} {'MFU':>6} "
          f"{'back to back ms':>16} {'kernels ms':>11}")
    for name, row in results["train"].items():
        ratio = row["pairs_per_s"] / reference["pairs_per_s"] if reference else float("nan")
        print(f"{name:30} {row['ms']:8.2f} {row['pairs_per_s']:8.1f} {row['peak_gib']:9.2f} {ratio:6.2f} "
              f"{row['mfu']:6.1%} {row['back_to_back_ms']:16.2f} {row['kernel_ms']:11.2f}")
    big_column = f"batch {args.big_batch} pairs/s" if big is not None else ""
    print(f"\n{'inference':30} {'1 pair ms':>10} {f'batch {args.batch} pairs/s':>16} {'peak GiB':>9} {big_column:>18}")
    for name in results["infer_one"]:
        big_rate = "" if big is None else _rate_or_out_of_memory(results["infer_big_batch"][name])
        print(f"{name:30} {results['infer_one'][name]['ms']:10.2f} {results['infer_batch'][name]['pairs_per_s']:16.1f} "
              f"{results['infer_batch'][name]['peak_gib']:9.2f} {big_rate}")
    results["host_launch_us"]["end"] = host_launch_us(device)
    print(f"\nhost: {results['host_launch_us']['start']:.1f} us to issue an operator at the start, "
          f"{results['host_launch_us']['end']:.1f} at the end")
    if "loaders" in results:
        print(f"\ndata path: packed {results['loaders']['packed']['pairs_per_s']:.0f} pairs/s, OBJ files "
              f"{results['loaders']['files']['pairs_per_s']:.0f} pairs/s with {args.workers} workers")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    run_main(main)
