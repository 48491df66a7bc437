"""The anomaly preview: a PNG grid of normal images and their synthetic anomalies.

Saved at the start of training so users see what the network learns to tell apart: one row
per class (normal, then each generator), one column per sampled training image, with the
changed region outlined in red on the anomaly rows.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torchvision.utils import save_image

import augment
from data.mvtec import other_index


def outline(mask: torch.Tensor) -> torch.Tensor:
    """``(S, S)`` bool -> bool map of the mask's border pixels."""
    m = mask.float()[None, None]
    eroded = -torch.nn.functional.max_pool2d(-m, 3, stride=1, padding=1)
    return (m - eroded)[0, 0] > 0


def save_preview(dataset, path: Path, columns: int = 8, seed: int = 0) -> Path:
    """Write the grid for the first ``columns`` images of a ``data.TrainSet`` to ``path``."""
    count = min(columns, len(dataset))
    rows: list[list[torch.Tensor]] = [[] for _ in range(1 + len(dataset.augs))]
    for index in range(count):
        gen = torch.Generator().manual_seed(seed * 7919 + index)
        normal = dataset.image(index)
        rows[0].append(normal)
        for row, name in enumerate(dataset.augs, start=1):
            source = dataset.image(other_index(index, len(dataset), gen))
            image, mask = augment.GENERATORS[name](normal, source, gen)
            image = image.clone()
            edge = outline(mask)
            image[:, edge] = torch.tensor([1.0, 0.0, 0.0])[:, None]
            rows[row].append(image)
    grid = torch.stack([img for row in rows for img in row])
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(grid, path, nrow=count, padding=2, pad_value=1.0)
    return path
