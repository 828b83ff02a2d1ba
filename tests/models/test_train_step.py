"""models/train_step.py: one optimizer step a call, with results that keep no autograd graph alive; replayed from a
CUDA graph, the same numbers as the eager step, and eager steps where a graph cannot be used."""
import pytest
import torch

from models import train_step
from models.networks import init_weights
from models.pose_transfer_model import PoseTransferModel
from models.train_step import WARMUP_STEPS, GraphedTrainingStep, training_step
from util.bench import synthetic_batch


def test_a_step_updates_every_parameter_and_returns_detached_results():
    torch.manual_seed(0)
    model = PoseTransferModel(ngf=8)
    init_weights(model)
    optimizer = torch.optim.Adam(model.parameters(), **model.OPTIMIZER)
    before = [parameter.detach().clone() for parameter in model.parameters()]
    outputs, losses = training_step(model, optimizer, torch.amp.GradScaler("cpu", enabled=False),
                                    synthetic_batch(2, 40, torch.device("cpu")))
    assert set(losses) == {"rec", "edge"} and all(torch.isfinite(value) for value in losses.values())
    assert all(value.grad_fn is None for value in (*outputs.values(), *losses.values()))
    changed = [not torch.equal(old, new) for old, new in zip(before, model.parameters())]
    assert sum(changed) > len(changed) // 2  # an update (some biases feed instance norms: no gradient)


def _twin_runs(device: str, compiled: bool = False, **model_options) -> tuple[tuple, tuple]:
    """Two identical models (compiled as train.py compiles them, or not), each with its (on a GPU fused) capturable
    Adam and loss scaler."""
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = PoseTransferModel(ngf=8, **model_options)
        init_weights(model)
        model = model.to(device).train()
        if compiled:
            model.compile_networks()
        optimizer = torch.optim.Adam(model.parameters(), **model.OPTIMIZER, fused=device == "cuda",
                                     capturable=device == "cuda")
        scaler = torch.amp.GradScaler(device, enabled=model.generator_dtype == torch.float16)
        runs.append((model, optimizer, scaler))
    return runs[0], runs[1]


def _assert_same_parameters(model: torch.nn.Module, other: torch.nn.Module, step: int) -> None:
    for (name, value), expected in zip(model.named_parameters(), other.parameters()):
        torch.testing.assert_close(value, expected, rtol=0, atol=0, msg=f"step {step}: {name}")


def test_graphed_step_refuses_an_optimizer_it_cannot_capture_and_a_cpu_model():
    model = PoseTransferModel(ngf=8)
    with pytest.raises(ValueError, match="needs an optimizer made with capturable=True"):
        GraphedTrainingStep(model, torch.optim.Adam(model.parameters()), torch.amp.GradScaler("cpu", enabled=False))
    with pytest.raises(ValueError, match="CUDA graphs need the model on a CUDA device, got cpu"):
        GraphedTrainingStep(model, torch.optim.Adam(model.parameters(), capturable=True),
                            torch.amp.GradScaler("cpu", enabled=False))


def _graphed_cpu_twins(monkeypatch: pytest.MonkeyPatch, capture) -> tuple[GraphedTrainingStep, tuple]:
    """A GraphedTrainingStep on the CPU (the device check and the side stream replaced, `capture` as its _capture)
    and the eager twin run beside it."""
    monkeypatch.setattr(train_step, "_require_cuda_model", lambda network: torch.device("cpu"))
    monkeypatch.setattr(train_step, "on_side_stream", lambda device, function: function())
    monkeypatch.setattr(GraphedTrainingStep, "_capture", capture)
    (model, optimizer, scaler), eager_run = _twin_runs("cpu")
    optimizer.param_groups[0]["capturable"] = True  # what the constructor asks; the CPU's Adam steps without it
    graphed = GraphedTrainingStep(model, optimizer, scaler)
    optimizer.param_groups[0]["capturable"] = False
    return graphed, eager_run


def _step_beside_eager_twin(graphed: GraphedTrainingStep, eager_run: tuple, vertices: list[int],
                            device: torch.device) -> None:
    """One call of `graphed` and one eager step of the twin per entry of vertices (the batch's vertex count), the lr of
    both lowered to 3e-5 before step WARMUP_STEPS + 2; losses, outputs and parameters equal after every step."""
    eager_model, eager_optimizer, eager_scaler = eager_run
    for step, count in enumerate(vertices):
        if step == WARMUP_STEPS + 2:
            for optimizer in (graphed.optimizer, eager_optimizer):
                optimizer.param_groups[0]["lr"] = 3e-5
        batch = synthetic_batch(2, count, device, seed=step)
        outputs, losses = graphed(batch)
        eager_outputs, eager_losses = training_step(eager_model, eager_optimizer, eager_scaler, batch)
        assert all(torch.isfinite(value) for value in eager_losses.values())
        torch.testing.assert_close(losses, eager_losses, rtol=0, atol=0, msg=f"step {step}")
        torch.testing.assert_close(outputs["fake_points"], eager_outputs["fake_points"], rtol=0, atol=0)
        _assert_same_parameters(graphed.network, eager_model, step)


def test_a_failed_capture_leaves_training_eager_one_step_a_call(monkeypatch, capsys):
    """Every call is one optimizer step on its batch, whether it warms up, tries a capture that fails (out of memory
    here) or runs eagerly after it. On the CPU, with the device check, the side stream and the capture replaced."""
    captures = []

    def failing_capture(self, batch):
        captures.append(batch["identity_points"].shape)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB\nmore detail")

    graphed, eager_run = _graphed_cpu_twins(monkeypatch, failing_capture)
    _step_beside_eager_twin(graphed, eager_run, [40] * (WARMUP_STEPS + 3), torch.device("cpu"))
    assert captures == [(2, 40, 3)]  # tried once, after the warm-up steps
    assert capsys.readouterr().err.strip() == ("warning: the training step could not be captured as a CUDA graph "
                                               "(CUDA out of memory. Tried to allocate 1.00 GiB); training goes on "
                                               "without one")


def test_captures_once_per_shape_and_lr_and_copies_each_batch_into_the_graphs_inputs(monkeypatch):
    """The control flow on the CPU, with a stand-in graph whose replay is an eager step on the captured input buffers:
    warm-up steps, one capture, replays that see each new batch, a new capture when the lr changes, an eager step for
    another shape; the parameters follow an eager twin's step for step."""
    captures = []

    class ReplayedStep:  # stands in for torch.cuda.CUDAGraph: its replay runs the step on the graph's inputs
        def __init__(self, graphed):
            self.graphed = graphed

        def replay(self):
            graphed = self.graphed
            graphed.outputs, graphed.losses = training_step(graphed.network, graphed.optimizer, graphed.scaler,
                                                            graphed.inputs)

    def capture(self, batch):
        captures.append((tuple(batch["identity_points"].shape), self.optimizer.param_groups[0]["lr"]))
        self.inputs = {name: value.to(self.device, copy=True) for name, value in batch.items()
                       if isinstance(value, torch.Tensor)}
        self.graph = ReplayedStep(self)

    graphed, eager_run = _graphed_cpu_twins(monkeypatch, capture)
    _step_beside_eager_twin(graphed, eager_run, [40] * (WARMUP_STEPS + 3) + [30, 40], torch.device("cpu"))
    assert captures == [((2, 40, 3), graphed.network.OPTIMIZER["lr"]), ((2, 40, 3), 3e-5)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_replayed_steps_equal_the_eager_steps():
    """The fast path (fp16, stored warp, compiled): warm-up, capture, replays, a new capture after the lr changed,
    and an eager step for a batch of another shape; parameters, losses and outputs equal the eager run's after every
    step, and so does the loss scale."""
    (model, optimizer, scaler), eager_run = _twin_runs("cuda", compiled=True, ot="stored", precision="fp16",
                                                       fold_linear=True)
    graphed = GraphedTrainingStep(model, optimizer, scaler)
    _step_beside_eager_twin(graphed, eager_run, [300] * (WARMUP_STEPS + 4) + [200, 300], torch.device("cuda"))
    assert graphed.graph is not None and graphed.captured_key[1] == (3e-5,)
    assert scaler.get_scale() == eager_run[2].get_scale()
