"""Frames: images keep their aspect ratio, may be larger than the network's input, and train in tiles."""

import json

import numpy as np
import pytest
import torch
from conftest import TRAIN_FLAGS, write_category

import main as train_main
from common import cli
from data import TrainSet
from data.frames import auto_frame, frame_problem, random_tiles, resolve_frame
from scoring import Detector, ScoreConfig
from scoring.pipeline import cli as score_cli
from training import TrainConfig


def test_auto_frame_keeps_the_median_aspect_and_caps_the_area():
    commutators = [(1260, 500), (1255, 500), (1263, 500)]
    assert auto_frame(commutators, 128) == (416, 160)  # 2.5:1 kept, 4 x 128^2 at most
    assert auto_frame([(512, 512)] * 3, 128) == (256, 256)
    assert auto_frame([(90, 100)] * 3, 128) == (128, 128)  # small images: the training size, no less
    assert auto_frame([(2000, 100)], 128)[1] == 128  # a very thin image still fits a training tile
    assert auto_frame([(300, 250), (120, 280), (260, 240)], 128, max_area=1.0) == (128, 128)
    assert resolve_frame("square", 96) == (96, 96) and resolve_frame("160x416", 128) == (160, 416)


def test_frame_settings_are_checked_where_made():
    assert frame_problem("auto") is None and frame_problem("square") is None and frame_problem("160X416") is None
    assert "multiple of 32" in frame_problem("65x64") and "choose square" in frame_problem("wide")
    with pytest.raises(ValueError, match="frame=.64x64.: each side must be at least the size"):
        TrainConfig(size=128, frame="64x64")
    with pytest.raises(ValueError, match="frame=.100x100.: each side must be a multiple of 32"):
        ScoreConfig(frame="100x100")
    assert ScoreConfig(frame="64x96").frame_hw == (64, 96) and ScoreConfig(size=48).frame_hw == (48, 48)
    with pytest.raises(ValueError, match="must be resolved"):
        _ = ScoreConfig(frame="auto").frame_hw


def test_random_tiles_are_crops_drawn_from_the_generator():
    images = torch.arange(2 * 3 * 6 * 5, dtype=torch.float32).view(2, 3, 6, 5)
    tiles = random_tiles(images, 4, torch.Generator().manual_seed(1))
    again = random_tiles(images, 4, torch.Generator().manual_seed(1))
    assert tiles.shape == (2, 3, 4, 4) and torch.equal(tiles, again)
    for image, tile in zip(images, tiles):
        top, left = divmod(int(tile[0, 0, 0] - image[0, 0, 0]), 5)  # values count up by row: the corner says where
        assert torch.equal(tile, image[:, top:top + 4, left:left + 4])
    rng = torch.Generator().manual_seed(3)
    square = images[..., :5, :5]
    assert random_tiles(square, 5, rng) is square  # the paper's square: no draw, the generator untouched
    assert torch.equal(torch.rand(1, generator=rng), torch.rand(1, generator=torch.Generator().manual_seed(3)))
    with pytest.raises(ValueError, match="does not fit"):
        random_tiles(images, 7, rng)


@pytest.fixture(scope="module")
def tall(tmp_path_factory):
    """A category of tall images (112 x 48) and a 1-epoch run trained on 32 px tiles of its auto frame."""
    root = tmp_path_factory.mktemp("tall")
    write_category(root, "tall", seed=5, n_train=8, size=(112, 48))
    ckpt_dir = root / "ckpt"
    train_main.main(train_main.parse_args(["--c", "tall", "--data-root", str(root), "--ckpt-dir", str(ckpt_dir),
                                           *TRAIN_FLAGS, "--e", "1", "--frame", "auto"]))
    return root, ckpt_dir / "tall-wave18" / "model.pt"


def test_training_on_tiles_records_the_frame(tall):
    root, checkpoint = tall
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
    assert ckpt["frame"] == [96, 32] and ckpt["args"]["frame"] == "auto"  # 112 x 48 -> 4 x 32^2 at most, 2.3:1
    dataset = TrainSet(root, "tall", 32, ["cutpaste", "perlin"], frame=(96, 32))
    assert dataset.images.shape[-2:] == (96, 32)
    normal, anomalies, masks = dataset.sample(0)
    assert normal.shape == (3, 32, 32) and anomalies.shape == (2, 3, 32, 32) and masks.shape == (2, 32, 32)
    # The tile is a crop of the frame-sized image, at a position of the sample's own stream.
    image = dataset.image(0)
    assert any(torch.equal(normal, image[:, top:top + 32]) for top in range(65))
    assert torch.equal(dataset.sample(0)[0], normal)


def test_scoring_follows_the_checkpoints_frame(tall, tmp_path, capsys):
    root, checkpoint = tall
    detector = Detector.fit(checkpoint, root / "tall" / "train" / "good", ScoreConfig(batch_size=4))
    assert detector.frame == (96, 32) and detector.config.frame == "96x32"
    paths = sorted((root / "tall" / "test").rglob("*.png"))
    prediction = detector.predict(paths)
    assert prediction.maps.shape == (len(paths), 96, 32)
    assert [m.shape for m in detector.predict(paths[:2], original_size=True).maps] == [(112, 48)] * 2
    loaded = Detector.load(detector.save(tmp_path / "tall.detector.pt"))
    assert loaded.frame == (96, 32) and np.array_equal(loaded.predict(paths).scores, prediction.scores)
    square = Detector.fit(checkpoint, root / "tall" / "train" / "good", ScoreConfig(batch_size=4, frame="square"))
    assert square.frame == (32, 32) and square.predict(paths[:1]).maps.shape == (1, 32, 32)
    # The command line scores the test set at the frame: masks resized to it, maps.npz at it.
    out = tmp_path / "out"
    args = score_cli.parse_args("concatenation", ["--c", "tall", "--data-root", str(root), "--checkpoint",
                                                  str(checkpoint), "--out", str(out), "--no-pictures", "--save-maps"])
    with pytest.raises(SystemExit) as exit_info:
        cli.run(score_cli.main, args)
        raise SystemExit(0)
    assert exit_info.value.code == 0, capsys.readouterr().err
    record = json.loads((out / "results.json").read_text())
    assert record["settings"]["frame"] == "96x32"
    maps = np.load(next(out.rglob("maps.npz")))["maps"]
    assert maps.shape == (len(paths), 96, 32)
    np.testing.assert_allclose(np.sort(maps.max(axis=(1, 2))), np.sort(prediction.maps.max(axis=(1, 2))), rtol=1e-4)


def test_tiled_features_are_each_windows_core_stitched():
    """A frame over the tile side: each tile's core is the network's output on its window (the
    core with its halo, clipped to the frame), put where the core lies; the windows here are not
    the whole frame, so the result differs from one pass (near it: the halo is context)."""
    from models import create_model
    from scoring.engine.features import _tile_spans, pooled_features

    torch.manual_seed(0)
    network = create_model("wave18").eval()
    images = torch.rand(2, 3, 160, 96)
    tile, halo = 64, 32
    rows, cols = _tile_spans(160, tile, halo), _tile_spans(96, tile, halo)
    assert len(rows) == 3 and len(cols) == 2 and all(stop - start < 160 for _, _, start, stop in rows)
    with torch.no_grad():
        whole = pooled_features(network, images, [2, 3], tile=4096)
        tiled = pooled_features(network, images, [2, 3], tile=tile, halo=halo)
        for top, bottom, w_top, w_bottom in rows:
            for left, right, w_left, w_right in cols:
                window = pooled_features(network, images[..., w_top:w_bottom, w_left:w_right], [2, 3], tile=4096)
                for stitched, alone, stride in zip(tiled, window, (8, 16)):
                    core = stitched[..., top // stride:bottom // stride, left // stride:right // stride]
                    torch.testing.assert_close(core, alone[..., (top - w_top) // stride:(bottom - w_top) // stride,
                                                           (left - w_left) // stride:(right - w_left) // stride],
                                               rtol=1e-5, atol=1e-6)
    for full, stitched in zip(whole, tiled):
        assert stitched.shape == full.shape
        assert not torch.allclose(stitched, full, rtol=1e-3, atol=1e-4)  # context beyond the halo matters
        assert (stitched - full).abs().mean() < 0.2 * full.abs().mean()  # but the halo gives most of it


def test_whole_share_mixes_whole_images_into_the_tiles(tall):
    """``whole_share``: that share of the samples (and their anomaly sources) are the whole image at the
    training size, the rest tiles; 0 draws nothing, so the tiles-only stream is unchanged."""
    root, _ = tall
    makers = ["cutpaste", "perlin"]
    tiles_only = TrainSet(root, "tall", 32, makers, frame=(96, 32))
    zero = TrainSet(root, "tall", 32, makers, frame=(96, 32), whole_share=0.0)
    assert zero.wholes is None and all(torch.equal(a, b) for i in range(3)
                                       for a, b in zip(tiles_only.sample(i), zero.sample(i)))
    everything = TrainSet(root, "tall", 32, makers, frame=(96, 32), whole_share=1.0)
    assert everything.wholes.shape == (8, 3, 32, 32)
    for index in range(len(everything)):
        assert torch.equal(everything.sample(index)[0], everything.whole(index))
    half = TrainSet(root, "tall", 32, makers, frame=(96, 32), whole_share=0.5)
    whole = [torch.equal(half.sample(i, epoch=e)[0], half.whole(i)) for e in range(4) for i in range(len(half))]
    assert 4 <= sum(whole) <= 28  # 32 draws of a fair coin
    # A square frame's tile is the whole image already: no whole cache, no draws.
    square = TrainSet(root, "tall", 32, makers, whole_share=0.5)
    assert square.whole_share == 0 and square.wholes is None


def test_whole_share_on_the_device_path_matches_the_images(tall):
    from torch.utils.data import SequentialSampler

    from training.device_batches import DeviceBatches

    root, _ = tall
    dataset = TrainSet(root, "tall", 32, ["cutpaste"], frame=(96, 32), whole_share=1.0)
    batch = next(iter(DeviceBatches(dataset, SequentialSampler(dataset), 4, torch.device("cpu"))))
    assert torch.equal(batch[0], dataset.wholes[:4].float() / 255)
    tiles = DeviceBatches(TrainSet(root, "tall", 32, ["cutpaste"], frame=(96, 32)),
                          SequentialSampler(dataset), 4, torch.device("cpu"))
    normal = next(iter(tiles))[0]
    assert normal.shape == (4, 3, 32, 32) and not torch.equal(normal, batch[0])


def test_whole_share_is_checked_and_recorded(tall, tmp_path):
    with pytest.raises(ValueError, match="whole_share=1.5: must be a share from 0 to 1"):
        TrainConfig(whole_share=1.5)
    with pytest.raises(ValueError, match="whole_share=0.5: needs a frame larger than the size"):
        TrainConfig(whole_share=0.5)
    root, _ = tall
    ckpt_dir = tmp_path / "ckpt"
    train_main.main(train_main.parse_args(["--c", "tall", "--data-root", str(root), "--ckpt-dir", str(ckpt_dir),
                                           *TRAIN_FLAGS, "--e", "1", "--frame", "auto", "--whole-share", "0.5"]))
    ckpt = torch.load(ckpt_dir / "tall-wave18" / "model.pt", map_location="cpu", weights_only=False)
    assert ckpt["args"]["whole_share"] == 0.5 and ckpt["frame"] == [96, 32]
