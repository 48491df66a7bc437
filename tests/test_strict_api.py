"""The Python API checks what the command line checks, and scoring runs never empty or thin earlier outputs."""

import numpy as np
import pytest
import torch

import main as train_main
from common import cli
from common.errors import SettingError, UserError
from scoring import Detector, ScoreConfig
from scoring.pipeline import cli as score_cli
from training import TrainConfig


@pytest.mark.parametrize("values, message", [
    ({"k": 0}, "k=0: must be at least 1"),
    ({"threshold": -1.0}, "threshold=-1.0: must be a positive number"),
    ({"threshold": float("nan")}, "threshold=nan: must be a positive number"),
    ({"coreset": 2.0}, r"coreset=2.0: must be in \(0, 1\]"),
    ({"smooth": -1.0}, "smooth=-1.0: must be a number from 0 to 100 px"),
    ({"calib_percentile": 150.0}, r"calib_percentile=150.0: must be in \(0, 100\]"),
    ({"size": 0}, "size=0: the network needs 32 to 4096 px"),
    ({"size": 100000}, "size=100000: the network needs 32 to 4096 px"),
    ({"refine": -1}, "refine=-1: must be 0 or more"),
    ({"layers": (2, 5)}, "layers=.*stages are numbered 1 to 4"),
    ({"knn": "annoy"}, "knn='annoy': choose one of auto, torch, faiss"),
    ({"coreset": None}, r"coreset=None: must be in \(0, 1\]"),
    ({"layers": None}, "layers=None: stages are numbered 1 to 4"),
    ({"layers": (2, "3")}, "stages are numbered 1 to 4"),
])
def test_score_config_refuses_what_the_command_line_refuses(values, message):
    with pytest.raises(SettingError, match=message):
        ScoreConfig(**values)


@pytest.mark.parametrize("values, message", [
    ({"lr": 0.0}, "lr=0.0: must be a positive finite number"),
    ({"epochs": -1}, "epochs=-1: must be 0 or more"),
    ({"size": 100000}, "size=100000: the network needs 32 to 4096 px"),
    ({"augs": ("cutpaste", "blur")}, "augs='cutpaste,blur': unknown anomaly maker blur"),
    ({"momentum": 1.0}, r"momentum=1.0: momentum must be in \[0, 1\)"),
    ({"augs": None}, "augs=None: give anomaly maker names"),
])
def test_train_config_refuses_bad_values(values, message):
    with pytest.raises(SettingError, match=message):
        TrainConfig(**values)


def test_the_command_lines_word_the_same_checks_with_their_flags(capsys):
    for run, argv, expected in [
        (score_cli.main, score_cli.parse_args("concatenation", ["--size", "100000"]), "--size 100000: the network"),
        (train_main.main, train_main.parse_args(["--size", "100000"]), "--size 100000: the network"),
        (score_cli.main, score_cli.parse_args("concatenation", ["--coreset", "0.1", "--refine", "0"]),
         "--refine 0: must be at least 1 for certified coreset scores (0 = the coreset alone, uncertified: add "
         "--uncertified)"),
    ]:
        with pytest.raises(SystemExit) as info:
            cli.run(run, argv)
        err = capsys.readouterr().err
        assert info.value.code == 2 and err.startswith(f"error: {expected}") and "Traceback" not in err


def test_defaults_are_defined_once():
    args = score_cli.parse_args("concatenation", [])
    assert all(getattr(args, name) == ScoreConfig.default(name) for name in ScoreConfig.names()
               if name not in ("layers",)) and tuple(args.layers) == ScoreConfig.default("layers")


@pytest.fixture(scope="module")
def detector(trained, tiny_root):
    return Detector.fit(trained / "widget-wave18" / "model.pt", tiny_root / "widget" / "train" / "good",
                        ScoreConfig(batch_size=4), device="cpu")


@pytest.mark.parametrize("bad, message", [
    (np.zeros((40, 40, 5), np.uint8), r"\(H, W\) or \(H, W, C\) with C = 1, 3 or 4, got shape \(40, 40, 5\)"),
    (np.zeros((40, 40, 2), np.uint8), r"got shape \(40, 40, 2\)"),
    (np.zeros((0, 0, 3), np.uint8), r"an empty image \(shape \(0, 0, 3\)\)"),
    (np.zeros((2, 64, 64), np.uint8), r"got shape \(2, 64, 64\); a batch of grey images is \(N, H, W, 1\)"),
    (torch.full((3, 40, 40), 200.0), r"must be in \[0, 1\], got values in \[200, 200\]"),
    (torch.full((3, 40, 40), float("nan")), "NaN or infinite"),
    (np.zeros((40, 40, 3), np.float32), "must be uint8"),
])
def test_predict_refuses_what_the_readme_does_not_accept(detector, bad, message):
    with pytest.raises(UserError, match=message):
        detector.predict(bad)


def test_predict_takes_grey_batches_and_rgba(detector):
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (2, 40, 40), dtype=np.uint8)
    batch = detector.predict(grey[..., None])  # (N, H, W, 1): two grey images
    listed = detector.predict(list(grey))  # a list of (H, W) arrays: the same two
    assert len(batch) == 2 and np.array_equal(batch.scores, listed.scores)
    rgb = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
    rgba = np.concatenate([rgb, np.full((40, 40, 1), 7, np.uint8)], axis=2)
    assert detector.predict(rgba).scores[0] == detector.predict(rgb).scores[0]  # alpha dropped


def test_a_category_named_twice_counts_once(tiny_root):
    from data import resolve_categories

    assert resolve_categories(tiny_root, "widget,widget") == ["widget"]
