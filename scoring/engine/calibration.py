"""The decision threshold and the maps' normalisation, from the normal training images alone.

No test image and no label: the training images are split in :data:`CALIBRATION_FOLDS` folds and
each fold is scored against a bank of the others (cross-fitted, so no image is scored against
itself); the threshold is the ``calib_percentile`` percentile of those scores. For the ``head`` and
``fused`` map sources the same cross-fitted maps give each map's normalisation
(:func:`scoring.engine.dense.map_norm`). The bank used for scoring stays whole.

Why five folds and not halves: a bank of half the images is sparser than the whole one a test
image meets, so every held-out score sat higher than a normal test image's, and with few training
images the threshold with it (toothbrush, 48 images: the halves' mean score 1.2x the normal test
images', their 99th percentile 1.4x the highest normal test score, and half the defects passed as
normal). A bank of four fifths is near the whole one (docs/results.md "The threshold's folds").
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from common.errors import UserError

from ..config import ScoreConfig
from . import dense
from .model import AnomalyScorer, bank_grids, combine_head, head_map


@dataclass(frozen=True)
class Threshold:
    """A decision threshold (``verdict = score > value``) and where it comes from."""

    value: float
    source: str
    train_score_mean: float | None = None  # of the cross-fitted training scores, when calibrated
    train_score_max: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict | None) -> Threshold | None:
        return None if values is None else cls(**{k: values.get(k) for k in cls.__dataclass_fields__})

    @classmethod
    def given(cls, value: float) -> Threshold:
        return cls(float(value), "given (threshold setting)")


CALIBRATION_FOLDS = 5  # the threshold's cross-fitting (at most one fold per training image)


def cross_fitted_maps(config: ScoreConfig, train_feats: list[torch.Tensor], device: torch.device,
                      keep_maps: bool, folds: int = 2) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The training images in ``folds`` random folds (``config.seed``), each scored against a bank
    of the others: k-NN image scores ``(N,)`` and (``keep_maps``) maps ``(N, S, S)``, with no image
    scored against itself. ``folds`` 2: halves (the image view's choice, :mod:`.views`)."""
    count = train_feats[0].shape[0]
    if count < 2:
        raise UserError("calibrating a threshold needs at least 2 training images; give a threshold instead")
    order = torch.randperm(count, generator=torch.Generator().manual_seed(config.seed))
    folds = min(folds, count)
    bounds = [i * count // folds for i in range(folds + 1)]  # halves: the first count // 2, then the rest
    parts = [(torch.cat([order[:start], order[end:]]), order[start:end]) for start, end in zip(bounds, bounds[1:])]
    # The k-NN maps alone; smoothing and the floor only where the maps are kept (image scores are
    # taken before both). The frame's maps alone (a square view's image scores are cross-fitted on its
    # own features).
    knn_config = config.replace(map_source="knn", image_view="frame", **({} if keep_maps else config.maps_untouched))
    layers = len(config.layers)
    scores = torch.empty(count)
    maps = torch.empty(count, *config.frame_hw) if keep_maps else None
    per_image = math.prod(bank_grids(config, [f[:1] for f in train_feats[:layers]])[0].shape[-2:])
    if knn_config.coreset < 1 and math.ceil(knn_config.coreset * per_image * min(len(fit) for fit, _ in parts)) \
            < per_image:
        # A bank of few training images is too small for the coreset fraction (check_coreset_size):
        # its whole bank then, the exact scores a certified coreset gives anyway.
        knn_config = knn_config.replace(coreset=1.0)
    for fit, held_out in parts:
        scorer = AnomalyScorer.fit(knn_config, [f[fit] for f in train_feats[:layers]], device=device)
        held_scores, held_maps = scorer.score([f[held_out] for f in train_feats[:layers]], "calibration")
        scores[held_out] = held_scores
        if keep_maps:
            maps[held_out] = held_maps
    return scores, maps


def cross_fitted_calibration(config: ScoreConfig, train_feats: list[torch.Tensor],
                              device: torch.device) -> tuple[Threshold, dict | None]:
    """The calibrated threshold and, for a head map source, the maps' normalisation (else ``None``).

    ``train_feats``: the training images' per-layer features, then the head's logits for a head
    map source, then a square view's features (:func:`scoring.engine.features.pooled_features`).
    """
    norm, knn_maps = None, None
    view = config.image_view == "square" and config.view_preprocessing is not None
    if view:  # the square view gives the image scores (scoring.engine.views)
        scores, _ = cross_fitted_maps(config.view_config, train_feats[-len(config.layers):], device, keep_maps=False,
                                      folds=CALIBRATION_FOLDS)
    elif config.map_source != "head":  # the head's map alone needs no k-NN map
        scores, knn_maps = cross_fitted_maps(config, train_feats, device, keep_maps=config.map_source == "fused",
                                             folds=CALIBRATION_FOLDS)
    if dense.uses_head(config.map_source):
        head = train_feats[len(config.layers)]
        norm = dense.map_norm(knn_maps, head_map(head, config.frame_hw))
        scores, _ = combine_head(config.map_source, knn_maps, head, norm, config.frame_hw)
    value = float(np.percentile(scores.numpy(), config.calib_percentile))
    folds = min(CALIBRATION_FOLDS, len(scores))
    # The head's map needs no bank, so its training scores are not cross-fitted.
    scored = ("the training images' head-map scores" if config.map_source == "head" else
              f"cross-fitted training scores ({folds} folds{', square view' if view else ''})")
    return Threshold(value, f"{scored}, {config.calib_percentile}th percentile",
                     float(scores.mean()), float(scores.max())), norm
