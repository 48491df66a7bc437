"""What a new user ran into (issue 35), each now one line and a non-zero exit, or a working run.

Non-finite weights and banks, files that are not what their name says, detector files edited by
hand, a detector saved over a training checkpoint, a test set labelled per image only, a small
category with the recipe's coreset, a network trained at a side that is no multiple of 32, and an
ONNX export of a tiled frame.
"""

from __future__ import annotations

import copy
import fcntl
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_category
from test_errors import TRAIN, one_line, run_score, run_train

import export as export_cli
from common import cli
from common.errors import UserError
from scoring import Detector, ScoreConfig, ScoringRun, score_categories
from scoring.detector import FORMAT_VERSION
from training import TrainConfig, TrainRun, train_categories


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


@pytest.fixture(scope="module")
def detector_state(detector, tmp_path_factory):
    """What ``detector.save`` writes, as read back (``torch.load``): each edit test changes a copy."""
    return torch.load(detector.save(tmp_path_factory.mktemp("state") / "d.pt"), weights_only=True)


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
    (lambda s: s["config"].update(balance=True), "balanced layers need one positive scale per layer"),
])
def test_edited_detector_files_are_one_line(edit, message, detector_state, tmp_path):
    path = tmp_path / "d.pt"
    state = copy.deepcopy(detector_state)
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
    assert json.loads((tmp_path / "out" / "results.json").read_text())["settings"]["frame"] == "square"


def test_a_resolved_square_frame_keeps_its_hxw_form():
    """Bank cache keys, run identities and detector files hold the resolved frame as HxW (as they
    always did: caches written before stay readable); "square" only where HxW cannot say it."""
    from scoring.building import resolve_config
    from scoring.pipeline.cache import bank_settings

    info = {"size": 32, "frame": [32, 32], "dense": False}
    config = resolve_config(ScoreConfig(), info)
    assert config.frame == "32x32" and config.frame_hw == (32, 32)
    assert bank_settings(config, "sha", "digest")["frame"] == "32x32"
    assert resolve_config(ScoreConfig(), {**info, "size": 100, "frame": [100, 100]}).frame == "square"


@pytest.mark.slow  # the default suite checks the same tile layout in ONNX small (test_one_way_in, tiled)
def test_onnx_of_a_tiled_frame_scores_as_predict(trained, tiny_root, tmp_path, capsys):
    """1088 x 64: a side over 1024 px goes through the network in two tiles (not a multiple of the tile)."""
    pytest.importorskip("onnxruntime")
    train = sorted((tiny_root / "widget" / "train" / "good").glob("*.png"))[:2]  # a small bank: a faster test
    detector = Detector.fit(trained / "widget-wave18" / "model.pt", train, ScoreConfig(batch_size=4, frame="1088x64"),
                            device="cpu")
    path = detector.save(tmp_path / "tall.pt")
    code, err = run_export(["--detector", str(path), "--format", "onnx", "--out", str(tmp_path / "tall.onnx")], capsys)
    assert code == 0, err  # export.py checks the file's scores against predict's before it keeps it
    assert (tmp_path / "tall.onnx").is_file()


@pytest.mark.parametrize("make, message", [
    (lambda: ScoreConfig(seed="a"), "seed='a': must be a whole number"),
    (lambda: ScoreConfig(seed=float("nan")), "seed=nan: must be a whole number"),
    (lambda: ScoreConfig(seed=2 ** 70), "must be a whole number from 0 to 2\\*\\*63 - 1"),
    (lambda: ScoreConfig(certify="no"), "certify='no': must be True or False"),
    (lambda: ScoreConfig(antialias="yes"), "antialias='yes': must be True or False"),
    (lambda: ScoreConfig(smooth=1e9), "smooth=1000000000.0: must be a number from 0 to 100 px"),
    (lambda: TrainConfig(seed=-1), "seed=-1: must be a whole number"),
    (lambda: train_categories(TrainConfig(), TrainRun(), "tex"), "categories='tex': must be a list"),
    (lambda: score_categories(None, ScoringRun(), ["x"]), "config=None: must be a ScoreConfig"),
    (lambda: ScoringRun(data_root=None), "data_root=None: must be a path"),
    (lambda: TrainRun(save_every="5"), "save_every='5': must be a whole number"),
])
def test_settings_objects_name_a_wrong_value_where_made(make, message):
    with pytest.raises(UserError, match=message):
        make()


def test_detector_fit_names_a_dict_config_and_a_missing_checkpoint_fast(trained, tiny_root):
    with pytest.raises(UserError, match="must be a ScoreConfig, got dict"):
        Detector.fit(trained / "widget-wave18" / "model.pt", tiny_root / "widget" / "train" / "good", {"k": 1})
    with pytest.raises(UserError, match="not found"):  # lists two levels of the folder, never walks a disk
        Detector.fit(trained / "nowhere" / "model.pt", tiny_root / "widget" / "train" / "good")


def test_wrong_flags_are_one_line(trained, tiny_root, tmp_path, capsys):
    checkpoint = trained / "widget-wave18" / "model.pt"
    image = next((tiny_root / "widget" / "test" / "good").glob("*.png"))
    for flags, message in [(["--images", str(image)], "is a file; give a folder of images"),
                           (["--shard-bank"], "splits the bank over torchrun processes"),
                           (["--smooth", "1e9"], "--smooth 1000000000.0: must be a number from 0 to 100")]:
        code, err = run_score(score_args(tiny_root, checkpoint, tmp_path / "out", *flags), capsys)
        assert code == 2 and message in one_line(err)
    code, err = run_score(score_args(tiny_root, checkpoint, "/proc/no-such/out"), capsys)
    assert code == 2 and "--out /proc/no-such/out: cannot be made" in one_line(err)
    from scoring.pipeline import cli as score_cli

    text = " ".join(score_cli.get_args_parser("concatenation").format_help().split())  # argparse wraps lines
    assert "(default: True)" not in text
    # An option whose help gives its default in words is not followed by "(default: None)" too.
    assert "(default: whatever the checkpoint holds; wave50 for the default --p) --wavelet" in text


def test_resume_from_another_file_into_a_run_folder_says_what_to_do(trained, tiny_root, tmp_path, capsys):
    other = tmp_path / "other.pt"
    shutil.copy(trained / "widget-wave18" / "model.pt", other)
    code, err = run_train(["--c", "widget", "--data-root", str(tiny_root), "--ckpt-dir", str(trained), *TRAIN,
                           "--e", "3", "--resume", str(other)], capsys)
    assert code == 2 and "is not that run's checkpoint" in one_line(err) and "--overwrite" in err


def test_a_changed_test_set_is_another_version_and_a_killed_one_starts_clean(trained, tiny_root, tmp_path, capsys,
                                                                            monkeypatch):
    root = tmp_path / "data"
    shutil.copytree(tiny_root / "widget", root / "widget")
    monkeypatch.chdir(tmp_path)
    args = ["--c", "widget", "--data-root", str(root), "--ckpt-dir", str(trained), "--p", "widget-wave18",
            "--no-pictures"]
    assert run_score(args, capsys)[0] == 0
    base = tmp_path / "results" / "widget-wave18" / "concatenation"
    (root / "widget" / "test" / "good" / "000.png").unlink()  # one image fewer: other results
    assert run_score(args, capsys)[0] == 0
    first, second = (json.loads((base / v / "results.json").read_text()) for v in ("v0", "v1"))
    assert first["data"]["test_images"] == 6 and second["data"]["test_images"] == 5
    # A run of v1's identity killed before results.json left a partial file: the next run starts v1 clean.
    (base / "v1" / "results.json").unlink()
    (base / "v1" / "heatmaps").mkdir()
    (base / "v1" / "heatmaps" / "stale.png").write_bytes(b"partial")
    # ... but not while that run is still alive (it holds the folder's lock): then one line, nothing touched.
    with (base / "v1" / ".scoring.lock").open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        code, err = run_score(args, capsys)
        assert code == 2 and "is being written by another scoring run" in one_line(err)
        assert (base / "v1" / "heatmaps" / "stale.png").exists()
    assert run_score(args, capsys)[0] == 0
    assert (base / "v1" / "results.json").is_file() and not (base / "v1" / "heatmaps").exists()
    assert not (base / "v2").exists()


def test_out_overwrite_moves_the_earlier_results_aside(trained, tiny_root, tmp_path, capsys):
    checkpoint = trained / "widget-wave18" / "model.pt"
    out = tmp_path / "out"
    assert run_score(score_args(tiny_root, checkpoint, out), capsys)[0] == 0
    before = (out / "results.json").read_bytes()
    (out / "notes.txt").write_text("mine")
    code, err = run_score(score_args(tiny_root, checkpoint, out, "--k", "2", "--overwrite"), capsys)
    assert code == 0, err
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("out.old-")]
    assert len(aside) == 1 and (aside[0] / "results.json").read_bytes() == before
    assert (out / "notes.txt").read_text() == "mine" and json.loads((out / "results.json").read_text())


def test_out_dot_overwrite_moves_aside_next_to_it(trained, tiny_root, tmp_path, capsys, monkeypatch):
    """``--out . --overwrite``: "." has no name to extend until it is made absolute."""
    checkpoint = trained / "widget-wave18" / "model.pt"
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    assert run_score(score_args(tiny_root, checkpoint, "."), capsys)[0] == 0
    code, err = run_score(score_args(tiny_root, checkpoint, ".", "--k", "2", "--overwrite"), capsys)
    assert code == 0, err
    assert len([p for p in tmp_path.iterdir() if p.name.startswith("here.old-")]) == 1


def test_predict_names_bytes():
    from scoring.inputs import as_image_list

    assert as_image_list(b"\x89PNG...") == [b"\x89PNG..."]  # one (undecoded) image, not a list of ints


def test_a_too_small_coreset_names_the_fraction_that_works():
    from scoring.engine.model import check_coreset_size

    with pytest.raises(UserError, match=r"with these 6 training images use coreset=0.17 or more \(1 keeps"):
        check_coreset_size(0.1, 288, 48)  # 6 images of 48 patches: 29 rows kept, one image needs 48
    check_coreset_size(0.17, 288, 48)  # 49 rows: enough


def test_an_out_folder_inside_the_images_folder_is_not_scored(trained, tiny_root, tmp_path, capsys):
    folder = tmp_path / "photos"
    shutil.copytree(tiny_root / "widget" / "test" / "scratch", folder)
    args = score_args(tiny_root, trained / "widget-wave18" / "model.pt", folder / "results", "--images", str(folder))
    args.remove("--no-pictures")  # heatmaps (PNG files) inside the folder scored
    assert run_score(args, capsys)[0] == 0
    before = (folder / "results" / "scores.csv").read_text()
    code, err = run_score(args, capsys)  # the same run again: the same identity, the same 3 images
    assert code == 0, err
    assert (folder / "results" / "scores.csv").read_text() == before
    assert json.loads((folder / "results" / "results.json").read_text())["images"]["scored"] == 3


def test_results_written_into_the_images_folder_leave_its_images_scored(trained, tiny_root, tmp_path, capsys):
    folder = tmp_path / "photos"
    shutil.copytree(tiny_root / "widget" / "test" / "scratch", folder)
    images = sorted(p.name for p in folder.iterdir())
    args = score_args(tiny_root, trained / "widget-wave18" / "model.pt", folder, "--images", str(folder))
    args.remove("--no-pictures")  # heatmaps (PNG files) and results among the images themselves
    assert run_score(args, capsys)[0] == 0
    assert (folder / "heatmaps").is_dir() and (folder / "results.json").is_file()
    scores = (folder / "scores.csv").read_text()
    # Scored again, into the same folder and elsewhere: the user's 3 images, not the run's own files.
    code, err = run_score(args, capsys)
    assert code == 0, err
    assert (folder / "scores.csv").read_text() == scores
    elsewhere = score_args(tiny_root, trained / "widget-wave18" / "model.pt", tmp_path / "o", "--images", str(folder))
    assert run_score(elsewhere, capsys)[0] == 0
    record = json.loads((tmp_path / "o" / "results.json").read_text())
    assert record["images"]["scored"] == len(images) == 3
    rows = (tmp_path / "o" / "scores.csv").read_text().splitlines()[1:]
    assert sorted(Path(row.split(",")[0]).name for row in rows) == images
