"""Synthetic anomaly makers: the paper's geometry, purity, determinism."""

import math

import pytest
import torch

import augment
from common.errors import UserError

SIZE = 128


def pair(seed=0):
    rng = torch.Generator().manual_seed(seed)
    return torch.rand(3, SIZE, SIZE, generator=rng), torch.rand(3, SIZE, SIZE, generator=rng)


def test_cutpaste_geometry():
    for seed in range(30):
        image, source = pair(seed)
        out, mask = augment.cutpaste(image, source, torch.Generator().manual_seed(seed))
        rows, cols = torch.nonzero(mask, as_tuple=True)
        side = int(rows.max() - rows.min() + 1)
        assert side == int(cols.max() - cols.min() + 1)  # a square
        assert int(mask.sum()) == side * side
        assert math.ceil(0.15 * SIZE) <= side < math.ceil(0.2 * SIZE)
        r1, r2 = int(rows.min()), int(cols.min())
        assert 0.3 * SIZE - side - 1 <= r1 < 0.7 * SIZE and 0.3 * SIZE - side - 1 <= r2 < 0.7 * SIZE
        assert r1 + side <= SIZE and r2 + side <= SIZE
        # Outside the square nothing changed; inside, the pixels come from a diagonal (c, c) square.
        assert torch.equal(out[:, ~mask], image[:, ~mask])
        patch = out[:, r1:r1 + side, r2:r2 + side]
        found = [c for c in range(SIZE - side + 1)
                 if torch.equal(source[:, c:c + side, c:c + side], patch)]
        assert found and SIZE // 2 - side <= found[0] < SIZE // 2


def test_scar_is_thin_rotated_and_inside():
    for seed in range(20):
        image, source = pair(seed)
        out, mask = augment.scar(image, source, torch.Generator().manual_seed(seed))
        assert mask.any()
        assert torch.equal(out[:, ~mask], image[:, ~mask])
        scale = SIZE / 256
        # Area of a strip at most 16 x 25 px at 256 px (plus rasterisation slack).
        assert int(mask.sum()) <= (16 * scale + 2) * (25 * scale + 2)
        assert int(mask.sum()) >= 1


def test_scar_rotation_varies():
    """Over many draws the strip's principal axis takes many directions (it is rotated)."""
    angles = set()
    for seed in range(40):
        image = torch.zeros(3, 256, 256)
        _, mask = augment.scar(image, image, torch.Generator().manual_seed(seed))
        ys, xs = torch.nonzero(mask, as_tuple=True)
        if len(ys) < 20:
            continue
        cov = torch.cov(torch.stack([xs.float(), ys.float()]))
        evals, evecs = torch.linalg.eigh(cov)
        v = evecs[:, -1]
        angles.add(round(math.degrees(math.atan2(float(v[1]), float(v[0]))) % 180 / 15))
        if len(angles) >= 4:
            break  # enough directions seen: the other draws cost time and prove nothing more
    assert len(angles) >= 4


def test_perlin_mask_binary_nonempty_and_blend():
    for seed in range(10):
        image, source = pair(seed)
        out, mask = augment.perlin_blend(image, source, torch.Generator().manual_seed(seed))
        assert mask.dtype == torch.bool and mask.any() and not mask.all()
        assert torch.equal(out[:, ~mask], image[:, ~mask])
        # Inside the mask the pixels are the source rotated by a multiple of 90 degrees.
        assert any(torch.equal(out[:, mask], torch.rot90(source, k, (1, 2))[:, mask]) for k in range(4))


def test_perlin_noise_shape_and_odd_sizes():
    rng = torch.Generator().manual_seed(0)
    noise = augment.perlin_noise(100, 70, (8, 8), rng)
    assert noise.shape == (100, 70) and torch.isfinite(noise).all()
    assert augment.perlin_mask(33, 33, rng).shape == (33, 33)


@pytest.mark.parametrize("name", list(augment.MAKERS))
def test_makers_draw_only_from_the_given_rng(name):
    image, source = pair(1)
    torch.manual_seed(123)
    a = augment.MAKERS[name](image, source, torch.Generator().manual_seed(5))
    torch.manual_seed(999)  # global state must not matter
    b = augment.MAKERS[name](image, source, torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c = augment.MAKERS[name](image, source, torch.Generator().manual_seed(6))
    assert not torch.equal(a[1], c[1]) or not torch.equal(a[0], c[0])


def test_parse_augs():
    assert augment.parse_augs("cutpaste, perlin") == ["cutpaste", "perlin"]
    with pytest.raises(UserError, match="unknown anomaly maker blur"):
        augment.parse_augs("cutpaste,blur")
