"""Stage 1 training: the settings, the loop, checkpoints, logging, the anomaly preview, torchrun support.

``training`` never imports ``scoring`` or the command line (``cli``): see tests/test_layers.py.
"""

from .checkpoints import CHECKPOINT_NAME
from .config import RESUME_WARN_SETTINGS, WEIGHT_SETTINGS, TrainConfig, TrainRun
from .distributed import DistInfo, cleanup, init_distributed
from .loop import PREVIEW_NAME, run_dir_for, train_category

__all__ = ["CHECKPOINT_NAME", "PREVIEW_NAME", "RESUME_WARN_SETTINGS", "WEIGHT_SETTINGS", "DistInfo", "TrainConfig",
           "TrainRun", "cleanup", "init_distributed", "run_dir_for", "train_category"]
