"""Dense self-supervision: the segmentation head, its loss, its checkpoint, and its maps at scoring time."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import main as train_main
import models
from common import cli
from common.errors import SettingError, UserError
from models.checkpoint import load_weights, read_checkpoint
from scoring import Detector, ScoreConfig
from scoring.engine import dense
from scoring.export import export, run_exported
from scoring.pipeline import cli as score_cli
from training.segmentation import focal_loss, mask_batch, segmentation_loss, soft_dice_loss


def train(root, ckpt_dir, *extra):
    return train_main.main(train_main.parse_args(
        ["--c", "widget", "--data-root", str(root), "--arch", "wave18", "--size", "32", "--b", "4",
         "--ckpt-dir", str(ckpt_dir), "--no-tensorboard", "--precision", "fp32", *extra]))


def score(root, ckpt_dir, out, fusion="concatenation", *extra):
    [record] = score_cli.main(score_cli.parse_args(fusion, [
        "--c", "widget", "--data-root", str(root), "--ckpt-dir", str(ckpt_dir), "--out", str(out),
        "--batch-size", "4", "--no-pictures", *extra]))
    return record


@pytest.fixture(scope="module")
def dense_ckpt(tiny_root, tmp_path_factory):
    ckpt_dir = tmp_path_factory.mktemp("dense")
    train(tiny_root, ckpt_dir, "--dense", "--e", "1")
    return ckpt_dir


def test_head_leaves_the_backbone_as_without_it():
    torch.manual_seed(0)
    with_head = models.create_model("wave18", dense=True)
    torch.manual_seed(0)
    plain = models.create_model("wave18")
    assert all(torch.equal(with_head.state_dict()[k], v) for k, v in plain.state_dict().items())
    logits, feats, seg = with_head(torch.rand(2, 3, 64, 64))
    assert logits.shape == (2, 3) and seg.shape == (2, 1, 16, 16) and len(feats) == 4
    assert len(plain(torch.rand(2, 3, 64, 64))) == 2  # the paper network's output is unchanged


def test_segmentation_loss_rewards_the_right_mask():
    normal = torch.zeros(2, 3, 16, 16)
    masks = torch.zeros(2, 1, 16, 16, dtype=torch.bool)
    masks[:, 0, 4:8, 4:8] = True
    target = mask_batch(normal, masks)
    assert target.shape == (4, 16, 16) and target[:2].sum() == 0 and target[2:].sum() == 32
    right = torch.where(target > 0, 8.0, -8.0)[:, None, ::4, ::4].repeat_interleave(4, 2).repeat_interleave(4, 3)
    wrong = -right
    assert segmentation_loss(right, target) < 0.05 < 1.0 < segmentation_loss(wrong, target)
    # Focal loss down-weights easy pixels: a confident right answer costs less than under plain BCE.
    logits = torch.full((1, 16, 16), 3.0)
    ones = torch.ones(1, 16, 16)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, ones)
    assert focal_loss(logits, ones) < bce / 100
    assert soft_dice_loss(torch.full((1, 4, 4), 20.0), torch.ones(1, 4, 4)) < 1e-3


def test_dense_checkpoint_keeps_the_paper_network_loadable(dense_ckpt, one_epoch):
    ckpt = read_checkpoint(dense_ckpt / "widget-wave18" / "model.pt")
    assert ckpt["dense"] is True and ckpt["args"]["dense"] is True
    assert ckpt["seg_head_state_dict"] and not any(k.startswith("seg_head") for k in ckpt["netD_state_dict"])
    load_weights(models.create_model("wave18"), ckpt["netD_state_dict"])  # strict: the paper's network
    log = [json.loads(line) for line in (dense_ckpt / "widget-wave18" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 1 and all(np.isfinite(r["loss"]) for r in log)
    # The paper protocol writes no head.
    plain = read_checkpoint(one_epoch / "widget-wave18" / "model.pt")
    assert "seg_head_state_dict" not in plain and "dense" not in plain


def test_resume_refuses_another_dense_setting(dense_ckpt, tiny_root, tmp_path):
    with pytest.raises(UserError, match="has a segmentation head"):
        train(tiny_root, tmp_path, "--e", "2", "--resume", str(dense_ckpt / "widget-wave18" / "model.pt"))
    args = train_main.parse_args(["--dense-weight", "nan"])
    with pytest.raises(SettingError, match="dense_weight=nan: must be a finite number") as info:
        train_main.config_from_args(args)  # the library names the field, the CLI its flag
    assert cli.setting_message(info.value, args.flag_names).startswith("--dense-weight nan: must be")


def test_map_sources_on_a_dense_network(dense_ckpt, tiny_root, tmp_path):
    knn = score(tiny_root, dense_ckpt, tmp_path / "knn", "concatenation", "--map", "knn")
    head = score(tiny_root, dense_ckpt, tmp_path / "head", "concatenation", "--map", "head")
    auto = score(tiny_root, dense_ckpt, tmp_path / "auto", "concatenation", "--synthetic-check", "--map", "fused")
    assert (knn["settings"]["map_source"], head["settings"]["map_source"], auto["settings"]["map_source"]) == \
        ("knn", "head", "fused")
    # The default is the paper's map, for a dense network too.
    assert score_cli.config_from_args(score_cli.parse_args("concatenation", [])).map_source == "knn"
    # Three different maps: the head's pixel AUROC is its own, the fusion's is neither's.
    pixel = [r["metrics"]["pixel_auroc"] for r in (knn, head, auto)]
    assert len(set(pixel)) == 3 and all(0.5 < p <= 1 for p in pixel)  # each map finds the scratches
    assert "pixel_auroc" in auto["synthetic_check"]
    # Head maps are the same whatever the fusion (no k-NN in them).
    head_mult = score(tiny_root, dense_ckpt, tmp_path / "head-m", "multiplication", "--map", "head")
    assert head_mult["metrics"]["pixel_auroc"] == pytest.approx(head["metrics"]["pixel_auroc"], rel=1e-6)


def test_head_maps_need_a_dense_network(trained, tiny_root, tmp_path):
    with pytest.raises(UserError, match="needs a network trained with dense self-supervision"):
        score(tiny_root, trained, tmp_path / "r", "concatenation", "--map", "fused")
    assert dense.resolve_map_source("knn", False) == "knn" and dense.resolve_map_source("fused", True) == "fused"


def test_fused_detector_saves_loads_and_exports_with_the_same_scores(dense_ckpt, tiny_root, tmp_path):
    detector = Detector.fit(dense_ckpt / "widget-wave18" / "model.pt", tiny_root / "widget" / "train" / "good",
                            ScoreConfig(batch_size=4, map_source="fused"), device="cpu")
    assert detector.config.map_source == "fused" and set(detector.model.scorer.map_norm) == {
        "knn_mean", "knn_std", "head_mean", "head_std"}
    # The threshold is a percentile of cross-fitted training scores of the fused map.
    assert detector.calibration.train_score_max >= detector.threshold > detector.calibration.train_score_mean
    assert detector.calibration.source.startswith("cross-fitted training scores (5 folds)")
    head = Detector.fit(dense_ckpt / "widget-wave18" / "model.pt", tiny_root / "widget" / "train" / "good",
                        ScoreConfig(batch_size=4, map_source="head"), device="cpu")
    assert head.calibration.source.startswith("the training images' head-map scores")  # no bank: not cross-fitted
    paths = sorted((tiny_root / "widget" / "test").rglob("*.png"))
    expected = detector.predict(paths)
    loaded = Detector.load(detector.save(tmp_path / "d.pt"), device="cpu")
    np.testing.assert_array_equal(loaded.predict(paths).scores, expected.scores)
    images = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths[:3]])
    ts_scores, ts_maps = run_exported(export(detector, "torchscript", tmp_path / "d.ts"), "torchscript", images)
    want = detector.predict(list(images))
    np.testing.assert_allclose(ts_scores, want.scores, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ts_maps, want.maps, rtol=1e-4, atol=1e-4)


def test_calibrations_are_kept_per_scoring_setting(dense_ckpt, tiny_root, tmp_path):
    """One cached bank serves every map source; each keeps its own threshold and normalisation."""
    def threshold(out, *extra):
        cli.run(score_cli.main, score_cli.parse_args("multiplication", [
            "--c", "widget", "--data-root", str(tiny_root), "--ckpt-dir", str(dense_ckpt), "--out", str(out),
            "--batch-size", "4", "--no-pictures", "--images", str(tiny_root / "widget" / "test" / "good"), *extra]))
        return json.loads((out / "results.json").read_text())["threshold"]["value"]

    first = threshold(tmp_path / "a", "--map", "knn")
    fused = threshold(tmp_path / "b", "--map", "fused")
    again = threshold(tmp_path / "c", "--map", "knn")
    # Smoothing and the floor move the k-NN maps only, not the image scores the threshold comes from:
    # the same calibration serves them. The fused map's normalisation reads the maps: its own.
    assert threshold(tmp_path / "d", "--map", "knn", "--smooth", "2", "--floor", "0.5") == first
    threshold(tmp_path / "e", "--map", "fused", "--floor", "0.5")
    assert first == again != fused
    [cache] = (dense_ckpt / "widget-wave18" / "banks").glob("multiplication-*.pt")
    entry = torch.load(cache, weights_only=True)
    keys = [json.loads(key) for key in entry["calibrations"]]  # (other tests may add the head's)
    assert sorted((key["map_source"], key.get("floor")) for key in keys if key["map_source"] != "head") == [
        ("fused", 0.0), ("fused", 0.5), ("knn", None)]
