"""Random draws and region masks shared by the newer anomaly makers (poisson, scratch, texture, shapes).

Each maker draws a fixed-size block of uniforms from its ``rng`` at once (:func:`uniforms`: one
host transfer even when ``rng`` lives on a GPU) and turns it into its parameters on the host, so
a maker always consumes the same amount of its stream. Region masks are ``(S, S)`` bool, pixel
``(i, j)`` being inside when its centre ``(i + 0.5, j + 0.5)`` is:

- :func:`ellipse_mask`: a rotated ellipse;
- :func:`polygon_mask`: a star-shaped polygon (vertices at increasing angles around a centre,
  so it never crosses itself);
- :func:`random_shape`: one of the two with random size, centre, aspect ratio or vertices.
"""

from __future__ import annotations

import math

import torch

MAX_VERTICES = 8
SHAPE_DRAWS = 6 + 2 * MAX_VERTICES  # uniforms one random_shape consumes


def uniforms(count: int, rng: torch.Generator) -> list[float]:
    """``count`` uniform floats in [0, 1), drawn in one call on ``rng``'s device."""
    return torch.rand(count, generator=rng, device=rng.device).tolist()


def lerp(low: float, high: float, u: float) -> float:
    """``u`` in [0, 1) mapped to [low, high)."""
    return low + (high - low) * u


def pick(u: float, count: int) -> int:
    """``u`` in [0, 1) -> an integer in ``range(count)``, uniformly."""
    return min(int(u * count), count - 1)


def pixel_centres(size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column coordinates of the pixel centres: ``(S, 1)`` and ``(1, S)`` float32."""
    pos = torch.arange(size, dtype=torch.float32, device=device) + 0.5
    return pos[:, None], pos[None, :]


def ellipse_mask(size: int, centre: tuple[float, float], axes: tuple[float, float], angle: float,
                 device: torch.device) -> torch.Tensor:
    """``(S, S)`` bool: the ellipse at ``centre`` (row, col) with semi-axes ``axes`` (along, across
    the direction ``angle`` radians from the column axis)."""
    ys, xs = pixel_centres(size, device)
    dy, dx = ys - centre[0], xs - centre[1]
    cos, sin = math.cos(angle), math.sin(angle)
    along, across = cos * dx + sin * dy, -sin * dx + cos * dy
    return (along / axes[0]) ** 2 + (across / axes[1]) ** 2 <= 1


def polygon_mask(size: int, rows: list[float], cols: list[float], device: torch.device) -> torch.Tensor:
    """``(S, S)`` bool: pixel centres inside the closed polygon with vertices ``(rows[k], cols[k])``
    (even-odd rule, vectorised over the edges)."""
    ys, xs = pixel_centres(size, device)
    y1 = torch.tensor(rows, dtype=torch.float32, device=device)[:, None, None]
    x1 = torch.tensor(cols, dtype=torch.float32, device=device)[:, None, None]
    y2, x2 = y1.roll(-1, 0), x1.roll(-1, 0)
    straddles = (y1 > ys) != (y2 > ys)  # (K, S, 1): the edge crosses the pixel row
    dy = torch.where(y2 == y1, torch.ones_like(y1), y2 - y1)
    crossing_x = x1 + (ys - y1) * (x2 - x1) / dy
    crossings = straddles & (xs < crossing_x)  # (K, S, S)
    return crossings.sum(0) % 2 == 1


def random_shape(size: int, radius: tuple[float, float], rng: torch.Generator,
                 device: torch.device) -> tuple[torch.Tensor, tuple[float, float], float]:
    """A random ellipse or star-shaped polygon inside the image, of ``SHAPE_DRAWS`` uniforms.

    The shape fits in a disc of radius ``R ~ U[radius[0] S, radius[1] S)`` (at least 1.5 px),
    whose centre is drawn so the disc stays inside the image. Ellipses have semi-axes ``R`` and
    ``R x U[0.35, 1)`` at a random angle; polygons 3-8 vertices at jittered, increasing angles
    (gaps under 180 degrees, so the centre is inside), each at ``R x U[0.45, 1)`` from the centre.
    The pixel holding the centre is always inside.

    Returns:
        ``(mask (S, S) bool, centre (row, col), R)``.
    """
    u = uniforms(SHAPE_DRAWS, rng)
    r = min(max(lerp(radius[0], radius[1], u[1]) * size, 1.5), size / 2)
    centre = (lerp(r, size - r, u[2]), lerp(r, size - r, u[3]))
    if u[0] < 0.5:
        mask = ellipse_mask(size, centre, (r, r * lerp(0.35, 1.0, u[4])), math.pi * u[5], device)
    else:
        count = 3 + pick(u[4], MAX_VERTICES - 2)
        step = 2 * math.pi / count
        angles = [step * (k + lerp(-0.2, 0.2, u[6 + k])) + 2 * math.pi * u[5] for k in range(count)]
        radii = [r * lerp(0.45, 1.0, u[6 + MAX_VERTICES + k]) for k in range(count)]
        mask = polygon_mask(size, [centre[0] + q * math.sin(a) for q, a in zip(radii, angles)],
                            [centre[1] + q * math.cos(a) for q, a in zip(radii, angles)], device)
    mask[min(int(centre[0]), size - 1), min(int(centre[1]), size - 1)] = True
    return mask, centre, r
