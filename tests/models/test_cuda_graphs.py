"""CUDA-graph inference (models/cuda_graphs.py): the same numbers as the eager call, one graph per shape."""
import pytest
import torch

from models import cuda_graphs
from models.cuda_graphs import GraphedTransfer
from models.networks import init_weights
from models.pose_transfer_model import PoseTransferModel


def test_cpu_inputs_are_refused_with_one_line():
    with pytest.raises(ValueError, match="CUDA graphs need inputs on a CUDA device, got cpu"):
        GraphedTransfer(PoseTransferModel(ngf=8).eval())(torch.rand(1, 30, 3), torch.rand(1, 30, 3))
    with pytest.raises(ValueError, match="max_graphs must be at least 1"):
        GraphedTransfer(PoseTransferModel(ngf=8), max_graphs=0)


def test_a_failed_capture_runs_eagerly_with_one_warning(monkeypatch, capsys):
    """Replaying must never fail a call that runs eagerly: a capture that fails (out of memory here) leaves
    that shape eager for good. Run on the CPU with the device check and the capture replaced."""
    captures = []

    def failing_capture(transfer, identity_points, pose_points):
        captures.append(tuple(identity_points.shape))
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")

    monkeypatch.setattr(cuda_graphs, "_require_cuda", lambda identity_points: None)
    monkeypatch.setattr(cuda_graphs, "_CapturedTransfer", failing_capture)
    torch.manual_seed(0)
    model = PoseTransferModel(ngf=8)
    init_weights(model)
    model.eval()
    graphed = GraphedTransfer(model)
    identity, pose = torch.rand(1, 30, 3), torch.rand(1, 32, 3)
    with torch.no_grad():
        expected = model.transfer(identity, pose)
    assert all(torch.isfinite(value).all() for value in expected.values())
    for _ in range(4):
        torch.testing.assert_close(graphed(identity, pose), expected, rtol=0, atol=0)
    assert captures == [(1, 30, 3)] and not graphed.graphs  # tried once, on the second call
    warning = capsys.readouterr().err.strip()
    assert warning == ("warning: no CUDA graph for inputs (1, 30, 3) and (1, 32, 3) (CUDA out of memory. "
                       "Tried to allocate 2.00 GiB); they run without one")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("ot, precision", [("dense", "fp32"), ("stored", "fp16"), ("chunked", "bf16")])
def test_replays_equal_the_eager_calls(ot, precision):
    torch.manual_seed(0)
    model = PoseTransferModel(ngf=16, ot=ot, precision=precision)
    init_weights(model)  # the published initialisation; PyTorch's default one gives NaN outputs here
    model = model.cuda()
    with torch.no_grad():  # spectral norm's power iteration runs in training mode; without it fp16 overflows
        for _ in range(5):
            model.transfer(torch.rand(2, 500, 3, device="cuda"), torch.rand(2, 507, 3, device="cuda"))
    model.eval()
    graphed = GraphedTransfer(model, max_graphs=1)
    shapes = [(2, 500, 3), (2, 500, 3), (2, 500, 3), (1, 300, 3), (1, 300, 3), (2, 500, 3), (2, 500, 3)]
    for call, shape in enumerate(shapes):
        identity, pose = torch.rand(shape, device="cuda"), torch.rand(shape[0], shape[1] + 7, 3, device="cuda")
        with torch.no_grad():
            expected = model.transfer(identity, pose)
        got = graphed(identity, pose)
        for name in ("warp_out", "fake_points"):
            assert torch.isfinite(expected[name]).all(), f"call {call} {name}"
            torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=f"call {call} {name}")
    assert len(graphed.graphs) == 1  # max_graphs=1: the (2, 500) graph replaced the (1, 300) one
    kept = next(iter(graphed.graphs.values()))
    outputs = graphed(identity, pose)
    graphed(torch.rand_like(identity), torch.rand_like(pose))
    assert not torch.equal(outputs["fake_points"], kept.outputs["fake_points"])  # callers get copies
