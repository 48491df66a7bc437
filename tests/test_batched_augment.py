"""The batched (GPU-path) anomaly makers against the per-image reference makers.

The random streams differ, so the tests compare what matters: the same parameter
distributions (two-sample Kolmogorov-Smirnov tests on mask area, position and shape over a few
hundred draws), pixels that really come from the source image, and torchvision-exact colour jitter.
"""

from __future__ import annotations

import pytest
import torch
from scipy.stats import ks_2samp
from torchvision.transforms import functional as TF

import augment
from augment import other_indices
from augment.batched import BATCH_MAKERS, apply_color_jitter, rotflip_batch
from data import TrainSet
from training.device_batches import DeviceBatches
from training.loop import EpochShuffleSampler

SIZE = 64
DRAWS = 300


def noise_images(count: int, seed: int) -> torch.Tensor:
    return torch.rand(count, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def mask_statistics(masks: torch.Tensor) -> dict[str, torch.Tensor]:
    """``(N, S, S)`` bool -> per-mask area, centroid row/column, bounding-box height/width."""
    area = masks.sum((1, 2)).double()
    rows = torch.arange(SIZE, dtype=torch.float64)
    row_mass, col_mass = masks.sum(2).double(), masks.sum(1).double()
    any_row, any_col = row_mass > 0, col_mass > 0
    height = SIZE - any_row.flip(1).double().argmax(1) - any_row.double().argmax(1)
    width = SIZE - any_col.flip(1).double().argmax(1) - any_col.double().argmax(1)
    return {"area": area, "row": (row_mass * rows).sum(1) / area, "col": (col_mass * rows).sum(1) / area,
            "height": height.double(), "width": width.double()}


@pytest.mark.parametrize("name", ["cutpaste", "perlin", "scar"])
def test_batched_maker_matches_per_image_statistics(name):
    images, sources = noise_images(DRAWS, 1), noise_images(DRAWS, 2)
    reference = augment.MAKERS[name]
    rng = torch.Generator().manual_seed(3)
    per_image = torch.stack([reference(images[i], sources[i], rng)[1] for i in range(DRAWS)])
    out, batched = BATCH_MAKERS[name](images, sources, torch.Generator().manual_seed(4))
    assert out.shape == images.shape and batched.shape == (DRAWS, SIZE, SIZE) and batched.dtype == torch.bool
    assert batched.any((1, 2)).all(), "every image gets an anomaly"
    # Outside the mask nothing changes; inside, a noise image changes (almost) everywhere.
    changed = (out != images).any(1)
    assert not (changed & ~batched).any()
    assert (changed & batched).sum() >= 0.95 * batched.sum()
    assert out.min() >= 0 and out.max() <= 1
    ref_stats, new_stats = mask_statistics(per_image), mask_statistics(batched)
    for key in ref_stats:
        result = ks_2samp(ref_stats[key].numpy(), new_stats[key].numpy())
        assert result.pvalue > 1e-3, (name, key, result, ref_stats[key].mean(), new_stats[key].mean())


def test_batched_cutpaste_pastes_a_square_of_the_source():
    images, sources = noise_images(16, 5), noise_images(16, 6)
    out, masks = BATCH_MAKERS["cutpaste"](images, sources, torch.Generator().manual_seed(0))
    for i in range(16):
        rows, cols = masks[i].nonzero(as_tuple=True)
        top, left, side = int(rows.min()), int(cols.min()), int(rows.max() - rows.min() + 1)
        assert masks[i].sum() == side * side and int(cols.max() - cols.min() + 1) == side
        patch = out[i, :, top:top + side, left:left + side]
        # The patch sits on the source's diagonal (cut at (c, c)), as in the paper.
        found = [c for c in range(SIZE - side + 1) if torch.equal(sources[i, :, c:c + side, c:c + side], patch)]
        assert found, i


def test_color_jitter_equals_torchvision_on_the_patch():
    rng = torch.Generator().manual_seed(0)
    images = torch.rand(5, 3, 20, 30, generator=rng)
    region = torch.zeros(5, 20, 30, dtype=torch.bool)
    region[:, 4:15, 6:13] = True
    factors = [0.9 + 0.2 * torch.rand(5, generator=rng) for _ in range(3)]
    hue = -0.1 + 0.2 * torch.rand(5, generator=rng)
    out = apply_color_jitter(images, region, *factors, hue)
    for i in range(5):
        patch = images[i, :, 4:15, 6:13]
        patch = TF.adjust_brightness(patch, float(factors[0][i]))
        patch = TF.adjust_contrast(patch, float(factors[1][i]))
        patch = TF.adjust_saturation(patch, float(factors[2][i]))
        patch = TF.adjust_hue(patch, float(hue[i])).clamp(0, 1)
        torch.testing.assert_close(out[i, :, 4:15, 6:13], patch, atol=1e-5, rtol=0)


def test_rotflip_batch_draws_all_eight_symmetries():
    base = torch.arange(16.0).view(1, 1, 4, 4).expand(400, 3, 4, 4)
    out = rotflip_batch(base, torch.Generator().manual_seed(0))
    symmetries = [torch.rot90(base[0], k, dims=(1, 2)) for k in range(4)]
    symmetries += [s.flip(2) for s in symmetries]
    counts = [sum(torch.equal(o, s) for o in out) for s in symmetries]
    assert sum(counts) == 400 and min(counts) > 25, counts


def test_other_indices_never_returns_the_index_and_covers_the_rest():
    index = torch.arange(5).repeat(200)
    other = other_indices(index, 5, torch.Generator().manual_seed(0))
    assert not (other == index).any()
    assert set(other[index == 2].tolist()) == {0, 1, 3, 4}
    assert torch.equal(other_indices(torch.zeros(3, dtype=torch.long), 1, torch.Generator()), torch.zeros(3).long())


def test_device_batches_shapes_seeding_and_epochs(tiny_root):
    dataset = TrainSet(tiny_root, "widget", 32, ["cutpaste", "perlin", "scar"], seed=7, rotflip=True)
    sampler = EpochShuffleSampler(len(dataset), seed=7)
    batches = DeviceBatches(dataset, sampler, batch_size=3, device=torch.device("cpu"))
    first = list(batches)
    assert len(first) == len(batches) == 3
    normal, anomalies = first[0]
    assert normal.shape == (3, 3, 32, 32) and anomalies.shape == (3, 3, 3, 32, 32)
    assert normal.dtype == torch.float32 and normal.min() >= 0 and normal.max() <= 1
    assert sum(b[0].shape[0] for b in first) == len(dataset)
    again = list(DeviceBatches(dataset, sampler, batch_size=3, device=torch.device("cpu")))
    assert all(torch.equal(a[1], b[1]) for a, b in zip(first, again)), "same seed and epoch, same batches"
    sampler.set_epoch(1)
    dataset.set_epoch(1)
    later = list(batches)
    assert not torch.equal(first[0][1], later[0][1])
    # Every normal image of an epoch is a (rotated/mirrored) training image, each once.
    cached = dataset.images.float() / 255
    seen = torch.cat([b[0] for b in later])
    for image in cached:
        variants = [torch.rot90(image, k, dims=(1, 2)) for k in range(4)]
        variants += [v.flip(2) for v in variants]
        assert sum(any(torch.allclose(v, s) for v in variants) for s in seen) >= 1
