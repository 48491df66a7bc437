"""The image score's view (``image_view``, scoring.engine.views): image scores at the square view
made from the frame's input, maps at the frame, and ``auto``'s label-free choice between them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.errors import SettingError, UserError
from scoring import Detector, ScoreConfig
from scoring.building import features_of, load_network, resolve_config
from scoring.engine.calibration import CALIBRATION_FOLDS, cross_fitted_maps
from scoring.engine.features import ImageFiles, batched_features
from scoring.engine.model import AnomalyScorer
from scoring.engine.views import VIEW_SPLITS, choose_view, chosen_config, spread
from scoring.pipeline.sharding import check_shardable

FRAME = "64x32"  # larger than the 32 px training side and not square: two views
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def paths(tiny_root):
    return sorted((tiny_root / "widget" / "test").rglob("*.png"))


@pytest.fixture(scope="module")
def train_paths(tiny_root):
    return sorted((tiny_root / "widget" / "train" / "good").glob("*.png"))


def fit(trained, tiny_root, **settings) -> Detector:
    return Detector.fit(trained / "widget-wave18" / "model.pt", tiny_root / "widget" / "train" / "good",
                        ScoreConfig(batch_size=4, frame=FRAME, **settings), device="cpu")


@pytest.mark.parametrize("settings", [{}, {"coreset": 0.5, "refine": 2, "cells": 4}], ids=["exact", "coreset"])
def test_square_view_scores_images_as_the_square_frame_scores_their_remade_input(settings, trained, tiny_root,
                                                                                paths, train_paths):
    viewed = fit(trained, tiny_root, image_view="square", **settings)
    framed = fit(trained, tiny_root, **settings)
    got, frame_only = viewed.predict(paths), framed.predict(paths)
    np.testing.assert_allclose(got.maps, frame_only.maps, rtol=1e-5, atol=1e-6)  # the maps: the frame's
    assert not np.allclose(got.scores, frame_only.scores)  # the image scores: not the frame's maxima

    # By hand: the frame's inputs remade at 32 x 32, banked and searched at the square frame.
    remade = viewed.config.view_preprocessing
    assert remade is not None and remade.frame == (32, 32)
    network, info = load_network(trained / "widget-wave18" / "model.pt", CPU)
    square = resolve_config(ScoreConfig(batch_size=4, frame="square", **settings), info, train_paths)

    def square_features(image_paths):
        inputs = remade.from_input(torch.stack([framed.preprocess(p)[0] for p in image_paths]))
        return batched_features(network, inputs, list(square.layers), 4, CPU)

    scorer = AnomalyScorer.fit(square, square_features(train_paths))
    expected, _ = scorer.score(square_features(paths))
    np.testing.assert_allclose(got.scores, expected.numpy(), rtol=1e-5)
    if settings:  # a certified coreset: the view's image scores are certified too
        assert got.search["certified_images"] == len(paths)
        # The view's banks read their cells as the frame's do (tighter bounds, fewer re-searches).
        assert [bank.cells for bank in viewed.model.scorer.view.banks] == [settings["cells"]]
        assert viewed.model.scorer.view.banks[0].cell_starts is not None


def test_the_square_view_is_the_papers_whatever_the_frames_upsampling_and_balance(trained, tiny_root, paths):
    bilinear = fit(trained, tiny_root, image_view="square", upsample="bilinear", balance=True)
    nearest = fit(trained, tiny_root, image_view="square")
    got, paper = bilinear.predict(paths), nearest.predict(paths)
    frame, view = bilinear.model.scorer.fusion_rule, bilinear.model.scorer.view.fusion_rule
    assert (frame.upsample, view.upsample) == ("bilinear", "nearest")
    assert len(frame.scales) == 2 and view.scales is None  # the frame's layers scaled, the view's as the paper's
    np.testing.assert_allclose(got.scores, paper.scores, rtol=1e-5)  # image scores: the paper's view
    assert bilinear.threshold == pytest.approx(nearest.threshold, rel=1e-5)  # calibrated on those scores
    assert not np.allclose(got.maps, paper.maps)  # the maps: the frame's, upsampled bilinearly, balanced


def test_a_square_view_detector_file_scores_as_the_detector(trained, tiny_root, paths, tmp_path):
    viewed = fit(trained, tiny_root, image_view="square", coreset=0.5, refine=2)
    loaded = Detector.load(viewed.save(tmp_path / "d.pt"), device="cpu")
    assert loaded.config.image_view == "square" and len(loaded.model.scorer.view.banks) == 1
    np.testing.assert_array_equal(loaded.predict(paths).scores, viewed.predict(paths).scores)
    assert loaded.threshold == viewed.threshold
    # A file whose view was never chosen (edited) is refused in one line, not scored at some view.
    state = torch.load(tmp_path / "d.pt", weights_only=True)
    state["config"]["image_view"] = "auto"
    torch.save(state, tmp_path / "edited.pt")
    with pytest.raises(UserError, match="image view is auto"):
        Detector.load(tmp_path / "edited.pt", device="cpu")


def test_auto_takes_the_view_whose_training_scores_spread_less(trained, tiny_root, paths, train_paths):
    auto = fit(trained, tiny_root, image_view="auto")
    record = auto.provenance["image_view"]
    assert record["chosen"] == auto.config.image_view  # a detector holds the view it chose, never auto
    assert record["chosen"] == ("square" if record["square_spread"] < record["frame_spread"] else "frame")
    # The spreads are those of each view's cross-fitted training scores, computed here again.
    network, info = load_network(trained / "widget-wave18" / "model.pt", CPU)
    config = resolve_config(ScoreConfig(batch_size=4, frame=FRAME, image_view="auto"), info, train_paths)
    feats, _ = features_of(network, ImageFiles(train_paths, config.preprocessing), config, CPU, "train")
    again = choose_view(config, feats, CPU)
    assert again == record and chosen_config(config, again).image_view == record["chosen"]
    # Each view's spread: of each image's mean score over VIEW_SPLITS halvings (seeds 0, 1, ...).
    layers = len(config.layers)
    for name, view_config, view_feats in (("frame", config.replace(image_view="frame"), feats[:layers]),
                                          ("square", config.view_config, feats[-layers:])):
        halvings = [cross_fitted_maps(view_config.replace(seed=seed), view_feats, CPU, keep_maps=False)[0]
                    for seed in range(VIEW_SPLITS)]
        assert record[f"{name}_spread"] == pytest.approx(spread(torch.stack(halvings).mean(0)), rel=1e-6)
        if name == record["chosen"]:  # the threshold: the chosen view's scores cross-fitted in 5 folds
            folds, _ = cross_fitted_maps(view_config, view_feats, CPU, keep_maps=False, folds=CALIBRATION_FOLDS)
            assert auto.threshold == pytest.approx(float(np.percentile(folds.numpy(), 99.0)), rel=1e-5)
            assert not torch.equal(folds, halvings[0])
    assert record["splits"] == VIEW_SPLITS > 1
    # Its scores are the chosen view's detector's, threshold included.
    chosen = fit(trained, tiny_root, image_view=record["chosen"])
    np.testing.assert_array_equal(auto.predict(paths).scores, chosen.predict(paths).scores)
    assert auto.threshold == pytest.approx(chosen.threshold)


def test_one_view_where_the_frame_is_square(trained, tiny_root):
    detector = Detector.fit(trained / "widget-wave18" / "model.pt", tiny_root / "widget" / "train" / "good",
                            ScoreConfig(batch_size=4, frame="square", image_view="auto"), device="cpu")
    assert detector.config.image_view == "frame" and detector.model.scorer.view is None


def test_spread_is_scale_free():
    scores = torch.tensor([1.0, 2.0, 3.0, 6.0])
    assert spread(scores) == pytest.approx(spread(scores * 7.5))
    assert spread(torch.tensor([2.0, 2.0, 2.0])) == 0.0


def test_views_refused_where_they_cannot_hold():
    with pytest.raises(SettingError, match="image_view"):
        ScoreConfig(image_view="sideways")
    with pytest.raises(SettingError, match="image_view"):
        ScoreConfig(image_view="square", map_source="head")
    # auto with the head's maps (the recipe with --map head): the frame, no second view
    assert ScoreConfig(size=32, frame=FRAME, image_view="auto", map_source="head").view_preprocessing is None
    config = ScoreConfig(size=32, frame=FRAME, image_view="auto", threshold=1.0)
    with pytest.raises(SettingError, match="image_view"):
        check_shardable(config, need_threshold=False, detector_file=None)
    check_shardable(config.replace(image_view="frame"), need_threshold=False, detector_file=None)
