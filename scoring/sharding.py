"""A memory bank split over torchrun processes (``--shard-bank``): each rank holds 1/N of it.

Each rank extracts the features of its block of training images (whole batches: the one
process's batches), builds its part of the bank and its rows of the coreset one process would
choose (:func:`scoring.knn.greedy_coreset` with ``shards``), and every search returns the whole
bank's k nearest (:class:`scoring.knn.BankSearch` with ``shards``: the k smallest over the ranks'
k smallest). Every rank then scores every test image with the same numbers; rank 0 writes.

Not cached (each run builds its parts), no detector file, and no calibrated threshold (the
cross-fitted calibration scores training images against banks of other images): give a threshold,
or calibrate once in one process.
"""

from __future__ import annotations

from pathlib import Path

import torch

from common.distributed import DistInfo, block
from common.errors import SettingError, UserError
from common.runtime import resolve_workers

from .calibration import Threshold
from .config import ScoreConfig
from .dense import uses_head
from .detector import Detector, features_of, provenance
from .features import ImageFiles
from .model import AnomalyModel, AnomalyScorer, bank_states


def check_shardable(config: ScoreConfig, need_threshold: bool, detector_file: Path | None) -> None:
    """What a sharded bank cannot do, refused before anything is built or written."""
    if detector_file is not None:
        raise UserError("a sharded bank (--shard-bank, ScoringRun.shard_bank) is not written into one detector "
                        "file; save the detector from a one-process run")
    if need_threshold:
        raise UserError("a sharded bank (--shard-bank, ScoringRun.shard_bank) cannot calibrate a threshold: give "
                        "one (--threshold T, ScoreConfig.threshold), e.g. the threshold in the results.json of a "
                        "one-process run")
    if uses_head(config.map_source):
        raise SettingError("map_source", config.map_source, "needs a map normalisation calibrated on the whole "
                                                             "bank; use {setting}knn with a sharded bank")


def sharded_bank_detector(config: ScoreConfig, network: torch.nn.Module, info: dict, train: tuple[list[Path], str],
                          device: torch.device, shards: DistInfo) -> Detector:
    """This rank's detector over its part of the bank (``train``: the training images and their
    digest); :func:`check_shardable` first."""
    paths, digest = train
    share = block(len(paths), shards, align=config.batch_size)
    if not len(share):
        raise SettingError("batch_size", config.batch_size, f"leaves process {shards.rank} no training images "
                                                            f"({len(paths)} images, {shards.world_size} processes); "
                                                            "use fewer processes or a smaller batch size")
    feats, _ = features_of(network, ImageFiles([paths[i] for i in share], config.preprocessing), config,
                           device, f"train features (part {shards.rank + 1}/{shards.world_size})",
                           workers=resolve_workers(config.workers, device))
    scorer = AnomalyScorer.from_states(config, bank_states(config, feats, device, shards), None, device, shards)
    threshold = Threshold.given(config.threshold) if config.threshold is not None else None
    return Detector(AnomalyModel(network, scorer, config), threshold, provenance(info, paths, digest), device)
