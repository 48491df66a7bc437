"""The anomaly preview: a PNG grid of normal images and their synthetic anomalies.

Saved at the start of training so users see what the network learns to tell apart: one row
per class (normal, then each anomaly maker), labelled on the left, one column per training
image, with the changed region outlined in red on the anomaly rows and a title line saying so.
The tiles are the training set's own samples of epoch 0 (:meth:`data.TrainSet.sample`, the same
seeds, sources and rotations/mirrors as the loader path), not a separate drawing.
"""

from __future__ import annotations

import functools
import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from common.fileio import atomic_write

TITLE = "Synthetic anomalies made from the training images; red outline: the changed region"
MIN_TILE = 96  # smaller images are enlarged (nearest, integer factor) so the grid stays legible


def outline(mask: torch.Tensor) -> torch.Tensor:
    """``(S, S)`` bool -> bool map of the mask's border pixels."""
    m = mask.float()[None, None]
    eroded = -torch.nn.functional.max_pool2d(-m, 3, stride=1, padding=1)
    return (m - eroded)[0, 0] > 0


@functools.lru_cache(maxsize=4)
def _font(size: int):
    """PIL's built-in font (no font file needed); its small bitmap font without FreeType."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError, AttributeError):
        return ImageFont.load_default()


def _wrap(text: str, width: int, face) -> list[str]:
    """Greedy word wrap to lines at most ``width`` px wide."""
    lines: list[str] = []
    for word in text.split():
        if lines and face.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines


def grid_picture(rows: list[list[torch.Tensor]], names: list[str], title: str = TITLE) -> Image.Image:
    """Tiles ``rows[r][c]`` ``(3, S, S)`` float in [0, 1] -> one labelled RGB picture.

    ``names[r]`` is written left of row ``r``; ``title`` (wrapped) above the grid.
    """
    size = rows[0][0].shape[-1]
    scale = max(1, -(-MIN_TILE // size))
    tile = size * scale
    face = _font(max(13, min(24, tile // 8)))
    line = face.getbbox("Ag")[3] + 4
    pad = 2
    label_w = max(int(face.getlength(name)) for name in names) + line
    columns = max(len(r) for r in rows)
    width = max(label_w + columns * (tile + pad) + pad, 320)
    title_lines = _wrap(title, width - 2 * pad - 8, face)
    top = 4 + len(title_lines) * line + 4
    height = top + len(rows) * (tile + pad) + pad
    canvas = np.full((height, width, 3), 255, np.uint8)
    for r, row in enumerate(rows):
        y = top + pad + r * (tile + pad)
        for c, image in enumerate(row):
            x = label_w + pad + c * (tile + pad)
            pixels = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
            canvas[y:y + tile, x:x + tile] = pixels.repeat(scale, axis=0).repeat(scale, axis=1)
    picture = Image.fromarray(canvas)
    draw = ImageDraw.Draw(picture)
    for i, text in enumerate(title_lines):
        draw.text((6, 4 + i * line), text, fill=(0, 0, 0), font=face)
    for r, name in enumerate(names):
        y = top + pad + r * (tile + pad) + (tile - line) // 2
        draw.text((line // 2, y), name, fill=(0, 0, 0), font=face)
    return picture


def save_preview(dataset, path: Path, columns: int = 8, seed: int = 0) -> Path:
    """Write the grid for the first ``columns`` images of a ``data.TrainSet`` to ``path``.

    ``seed`` is the training seed: the tiles are exactly epoch 0's training samples when it is
    the data set's seed (as the training loop passes it).
    """
    count = min(columns, len(dataset))
    rows: list[list[torch.Tensor]] = [[] for _ in range(1 + len(dataset.augs))]
    for index in range(count):
        normal, anomalies, masks = dataset.sample(index, epoch=0, seed=seed)
        rows[0].append(normal)
        for row, (image, mask) in enumerate(zip(anomalies, masks), start=1):
            image = image.clone()
            image[:, outline(mask)] = torch.tensor([1.0, 0.0, 0.0])[:, None]
            rows[row].append(image)
    title = TITLE + ("; normal images rotated/mirrored at random, as in training" if dataset.rotflip else "")
    picture = grid_picture(rows, ["normal", *dataset.augs], title)
    buffer = io.BytesIO()
    picture.save(buffer, format="png")
    atomic_write(path, lambda handle: handle.write(buffer.getvalue()))
    return path
