"""Shaped CutPaste: an ellipse or a star-shaped polygon, not a square, cut from another image and pasted.

The shape (:func:`augment.regions.random_shape`) fits in a disc of radius ``0.08-0.15 S``,
about the area of the paper's CutPaste square; it is cut from ``source`` around a random centre
(the disc inside the source) and pasted, unrotated and unchanged, at the shape's own position.
"""

from __future__ import annotations

import torch

from .regions import lerp, random_shape, uniforms

SHAPE_RADIUS = (0.08, 0.15)  # of the image side


def shapes(image: torch.Tensor, source: torch.Tensor,
           rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Paste an ellipse or polygon of ``source`` into ``image``.

    Draws the shape's uniforms (target position, size, form), then two for where it is cut.

    Args:
        image, source: ``(3, S, S)`` float in [0, 1].
    Returns:
        ``(anomalous image (3, S, S), mask (S, S) bool of the shape)``; outside the mask the
        image is unchanged, inside every pixel is a source pixel (shifted by one offset).
    """
    _, size, _ = image.shape
    mask, (cy, cx), radius = random_shape(size, SHAPE_RADIUS, rng, image.device)
    u = uniforms(2, rng)
    dy = round(lerp(radius, size - radius, u[0]) - cy)
    dx = round(lerp(radius, size - radius, u[1]) - cx)
    pos = torch.arange(size, device=image.device)
    rows, cols = (pos + dy).clamp(0, size - 1), (pos + dx).clamp(0, size - 1)
    shifted = source[:, rows][:, :, cols]
    return torch.where(mask, shifted, image), mask
