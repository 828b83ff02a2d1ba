"""models/train_step.py: one optimizer step a call, with results that keep no autograd graph alive."""
import torch

from models.networks import init_weights
from models.pose_transfer_model import PoseTransferModel
from models.train_step import training_step
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
