"""util/bench.py on the CPU at toy size: the tables and JSON it writes, its profile tables, the fused-pass timing and
the feature-layer timing."""
import json
import math
import os
import sys
import time

import pytest
import torch

from models.networks import elain_kernels, feature_kernels
from models.networks.ot import fused
from util import bench


def test_bench_writes_timings_for_each_variant(tmp_path, monkeypatch, capsys):
    out = tmp_path / "bench.json"
    monkeypatch.setattr(sys, "argv", ["bench", "--device", "cpu", "--vertices", "40", "--batch", "2",
                                      "--variants", "reference", "--sweep", "", "--loader_pairs", "0",
                                      "--big_batch", "0", "--warmup", "1", "--repeats", "2", "--out", str(out)])
    bench.main()
    results = json.loads(out.read_text())
    assert (results["device"], results["batch"], results["vertices"]) == ("cpu", 2, 40)
    train = results["train"]["reference"]
    assert train["ms"] > 0 and math.isclose(train["pairs_per_s"], 2 / train["ms"] * 1e3)
    assert results["infer_one"]["reference"]["ms"] > 0
    assert math.isnan(train["kernel_ms"])  # a GPU's kernel time; none on a CPU
    assert sorted(results["host_launch_us"]) == ["end", "start"]
    assert all(0 < us < 1e4 for us in results["host_launch_us"].values())
    printed = capsys.readouterr().out
    assert "training step" in printed and "reference" in printed and "us to issue an operator" in printed


@pytest.mark.skipif(not torch.cuda.is_available(), reason="kernel time is a GPU's")
def test_kernel_time_counts_the_kernels_of_a_step_and_not_the_host():
    device = torch.device("cuda")
    a = torch.randn(2048, 2048, device=device)
    one_product = bench.kernel_ms(lambda: a @ a, device)
    host_bound = bench.kernel_ms(lambda: [a @ a for _ in range(4)] + [time.sleep(0.05)], device)
    assert 0 < one_product < 50
    assert 3 * one_product < host_bound < 6 * one_product  # four products; the sleep is not a kernel


def test_profile_names_operators_and_their_shapes():
    batch = bench.synthetic_batch(2, 40, torch.device("cpu"))
    table = bench.profile_training("reference", batch, torch.device("cpu"), steps=1)
    by_operator, by_shape = table.split("By input shape (1 calls):")
    assert "aten::bmm" in by_operator and "Optimizer.step" in by_operator
    # Input shapes are recorded: the generator's widest activations, (B, 16 ngf, N) = (2, 1024, 40).
    assert "[2, 1024, 40]" in by_shape


def test_kernel_table_lists_device_kernels_per_call_by_self_time():
    from types import SimpleNamespace
    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    events = [SimpleNamespace(key="aten::bmm", device_type=cpu, self_device_time_total=9000.0, count=4),
              SimpleNamespace(key="small_kernel", device_type=cuda, self_device_time_total=1000.0, count=4),
              SimpleNamespace(key="big_kernel", device_type=cuda, self_device_time_total=3000.0, count=2),
              SimpleNamespace(key="## Call CompiledFxGraph f123 ##", device_type=cuda, self_device_time_total=5000.0,
                              count=2),
              SimpleNamespace(key="Optimizer.step#Adam.step", device_type=cuda, self_device_time_total=700.0, count=2,
                              is_user_annotation=True)]
    lines = bench._kernel_table(events, calls=2).splitlines()
    assert lines[0] == "Device kernels per call (2.000 ms, 3 launches in all):"  # 4000 us, 6 launches, 2 calls
    assert lines[1].split() == ["1.500", "ms", "75.0%", "1x", "big_kernel"]
    assert lines[2].split() == ["0.500", "ms", "25.0%", "2x", "small_kernel"]
    assert len(lines) == 3  # the CPU operator and the two annotations are left out


def _kernel_bench(tmp_path, monkeypatch, *flags: str) -> dict:
    """util.bench's JSON for `flags` on the GPU, or on the CPU (Triton's interpreter), one warm-up and two repeats."""
    out = tmp_path / "bench.json"
    monkeypatch.setattr(sys, "argv", ["bench", "--device", "cuda" if torch.cuda.is_available() else "cpu", *flags,
                                      "--warmup", "1", "--repeats", "2", "--out", str(out)])
    bench.main()
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.skipif(not fused.fused_pass_supported(torch.empty(1, 1, 1, device="cuda" if torch.cuda.is_available()
                                                              else "cpu")),
                    reason="the fused Sinkhorn passes need triton (a GPU, or its interpreter on the CPU)")
def test_fused_passes_mode_times_both_forms(tmp_path, monkeypatch, capsys):
    results = _kernel_bench(tmp_path, monkeypatch, "--fused_passes", "--vertices", "40", "--batch", "2")
    assert set(results) == {"2", "1"}
    for row in results.values():
        assert row["separate_ms"] > 0
        product_times = list(row["product"].items())
        assert [name for name, _ in product_times[:2]] == ["separate", "x".join(map(str, fused.PRODUCT_TILE))]
        assert product_times[0][1] > 0 and product_times[1][1] > 0  # the default first, and it launches
        assert all(ms is None or ms > 0 for _, ms in product_times)  # None: a tile too large for the GPU
        for form, stage_counts in (("float32", {"2", "3", "4"}), ("fixed_point", {"2", "3", "4", "6"})):
            timed = row[form]
            assert all(ms > 0 for ms in timed["similarity_gradient"].values())
            assert list(timed["similarity_gradient"])[0] == "x".join(map(str, fused.GRADIENT_TILE))  # default first
            for key in ("plan_warp", "plan_column_sums"):
                assert list(timed[key]) == ["compiled", "default", "8", "16"]
                assert all(ms > 0 for ms in timed[key].values())
            assert set(timed["stages"]) == stage_counts and set(timed["warps"]) == {"8", "16", "32"}
            assert all(times["forward_ms"] > 0 and times["backward_ms"] > 0
                       for times in [*timed["fused"].values(), *timed["stages"].values(), *timed["warps"].values()])
    printed = capsys.readouterr().out
    default_tile = "x".join(map(str, fused.GRADIENT_TILE))
    for form in ("float32", "fixed_point"):
        assert f"{form} C: fused, by programs per batch element: default" in printed
        assert f"{form} C: fused, by pipeline stages: 2" in printed
        assert f"{form} C: dL/dC kernel, by tile (rows x columns x warps): {default_tile}" in printed
        assert f"{form} C: final softmax's warp, by warps: compiled" in printed
        assert f"{form} C: final softmax's column sums, by warps: compiled" in printed
    assert "C's split product and the fixed-point column pass, then the fixed-point product by tile" in printed


@pytest.mark.skipif(not fused.fused_pass_supported(torch.empty(1, 1, 1, device="cuda" if torch.cuda.is_available()
                                                              else "cpu")),
                    reason="the fused Sinkhorn passes need triton (a GPU, or its interpreter on the CPU)")
def test_fused_launches_mode_runs_each_kernel_the_asked_number_of_times_on_the_fixed_point_similarity(monkeypatch):
    calls = []

    def counted(name):
        kernel = getattr(fused, name)

        def run(similarity, *args, **kwargs):
            calls.append((name, similarity.dtype))
            return kernel(similarity, *args, **kwargs)
        return run
    for name in ("fused_fixed_point_product", "fused_fixed_point_column_pass", "fused_row_column_forward",
                 "fused_plan_warp",
                 "fused_plan_column_sums", "fused_row_column_backward", "fused_similarity_gradient"):
        monkeypatch.setattr(fused, name, counted(name))
    monkeypatch.setattr(sys, "argv", ["bench", "--device", "cuda" if torch.cuda.is_available() else "cpu",
                                      "--fused_launches", "2", "--vertices", "40", "--batch", "2"])
    bench.main()
    assert calls == 2 * [("fused_fixed_point_product", torch.float16), ("fused_fixed_point_column_pass", torch.float32),
                         ("fused_row_column_forward", torch.int16),
                         ("fused_plan_warp", torch.int16), ("fused_plan_column_sums", torch.int16),
                         ("fused_row_column_backward", torch.int16),
                         ("fused_similarity_gradient", torch.int16)]


@pytest.mark.skipif(fused.triton is None, reason="needs triton")
def test_tile_time_is_none_for_a_tile_the_gpu_cannot_launch():
    from triton.runtime.errors import OutOfResources

    def too_large():
        raise OutOfResources(300_000, 232_448, "shared memory")

    assert bench.tile_time(too_large, torch.device("cpu"), 1, 2) is None

    def too_large_a_layer():  # feature_kernels.py reports the same refusal in its own words
        raise feature_kernels.KernelsDoNotFit("the feature kernels do not fit this GPU")

    assert bench.tile_time(too_large_a_layer, torch.device("cpu"), 1, 2) is None
    assert bench.tile_time(lambda: None, torch.device("cpu"), 1, 2) >= 0
    with pytest.raises(ValueError):  # other failures still stop the sweep
        bench.tile_time(lambda: int("x"), torch.device("cpu"), 1, 2)


def test_bench_says_in_one_line_what_the_machine_lacks():
    """A GPU asked for where torch sees none, and the fused passes where they cannot run: one line each, status 2."""
    import subprocess

    cases = [["--device", "cuda"]] if not torch.cuda.is_available() else []
    if not fused.fused_pass_supported(torch.empty(1, 1, 1)):  # on the CPU without triton's interpreter
        cases.append(["--device", "cpu", "--fused_passes"])
    if not cases:
        pytest.skip("this machine has a GPU and the fused passes run on its CPU too")
    for arguments in cases:
        finished = subprocess.run([sys.executable, "-m", "util.bench", *arguments], capture_output=True, text=True,
                                  timeout=120, env={**os.environ, "TRITON_INTERPRET": "0"})
        assert finished.returncode == 2 and finished.stderr.startswith("error: "), finished.stderr
        assert len(finished.stderr.strip().splitlines()) == 1, finished.stderr


def test_product_table_gives_each_shape_its_time_and_rate():
    from types import SimpleNamespace
    cpu = torch.autograd.DeviceType.CPU
    assert bench.product_flops("aten::bmm", [[8, 64, 32], [8, 32, 100], []]) == 2 * 8 * 64 * 32 * 100
    assert bench.product_flops("aten::addmm", [[10], [10, 20], [20, 30]]) == 2 * 10 * 20 * 30
    assert bench.product_flops("aten::add", [[10, 20], [10, 20]]) == 0
    events = [SimpleNamespace(key="aten::bmm", device_type=cpu, device_time_total=4000.0, count=4,
                              input_shapes=[[8, 1000, 500], [8, 500, 1000], []]),
              SimpleNamespace(key="aten::mm", device_type=cpu, device_time_total=1000.0, count=2,
                              input_shapes=[[100, 100], [100, 100]]),
              SimpleNamespace(key="aten::add", device_type=cpu, device_time_total=9000.0, count=2,
                              input_shapes=[[100], [100]])]
    lines = bench._product_table(events, calls=2, on_device=True).splitlines()
    assert lines[0] == "Matrix products by input shapes, per call (2.500 ms in all):"
    # 2 x 8 x 1000 x 500 x 1000 = 8 GFLOP a launch, 2 launches a call in 2 ms: 8 TFLOP/s.
    assert lines[1].split()[:5] == ["2.000", "ms", "2x", "8", "TFLOP/s"] and "[8, 1000, 500]" in lines[1]
    assert lines[2].split()[:5] == ["0.500", "ms", "1x", "0", "TFLOP/s"] and "aten::mm" in lines[2]
    assert len(lines) == 3  # not a product: left out


def test_profile_lists_the_products_by_shape():
    batch = bench.synthetic_batch(2, 40, torch.device("cpu"))
    table = bench.profile_training("reference", batch, torch.device("cpu"), steps=1)
    products = table.split("Matrix products by input shapes, per call")[1].splitlines()[1:]
    # The generator's 1x1 convolutions at 16 ngf = 1024 channels, without a bias (spectral_norm's conv_s) and with.
    rows = {line.split("TFLOP/s")[1].strip(): float(line.split()[0]) for line in products}
    assert rows["aten::bmm [[2, 1024, 1024], [2, 1024, 40]]"] > 0
    assert rows["aten::baddbmm [[1024, 1], [2, 1024, 1024], [2, 1024, 40]]"] > 0


def test_a_graphed_step_that_cannot_be_captured_is_a_capture_error(monkeypatch, capsys):
    """make_training_step(graphs=True) runs the warm-up steps, then a capture; when the capture fails (out of memory
    here; on the CPU with the device check, the side stream and the capture replaced) it raises GraphCaptureError,
    which util.bench's table skips with one line, after the warning the step printed."""
    from models import train_step

    def failing_capture(self, batch):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train_step, "_require_cuda_model", lambda network: torch.device("cpu"))
    monkeypatch.setattr(train_step, "on_side_stream", lambda device, function: None)
    monkeypatch.setattr(train_step.GraphedTrainingStep, "_capture", failing_capture)
    monkeypatch.setattr(torch.optim.Adam, "step", lambda self, closure=None: None)  # no capturable Adam on the CPU
    model = bench.build("reference", torch.device("cpu"))
    with pytest.raises(bench.GraphCaptureError, match="could not be captured as a CUDA graph"):
        bench.make_training_step(model, bench.synthetic_batch(1, 30, torch.device("cpu")), torch.device("cpu"),
                                 graphs=True)
    assert "warning: the training step could not be captured" in capsys.readouterr().err


@pytest.mark.skipif(feature_kernels.unsupported_reason(torch.empty(1, device="cuda" if torch.cuda.is_available()
                                                                   else "cpu")) is not None,
                    reason="the feature kernels need triton (a GPU, or its interpreter on the CPU)")
def test_feature_layers_mode_times_the_compiled_layer_and_each_kernel_layout(tmp_path, monkeypatch, capsys):
    results = _kernel_bench(tmp_path, monkeypatch, "--feature_layers", "--vertices", "20", "--batch", "1")
    default = "x".join(map(str, feature_kernels.CONVOLUTION_TILE))
    assert set(results) == {"kept", "not_kept"}
    for row in results.values():
        names = list(row)
        assert names[:3] == ["compiled", f"{default}, 2 stages", f"{default}, 3 stages"]
        assert len(names) == 1 + len(bench.FEATURE_LAYER_STAGES) * (1 + len(bench.FEATURE_LAYER_TILES))
        assert all(times is None or (times["ms"] > 0 and times["back_to_back_ms"] > 0) for times in row.values())
        assert row["compiled"] is not None and row[f"{default}, 3 stages"] is not None
    printed = capsys.readouterr().out
    assert "feature layer, 2 x 256 x 20, input kept: compiled" in printed and "input not kept" in printed


@pytest.mark.skipif(elain_kernels.unsupported_reason(torch.empty(1, dtype=torch.float16, device="cuda" if
                                                                 torch.cuda.is_available() else "cpu")) is not None,
                    reason="the ElaIN kernel needs triton (a GPU, or its interpreter on the CPU)")
def test_elain_maps_mode_times_the_compiled_map_and_each_kernel_layout(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "ELAIN_MAP_CHANNELS", (32, 16))
    results = _kernel_bench(tmp_path, monkeypatch, "--elain_maps", "--vertices", "20", "--batch", "1")
    default = f"{'x'.join(map(str, elain_kernels.ELAIN_TILE))}, {elain_kernels.ELAIN_STAGES} stages"
    assert set(results) == {"32", "16"}
    for row in results.values():
        names = list(row)
        assert names[:3] == ["compiled", f"{default}, float32 features", f"{default}, fp16 features"]
        assert len(names) == 1 + 2 * (1 + len(bench.ELAIN_MAP_TILES))
        assert all(times["ms"] > 0 and times["back_to_back_ms"] > 0 for times in row.values())
    printed = capsys.readouterr().out
    assert "ElaIN map, 1 x 32 x 20: compiled" in printed and "ElaIN map, 1 x 16 x 20" in printed


def test_a_big_batch_that_does_not_fit_reads_out_of_memory_and_the_table_goes_on(tmp_path, monkeypatch, capsys):
    out = tmp_path / "bench.json"
    monkeypatch.setattr(sys, "argv", ["bench", "--device", "cpu", "--vertices", "40", "--batch", "2",
                                      "--variants", "reference", "--sweep", "", "--loader_pairs", "0", "--skip_train",
                                      "--big_batch", "5", "--warmup", "1", "--repeats", "2", "--out", str(out)])
    timed = bench.bench_inference

    def no_memory_for_five(transfer, batch, *args):
        if len(batch["identity_points"]) == 5:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 54.00 MiB.")
        return timed(transfer, batch, *args)

    monkeypatch.setattr(bench, "bench_inference", no_memory_for_five)
    bench.main()
    results = json.loads(out.read_text())
    assert results["infer_big_batch"]["reference"] == {"ms": None, "peak_gib": None, "pairs_per_s": None, "oom": True}
    assert results["infer_batch"]["reference"]["pairs_per_s"] > 0
    reference_row = next(line for line in capsys.readouterr().out.splitlines()[::-1] if line.startswith("reference"))
    assert reference_row.endswith("out of memory")


def test_a_failure_other_than_memory_is_not_taken_for_a_batch_that_does_not_fit():
    def broken():
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        bench.or_out_of_memory(broken, torch.device("cpu"))


def test_the_sweep_stops_at_the_first_vertex_count_that_does_not_fit(tmp_path, monkeypatch):
    out = tmp_path / "bench.json"
    monkeypatch.setattr(sys, "argv", ["bench", "--device", "cpu", "--variants", "", "--sweep", "30,60,90",
                                      "--sweep_variant", "reference", "--loader_pairs", "0", "--out", str(out)])
    timed = bench.bench_inference

    def no_memory_from_sixty(transfer, batch, *args):
        if batch["identity_points"].shape[1] >= 60:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 54.00 MiB.")
        return timed(transfer, batch, *args)

    monkeypatch.setattr(bench, "bench_inference", no_memory_from_sixty)
    bench.main()
    sweep = json.loads(out.read_text())["sweep"]["reference"]
    assert list(sweep) == ["30", "60"] and sweep["30"]["ms"] > 0
    assert sweep["60"] == {"ms": None, "peak_gib": None, "oom": True}
