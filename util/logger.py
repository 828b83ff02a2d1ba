"""Rank-0 logging: messages to stdout and loss_log.txt, scalars to TensorBoard; other ranks stay silent."""
from __future__ import annotations

import time
from pathlib import Path

from util.distributed import is_main_process


class TrainingLogger:
    """Writes loss lines to <checkpoint_dir>/loss_log.txt and scalars to <checkpoint_dir>/tensorboard."""

    def __init__(self, checkpoint_dir: Path):
        self.enabled = is_main_process()
        self.log_path = Path(checkpoint_dir) / "loss_log.txt"
        self.writer = None
        if self.enabled:
            from torch.utils.tensorboard import SummaryWriter
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "a") as handle:
                handle.write(f"================ Training Loss ({time.strftime('%c')}) ================\n")
            self.writer = SummaryWriter(log_dir=str(Path(checkpoint_dir) / "tensorboard"))

    def losses(self, epoch: int, iteration: int, samples_seen: int, seconds_per_pair: float,
               losses: dict[str, float], lr: float) -> str:
        """Log one line of losses and the learning rate; return the line (empty on other ranks)."""
        if not self.enabled:
            return ""
        line = (f"(epoch: {epoch}, iters: {iteration}, time: {seconds_per_pair:.4f}) "
                + " ".join(f"{name}: {value:.4f}" for name, value in losses.items()) + f" lr: {lr:.3g}")
        with open(self.log_path, "a") as handle:
            handle.write(line + "\n")
        for name, value in losses.items():
            self.writer.add_scalar(f"loss/{name}", value, samples_seen)
        self.writer.add_scalar("lr", lr, samples_seen)
        return line

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
