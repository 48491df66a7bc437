"""Both inference scripts end to end on the tiny data set, as a user runs them."""

import contextlib
import io
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from common import cli
from scoring import ScoreConfig, metrics
from scoring.pipeline import cli as score_cli
from scoring.pipeline.evaluation import category_test_set


def infer(script, tiny_root, ckpt_dir, out, *extra):
    """An inference script run in-process (its subprocess form is tested by test_demo): its exit
    code, stdout and stderr."""
    fusion = script.split("_")[1].split(".")[0]
    argv = ["--data-root", str(tiny_root), "--ckpt-dir", str(ckpt_dir), "--out", str(out), "--batch-size", "4",
            *extra]
    stdout, stderr = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            cli.run(score_cli.main, score_cli.parse_args(fusion, argv))
        except SystemExit as exc:
            code = exc.code
    return SimpleNamespace(returncode=code, stdout=stdout.getvalue(), stderr=stderr.getvalue())


@pytest.mark.parametrize("script", ["inference_concatenation.py", "inference_multiplication.py"])
def test_scripts_write_results_and_recomputable_maps(script, tiny_root, trained, tmp_path):
    run = infer(script, tiny_root, trained, tmp_path, "--c", "widget", "--p", "widget-wave18", "--save-maps")
    assert run.returncode == 0, run.stderr[-2000:]
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["fusion"] == script.split("_")[1].split(".")[0]
    assert record["data"]["test_images"] == 6 and record["bank"]["train_images"] == 8
    assert record["settings"]["size"] == 32 and record["checkpoint"]["arch"] == "wave18"
    assert len(record["checkpoint"]["sha256"]) == 64
    for key in ("seed", "git_commit", "versions", "memory", "timings"):
        assert key in record
    assert record["memory"]["peak_rss_mb"] > 0 and record["timings"]["s_per_test_image"] > 0
    saved = np.load(tmp_path / "maps.npz")
    assert saved["maps"].shape == (6, 32, 32) and saved["masks"].shape == (6, 32, 32)
    m = record["metrics"]
    assert metrics.image_auroc(saved["labels"], saved["scores"]) == pytest.approx(m["image_auroc"], abs=1e-4)
    assert metrics.pixel_auroc(saved["masks"].astype(bool), saved["maps"]) == pytest.approx(m["pixel_auroc"], abs=1e-4)
    assert metrics.aupro(saved["masks"].astype(bool), saved["maps"]) == pytest.approx(m["aupro"], abs=0.01)
    # The same maps against the paper code's masks (bilinear resize, any non-zero value), recomputed here.
    dataset = category_test_set(tiny_root, "widget", ScoreConfig(size=32))
    paper_masks = np.stack([dataset[i]["paper_mask"].numpy() for i in range(len(dataset))])
    order = [dataset.samples[i].path.name for i in range(len(dataset))]
    assert [Path(p).name for p in saved["paths"]] == order
    assert m["pixel_auroc_paper_masks"] == pytest.approx(metrics.pixel_auroc(paper_masks, saved["maps"]), abs=1e-6)
    assert m["pixel_auroc_paper_masks"] != m["pixel_auroc"]
    heatmaps = sorted(p.relative_to(tmp_path / "heatmaps") for p in (tmp_path / "heatmaps").rglob("*.png"))
    assert len(heatmaps) == 6 and {p.parts[0] for p in heatmaps} == {"good", "scratch"}
    assert (tmp_path / "roc.png").stat().st_size > 0
    assert (tmp_path / "results.md").read_text().count("|") > 10
    assert len((tmp_path / "image_scores.csv").read_text().splitlines()) == 7
    # Second run reuses the cached bank and repeats bit for bit.
    again = infer(script, tiny_root, trained, tmp_path / "again", "--c", "widget", "--p", "widget-wave18",
                  "--no-pictures", "--save-maps")
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads((tmp_path / "again" / "results.json").read_text())["bank"]["cached"] is True
    repeat = np.load(tmp_path / "again" / "maps.npz")
    assert np.array_equal(repeat["maps"], saved["maps"]) and np.array_equal(repeat["scores"], saved["scores"])


def test_checkpoint_given_as_folder_or_file(tiny_root, trained, tmp_path):
    for i, p in enumerate([trained / "widget-wave18", trained / "widget-wave18" / "model.pt"]):
        run = infer("inference_concatenation.py", tiny_root, trained, tmp_path / str(i), "--c", "widget",
                    "--p", str(p), "--no-pictures")
        assert run.returncode == 0, run.stderr[-2000:]
        assert json.loads((tmp_path / str(i) / "results.json").read_text())["checkpoint"]["arch"] == "wave18"


def test_all_categories_summary(tiny_root, trained, tmp_path):
    run = infer("inference_concatenation.py", tiny_root, trained, tmp_path, "--c", "all", "--p",
                "{category}-wave18", "--no-pictures", "--coreset", "0.5")
    assert run.returncode == 0, run.stderr[-2000:]
    table = (tmp_path / "summary-concatenation.md").read_text()
    assert "gizmo" in table and "widget" in table and "mean" in table
    assert (tmp_path / "summary-concatenation.csv").read_text().count("\n") == 4
    record = json.loads((tmp_path / "widget" / "results.json").read_text())
    assert record["bank"]["patches"] == [8 * 4 * 4 // 2]


def test_unlabeled_images(tiny_root, trained, tmp_path):
    folder = tmp_path / "new"
    folder.mkdir()
    for p in sorted((tiny_root / "widget" / "test").rglob("*.png")):
        shutil.copy(p, folder / f"{p.parent.name}_{p.name}")
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    run = infer("inference_multiplication.py", tiny_root, trained, out, "--c", "widget", "--p", "widget-wave18",
                "--images", str(folder))
    assert run.returncode == 0, run.stderr[-2000:]
    rows = (out / "scores.csv").read_text().splitlines()
    assert rows[0] == "path,score,normalized_score,verdict,heatmap" and len(rows) == 1 + 6
    assert all(r.split(",")[3] in ("normal", "anomalous") for r in rows[1:])
    record = json.loads((out / "results.json").read_text())
    assert "cross-fitted" in record["threshold"]["source"]
    skipped = {Path(s["path"]).name for s in record["images"]["skipped"]}
    assert skipped == {"broken.png", "notes.txt"}
    assert "broken.png" in run.stderr  # warned
    assert len(list((out / "heatmaps").glob("*.png"))) == 6


def test_synthetic_check_uses_held_out_training_images_only(tiny_root, trained, tmp_path):
    run = infer("inference_multiplication.py", tiny_root, trained, tmp_path, "--c", "widget", "--p",
                "widget-wave18", "--synthetic-check", "--no-pictures")
    assert run.returncode == 0, run.stderr[-2000:]
    assert "synthetic check: image AUROC" in run.stdout
    record = json.loads((tmp_path / "results.json").read_text())
    check = record["synthetic_check"]
    # 8 training images: a fifth (2) held out, each scored as is and with 3 kinds of anomaly.
    assert check["held_out_images"] == 2 and check["bank_images"] == 6
    assert check["kinds"] == ["cutpaste", "perlin", "scar"]
    for key in ("image_auroc", "pixel_auroc", "aupro"):
        assert 0 <= check[key] <= 1
    assert record["timings"]["synthetic_check_s"] > 0
    # The test-set metrics are those of a run without the check.
    plain = infer("inference_multiplication.py", tiny_root, trained, tmp_path / "plain", "--c", "widget", "--p",
                  "widget-wave18", "--no-pictures")
    assert plain.returncode == 0, plain.stderr[-2000:]
    assert json.loads((tmp_path / "plain" / "results.json").read_text())["metrics"] == record["metrics"]
