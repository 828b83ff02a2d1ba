"""--compile on: each model's compiled region carries its autocast, so the dtype is part of the graph."""
import pytest
import torch

from models.networks import init_weights
from models.networks.correspondence import COMPILED_KERNELS_MIN_BATCH
from models.npt_model import NPTModel
from models.pose_transfer_model import PoseTransferModel


def _ver2ver(precision: str) -> PoseTransferModel:
    model = PoseTransferModel(ngf=8, ot="dense", precision=precision)
    init_weights(model, "xavier", 0.02)  # the published initialisation, as create_model applies it
    return model


@pytest.fixture
def captured_graphs(monkeypatch):
    """torch.compile with a backend that records each graph and runs it as traced (no Inductor)."""
    graphs = []
    real_compile = torch.compile

    def recording_compile(function, **options):
        def record(graph_module, example_inputs):
            graphs.append(graph_module)
            return graph_module.forward
        return real_compile(function, backend=record)

    monkeypatch.setattr(torch, "compile", recording_compile)
    torch._dynamo.reset()
    yield graphs
    torch._dynamo.reset()


def _autocast_dtypes(graphs) -> set:
    """The dtypes of every autocast region entered inside the recorded graphs."""
    return {arg for graph in graphs for node in graph.graph.nodes
            if node.target is torch.amp.autocast_mode._enter_autocast
            for arg in node.args if isinstance(arg, torch.dtype)}


@pytest.mark.parametrize("make_model", [_ver2ver, lambda precision: NPTModel(precision=precision)],
                         ids=["ver2ver", "npt"])
@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_compiled_model_graphs_carry_the_autocast_dtype(captured_graphs, make_model, precision, dtype):
    torch.manual_seed(0)
    eager = make_model(precision).eval()
    compiled = make_model(precision).eval()
    compiled.load_state_dict(eager.state_dict())
    compiled.compile_networks()
    generator = torch.Generator().manual_seed(1)
    identity_points, pose_points = torch.rand(1, 40, 3, generator=generator), torch.rand(1, 40, 3, generator=generator)
    with torch.no_grad():
        expected = eager.transfer(identity_points, pose_points)["fake_points"]
        actual = compiled.transfer(identity_points, pose_points)["fake_points"]
    assert captured_graphs and _autocast_dtypes(captured_graphs) == {dtype}
    torch.testing.assert_close(actual, expected)


def test_compiled_ver2ver_runs_corr_through_its_compiled_layers(captured_graphs):
    """Corr's forward stays eager (it picks the layer kernels for batches on a GPU) and calls its compiled layers."""
    model = _ver2ver("fp16").eval()
    points = torch.rand(1, 3, 40, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model.corr(points, points)
        assert not captured_graphs
        model.compile_networks()
        actual = model.corr(points, points)
    assert captured_graphs and model.corr.kernels_min_batch == COMPILED_KERNELS_MIN_BATCH
    torch.testing.assert_close(actual, expected)
