"""Checkpoints: the published keys and shapes, bit-exact round trips, strict loading and atomic saves."""
import json
from pathlib import Path

import pytest
import torch

from models.pose_transfer_model import PoseTransferModel
from tests.golden import GOLDEN_DIR
from util import checkpoint

MANIFEST = GOLDEN_DIR.parent / "state_dict_keys.json"
pytestmark = pytest.mark.skipif(not MANIFEST.is_file(), reason=f"key manifest not found at {MANIFEST}")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return PoseTransferModel()


def test_state_dicts_have_exactly_the_published_keys_and_shapes(model):
    manifest = json.loads(MANIFEST.read_text())
    for name, network in model.checkpoint_networks().items():
        ours = [[key, list(value.shape)] for key, value in network.state_dict().items()]
        assert ours == manifest[name], name


def test_saved_checkpoint_loads_back_bit_exact(model, tmp_path):
    checkpoint.save_networks(model, tmp_path, "latest")
    other = PoseTransferModel()
    checkpoint.load_networks(other, tmp_path, "latest")
    for mine, theirs in zip(model.state_dict().values(), other.state_dict().values()):
        assert torch.equal(mine, theirs)
    assert not list(tmp_path.glob(".*.tmp"))


def test_state_dict_built_from_the_manifest_loads(tmp_path):
    manifest = json.loads(MANIFEST.read_text())
    generator = torch.Generator().manual_seed(1)
    for name in ("G", "Corr"):
        state = {key: torch.randn(shape, generator=generator) for key, shape in manifest[name]}
        torch.save(state, tmp_path / f"7_net_{name}.pth")
    model = PoseTransferModel()
    checkpoint.load_networks(model, tmp_path, "7")
    assert torch.equal(model.G.fc.weight, torch.load(tmp_path / "7_net_G.pth")["fc.weight"])


def test_missing_file_names_path_and_epoch(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"latest_net_G.pth does not exist \(--which_epoch latest\)"):
        checkpoint.load_networks(PoseTransferModel(ngf=8), tmp_path, "latest")


def test_wrong_keys_and_shapes_are_listed(tmp_path):
    small = PoseTransferModel(ngf=8)
    state = small.G.state_dict()
    state.pop("fc.bias")
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "latest_net_G.pth")
    with pytest.raises(RuntimeError, match=r"1 missing: fc.bias; 1 unexpected: extra.weight"):
        checkpoint.load_network_file(small.G, tmp_path / "latest_net_G.pth", "--which_epoch latest")
    with pytest.raises(RuntimeError, match=r"mis-shaped: fc.weight \(128, 3, 3\) \(expected \(1024, 3, 3\)\)"):
        checkpoint.load_network_file(PoseTransferModel().G, tmp_path / "latest_net_G.pth", "x")


def test_untrusted_pickle_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "pwned",))
    torch.save({"fc.weight": Payload()}, tmp_path / "latest_net_G.pth")
    with pytest.raises(ValueError, match=r"holds a Python object \(\w[\w.]*\) besides tensors.*not loaded") as raised:
        checkpoint.read_checkpoint(tmp_path / "latest_net_G.pth", "--which_epoch latest")
    assert not (tmp_path / "pwned").exists()
    assert "weights_only" not in str(raised.value)


@pytest.mark.parametrize("content, expected", [
    (b"", "is empty, truncated or corrupt"),
    (b"garbage\n", "is not a PyTorch checkpoint of tensors"),
    ("half", "is empty, truncated or corrupt"),
])
def test_unreadable_checkpoint_says_what_is_wrong_in_one_line(tmp_path, content, expected):
    path = tmp_path / "latest_net_G.pth"
    if content == "half":  # a copy cut short
        checkpoint.atomic_save({"fc.weight": torch.zeros(64)}, path)
        content = path.read_bytes()[:len(path.read_bytes()) // 2]
    path.write_bytes(content)
    with pytest.raises(ValueError, match=expected) as raised:
        checkpoint.read_checkpoint(path, "--which_epoch latest")
    message = str(raised.value)
    assert message.startswith(f"checkpoint {path} ") and "\n" not in message and "weights_only" not in message


def test_interrupted_save_keeps_the_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "latest_net_G.pth"
    checkpoint.atomic_save({"a": torch.ones(2)}, target)

    def failing_save(obj, handle):
        handle.write(b"partial")
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.atomic_save({"a": torch.zeros(2)}, target)
    monkeypatch.undo()
    assert torch.equal(torch.load(target, weights_only=True)["a"], torch.ones(2))
    assert not list(tmp_path.glob(".*.tmp"))


def test_optimizer_state_keeps_this_runs_implementation():
    """A resume file written by a GPU run (fused, capturable Adam: step counts on the GPU) resumes a CPU run:
    the moments and step count load, the update is computed the CPU's way."""
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(4, 3))
    saving = torch.optim.Adam([weight], lr=1e-3, foreach=False)
    weight.grad = torch.randn(4, 3)
    saving.step()
    saved = saving.state_dict()
    saved["param_groups"][0].update(fused=True, capturable=True, foreach=None)

    loading = torch.optim.Adam([torch.nn.Parameter(weight.detach().clone())], lr=1e-3, foreach=False)
    checkpoint.load_optimizer_state(loading, saved)
    group = loading.param_groups[0]
    assert (group["fused"], group["capturable"], group["foreach"]) == (None, False, False)
    state = loading.state[group["params"][0]]
    torch.testing.assert_close(state["exp_avg"], saving.state[weight]["exp_avg"], rtol=0, atol=0)
    assert state["step"].item() == 1 and state["step"].device.type == "cpu"
    group["params"][0].grad = torch.randn(4, 3)
    loading.step()  # torch's own load would keep capturable=True and refuse a CPU step
    assert state["step"].item() == 2


def test_a_checkpoint_cut_anywhere_is_reported_as_cut_short(tmp_path):
    """Cut in its first kilobytes torch raises OSError(EINVAL), elsewhere a zip error: one message for both."""
    whole = tmp_path / "whole.pth"
    torch.save(PoseTransferModel(ngf=8).G.state_dict(), whole)
    data = whole.read_bytes()
    cut = tmp_path / "latest_net_G.pth"
    for length in list(range(0, 8192, 512)) + list(range(8192, len(data), len(data) // 40)):
        cut.write_bytes(data[:length])
        with pytest.raises(ValueError, match="is empty, truncated or corrupt"):
            checkpoint.read_checkpoint(cut, "--which_epoch latest")


def test_non_finite_weights_are_refused(tmp_path):
    network = PoseTransferModel(ngf=8).G
    state = network.state_dict()
    state["fc.weight"][0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"holds NaN or inf values in 1 tensors \(fc.weight\)"):
        checkpoint.check_state_dict(network, state, "checkpoint x")
