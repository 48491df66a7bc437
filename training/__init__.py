"""Stage 1 training: the loop, checkpoints, logging, the anomaly preview, torchrun support."""

from .distributed import DistInfo, cleanup, init_distributed
from .loop import CHECKPOINT_NAME, PREVIEW_NAME, resolve_precision, run_dir_for, train_category

__all__ = ["CHECKPOINT_NAME", "PREVIEW_NAME", "DistInfo", "cleanup", "init_distributed",
           "resolve_precision", "run_dir_for", "train_category"]
