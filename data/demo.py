"""A small built-in demo data set in the MVTec layout, generated (nothing is downloaded).

Two categories, made in a few seconds, deterministic for a seed:

- ``weave``: a woven texture (crossing coloured threads with jitter), defects ``scratch``
  (a bright thin line), ``hole`` (a dark round gap), ``stain`` (a soft coloured blob);
- ``pill``: a round pill on a plain background, defects ``crack`` (a dark jagged line across
  the pill), ``missing`` (a piece broken off, background shows), ``stain``.

Every defect image has its mask (255 where the defect is) under ``ground_truth/``.

    python -m data.demo demo_data          # write it (python main.py --demo does this itself)
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 96
TRAIN, TEST_GOOD, TEST_PER_DEFECT = 40, 10, 5
DEFECTS = {"weave": ("scratch", "hole", "stain"), "pill": ("crack", "missing", "stain")}


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    return yy, xx


def weave(rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    """A woven texture ``(size, size, 3)`` float in [0, 1]: over/under threads with jitter."""
    yy, xx = _grid(size)
    period = 8.0
    # Small registration jitter only: like a fixed camera over a moving web of fabric, aligned.
    shift_y, shift_x = rng.uniform(0, 1.5, 2)
    u, v = (xx + shift_x) / period, (yy + shift_y) / period
    warp = 0.5 + 0.5 * np.cos(2 * np.pi * u) ** 2
    weft = 0.5 + 0.5 * np.cos(2 * np.pi * v) ** 2
    over = ((np.floor(u) + np.floor(v)) % 2 == 0)
    thread = np.where(over, warp, weft)
    base = np.array([0.55, 0.45, 0.30]) + rng.normal(0, 0.01, 3)
    img = base[None, None, :] * (0.6 + 0.4 * thread[..., None])
    img += rng.normal(0, 0.015, img.shape)
    return np.clip(img, 0, 1)


def pill(rng: np.random.Generator, size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """A pill on a plain background: image ``(size, size, 3)`` and the pill's own mask."""
    yy, xx = _grid(size)
    cy, cx = size / 2 + rng.normal(0, 1.0, 2)
    radius = size * 0.32 + rng.normal(0, 0.5)
    inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
    background = np.array([0.15, 0.2, 0.25]) + rng.normal(0, 0.01, 3)
    body = np.array([0.9, 0.88, 0.8]) + rng.normal(0, 0.01, 3)
    shade = 1 - 0.15 * ((yy - cy) ** 2 + (xx - cx) ** 2) / radius**2
    img = np.where(inside[..., None], body[None, None, :] * shade[..., None], background[None, None, :])
    img += rng.normal(0, 0.015, img.shape)
    return np.clip(img, 0, 1), inside


def _line_mask(size: int, points: np.ndarray, width: float) -> np.ndarray:
    """Pixels within ``width / 2`` of the polyline through ``points`` ``(K, 2)`` (y, x)."""
    yy, xx = _grid(size)
    mask = np.zeros((size, size), dtype=bool)
    for (y0, x0), (y1, x1) in zip(points[:-1], points[1:]):
        dy, dx = y1 - y0, x1 - x0
        t = np.clip(((yy - y0) * dy + (xx - x0) * dx) / max(dy * dy + dx * dx, 1e-9), 0, 1)
        mask |= (yy - y0 - t * dy) ** 2 + (xx - x0 - t * dx) ** 2 <= (width / 2) ** 2
    return mask


def _blob_mask(rng: np.random.Generator, size: int, centre: tuple[float, float], radius: float) -> np.ndarray:
    """An irregular round blob: a circle whose radius wobbles with the angle."""
    yy, xx = _grid(size)
    angle = np.arctan2(yy - centre[0], xx - centre[1])
    wobble = sum(rng.uniform(0.05, 0.2) * np.cos(k * angle + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5))
    return np.hypot(yy - centre[0], xx - centre[1]) <= radius * (1 + wobble)


def add_defect(rng: np.random.Generator, category: str, defect: str, img: np.ndarray,
               inside: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Paint one defect into ``img``; returns ``(image, mask)``."""
    size = img.shape[0]
    img = img.copy()
    margin = size * 0.25
    centre = (rng.uniform(margin, size - margin), rng.uniform(margin, size - margin))
    if defect == "scratch":
        angle = rng.uniform(0, np.pi)
        length = rng.uniform(0.3, 0.5) * size
        d = np.array([math.sin(angle), math.cos(angle)]) * length / 2
        mask = _line_mask(size, np.array([np.array(centre) - d, np.array(centre) + d]), rng.uniform(2, 3))
        img[mask] = np.clip(img[mask] * 0.3 + 0.75, 0, 1)
    elif defect == "hole":
        mask = _blob_mask(rng, size, centre, rng.uniform(5, 9))
        img[mask] = 0.05 + rng.normal(0, 0.01, (int(mask.sum()), 3))
    elif defect == "stain":
        mask = _blob_mask(rng, size, centre, rng.uniform(7, 11))
        colour = np.array([0.45, 0.15, 0.1]) if category == "weave" else np.array([0.6, 0.45, 0.1])
        img[mask] = 0.3 * img[mask] + 0.7 * colour
    elif defect == "crack":
        start, end = rng.uniform(0.3, 0.4) * size, rng.uniform(0.6, 0.7) * size
        xs = np.linspace(start, end, 7)
        ys = size / 2 + rng.normal(0, 3, 7) + rng.uniform(-8, 8)
        points = np.stack([ys, xs], 1) if rng.random() < 0.5 else np.stack([xs, ys], 1)
        mask = _line_mask(size, points, rng.uniform(1.5, 2.5)) & inside
        img[mask] = 0.15
    elif defect == "missing":
        yy, xx = _grid(size)
        angle = rng.uniform(0, 2 * np.pi)
        c = size / 2
        edge = (c + math.sin(angle) * size * 0.22, c + math.cos(angle) * size * 0.22)
        # A bite out of the pill's rim: a disc centred on the rim.
        mask = (np.hypot(yy - edge[0] - math.sin(angle) * 6, xx - edge[1] - math.cos(angle) * 6) <= 10) & inside
        img[mask] = np.array([0.15, 0.2, 0.25]) + rng.normal(0, 0.015, (int(mask.sum()), 3))
    else:
        raise ValueError(f"unknown defect {defect}")
    return np.clip(img, 0, 1), mask


def _save(path: Path, img: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((img * 255).round().astype(np.uint8)).save(path)


def _normal(rng: np.random.Generator, category: str) -> tuple[np.ndarray, np.ndarray | None]:
    return (weave(rng), None) if category == "weave" else pill(rng)


def write_demo(root: str | Path, seed: int = 0) -> Path:
    """Write the demo data set under ``root`` (overwriting its files); returns ``root``."""
    root = Path(root)
    for offset, (category, defects) in enumerate(DEFECTS.items()):
        rng = np.random.default_rng(seed * 1000 + offset)
        base = root / category
        for i in range(TRAIN):
            _save(base / "train" / "good" / f"{i:03d}.png", _normal(rng, category)[0])
        for i in range(TEST_GOOD):
            _save(base / "test" / "good" / f"{i:03d}.png", _normal(rng, category)[0])
        for defect in defects:
            for i in range(TEST_PER_DEFECT):
                img, inside = _normal(rng, category)
                img, mask = add_defect(rng, category, defect, img, inside)
                _save(base / "test" / defect / f"{i:03d}.png", img)
                mask_path = base / "ground_truth" / defect / f"{i:03d}_mask.png"
                mask_path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(mask.astype(np.uint8) * 255).save(mask_path)
    (root / "README.md").write_text(
        "Demo data written by data/demo.py (synthetic, deterministic for its seed). "
        "Categories: " + ", ".join(f"{c} ({', '.join(d)})" for c, d in DEFECTS.items()) + ".\n")
    return root


def demo_exists(root: str | Path) -> bool:
    root = Path(root)
    return all((root / c / "train" / "good" / f"{TRAIN - 1:03d}.png").is_file() and
               (root / c / "ground_truth" / d[-1] / f"{TEST_PER_DEFECT - 1:03d}_mask.png").is_file()
               for c, d in DEFECTS.items())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Write the demo data set.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("root", nargs="?", default="demo_data", help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same files")
    ns = parser.parse_args()
    print(f"demo data written to {write_demo(ns.root, ns.seed)}")
