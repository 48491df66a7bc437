"""One image, one score: every way in gives the same numbers at the settings users run.

A checkpoint scored at a non-square frame larger than its training side (as ``--recipe best``'s
auto frame), through the tiled path, with a certified coreset, in both fusions, with the image
scores at the square view (``--image-view``) and half of each map's floor taken off (``--floor``,
as the recipe): the test
set's ``image_scores.csv``, ``--images``' ``scores.csv``, ``Detector.predict`` on paths, uint8
arrays and float tensors, and the exported TorchScript and ONNX graphs give each image the same
score (1e-4 relative; exported graphs run other convolution kernels, see ``test_export``), and
each image the same map (``maps.npz`` of both runs, ``predict``; the exported graphs within 1e-3).
Torchrun's share of this is ``test_sharded_scoring`` (a frame job among its jobs).
"""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import scoring.engine.features as features
from common import cli
from scoring import Detector
from scoring.export import export, read_metadata, run_exported
from scoring.pipeline import cli as score_cli

# name -> fusion, frame and flags of the scoring run, for a network trained on 32 px: both fusions,
# the certified coreset with its cells read (the recipe's; its certified scores are the exact bank's),
# a frame whole and in tiles. The exact bank at a frame: test_frames; both fusions' exported files: test_export.
VARIANTS = {
    "certified-coreset": ("concatenation", "64x32", ["--coreset", "0.5", "--refine", "2", "--cells", "16",
                                                     "--floor", "0.5", "--upsample", "bilinear", "--balance"]),
    # TILE_SIDE patched to 64: 2 tiles of a 96 px side (not a multiple of the tile: ceil(96 / 64))
    "tiled": ("multiplication", "96x32", ["--coreset", "0.5"]),
    # image scores at the square view remade from the frame's input, maps at the frame (--image-view;
    # --recipe best's auto chooses it or the frame): scoring.engine.views
    "square-view": ("concatenation", "64x32", ["--coreset", "0.5", "--refine", "2", "--cells", "16",
                                               "--image-view", "square", "--floor", "0.5", "--upsample", "bilinear",
                                               "--balance"]),
}
RTOL = 1e-4
# Exported here at the recipe's settings (test_export checks both plain fusions' files against
# predict): the certified coreset in both formats, the tiled frame in ONNX (whose integer division
# once broke its tile layout; TorchScript runs the same traced graph).
EXPORTED = {"certified-coreset": ("torchscript", "onnx"), "tiled": ("onnx",), "square-view": ("torchscript", "onnx")}


def run_cli(fusion: str, argv: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.run(score_cli.main, score_cli.parse_args(fusion, argv))
        raise SystemExit(0)
    assert exit_info.value.code == 0, capsys.readouterr().err


def csv_scores(path: Path) -> dict[str, float]:
    with path.open(newline="") as handle:
        return {row["path"]: float(row["score"]) for row in csv.DictReader(handle)}


def assert_same(got, expected, what: str, rtol: float = RTOL) -> None:
    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    assert got.shape == expected.shape, what
    assert np.all(np.abs(got - expected) <= rtol * np.abs(expected)), (what, got, expected)


def assert_same_saved_maps(tmp_path: Path, paths: list[str], maps: np.ndarray) -> None:
    """The test-set and ``--images`` runs' ``maps.npz`` hold ``maps`` ``(N, H, W)`` (predict's, in
    ``paths``' order): a map setting such as ``--floor`` reaches every way in."""
    for run in ("test", "images"):
        saved = np.load(tmp_path / run / "maps.npz")
        order = {path: i for i, path in enumerate(saved["paths"].tolist())}
        np.testing.assert_allclose(saved["maps"][[order[p] for p in paths]], maps, rtol=RTOL, atol=1e-6, err_msg=run)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_way_in_gives_each_image_the_same_score(name, tiny_root, trained, tmp_path, monkeypatch, capsys):
    fusion, frame, flags = VARIANTS[name]
    if name == "tiled":
        monkeypatch.setattr(features, "TILE_SIDE", 64)
        monkeypatch.setattr(features, "TILE_HALO", 0)  # no context: tiles differ from the whole frame
    checkpoint = trained / "widget-wave18" / "model.pt"
    common = ["--c", "widget", "--data-root", str(tiny_root), "--checkpoint", str(checkpoint), "--frame", frame,
              "--batch-size", "4", *flags]
    detector_file = tmp_path / "widget.detector.pt"
    run_cli(fusion, [*common, "--out", str(tmp_path / "test"), "--no-pictures", "--save-maps", "--save-detector",
                     str(detector_file)], capsys)
    test_set = csv_scores(tmp_path / "test" / "image_scores.csv")
    images = tiny_root / "widget" / "test"
    # --images with pictures at the frame: one heatmap per image (the frame, not the training side).
    run_cli(fusion, [*common, "--images", str(images), "--out", str(tmp_path / "images"), "--save-maps"], capsys)
    folder = csv_scores(tmp_path / "images" / "scores.csv")
    assert sorted(folder) == sorted(test_set) and len(folder) == 6
    heatmaps = sorted((tmp_path / "images" / "heatmaps").rglob("*.png"))
    assert len(heatmaps) == 6

    paths = sorted(test_set)
    expected = np.array([test_set[p] for p in paths])
    assert_same([folder[p] for p in paths], expected, "--images against the test set")

    detector = Detector.load(detector_file, device="cpu")
    assert detector.frame == tuple(map(int, frame.split("x"))) and detector.size == 32
    arrays = [np.array(Image.open(p).convert("RGB")) for p in paths]
    tensors = [torch.from_numpy(a).permute(2, 0, 1).float() / 255 for a in arrays]
    by_path = detector.predict(paths)
    assert by_path.maps.shape == (6, *detector.frame)
    assert_same(by_path.scores, expected, "predict(paths)")
    assert_same_saved_maps(tmp_path, paths, by_path.maps)
    assert detector.config.floor == (float(flags[flags.index("--floor") + 1]) if "--floor" in flags else 0.0)
    # --balance: the detector file holds the layer scales the test-set run reports (the last layer's 1)
    scales = json.loads((tmp_path / "test" / "results.json").read_text())["bank"].get("layer_scales")
    assert scales == detector.model.scorer.banks[0].scales and (scales is not None) == ("--balance" in flags)
    assert scales is None or (len(scales) == 2 and scales[-1] == 1.0 and scales[0] > 0)
    assert_same(detector.predict(arrays).scores, expected, "predict(uint8 arrays)")
    assert_same(detector.predict(np.stack(arrays)).scores, expected, "predict(a uint8 batch)")
    assert_same(detector.predict(tensors).scores, expected, "predict(float tensors)")
    # One image at a time: an image's score does not depend on the images beside it (on the CPU the
    # network runs one image per pass; the CLI ran batches of 4 in another order).
    alone = np.array([detector.predict(array).scores[0] for array in arrays])
    np.testing.assert_array_equal(alone, by_path.scores)
    # Float tensors are the uint8 values / 255: the same resize and rounding, so the same input.
    assert torch.equal(detector.preprocess(tensors[0])[0], detector.preprocess(arrays[0])[0])
    # The verdicts follow the one rule (score > threshold) in the file and in predict.
    with (tmp_path / "images" / "scores.csv").open(newline="") as handle:
        verdicts = {row["path"]: row["verdict"] == "anomalous" for row in csv.DictReader(handle)}
    assert [verdicts[p] for p in paths] == list(by_path.verdicts)

    if name in EXPORTED:
        check_exported_files(EXPORTED[name], detector, arrays, by_path, expected, tmp_path)


def check_exported_files(formats, detector, arrays, by_path, expected, tmp_path) -> None:
    """The exported files of ``detector`` in ``formats`` give ``predict``'s maps and scores on ``arrays``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for fmt in formats:
            if fmt == "onnx":
                pytest.importorskip("onnxruntime")
            out = export(detector, fmt, tmp_path / f"widget.{fmt}")
            assert read_metadata(out, fmt)["frame"] == list(detector.frame)
            scores, maps = run_exported(out, fmt, np.stack(arrays))[:2]
            np.testing.assert_allclose(maps, by_path.maps, rtol=1e-3, atol=1e-3)
            # 1e-4 relative; a score below the threshold within 1e-4 of the threshold (test_export explains)
            assert np.all(np.abs(scores - expected) <= RTOL * np.maximum(np.abs(expected), detector.threshold)), fmt
