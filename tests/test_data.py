"""MVTec-layout data: discovery, odd image modes, soft masks, determinism, clear errors."""

import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from common.errors import UserError
from data import TestSet, TrainSet, find_categories, read_rgb, resolve_categories
from data.images import load_image, resize_mask
from training.loop import EpochShuffleSampler


def test_categories_found(tiny_root):
    assert find_categories(tiny_root) == ["gizmo", "widget"]
    assert resolve_categories(tiny_root, "all") == ["gizmo", "widget"]
    with pytest.raises(UserError, match="no category nope.*found: gizmo, widget"):
        resolve_categories(tiny_root, "nope")
    with pytest.raises(UserError, match="does not exist.*mvtec"):
        find_categories(tiny_root / "missing")


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "LA", "1"])
def test_odd_modes_become_rgb(tmp_path, mode):
    rng = np.random.default_rng(0)
    if mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65535, (30, 20)).astype(np.uint16))
    else:
        img = Image.fromarray(rng.integers(0, 255, (30, 20, 3)).astype(np.uint8)).convert(mode)
    path = tmp_path / "x.png"
    img.save(path)
    rgb = read_rgb(path)
    assert rgb.shape == (3, 30, 20) and rgb.dtype == torch.uint8
    out = load_image(path, 16)
    assert out.shape == (3, 16, 16)
    if mode == "I;16":
        assert int(rgb.max()) > 200  # 16-bit range scaled, not clipped to 255 of 65535


def test_16bit_scaling_exact(tmp_path):
    arr = np.full((4, 4), 65535, np.uint16)
    arr[0, 0] = 0
    Image.fromarray(arr).save(tmp_path / "a.png")
    rgb = read_rgb(tmp_path / "a.png")
    assert int(rgb[0, 1, 1]) == 255 and int(rgb[0, 0, 0]) == 0


def test_resize_is_bilinear_half_pixel():
    img = torch.arange(16, dtype=torch.uint8).view(1, 4, 4).repeat(3, 1, 1) * 10
    path_free = torch.nn.functional.interpolate(img[None].float(), size=(2, 2), mode="bilinear",
                                                align_corners=False)[0].round()
    from data.images import resize_image
    assert torch.equal(resize_image(img, 2).float(), path_free)
    # 2x downscale without antialias = mean of each 2x2 block (OpenCV INTER_LINEAR behaviour)
    assert int(resize_image(img, 2)[0, 0, 0]) == round((0 + 10 + 40 + 50) / 4)


def test_soft_mask_threshold():
    soft = torch.tensor([[0, 127], [128, 255]], dtype=torch.uint8)
    assert resize_mask(soft, 2).tolist() == [[False, False], [True, True]]


def test_test_set(tiny_root):
    ds = TestSet(tiny_root, "widget", 32)
    assert len(ds) == 6
    labels = [ds[i]["label"] for i in range(len(ds))]
    assert sorted(labels) == [0, 0, 0, 1, 1, 1]
    for i in range(len(ds)):
        item = ds[i]
        assert item["image"].shape == (3, 32, 32) and 0 <= item["image"].min() <= item["image"].max() <= 1
        assert item["mask"].dtype == torch.bool
        assert item["mask"].any() == bool(item["label"])  # soft 100-valued border excluded, 200 kept
        # The paper code's convention counts the soft border too: a strict superset.
        assert item["paper_mask"].sum() > item["mask"].sum() or not item["label"]
        assert not (item["mask"] & ~item["paper_mask"]).any()


def test_missing_mask_and_bad_ratio(tiny_root, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(tiny_root / "widget", root / "widget")
    mask = root / "widget" / "ground_truth" / "scratch" / "000_mask.png"
    Image.open(mask).resize((10, 40)).save(mask)
    with pytest.raises(UserError, match=r"000_mask.png is 40x10 but image .*000.png is 48x40 \(height x width"):
        TestSet(root, "widget", 32)[3]
    mask.unlink()
    with pytest.raises(UserError, match="defect image .*000.png has no mask"):
        TestSet(root, "widget", 32)


def test_train_set_items_and_cache(tiny_root):
    ds = TrainSet(tiny_root, "widget", 32, ["cutpaste", "perlin"], seed=0)
    assert ds.images.shape == (8, 3, 32, 32) and ds.images.dtype == torch.uint8
    normal, anomalies = ds[0]
    assert normal.shape == (3, 32, 32) and anomalies.shape == (2, 3, 32, 32)
    assert not torch.equal(anomalies[0], normal) and not torch.equal(anomalies[1], normal)


def batches(ds, workers, epoch):
    sampler = EpochShuffleSampler(len(ds), seed=0)
    sampler.set_epoch(epoch)
    ds.set_epoch(epoch)
    loader = DataLoader(ds, batch_size=3, sampler=sampler, num_workers=workers)
    return [torch.cat([n.flatten(), a.flatten()]) for n, a in loader]


def test_same_seed_same_batches_any_workers(tiny_root):
    ds = TrainSet(tiny_root, "widget", 32, ["cutpaste", "perlin", "scar"], seed=3)
    ref = batches(ds, 0, epoch=1)
    assert all(torch.equal(a, b) for a, b in zip(ref, batches(ds, 2, epoch=1)))
    other_epoch = batches(ds, 0, epoch=2)
    assert not all(torch.equal(a, b) for a, b in zip(ref, other_epoch))
    ds2 = TrainSet(tiny_root, "widget", 32, ["cutpaste", "perlin", "scar"], seed=4)
    assert not all(torch.equal(a, b) for a, b in zip(ref, batches(ds2, 0, epoch=1)))
