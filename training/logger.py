"""Per-epoch logging: one JSON line per epoch in ``log.jsonl``, TensorBoard scalars when installed."""

from __future__ import annotations

import json
from pathlib import Path

from common.fileio import write_text_atomic


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
                if (done := parsed_epoch(line)) is not None and done <= epoch]
        # Atomic: a kill here must not leave the log empty or cut in the middle of a line.
        write_text_atomic(self.path, "".join(line + "\n" for line in kept))

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


def parsed_epoch(line: str) -> int | None:
    """The epoch of a log line; ``None`` for a blank line or one cut short by a killed run."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record.get("epoch", 0) if isinstance(record, dict) else None
