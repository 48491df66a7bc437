"""A memory bank split over torchrun processes (``--shard-bank``): each rank holds 1/N of it.

Each rank extracts the features of its block of training images (whole batches: the one
process's batches), builds its part of the bank and its rows of the coreset one process would
choose (:func:`scoring.engine.coreset.greedy_coreset` with ``shards``), and every search returns the whole
bank's k nearest (:class:`scoring.engine.knn.BankSearch` with ``shards``: the k smallest over the ranks'
k smallest). Every rank then scores every test image with the same numbers; rank 0 writes.

The parts are built by :func:`scoring.building.build_detector` with ``shards``. Not cached
(each run builds its parts), no detector file, and no calibrated threshold (the
cross-fitted calibration scores training images against banks of other images): give a threshold,
or calibrate once in one process.
"""

from __future__ import annotations

from pathlib import Path

from common.errors import SettingError, UserError

from ..config import ScoreConfig
from ..engine.dense import uses_head


def check_shardable(config: ScoreConfig, need_threshold: bool, detector_file: Path | None) -> None:
    """What a sharded bank cannot do, refused before anything is built or written."""
    if detector_file is not None:
        raise UserError("a sharded bank (--shard-bank, ScoringRun.shard_bank) is not written into one detector "
                        "file; save the detector from a one-process run")
    if need_threshold:
        raise UserError("a sharded bank (--shard-bank, ScoringRun.shard_bank) cannot calibrate a threshold: give "
                        "one (--threshold T, ScoreConfig.threshold), e.g. the threshold in the results.json of a "
                        "one-process run")
    if config.image_view != "frame" and config.view_preprocessing is not None:
        raise SettingError("image_view", config.image_view, "needs the square view's bank and its choice in one "
                                                            "process; use {setting}frame with a sharded bank")
    if uses_head(config.map_source):
        raise SettingError("map_source", config.map_source, "needs a map normalisation calibrated on the whole "
                                                             "bank; use {setting}knn with a sharded bank")
