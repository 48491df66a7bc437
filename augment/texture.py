"""Texture anomalies: a procedural pattern, made from the ``rng`` alone, blended into an irregular region.

Unlike the other makers the foreign material is not another image but one of four patterns
painted between two random colours: a Perlin colour field (two octaves), stripes (smooth or
hard-edged, any angle and period), a rotated checkerboard, or a linear or radial colour gradient.
It is laid with an opacity of 0.5-1 over a random region: a thresholded Perlin blob, an ellipse
or a star-shaped polygon (:func:`augment.regions.random_shape`). The ``source`` image is unused.
"""

from __future__ import annotations

import math

import torch

from .perlin import blob_masks, perlin_noise
from .regions import lerp, pick, pixel_centres, random_shape, uniforms

PATTERN_DRAWS = 4  # uniforms each pattern takes
SHAPE_RADIUS = (0.08, 0.2)  # of the image side, for ellipse and polygon regions


def _perlin_field(size: int, u: list[float], rng: torch.Generator, device: torch.device) -> torch.Tensor:
    """Two octaves of Perlin noise, 2-16 lattice cells across, scaled to [0, 1]."""
    res = 2 ** (1 + pick(u[0], 4))
    noise = perlin_noise(size, size, (res, res), rng) + 0.5 * perlin_noise(size, size, (2 * res, 2 * res), rng)
    noise = noise.to(device)
    return (noise - noise.min()) / (noise.max() - noise.min()).clamp_min(1e-12)


def _stripes(size: int, u: list[float], rng: torch.Generator, device: torch.device) -> torch.Tensor:
    """Parallel stripes at any angle, period 3 px to a quarter of the image, sine or square profile."""
    ys, xs = pixel_centres(size, device)
    angle, period = math.pi * u[0], lerp(3.0, max(4.0, size / 4), u[1])
    wave = 0.5 + 0.5 * torch.sin(2 * math.pi * (math.cos(angle) * xs + math.sin(angle) * ys) / period
                                 + 2 * math.pi * u[2])
    return (wave > 0.5).float() if u[3] < 0.5 else wave


def _checkerboard(size: int, u: list[float], rng: torch.Generator, device: torch.device) -> torch.Tensor:
    """A checkerboard rotated by 0-90 degrees, cells 2 px to 15% of the image side."""
    ys, xs = pixel_centres(size, device)
    angle, cell = 0.5 * math.pi * u[0], lerp(2.0, max(3.0, 0.15 * size), u[1])
    along = (math.cos(angle) * xs + math.sin(angle) * ys) / cell + u[2]
    across = (-math.sin(angle) * xs + math.cos(angle) * ys) / cell + u[3]
    return ((torch.floor(along) + torch.floor(across)) % 2).float()


def _gradient(size: int, u: list[float], rng: torch.Generator, device: torch.device) -> torch.Tensor:
    """A linear ramp in any direction or (a third of the time) a radial one, scaled to [0, 1]."""
    ys, xs = pixel_centres(size, device)
    if u[0] < 1 / 3:
        ramp = torch.sqrt((ys - u[1] * size) ** 2 + (xs - u[2] * size) ** 2).expand(size, size)
    else:
        angle = 2 * math.pi * u[3]
        ramp = (math.cos(angle) * xs + math.sin(angle) * ys).expand(size, size)
    return (ramp - ramp.min()) / (ramp.max() - ramp.min()).clamp_min(1e-12)


PATTERNS = (_perlin_field, _stripes, _checkerboard, _gradient)


def texture(image: torch.Tensor, source: torch.Tensor,
            rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Blend a procedural pattern (see the module docstring) into a random region of ``image``.

    Draws 15 uniforms, then the pattern's Perlin lattices (Perlin fields only), then the region's
    (a Perlin blob on a 2, 4 or 8 cell lattice thresholded at 0.75-0.92, or a shape's own uniforms).

    Args:
        image: ``(3, S, S)`` float in [0, 1]; ``source`` ``(3, S, S)`` is not used.
    Returns:
        ``(anomalous image (3, S, S) in [0, 1], mask (S, S) bool of the region)``.
    """
    _, size, _ = image.shape
    device = image.device
    u = uniforms(15, rng)
    pattern = PATTERNS[pick(u[0], len(PATTERNS))](size, u[1:5], rng, device)  # (S, S) in [0, 1]
    low = torch.tensor(u[5:8], device=device)[:, None, None]
    high = torch.tensor(u[8:11], device=device)[:, None, None]
    painted = low + (high - low) * pattern
    opacity = lerp(0.5, 1.0, u[12])
    if pick(u[11], 3) == 0:
        lattice = 2 ** (1 + pick(u[13], 3))
        noise = perlin_noise(size, size, (lattice, lattice), rng).to(device)
        mask = blob_masks(noise, lerp(0.75, 0.92, u[14]))
    else:
        mask = random_shape(size, SHAPE_RADIUS, rng, device)[0]
    alpha = opacity * mask.to(image.dtype)
    return (image * (1 - alpha) + painted * alpha).clamp(0, 1), mask
