"""What a new user ran into (issue 35), each now one line and a non-zero exit, or a working run.

Non-finite weights and banks, files that are not what their name says, detector files edited by
hand, a detector saved over a training checkpoint, a test set labelled per image only, a small
category with the recipe's coreset, a network trained at a side that is no multiple of 32, and an
ONNX export of a tiled frame.
"""

from __future__ import annotations

import json
import math
import re
import shutil

import numpy as np
import pytest
import torch
from conftest import write_category
from test_errors import TRAIN, one_line, run_score, run_train

import export as export_cli
from common import cli
from common.errors import UserError
from scoring import Detector, ScoreConfig
from scoring.detector import FORMAT_VERSION


@pytest.fixture()
def checkpoint(trained, tmp_path):
    """A private copy of the tiny widget checkpoint (32 px) that a test may damage."""
    shutil.copytree(trained / "widget-wave18", tmp_path / "ckpt" / "widget-wave18",
                    ignore=shutil.ignore_patterns("banks"))
    return tmp_path / "ckpt" / "widget-wave18" / "model.pt"


@pytest.fixture(scope="module")
def detector(trained, tiny_root):
    return Detector.fit(trained / "widget-wave18" / "model.pt", tiny_root / "widget" / "train" / "good",
                        ScoreConfig(batch_size=4), device="cpu")


def score_args(tiny_root, checkpoint, out, *flags):
    return ["--c", "widget", "--data-root", str(tiny_root), "--checkpoint", str(checkpoint), "--out", str(out),
            "--no-pictures", "--batch-size", "4", *flags]


def test_nan_weights_are_refused_in_one_line(checkpoint, tiny_root, tmp_path, capsys):
    state = torch.load(checkpoint, weights_only=False)
    key = next(k for k, v in state["netD_state_dict"].items() if v.is_floating_point())
    state["netD_state_dict"][key] = torch.full_like(state["netD_state_dict"][key], float("nan"))
    torch.save(state, checkpoint)
    code, err = run_score(score_args(tiny_root, checkpoint, tmp_path / "out"), capsys)
    assert code == 2 and "NaN or infinite weights" in one_line(err) and key in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(UserError, match="NaN or infinite weights"):
        Detector.fit(checkpoint, tiny_root / "widget" / "train" / "good")


def test_training_that_diverges_stops_before_saving(tiny_root, tmp_path, capsys):
    code, err = run_train(["--c", "widget", "--data-root", str(tiny_root), "--ckpt-dir", str(tmp_path), *TRAIN,
                           "--e", "1", "--lr", "1e9"], capsys)
    line = one_line(err)
    assert code == 2 and "training stopped without saving it" in line and "no checkpoint was saved yet" in line
    assert not (tmp_path / "widget-wave18" / "model.pt").exists()


def test_a_text_file_named_pt_is_one_line(tiny_root, tmp_path, capsys):
    text = tmp_path / "notes.pt"
    text.write_text("hello, not a checkpoint\n")
    code, err = run_score(score_args(tiny_root, text, tmp_path / "out"), capsys)
    assert code == 2 and "cannot be read" in one_line(err)
    for call in (lambda: Detector.load(text), lambda: Detector.fit(text, tiny_root / "widget" / "train" / "good")):
        with pytest.raises(UserError, match="cannot be read"):
            call()
    code, err = run_export(["--detector", str(text), "--format", "torchscript", "--out", str(tmp_path / "x.ts")],
                           capsys)
    assert code == 2 and "cannot be read" in one_line(err) and not (tmp_path / "x.ts").exists()


def run_export(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.run(export_cli.main, export_cli.get_args_parser().parse_args(argv))
        raise SystemExit(0)
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.update(banks=[]), "needs 1 memory bank"),
    (lambda s: s["banks"][0].update(rows=s["banks"][0]["rows"][:, :7]), "features, its network gives"),
    (lambda s: s.update(format_version=str(FORMAT_VERSION)), re.escape("format version '1' (str)")),
    (lambda s: s["threshold"].update(value=float("nan")), "threshold is nan"),
    (lambda s: s["banks"][0]["rows"].__setitem__((0, 0), float("nan")), "NaN or infinite values"),
])
def test_edited_detector_files_are_one_line(edit, message, detector, tmp_path):
    path = detector.save(tmp_path / "d.pt")
    state = torch.load(path, weights_only=True)
    edit(state)
    torch.save(state, path)
    with pytest.raises(UserError, match=message):
        Detector.load(path, device="cpu")


def test_save_never_replaces_a_checkpoint_and_a_detector_only_when_asked(detector, checkpoint, tmp_path):
    before = checkpoint.read_bytes()
    with pytest.raises(UserError, match="is not a detector file"):
        detector.save(checkpoint)
    assert checkpoint.read_bytes() == before
    with pytest.raises(UserError, match="is a folder"):
        detector.save(tmp_path)
    path = detector.save(tmp_path / "d.pt")
    with pytest.raises(UserError, match="overwrite=True"):
        detector.save(path)
    assert detector.save(path, overwrite=True) == path
    code = export_refuses_its_own_input(path)
    assert code == 2


def export_refuses_its_own_input(path) -> int:
    with pytest.raises(SystemExit) as exit_info:
        cli.run(export_cli.main, export_cli.get_args_parser().parse_args(
            ["--detector", str(path), "--format", "onnx", "--out", str(path), "--overwrite"]))
    assert Detector.load(path, device="cpu") is not None  # still the detector
    return exit_info.value.code


def test_image_labels_only_give_image_metrics(trained, tiny_root, tmp_path, capsys):
    root = tmp_path / "data"
    shutil.copytree(tiny_root / "widget", root / "widget")
    shutil.rmtree(root / "widget" / "ground_truth")
    code, err = run_score(score_args(root, trained / "widget-wave18" / "model.pt", tmp_path / "out"), capsys)
    assert code == 0, err
    record = json.loads((tmp_path / "out" / "results.json").read_text())
    assert record["metrics"]["image_auroc"] == 1.0 and record["metrics"]["pixel_auroc"] is None
    assert "labelled per image only" in record["unavailable_metrics"]["aupro"]


def test_a_small_category_calibrates_with_the_recipes_coreset(trained, tmp_path, capsys):
    """16 training images at 32 px: a half-bank of 8 images is too small for a 10% coreset (13 of 128
    patches, fewer than one image's 16), the whole bank is not; --images needs the calibration."""
    write_category(tmp_path / "data", "widget", seed=3, n_train=16)
    images = tmp_path / "data" / "widget" / "test"
    code, err = run_score(score_args(tmp_path / "data", trained / "widget-wave18" / "model.pt", tmp_path / "out",
                                     "--coreset", "0.1", "--images", str(images)), capsys)
    assert code == 0, err
    record = json.loads((tmp_path / "out" / "results.json").read_text())
    assert record["images"]["scored"] == 6 and math.isfinite(record["threshold"]["value"])
    assert record["search"]["certified_images"] == 6


def test_a_network_trained_at_100_px_can_be_scored(checkpoint, tiny_root, tmp_path, capsys):
    state = torch.load(checkpoint, weights_only=False)
    state["size"], state["frame"] = 100, [100, 100]  # as main.py --size 100 records it
    torch.save(state, checkpoint)
    code, err = run_score(score_args(tiny_root, checkpoint, tmp_path / "out", "--save-maps"), capsys)
    assert code == 0, err
    assert np.load(tmp_path / "out" / "maps.npz")["maps"].shape == (6, 100, 100)


def test_onnx_of_a_tiled_frame_scores_as_predict(trained, tiny_root, tmp_path, capsys):
    """1088 x 64: a side over 1024 px goes through the network in two tiles (not a multiple of the tile)."""
    pytest.importorskip("onnxruntime")
    detector = Detector.fit(trained / "widget-wave18" / "model.pt", tiny_root / "widget" / "train" / "good",
                            ScoreConfig(batch_size=4, frame="1088x64"), device="cpu")
    path = detector.save(tmp_path / "tall.pt")
    code, err = run_export(["--detector", str(path), "--format", "onnx", "--out", str(tmp_path / "tall.onnx")], capsys)
    assert code == 0, err  # export.py checks the file's scores against predict's before it keeps it
    assert (tmp_path / "tall.onnx").is_file()
