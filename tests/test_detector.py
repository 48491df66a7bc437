"""The trained detector as one object: Python API, one-file save/load, and parity with the CLI."""

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from common import cli
from common.errors import UserError
from scoring import Detector, ScoreConfig, metrics
from scoring.detector import FORMAT_VERSION
from scoring.pipeline import cli as score_cli
from scoring.pipeline.evaluation import category_test_set

# Settings the CLI's metrics are checked at: both fusions, and a coreset bank searched alone with k = 2.
CLI_VARIANTS = [("concatenation", ()), ("multiplication", ()),
                ("concatenation", ("--coreset", "0.5", "--refine", "0", "--uncertified", "--k", "2")),
                ("multiplication", ("--coreset", "0.5", "--refine", "0", "--uncertified", "--k", "2"))]


def score(argv, fusion):
    cli.run(score_cli.main, score_cli.parse_args(fusion, argv))


@pytest.fixture(scope="module")
def detector(trained, tiny_root):
    return Detector.fit(trained / "widget-wave18" / "model.pt", tiny_root / "widget" / "train" / "good",
                        ScoreConfig(batch_size=4), device="cpu")


@pytest.mark.parametrize("fusion, extra", CLI_VARIANTS)
def test_cli_metrics_are_the_metrics_of_predicts_maps(fusion, extra, tiny_root, trained, tmp_path):
    """results.json's metrics are those of the saved detector's maps on the test set, computed here,
    on this machine (numbers pinned on another CPU would differ in the last digits)."""
    target = tmp_path / "widget.detector.pt"
    score(["--c", "widget", "--data-root", str(tiny_root), "--ckpt-dir", str(trained), "--out", str(tmp_path / "r"),
           "--batch-size", "4", "--no-pictures", "--save-detector", str(target), *extra], fusion)
    record = json.loads((tmp_path / "r" / "results.json").read_text())
    m = record["metrics"]
    assert record["files"]["detector"] == str(target)
    state = torch.load(target, weights_only=True)  # plain tensors and values only
    assert state["format_version"] == FORMAT_VERSION and state["config"]["fusion"] == fusion
    detector = Detector.load(target, device="cpu")
    assert detector.config.fusion == fusion and detector.size == 32 and detector.threshold > 0
    assert detector.provenance["sha256"] == record["checkpoint"]["sha256"]  # the checkpoint, by content
    dataset = category_test_set(tiny_root, "widget", detector.config)
    items = [dataset[i] for i in range(len(dataset))]
    labels = np.array([item["label"] for item in items])
    masks = np.stack([item["mask"].numpy() for item in items])
    prediction = detector.predict([item["path"] for item in items])
    assert prediction.maps.shape == (6, 32, 32) and prediction.maps.dtype == np.float32
    np.testing.assert_allclose(prediction.normalized_scores, prediction.scores / detector.threshold, rtol=1e-6)
    ours = {"image_auroc": metrics.image_auroc(labels, prediction.scores),
            "pixel_auroc": metrics.pixel_auroc(masks, prediction.maps), "aupro": metrics.aupro(masks, prediction.maps),
            "pixel_ap": metrics.pixel_ap(masks, prediction.maps),
            "pixel_auroc_paper_masks": metrics.pixel_auroc(np.stack([item["paper_mask"].numpy() for item in items]),
                                                           prediction.maps)}
    assert m["image_auroc"] == 1.0  # the tiny set's scratches are easy: a broken pipeline loses that first
    for name, value in ours.items():
        assert m[name] == pytest.approx(value, abs=1e-4), name
    assert 0.6 < m["pixel_auroc"] < 1.0 and 0.1 < m["aupro"] < 1.0  # a map that finds the scratches, not all pixels


def test_predict_accepts_every_kind_of_image(detector, tiny_root):
    path = sorted((tiny_root / "widget" / "test" / "scratch").glob("*.png"))[0]
    rgb = np.array(Image.open(path).convert("RGB"))
    by_path = detector.predict(path)
    assert by_path.scores.shape == (1,) and by_path.maps.shape == (1, 32, 32)
    same = [detector.predict(Image.open(path)), detector.predict(rgb), detector.predict(rgb[:, :, 0]),
            detector.predict(str(path))]
    for result in same:
        np.testing.assert_allclose(result.scores, by_path.scores, rtol=1e-6)
    # Float tensors are taken as their 8-bit values: the same resize and rounding, the same score.
    tensor = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255
    np.testing.assert_allclose(detector.predict(tensor).scores, by_path.scores, rtol=1e-6)
    batch = detector.predict(torch.stack([tensor, tensor]))
    assert batch.scores.shape == (2,) and batch.scores[0] == batch.scores[1]
    mixed = detector.predict([path, rgb, Image.open(path)], original_size=True)
    assert [m.shape for m in mixed.maps] == [rgb.shape[:2]] * 3 and all(m.dtype == np.float32 for m in mixed.maps)
    assert mixed.verdicts.dtype == bool and mixed.threshold == detector.threshold


def test_predict_rejects_what_it_cannot_score(detector, tmp_path):
    for bad, message in [(np.zeros((8, 8), np.float64), "must be uint8"), (torch.zeros(5, 8, 8), "float (3, H, W)"),
                         (42, "cannot score a int"), (tmp_path / "missing.png", "no such image file"),
                         ([], "at least one image")]:
        with pytest.raises(UserError, match=re.escape(message)):
            detector.predict(bad)


def test_detector_file_errors_are_one_line(detector, trained, tmp_path):
    good = detector.save(tmp_path / "d.pt")
    with pytest.raises(UserError, match="not found"):
        Detector.load(tmp_path / "missing.pt")
    (tmp_path / "broken.pt").write_bytes(good.read_bytes()[:1000])
    with pytest.raises(UserError, match="cannot be read"):
        Detector.load(tmp_path / "broken.pt")
    with pytest.raises(UserError, match="not a detector file"):
        Detector.load(trained / "widget-wave18" / "model.pt")
    state = torch.load(good, weights_only=True)
    state["format_version"] = FORMAT_VERSION + 1
    torch.save(state, tmp_path / "future.pt")
    with pytest.raises(UserError, match=f"format version {FORMAT_VERSION + 1}"):
        Detector.load(tmp_path / "future.pt")


def test_save_detector_never_replaces_another_file(tiny_root, trained, tmp_path, capsys):
    victim = tmp_path / "model.pt"
    victim.write_bytes((trained / "widget-wave18" / "model.pt").read_bytes())
    before = victim.read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        score(["--c", "widget", "--data-root", str(tiny_root), "--ckpt-dir", str(trained), "--out", str(tmp_path / "r"),
               "--no-pictures", "--save-detector", str(victim)], "concatenation")
    assert exit_info.value.code == 2 and "is not a detector file" in capsys.readouterr().err
    assert victim.read_bytes() == before
