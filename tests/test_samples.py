"""The one path for synthetic anomalies (augment.samples): its four users and their frozen random streams.

The README's accuracies were measured with the training streams, so the reference recipes below
(the code each user had before the path was shared) must keep giving bit-identical results.
"""

from __future__ import annotations

import pytest
import torch

import augment
from augment import make_anomalies, make_anomalies_batch, other_index, other_indices, sample_seed
from augment.batched import BATCH_MAKERS, rotflip_batch
from data import TrainSet, to_float
from training import preview
from training.device_batches import DeviceBatches
from training.loop import EpochShuffleSampler

AUGS = ["cutpaste", "perlin", "scar"]


def reference_training_sample(ds: TrainSet, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """TrainSet.__getitem__ as first written: its own rotate/flip draw, a source per maker."""
    rng = torch.Generator().manual_seed(sample_seed(ds.seed, ds.epoch, index))
    normal = ds.image(index)
    if ds.rotflip:
        turns, mirror = (int(v) for v in torch.randint(0, 4, (2,), generator=rng))
        normal = torch.rot90(normal, turns, dims=(1, 2))
        normal = normal.flip(2) if mirror % 2 else normal
    anomalies = [augment.MAKERS[name](normal, ds.image(other_index(index, len(ds), rng)), rng)[0] for name in ds.augs]
    return normal, torch.stack(anomalies)


@pytest.mark.parametrize("rotflip", [False, True])
def test_training_samples_keep_their_stream(tiny_root, rotflip):
    ds = TrainSet(tiny_root, "widget", 32, AUGS, seed=11, rotflip=rotflip)
    for epoch in (0, 5):
        ds.set_epoch(epoch)
        for index in range(len(ds)):
            normal, anomalies = ds[index]
            ref_normal, ref_anomalies = reference_training_sample(ds, index)
            assert torch.equal(normal, ref_normal) and torch.equal(anomalies, ref_anomalies), (epoch, index)


def test_device_batches_keep_their_stream(tiny_root):
    ds = TrainSet(tiny_root, "widget", 32, AUGS, seed=2, rotflip=True)
    sampler = EpochShuffleSampler(len(ds), seed=2)
    sampler.set_epoch(3)
    ds.set_epoch(3)
    images = ds.images.float().div_(255)
    order = torch.as_tensor(list(sampler))
    for step, (normal, anomalies) in enumerate(DeviceBatches(ds, sampler, 3, torch.device("cpu"))):
        index = order[3 * step:3 * step + 3]
        rng = torch.Generator().manual_seed(sample_seed(2, 3, 1_000_000_007 + step))
        ref = rotflip_batch(images[index], rng)
        ref_anomalies = [BATCH_MAKERS[name](ref, images[other_indices(index, len(images), rng)], rng)[0]
                         for name in AUGS]
        assert torch.equal(normal, ref) and torch.equal(anomalies, torch.stack(ref_anomalies, 1)), step


def test_synthetic_check_images_keep_their_stream():
    from scoring.pipeline.synthetic_check import SEED_OFFSET, split_train, synthetic_images

    images = torch.randint(0, 256, (12, 3, 24, 24), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    fit, held = split_train(12, seed=5)
    batch, masks, labels = synthetic_images(images, held, fit, seed=5)
    rng = torch.Generator().manual_seed(5 + SEED_OFFSET)
    ref_images, ref_masks = [to_float(images[i]) for i in held], [torch.zeros(24, 24, dtype=torch.bool)] * len(held)
    for name in ("cutpaste", "perlin", "scar"):
        for i in held:
            source = to_float(images[fit[int(torch.randint(len(fit), (1,), generator=rng))]])
            image, mask = augment.MAKERS[name](to_float(images[i]), source, rng)
            ref_images.append(image)
            ref_masks.append(mask)
    assert torch.equal(batch, torch.stack(ref_images)) and torch.equal(masks, torch.stack(ref_masks))
    assert labels.tolist() == [0] * len(held) + [1] * 3 * len(held)


def test_preview_shows_the_epoch_0_training_samples(tiny_root, tmp_path, monkeypatch):
    ds = TrainSet(tiny_root, "widget", 32, AUGS, seed=9, rotflip=True)
    ds.set_epoch(4)  # the preview does not depend on the set's current epoch
    shown, draw = {}, preview.grid_picture

    def capture(rows, names, title):
        shown.update(rows=rows, names=names, title=title)
        return draw(rows, names, title)

    monkeypatch.setattr(preview, "grid_picture", capture)
    preview.save_preview(ds, tmp_path / "preview.png", columns=3, seed=9)
    assert shown["names"] == ["normal", *AUGS] and "rotated" in shown["title"]
    ds.set_epoch(0)
    red = torch.tensor([1.0, 0.0, 0.0])[:, None]
    for index in range(3):
        normal, anomalies = ds[index]
        _, _, masks = ds.sample(index)
        assert torch.equal(shown["rows"][0][index], normal)
        for g in range(len(AUGS)):
            tile, edge = shown["rows"][g + 1][index], preview.outline(masks[g])
            assert edge.any() and torch.equal(tile[:, edge], red.expand(-1, int(edge.sum())))
            assert torch.equal(tile[:, ~edge], anomalies[g][:, ~edge])


def test_make_anomalies_order_masks_and_forms():
    """Sources are picked right before each maker; masks mark exactly the changed pixels; both forms agree on layout."""
    rng_images = torch.Generator().manual_seed(0)
    pool = torch.rand(6, 3, 32, 32, generator=rng_images)
    calls = []

    def pick(rng):
        calls.append("pick")
        return pool[int(torch.randint(1, 6, (1,), generator=rng))]

    def recording(make):
        def wrapped(image, source, rng):
            calls.append("make")
            return make(image, source, rng)
        return wrapped

    makers = [recording(augment.MAKERS[name]) for name in AUGS]
    normal, anomalies, masks = make_anomalies(pool[0], makers, pick, torch.Generator().manual_seed(1))
    assert calls == ["pick", "make"] * 3
    assert torch.equal(normal, pool[0]) and anomalies.shape == (3, 3, 32, 32) and masks.shape == (3, 32, 32)
    changed = (anomalies != normal).any(1)
    assert not (changed & ~masks).any() and masks.any((1, 2)).all()

    normals, batch, batch_masks = make_anomalies_batch(
        pool[:4], [BATCH_MAKERS[name] for name in AUGS], lambda rng: pool[2:6], torch.Generator().manual_seed(1),
        rotflip=True)
    assert batch.shape == (4, 3, 3, 32, 32) and batch_masks.shape == (4, 3, 32, 32)
    assert not ((batch != normals[:, None]).any(2) & ~batch_masks).any()
