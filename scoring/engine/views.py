"""Which view gives a detector's image scores: the frame's map, or the image squashed to the
network's training side (``ScoreConfig.image_view``).

The frame (:mod:`data.frames`) keeps the images' shape and scale: its maps localise better on
every development data set, and on most of them it detects better too. On some (Magnetic Tile
here, a grainy tire texture held out) the same network detects better at ``size x size``, the
paper's view, where its many small patches do not raise normal images' maxima. A detector can
take its maps at the frame and its image scores at the square view: the image is remade at
``size x size`` from the frame's input (:meth:`scoring.inputs.Preprocessing.from_input`: one
input for every way in, the exported files' too), banked and searched as the paper does (the
detector's coreset, certified, reading its cells as the frame's banks do: ``view_config``).

``image_view="auto"`` chooses between the two without labels (the frame where the frame is
square or the maps read the segmentation head, whose maps score the images): each view's cross-fitted training
scores (every normal training image scored against a bank of the other half,
:func:`scoring.engine.calibration.cross_fitted_maps`), each image's score the
mean over :data:`VIEW_SPLITS` random halvings, and the view whose normal scores spread less
around their mean (coefficient of variation, std / mean) scores the images. A view where normal
images' maxima scatter widely is one where defects stand out less. One halving's scores also
vary with which images share a half, most at the square view: on Magnetic Tile one halving in
eight chose the other view; the mean over three halvings chose the same view in every set of
three tried, with a wider margin (docs/results.md "The view chosen over three halvings"). On the three
development data sets it chose the view with the better test image AUROC on every network measured.
"""

from __future__ import annotations

import torch

from ..config import ScoreConfig
from .calibration import cross_fitted_maps


def spread(scores: torch.Tensor) -> float:
    """Normal images' scores ``(N,)`` -> their coefficient of variation (std / mean; scale-free,
    so the two views' distances compare)."""
    scores = scores.double()
    return float(scores.std() / scores.mean()) if float(scores.mean()) > 0 else float("inf")


# Random halvings each training image is cross-fitted against; its score is their mean. One
# halving's choice flipped on Magnetic Tile (1 halving in 8); three agreed in all 56 sets tried.
VIEW_SPLITS = 3


def view_scores(config: ScoreConfig, train_feats: list[torch.Tensor],
                device: torch.device) -> dict[str, torch.Tensor]:
    """Both views' cross-fitted training image scores ``{"frame": (R, N), "square": (R, N)}``, one
    row per halving (:data:`VIEW_SPLITS`, seeds ``config.seed``, ``config.seed + 1``, ...);
    ``train_feats`` as
    :func:`scoring.engine.features.pooled_features` gives them with the view."""
    layers = len(config.layers)
    scores: dict[str, list[torch.Tensor]] = {"frame": [], "square": []}
    for split in range(VIEW_SPLITS):
        seeded = config.replace(seed=config.seed + split)
        frame, _ = cross_fitted_maps(seeded.replace(image_view="frame"), train_feats[:layers], device, keep_maps=False)
        square, _ = cross_fitted_maps(seeded.view_config, train_feats[-layers:], device, keep_maps=False)
        scores["frame"].append(frame)
        scores["square"].append(square)
    return {name: torch.stack(rows) for name, rows in scores.items()}


def choose_view(config: ScoreConfig, train_feats: list[torch.Tensor], device: torch.device) -> dict:
    """``config`` with ``image_view`` auto -> what the choice read (``{"chosen", "frame_spread",
    "square_spread", "splits"}``: the spreads of each image's mean score over the halvings; kept
    with the banks and in the provenance; :func:`chosen_config` applies it)."""
    if config.view_preprocessing is None:  # one view
        reason = "the frame is square" if config.map_source == "knn" else f"the {config.map_source} map source"
        return {"chosen": "frame", "reason": reason}
    spreads = {name: spread(values.mean(0)) for name, values in view_scores(config, train_feats, device).items()}
    chosen = "square" if spreads["square"] < spreads["frame"] else "frame"
    return {"chosen": chosen, "frame_spread": spreads["frame"], "square_spread": spreads["square"],
            "splits": VIEW_SPLITS}


def chosen_config(config: ScoreConfig, record: dict | None) -> ScoreConfig:
    """``config`` with the view a bank's ``record`` (:func:`choose_view`) holds, where it is auto."""
    if config.image_view != "auto":
        return config
    if not record or record.get("chosen") not in ("frame", "square"):
        raise ValueError("image_view auto needs the view chosen with the banks (choose_view)")
    return config.replace(image_view=record["chosen"])


def view_text(record: dict) -> str:
    """One line of what :func:`choose_view` chose and why."""
    if "frame_spread" not in record:
        return f"{record['chosen']} ({record.get('reason', '')})"
    spreads = f"frame {record['frame_spread']:.3f}, square {record['square_spread']:.3f}"
    halvings = f", each image's mean over {record['splits']} halvings" if record.get("splits", 1) > 1 else ""
    return (f"{record['chosen']} (cross-fitted training scores' std / mean{halvings}: {spreads}; "
            "the lower one scores images)")
