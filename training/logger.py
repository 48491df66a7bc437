"""Per-epoch logging: one JSON line per epoch in ``log.jsonl``, TensorBoard scalars when installed."""

from __future__ import annotations

import json
from pathlib import Path


class EpochLogger:
    """Appends ``record`` dicts to ``run_dir/log.jsonl`` and mirrors numbers to TensorBoard."""

    def __init__(self, run_dir: Path, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = run_dir / "log.jsonl"
        self.writer = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                SummaryWriter = None
            if SummaryWriter is not None:
                self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def truncate_after(self, epoch: int) -> None:
        """On resume, drop lines of epochs past the checkpoint (they will be redone)."""
        if not self.enabled or not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("epoch", 0) <= epoch]
        self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "epoch":
                    self.writer.add_scalar(f"train/{key}", value, record["epoch"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
