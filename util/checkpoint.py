"""Saving and loading checkpoints, in the published layout and with strict checks.

Published files, in <checkpoints_dir>/<dataset_mode>/: <label>_net_G.pth and <label>_net_Corr.pth (a plain
state_dict each, CPU float32), optimizer.pth ({'G': optimizer state, 'lr': lr}) and iter.txt
("epoch,iteration"). We also write latest_resume.pth: one dict with the networks, the
optimizer, fp16 loss scaler, lr, epoch, iteration, RNG state and options, so --continue_train makes the
next step identical.
Every file is written to a temporary name and renamed, so an interrupted save never leaves a broken file.
Every load uses torch.load(weights_only=True): no checkpoint can run code.
"""
from __future__ import annotations

import errno
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from util.atomic import atomic_write

RESUME_KEYS = ("networks", "optimizer", "scaler", "lr", "epoch", "iteration", "samples_seen", "torch_rng", "options")


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save through a temporary file renamed over path."""
    with atomic_write(path) as handle:
        torch.save(obj, handle)


def network_path(directory: Path, label: str, name: str) -> Path:
    """<directory>/<label>_net_<name>.pth, e.g. checkpoints/human/latest_net_G.pth."""
    return Path(directory) / f"{label}_net_{name}.pth"


def cpu_state_dict(network: nn.Module) -> dict[str, torch.Tensor]:
    """The network's state_dict as detached CPU tensors (what the published files hold)."""
    return {key: value.detach().cpu().clone() for key, value in network.state_dict().items()}


def read_checkpoint(path: Path, what: str) -> Any:
    """torch.load with weights_only=True; one-line errors for a missing or unreadable file.

    Args:
        path: the file.
        what: how the user asked for it, for the message (e.g. "--which_epoch latest").
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist ({what}); check --checkpoints_dir, "
                                f"--dataset_mode, --model and --which_epoch")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for corrupt or unsafe files; report them as one
        raise ValueError(f"checkpoint {path} {load_failure(err)}") from None


def load_failure(err: Exception) -> str:
    """What a failed torch.load(weights_only=True) means for the user, as the end of a sentence about the file.

    torch's own messages for unsafe files advise loading with weights_only=False, which would let the file run
    code: that advice is never passed on.
    """
    text = str(err)
    unsafe = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if unsafe:
        return (f"holds a Python object ({unsafe.group(1)}) besides tensors and plain containers; it is not "
                f"loaded, since unpickling it could run code. Re-save only the state_dict of tensors")
    cut_short = isinstance(err, EOFError) or (isinstance(err, OSError) and err.errno == errno.EINVAL)
    if cut_short or "central directory" in text or "zip archive" in text:
        return "is empty, truncated or corrupt (not a readable PyTorch file); save or copy it again"
    if "Weights only load failed" in text:
        return "is not a PyTorch checkpoint of tensors (its contents cannot be read as one)"
    first_line = text.strip().splitlines()[0] if text.strip() else type(err).__name__
    return f"cannot be read: {first_line}"


def check_state_dict(network: nn.Module, state: Any, source: str) -> None:
    """Raise RuntimeError listing missing, unexpected and mis-shaped keys (never a silent strict=False), and
    ValueError for NaN or inf values (a diverged run's file would write NaN meshes)."""
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{source} does not hold a state_dict of tensors")
    expected = network.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    misshaped = [f"{key} {tuple(state[key].shape)} (expected {tuple(value.shape)})"
                 for key, value in expected.items() if key in state and state[key].shape != value.shape]
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if keys:
            shown = ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
            problems.append(f"{len(keys)} {label}: {shown}")
    if problems:
        raise RuntimeError(f"{source} does not fit the network ({'; '.join(problems)}); "
                           f"is it a checkpoint of this model, --dataset_mode and --ngf?")
    not_finite = [key for key, value in state.items() if value.is_floating_point() and not value.isfinite().all()]
    if not_finite:
        raise ValueError(f"{source} holds NaN or inf values in {len(not_finite)} tensors ({', '.join(not_finite[:3])}"
                         f"{' ...' if len(not_finite) > 3 else ''}): the training that wrote it diverged or the file "
                         f"is damaged; use an earlier --which_epoch")


def load_network_file(network: nn.Module, path: Path, what: str) -> None:
    """Load one published <label>_net_<name>.pth into network, strictly."""
    state = read_checkpoint(path, what)
    check_state_dict(network, state, f"checkpoint {path}")
    network.load_state_dict(state)


def save_networks(model: nn.Module, directory: Path, label: str) -> None:
    """Write <label>_net_<name>.pth for every network of model.checkpoint_networks() (G and Corr)."""
    for name, network in model.checkpoint_networks().items():
        atomic_save(cpu_state_dict(network), network_path(directory, label, name))


def load_networks(model: nn.Module, directory: Path, label: str) -> None:
    """Load <label>_net_<name>.pth into every network of model.checkpoint_networks(), strictly."""
    for name, network in model.checkpoint_networks().items():
        load_network_file(network, network_path(directory, label, name), f"--which_epoch {label}")


def save_training_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                        scaler: torch.amp.GradScaler, lr: float, epoch: int, iteration: int, samples_seen: int,
                        options: dict[str, Any]) -> None:
    """Write the one-file resume state (see module docstring)."""
    state = {
        "networks": {name: cpu_state_dict(network) for name, network in model.checkpoint_networks().items()},
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "lr": lr,
        "epoch": epoch,
        "iteration": iteration,
        "samples_seen": samples_seen,
        "torch_rng": torch.get_rng_state(),
        "options": options,
    }
    atomic_save(state, path)


# How torch.optim computes the update, not what it has learnt: a resume file saved by a GPU run (fused Adam) must
# load into a CPU run and the other way round.
OPTIMIZER_IMPLEMENTATION_KEYS = ("fused", "foreach", "capturable", "differentiable")


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """optimizer.load_state_dict(saved), keeping this optimizer's own OPTIMIZER_IMPLEMENTATION_KEYS (torch takes
    the saved groups' settings whole, and places Adam's step counts by them)."""
    groups = saved.get("param_groups") if isinstance(saved, dict) else None
    if isinstance(groups, list) and len(groups) == len(optimizer.param_groups) and \
            all(isinstance(group, dict) for group in groups):
        saved = {**saved, "param_groups": [
            {**saved_group, **{key: group[key] for key in OPTIMIZER_IMPLEMENTATION_KEYS if key in group}}
            for saved_group, group in zip(groups, optimizer.param_groups)]}
    optimizer.load_state_dict(saved)


def load_training_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                        scaler: torch.amp.GradScaler) -> dict[str, Any]:
    """Restore networks, optimizer and loss scaler from a resume file; return its lr, epoch, iteration and
    options."""
    state = read_checkpoint(path, "--continue_train")
    missing = [key for key in RESUME_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise ValueError(f"resume file {path} lacks {', '.join(missing)}; it was not written by this train.py")
    networks = model.checkpoint_networks()
    if not isinstance(state["networks"], dict) or set(state["networks"]) != set(networks):
        raise ValueError(f"resume file {path} holds networks {sorted(state['networks'])}, this model has "
                         f"{sorted(networks)}; is it a checkpoint of another --model?")
    for name, network in networks.items():
        check_state_dict(network, state["networks"][name], f"resume file {path} ({name})")
        network.load_state_dict(state["networks"][name])
    load_optimizer_state(optimizer, state["optimizer"])
    if state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["torch_rng"])
    return {key: state[key] for key in ("lr", "epoch", "iteration", "samples_seen", "options")}
