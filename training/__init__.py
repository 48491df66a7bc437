"""Stage 1 training: the settings, the loop, checkpoints, logging, the anomaly preview, torchrun support.

``training`` never imports ``scoring`` or the command line (``common.cli``): see tests/test_layers.py.
From Python: :func:`train_categories` (:mod:`training.runner`).
"""

from common.distributed import DistInfo, cleanup, init_distributed

from .checkpoints import CHECKPOINT_NAME
from .config import RESUME_WARN_SETTINGS, WEIGHT_SETTINGS, TrainConfig, TrainRun
from .loop import PREVIEW_NAME, train_category
from .runner import train_categories

__all__ = ["CHECKPOINT_NAME", "PREVIEW_NAME", "RESUME_WARN_SETTINGS", "WEIGHT_SETTINGS", "DistInfo", "TrainConfig",
           "TrainRun", "cleanup", "init_distributed", "train_categories", "train_category"]
