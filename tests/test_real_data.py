"""Real photographs (Magnetic Tile, in ../shared/datasets): the whole pipeline, marked slow.

Skips cleanly when the data set is not beside the repository. Run with ``pytest -m slow``.
"""

import json
from pathlib import Path

import pytest

import main as train_main
from scoring.pipeline import cli as score_cli

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "datasets"

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (DATA / "magnetic_tile" / "train" / "good").is_dir(),
                                 reason="Magnetic Tile not found at ../shared/datasets")]


def test_magnetic_tile_short_run(tmp_path):
    train_main.main(train_main.parse_args(
        ["--c", "magnetic_tile", "--data-root", str(DATA), "--arch", "wave18", "--size", "64", "--e", "2",
         "--ckpt-dir", str(tmp_path / "ckpt"), "--no-tensorboard"]))
    for fusion in ("concatenation", "multiplication"):
        out = tmp_path / fusion
        [record] = score_cli.main(score_cli.parse_args(fusion, [
            "--c", "magnetic_tile", "--data-root", str(DATA), "--ckpt-dir", str(tmp_path / "ckpt"),
            "--p", "magnetic_tile-wave18", "--out", str(out), "--coreset", "0.1", "--no-pictures"]))
        saved = json.loads((out / "results.json").read_text())
        assert saved["data"]["test_images"] == 582 and saved["data"]["test_defect"] == 392
        assert saved["bank"]["train_images"] == 762
        # Two epochs already beat chance; the four all-zero masks are defects without regions.
        assert record["metrics"]["image_auroc"] > 0.55
        assert 0.5 < record["metrics"]["pixel_auroc"] <= 1
