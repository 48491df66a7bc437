"""The anomaly makers closer to real defects: poisson, scratch, texture, shapes.

Shapes, ranges and masks on noise images; determinism; each maker's own promise (a seamless
gradient-domain blend, thin strokes, a pattern independent of the source, a non-rectangular
cut of the source); the batched loop fallback; the registry, the preview and a tiny training.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

import augment
import main as train_main
from augment.batched import BATCH_MAKERS
from augment.poisson import CHANGE_THRESHOLD, seamless_clone, solve_dirichlet
from augment.scratch import stroke_mask
from data import TrainSet
from training import preview
from training.device_batches import DeviceBatches
from training.loop import EpochShuffleSampler

NEW = ["poisson", "scratch", "texture", "shapes"]
SIZE = 64
SEEDS = range(16)


def pair(seed: int, size: int = SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    rng = torch.Generator().manual_seed(1000 + seed)
    return torch.rand(3, size, size, generator=rng), torch.rand(3, size, size, generator=rng)


def make(name: str, seed: int, size: int = SIZE):
    image, source = pair(seed, size)
    out, mask = augment.MAKERS[name](image, source, torch.Generator().manual_seed(seed))
    return image, source, out, mask


@pytest.mark.parametrize("name", NEW)
def test_outputs_masks_and_determinism(name):
    masks = []
    for seed in SEEDS:
        image, _, out, mask = make(name, seed)
        assert out.shape == image.shape and out.dtype == torch.float32
        assert mask.shape == (SIZE, SIZE) and mask.dtype == torch.bool
        assert out.min() >= 0 and out.max() <= 1
        assert mask.any() and not mask.all(), seed
        change = (out - image).abs().amax(0)
        # The mask marks where the image changed (poisson: noticeably; below the threshold elsewhere).
        outside_limit = CHANGE_THRESHOLD if name == "poisson" else 0
        assert change[~mask].max() <= outside_limit, seed
        assert (change[mask] > 0).float().mean() >= 0.95, seed
        again = make(name, seed)
        assert torch.equal(out, again[2]) and torch.equal(mask, again[3])
        masks.append(mask)
    assert len({m.numpy().tobytes() for m in masks}) == len(masks), "different seeds, different anomalies"


@pytest.mark.parametrize("name", NEW)
def test_other_sizes(name):
    for size in (16, 33, 256):
        image, _, out, mask = make(name, 0, size)
        assert out.shape == image.shape and mask.shape == (size, size) and mask.any()


@pytest.mark.parametrize("name", NEW)
def test_batched_form_is_the_per_image_maker_looped(name):
    images = torch.rand(5, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    sources = torch.rand(5, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    out, masks = BATCH_MAKERS[name](images, sources, torch.Generator().manual_seed(3))
    assert out.shape == images.shape and masks.shape == (5, SIZE, SIZE) and masks.dtype == torch.bool
    rng = torch.Generator().manual_seed(3)
    for i in range(5):
        ref_out, ref_mask = augment.MAKERS[name](images[i], sources[i], rng)
        assert torch.equal(out[i], ref_out) and torch.equal(masks[i], ref_mask)


def test_poisson_solver_keeps_the_border_and_the_source_laplacian():
    rng = torch.Generator().manual_seed(0)
    target, patch = torch.rand(3, 19, 26, generator=rng), torch.rand(3, 19, 26, generator=rng)
    out = seamless_clone(target, patch)

    def laplacian(x):
        return x[:, :-2, 1:-1] + x[:, 2:, 1:-1] + x[:, 1:-1, :-2] + x[:, 1:-1, 2:] - 4 * x[:, 1:-1, 1:-1]

    torch.testing.assert_close(laplacian(out), laplacian(patch), atol=1e-5, rtol=0)
    border = torch.ones(19, 26, dtype=torch.bool)
    border[1:-1, 1:-1] = False
    assert torch.equal(out[:, border], target[:, border])
    rhs = torch.rand(2, 7, 11, generator=rng)
    x = torch.nn.functional.pad(solve_dirichlet(rhs), (1, 1, 1, 1))
    torch.testing.assert_close(laplacian(x), rhs, atol=1e-5, rtol=0)


def test_poisson_moves_gradients_not_colours():
    """A flat source of another colour leaves no trace; a source with an edge does."""
    image = torch.full((3, SIZE, SIZE), 0.3)
    out, mask = augment.poisson(image, torch.full((3, SIZE, SIZE), 0.8), torch.Generator().manual_seed(0))
    assert torch.allclose(out, image, atol=1e-5) and not mask.any()
    stripes = torch.zeros(3, SIZE, SIZE)
    stripes[:, :, ::4] = 1.0
    out, mask = augment.poisson(image, stripes, torch.Generator().manual_seed(0))
    assert mask.any() and (out - image).abs().max() > 0.3


def test_scratch_strokes_are_thin():
    line = torch.tensor([[10.5, 5.0], [10.5, 40.0]])
    for width, rows in ((1.0, 1), (3.0, 3)):
        mask = stroke_mask(SIZE, line, width, torch.device("cpu"))
        assert mask[:, 8:36].sum(0).tolist() == [rows] * 28
    for seed in SEEDS:
        mask = make("scratch", seed)[3]
        # At most three strokes of <= 0.5 S chord (bent: arc < 1.3 x chord), <= 3 px wide, plus caps.
        assert int(mask.sum()) <= 3 * (0.5 * 1.3 * SIZE + 3) * 3, seed


def test_texture_ignores_the_source():
    image, source = pair(0)
    for seed in SEEDS:
        a = augment.texture(image, source, torch.Generator().manual_seed(seed))
        b = augment.texture(image, 1 - source, torch.Generator().manual_seed(seed))
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_shapes_paste_a_shifted_non_rectangular_piece_of_the_source():
    rectangles = 0
    for seed in SEEDS:
        _, source, out, mask = make("shapes", seed)
        rows, cols = mask.nonzero(as_tuple=True)
        # The first masked pixel's colour is unique in a noise source: it gives the offset.
        hits = (source == out[:, rows[0], cols[0]][:, None, None]).all(0).nonzero()
        dy, dx = int(hits[0, 0] - rows[0]), int(hits[0, 1] - cols[0])
        assert torch.equal(out[:, rows, cols], source[:, rows + dy, cols + dx]), seed
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        rectangles += int(mask.sum()) == int(box)
    assert rectangles == 0


def test_registry_parse_and_help():
    assert augment.parse_augs("cutpaste,perlin," + ",".join(NEW)) == ["cutpaste", "perlin", *NEW]
    assert set(NEW) <= set(augment.MAKERS) and set(NEW) <= set(BATCH_MAKERS)
    text = " ".join(train_main.get_args_parser().format_help().split())
    assert all(name in text for name in NEW)


def test_preview_and_device_batches_with_the_new_makers(tiny_root, tmp_path):
    augs = ["cutpaste", "perlin", *NEW]
    ds = TrainSet(tiny_root, "widget", 32, augs, seed=0)
    assert preview.save_preview(ds, tmp_path / "preview.png", columns=2).exists()
    normal, anomalies = ds[0]
    assert normal.shape == (3, 32, 32) and anomalies.shape == (len(augs), 3, 32, 32)
    # The device path: the batched loop fallback, in the training's own batches.
    batches = list(DeviceBatches(ds, EpochShuffleSampler(len(ds), seed=0), 4, torch.device("cpu")))
    assert [b[1].shape for b in batches] == [(4, len(augs), 3, 32, 32)] * 2


def test_one_epoch_with_poisson_as_third_class(tiny_root, tmp_path):
    [path] = train_main.main(train_main.get_args_parser().parse_args(
        ["--c", "widget", "--data-root", str(tiny_root), "--arch", "wave18", "--size", "32", "--b", "4", "--e", "1",
         "--ckpt-dir", str(tmp_path), "--no-tensorboard", "--precision", "fp32", "--augs", "cutpaste,perlin,poisson"]))
    log = json.loads((path.parent / "log.jsonl").read_text().splitlines()[0])
    assert math.isfinite(log["loss"]) and "acc_poisson" in log
