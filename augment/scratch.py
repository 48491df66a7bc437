"""Scratch anomalies: one to three thin, smoothly bent strokes drawn over the image.

Each stroke is a quadratic Bezier curve (start anywhere in the central 80% of the image, 15-50%
of the image side long, in any direction, its control point pushed sideways by up to 40% of its
length), 1-3 px wide, rasterised as the pixels whose centre lies within half the width of the
curve (approximated by 16 segments). All strokes of an image share one look: brighter or darker
than the image under them (by 0.2-0.5, the other way when that would clip), or the source image's
pixels, laid on with an opacity of 0.7-1.
"""

from __future__ import annotations

import math

import torch

from .regions import lerp, pick, uniforms

MAX_STROKES = 3
STROKE_DRAWS = 6  # uniforms per stroke
SEGMENTS = 16


def bezier_points(start: tuple[float, float], length: float, angle: float, bend: float,
                  count: int = SEGMENTS + 1) -> torch.Tensor:
    """``(count, 2)`` (row, col) points along the quadratic Bezier from ``start``, ``length`` long
    (chord) at ``angle``, its control point ``bend`` (a signed distance) off the chord's middle."""
    cos, sin = math.cos(angle), math.sin(angle)
    p0 = torch.tensor(start)
    p2 = p0 + length * torch.tensor([sin, cos])
    p1 = (p0 + p2) / 2 + bend * torch.tensor([cos, -sin])
    t = torch.linspace(0, 1, count)[:, None]
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2


def stroke_mask(size: int, points: torch.Tensor, width: float, device: torch.device) -> torch.Tensor:
    """``(S, S)`` bool: pixel centres within ``width / 2`` of the polyline through ``points`` ``(K, 2)``.

    Distances are computed only in the polyline's bounding box (grown by the half width).
    """
    reach = width / 2 + 1
    low = (points.amin(0) - reach).floor().clamp(0, size).long().tolist()
    high = (points.amax(0) + reach).ceil().clamp(0, size).long().tolist()
    mask = torch.zeros(size, size, dtype=torch.bool, device=device)
    if high[0] <= low[0] or high[1] <= low[1]:
        return mask
    a = points[:-1].to(device)[:, :, None, None]  # (K-1, 2, 1, 1)
    d = points[1:].to(device)[:, :, None, None] - a
    ys = torch.arange(low[0], high[0], dtype=torch.float32, device=device)[:, None] + 0.5
    xs = torch.arange(low[1], high[1], dtype=torch.float32, device=device)[None, :] + 0.5
    py, px = ys - a[:, 0], xs - a[:, 1]  # (K-1, h, w) offsets from each segment's start
    t = ((py * d[:, 0] + px * d[:, 1]) / (d ** 2).sum(1).clamp_min(1e-9)).clamp(0, 1)
    dist2 = ((py - t * d[:, 0]) ** 2 + (px - t * d[:, 1]) ** 2).amin(0)
    mask[low[0]:high[0], low[1]:high[1]] = dist2 <= (width / 2) ** 2
    return mask


def scratch(image: torch.Tensor, source: torch.Tensor,
            rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw 1-3 thin curved strokes (see the module docstring) on ``image``.

    Always draws ``4 + 3 x 6`` uniforms from ``rng`` (unused strokes' draws included).

    Args:
        image, source: ``(3, S, S)`` float in [0, 1].
    Returns:
        ``(anomalous image (3, S, S) in [0, 1], mask (S, S) bool of the stroke pixels)``.
    """
    _, size, _ = image.shape
    u = uniforms(4 + MAX_STROKES * STROKE_DRAWS, rng)
    count, look = 1 + pick(u[0], MAX_STROKES), pick(u[1], 3)
    strength, opacity = lerp(0.2, 0.5, u[2]), lerp(0.7, 1.0, u[3])
    mask = torch.zeros(size, size, dtype=torch.bool, device=image.device)
    for k in range(count):
        v = u[4 + k * STROKE_DRAWS: 4 + (k + 1) * STROKE_DRAWS]
        length = lerp(0.15, 0.5, v[2]) * size
        points = bezier_points((lerp(0.1, 0.9, v[0]) * size, lerp(0.1, 0.9, v[1]) * size), length,
                               2 * math.pi * v[3], lerp(-0.4, 0.4, v[4]) * length)
        mask |= stroke_mask(size, points, lerp(1.0, 3.0, v[5]), image.device)
    if look == 2:
        paint = source
    else:
        local = (image * mask).sum((1, 2)) / mask.sum().clamp_min(1)  # (3,) mean colour under the strokes
        sign = 1.0 if look == 0 else -1.0
        grey = float(local.mean())
        if grey + sign * strength > 1 or grey + sign * strength < 0:
            sign = -sign
        paint = (local + sign * strength).clamp(0, 1)[:, None, None].expand_as(image)
    drawn = (opacity * paint + (1 - opacity) * image).clamp(0, 1)
    return torch.where(mask, drawn, image), mask
