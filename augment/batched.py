"""Anomaly makers for a whole batch at once, on the batch's device (the GPU training path).

The per-image makers in :mod:`augment.cutpaste` and :mod:`augment.perlin` are the reference:
every function here draws the same parameters from the same distributions, one value per
image, and builds the result with gathers and masks instead of Python loops, so a CUDA batch of
hundreds of images costs a few kernel launches. The random streams differ from the per-image
ones (the values are not the same, the statistics are; ``tests/test_batched_augment.py``
compares them). The newer makers (``poisson``, ``scratch``, ``texture``, ``shapes``) are not
vectorised: :func:`per_image_batch` loops their per-image form, the slower fallback.

Every function is ``fn(images, sources, rng) -> (anomalous, masks)`` with ``images`` and
``sources`` ``(B, 3, S, S)`` float in [0, 1] on one device, ``generator`` a ``torch.Generator``
on that device, ``anomalous`` ``(B, 3, S, S)`` and ``masks`` ``(B, S, S)`` bool.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .perlin import LATTICE, blob_masks, perlin_noise_batch
from .poisson import poisson
from .scratch import scratch
from .shapes import shapes
from .texture import texture

BatchMaker = Callable[[torch.Tensor, torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]]


def _uniform(low, high, count: int, rng: torch.Generator) -> torch.Tensor:
    """``(count,)`` float32 uniform in ``[low, high)``; ``low``/``high`` scalars or ``(count,)``."""
    u = torch.rand(count, generator=rng, device=rng.device)
    return low + (high - low) * u


def _randint(low: torch.Tensor | int, high: torch.Tensor | int, count: int,
             rng: torch.Generator) -> torch.Tensor:
    """``(count,)`` int64 uniform in ``[low, high)``, ``low`` where the range is empty (as the per-image code)."""
    device = rng.device
    # torch.full, not as_tensor: a host scalar copied to the GPU would wait for the queue.
    low = torch.full((count,), low, device=device) if isinstance(low, int) else low
    high = torch.full((count,), high, device=device) if isinstance(high, int) else high
    span = (high - low).clamp_min(1)
    draw = (torch.rand(count, generator=rng, device=device) * span).long().clamp_max(span - 1)
    return torch.where(high > low, low + draw, low)


def _gather_pixels(sources: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``sources (B, C, S, S)``, ``rows``/``cols`` int ``(B, H, W)`` -> ``(B, C, H, W)`` picked pixels."""
    batch = torch.arange(sources.shape[0], device=sources.device)[:, None, None]
    return sources[batch, :, rows, cols].permute(0, 3, 1, 2)


def cutpaste_batch(images: torch.Tensor, sources: torch.Tensor,
                   rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's CutPaste per image (see :func:`augment.cutpaste.cutpaste`), batched.

    Side ``s ~ U[0.15 S, 0.2 S)``, cut at ``(c, c)`` with ``c ~ U[S/2 - s, S/2)``, pasted at
    ``(r1, r2)`` each ``~ U[0.3 S - s, 0.7 S)``.
    """
    count, _, size, _ = images.shape
    side = _randint(math.ceil(0.15 * size), math.ceil(0.2 * size), count, rng).clamp_min(1)
    c = _randint((size // 2 - side).clamp_min(0), size // 2, count, rng)
    r1 = _randint((int(0.3 * size) - side).clamp_min(0), int(0.7 * size), count, rng)
    r2 = _randint((int(0.3 * size) - side).clamp_min(0), int(0.7 * size), count, rng)
    pos = torch.arange(size, device=images.device)
    in_rows = (pos >= r1[:, None]) & (pos < (r1 + side)[:, None])  # (B, S)
    in_cols = (pos >= r2[:, None]) & (pos < (r2 + side)[:, None])
    masks = in_rows[:, :, None] & in_cols[:, None, :]
    rows = (c[:, None] + pos - r1[:, None]).clamp(0, size - 1)
    cols = (c[:, None] + pos - r2[:, None]).clamp(0, size - 1)
    patch = _gather_pixels(sources, rows[:, :, None].expand(-1, -1, size), cols[:, None, :].expand(-1, size, -1))
    return torch.where(masks[:, None], patch, images), masks


def rotate_quarter_turns(images: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """Rotate square image ``i`` of ``(B, C, S, S)`` by ``turns[i]`` x 90 degrees (``turns`` int ``(B,)``).

    All four rotations are made and picked by index: a boolean selection would stall the GPU
    queue (it needs the selected count on the host).
    """
    candidates = torch.stack([torch.rot90(images, k, dims=(2, 3)) for k in range(4)])  # (4, B, C, S, S)
    return candidates[turns, torch.arange(images.shape[0], device=images.device)]


def perlin_blend_batch(images: torch.Tensor, sources: torch.Tensor,
                       rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's Perlin anomaly per image (see :func:`augment.perlin.perlin_blend`), batched."""
    count, _, height, width = images.shape
    masks = blob_masks(perlin_noise_batch(count, height, width, (LATTICE, LATTICE), rng))
    turns = torch.randint(0, 4, (count,), generator=rng, device=images.device)
    rotated = rotate_quarter_turns(sources, turns) if height == width else sources
    m = masks[:, None].to(images.dtype)
    return images * (1 - m) + rotated * m, masks


def _grayscale(images: torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, W)`` -> ``(B, 1, H, W)`` with torchvision's ITU-R 601-2 luma weights."""
    r, g, b = images.unbind(1)
    return (0.2989 * r + 0.587 * g + 0.114 * b)[:, None]


def _rgb_to_hsv(rgb: torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, W)`` RGB in [0, 1] -> HSV in [0, 1] (the formulas torchvision's adjust_hue uses)."""
    r, g, b = rgb.unbind(1)
    maxc, _ = rgb.max(1)
    minc = rgb.min(1).values
    equal = maxc == minc
    delta = maxc - minc
    s = delta / torch.where(equal, torch.ones_like(maxc), maxc)
    safe = torch.where(equal, torch.ones_like(delta), delta)
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.fmod(h / 6.0 + 1.0, 1.0)
    return torch.stack((h, s, maxc), 1)


def _hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_rgb_to_hsv`."""
    h, s, v = hsv.unbind(1)
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.long() % 6
    p = (v * (1.0 - s)).clamp(0, 1)
    q = (v * (1.0 - s * f)).clamp(0, 1)
    t = (v * (1.0 - s * (1.0 - f))).clamp(0, 1)
    choices = torch.stack((
        torch.stack((v, q, p, p, t, v), 1),
        torch.stack((t, v, v, q, p, p), 1),
        torch.stack((p, p, t, v, v, q), 1)), 1)  # (B, 3, 6, H, W)
    index = i[:, None, None].expand(-1, 3, 1, -1, -1)
    return choices.gather(2, index)[:, :, 0]


def color_jitter_batch(images: torch.Tensor, region: torch.Tensor, rng: torch.Generator,
                       strength: float = 0.1) -> torch.Tensor:
    """Brightness, contrast, saturation and hue jitter with one random factor set per image.

    ``region`` ``(B, H, W)`` bool marks the patch whose mean grey the contrast change pivots on
    (torchvision's ``adjust_contrast`` of the cut patch). Returns ``(B, 3, H, W)`` in [0, 1].
    """
    factors = [_uniform(1 - strength, 1 + strength, images.shape[0], rng) for _ in range(3)]
    hue = _uniform(-strength, strength, images.shape[0], rng)
    return apply_color_jitter(images, region, *factors, hue)


def apply_color_jitter(images: torch.Tensor, region: torch.Tensor, brightness: torch.Tensor,
                       contrast: torch.Tensor, saturation: torch.Tensor, hue: torch.Tensor) -> torch.Tensor:
    """torchvision's adjust_brightness, _contrast, _saturation, _hue in that order, factors ``(B,)``."""
    view = (-1, 1, 1, 1)
    out = (images * brightness.view(view)).clamp(0, 1)
    weights = region[:, None].to(out.dtype)
    mean = (_grayscale(out) * weights).sum((1, 2, 3), keepdim=True) / weights.sum((1, 2, 3), keepdim=True).clamp_min(1)
    contrast, saturation = contrast.view(view), saturation.view(view)
    out = (contrast * out + (1 - contrast) * mean).clamp(0, 1)
    out = (saturation * out + (1 - saturation) * _grayscale(out)).clamp(0, 1)
    hsv = _rgb_to_hsv(out)
    hsv = torch.stack((torch.remainder(hsv[:, 0] + hue.view(-1, 1, 1), 1.0), hsv[:, 1], hsv[:, 2]), 1)
    return _hsv_to_rgb(hsv).clamp(0, 1)


def scar_batch(images: torch.Tensor, sources: torch.Tensor,
               rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """CutPaste-scar per image (see :func:`augment.cutpaste.scar`), batched."""
    count, _, height, width = images.shape
    device = images.device
    scale = min(height, width) / 256
    strip_w = torch.round(_uniform(2, 16, count, rng) * scale).long().clamp(1, width)
    strip_h = torch.round(_uniform(10, 25, count, rng) * scale).long().clamp_min(2).clamp_max(height)
    top = _randint(0, height - strip_h + 1, count, rng)
    left = _randint(0, width - strip_w + 1, count, rng)
    rows = torch.arange(height, device=device)
    cols = torch.arange(width, device=device)
    region = (((rows >= top[:, None]) & (rows < (top + strip_h)[:, None]))[:, :, None]
              & ((cols >= left[:, None]) & (cols < (left + strip_w)[:, None]))[:, None, :])
    jittered = color_jitter_batch(sources, region, rng)

    angle = torch.deg2rad(_uniform(-45, 45, count, rng))
    cos, sin = torch.cos(angle), torch.sin(angle)
    w, h = strip_w.float(), strip_h.float()
    half_y = 0.5 * (cos.abs() * h + sin.abs() * w)
    half_x = 0.5 * (sin.abs() * h + cos.abs() * w)
    cy = _uniform(half_y, torch.maximum(half_y, height - half_y), count, rng)
    cx = _uniform(half_x, torch.maximum(half_x, width - half_x), count, rng)
    ys = rows.float()[None, :, None] + 0.5 - cy[:, None, None]  # (B, H, 1)
    xs = cols.float()[None, None, :] + 0.5 - cx[:, None, None]  # (B, 1, W)
    cos, sin, w, h = (t[:, None, None] for t in (cos, sin, w, h))
    u = cos * xs + sin * ys + w / 2
    v = -sin * xs + cos * ys + h / 2
    masks = (u >= 0) & (u < w) & (v >= 0) & (v < h)
    ui = torch.minimum(u.clamp_min(0).long(), strip_w[:, None, None] - 1)
    vi = torch.minimum(v.clamp_min(0).long(), strip_h[:, None, None] - 1)
    strip = _gather_pixels(jittered, top[:, None, None] + vi, left[:, None, None] + ui)
    return torch.where(masks[:, None], strip, images), masks


def rotflip_batch(images: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    """One of the 8 symmetries of the square per image (a random quarter-turn, then a random mirror)."""
    count = images.shape[0]
    turns = torch.randint(0, 4, (count,), generator=rng, device=images.device)
    mirror = torch.randint(0, 2, (count,), generator=rng, device=images.device).bool()
    out = rotate_quarter_turns(images, turns)
    return torch.where(mirror[:, None, None, None], out.flip(3), out)


def per_image_batch(make: Callable[..., tuple[torch.Tensor, torch.Tensor]]) -> BatchMaker:
    """The slower fallback: a batched maker that calls the per-image ``make`` on each image in turn.

    Image ``i`` gets ``make(images[i], sources[i], rng)`` with the one ``rng``, in batch order, so
    the result equals the per-image maker's run over the batch (the same stream, unlike the
    vectorised makers above). On a GPU each image costs a few small kernels and one or two host
    round trips (the makers draw their parameters in one call and read them on the host).
    """
    def batched(images: torch.Tensor, sources: torch.Tensor,
                rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        made = [make(images[i], sources[i], rng) for i in range(images.shape[0])]
        return torch.stack([m[0] for m in made]), torch.stack([m[1] for m in made])

    batched.__name__ = batched.__qualname__ = f"{make.__name__}_batch"
    batched.__doc__ = f"{make.__name__} per image, looped over the batch (see :func:`per_image_batch`)."
    return batched


BATCH_MAKERS: dict[str, BatchMaker] = {
    "cutpaste": cutpaste_batch,
    "perlin": perlin_blend_batch,
    "scar": scar_batch,
    # Not vectorised: the per-image makers looped (same stream as the per-image form).
    "poisson": per_image_batch(poisson),
    "scratch": per_image_batch(scratch),
    "texture": per_image_batch(texture),
    "shapes": per_image_batch(shapes),
}
