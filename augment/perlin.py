"""Perlin-noise anomalies: a 2-D Perlin field, thresholded into a blob mask, blends in another image.

``perlin_noise`` is a pure noise function of its ``rng`` (a ``torch.Generator``);
``perlin_blend`` is the anomaly maker, the paper's transform
``x' = x (1 - M) + y M`` with ``y`` another normal image rotated by a random multiple of 90
degrees and ``M = minmax(noise) > 0.9`` on an 8 x 8 lattice.
"""

from __future__ import annotations

import math

import torch

LATTICE = 8
THRESHOLD = 0.9


def _fade(t: torch.Tensor) -> torch.Tensor:
    return t * t * t * (t * (t * 6 - 15) + 10)


def perlin_noise_batch(count: int, height: int, width: int, res: tuple[int, int],
                       rng: torch.Generator) -> torch.Tensor:
    """``count`` independent gradient (Perlin) noise fields ``(count, height, width)``, on ``rng``'s device.

    Random unit gradients sit on the ``(res_y + 1) x (res_x + 1)`` lattice corners; each pixel
    interpolates the four corner dot products with the quintic fade. Sizes that are not a
    multiple of ``res`` are computed on the next multiple and cropped.
    """
    device = rng.device
    ry, rx = res
    cell_h, cell_w = math.ceil(height / ry), math.ceil(width / rx)
    angles = 2 * math.pi * torch.rand(count, ry + 1, rx + 1, generator=rng, device=device)
    grads = torch.stack((torch.cos(angles), torch.sin(angles)), dim=-1)  # (B, ry+1, rx+1, 2)
    # Position of every pixel inside its cell, in [0, 1).
    ys = torch.arange(ry * cell_h, dtype=torch.float32, device=device) / cell_h
    xs = torch.arange(rx * cell_w, dtype=torch.float32, device=device) / cell_w
    yi, xi = ys.long(), xs.long()
    fy, fx = (ys - yi)[:, None], (xs - xi)[None, :]

    def corner(dy: int, dx: int) -> torch.Tensor:
        g = grads[:, yi[:, None] + dy, xi[None, :] + dx]  # (B, H, W, 2)
        return g[..., 0] * (fy - dy) + g[..., 1] * (fx - dx)

    uy, ux = _fade(fy), _fade(fx)
    top = corner(0, 0) * (1 - ux) + corner(0, 1) * ux
    bottom = corner(1, 0) * (1 - ux) + corner(1, 1) * ux
    noise = math.sqrt(2) * (top * (1 - uy) + bottom * uy)
    return noise[:, :height, :width]


def perlin_noise(height: int, width: int, res: tuple[int, int], rng: torch.Generator) -> torch.Tensor:
    """One Perlin field ``(height, width)`` with ``res`` lattice cells along each axis (see the batch form)."""
    return perlin_noise_batch(1, height, width, res, rng)[0]


def blob_masks(noise: torch.Tensor, threshold: float = THRESHOLD) -> torch.Tensor:
    """``(..., H, W)`` noise -> bool blob masks: each field min-max scaled, then ``>= threshold``.

    Never empty: the maximum of a scaled field is 1.
    """
    low = noise.amin(dim=(-2, -1), keepdim=True)
    high = noise.amax(dim=(-2, -1), keepdim=True)
    return (noise - low) / (high - low).clamp_min(1e-12) >= threshold


def perlin_mask(height: int, width: int, rng: torch.Generator,
                lattice: int = LATTICE, threshold: float = THRESHOLD) -> torch.Tensor:
    """Binary blob mask ``(height, width)`` bool: min-max scaled Perlin noise above ``threshold``."""
    return blob_masks(perlin_noise(height, width, (lattice, lattice), rng), threshold)


def perlin_blend(image: torch.Tensor, source: torch.Tensor,
                 rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Blend a rotated ``source`` into ``image`` through a Perlin blob mask.

    Args:
        image, source: ``(3, S, S)`` float in [0, 1] (square, so rotations keep the shape).
        rng: the only source of randomness.
    Returns:
        ``(anomalous image (3, S, S), mask (S, S) bool of the changed region)``.
    """
    _, height, width = image.shape
    mask = perlin_mask(height, width, rng)
    turns = int(torch.randint(0, 4, (1,), generator=rng))
    rotated = torch.rot90(source, turns, dims=(1, 2)) if height == width else source
    m = mask.to(image.dtype)
    return image * (1 - m) + rotated * m, mask
