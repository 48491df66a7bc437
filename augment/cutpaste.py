"""CutPaste anomaly makers: the paper's square patch, and the CutPaste paper's thin rotated "scar".

Both cut from another normal image (``source``) and paste into ``image``; both are pure
functions of ``(image, source, rng)`` (``rng`` a ``torch.Generator``) returning
``(anomalous image, changed-pixel mask)``. The small draw helpers below are the per-image
stream; :mod:`augment.batched` has its own (vectorised, drawing differently) on purpose.
"""

from __future__ import annotations

import math

import torch


def _randint(low: int, high: int, rng: torch.Generator) -> int:
    """Uniform integer in ``[low, high)`` (``low`` when the range is empty)."""
    if high <= low:
        return low
    return int(torch.randint(low, high, (1,), generator=rng))


def _uniform(low: float, high: float, rng: torch.Generator) -> float:
    return low + (high - low) * float(torch.rand(1, generator=rng))


def cutpaste(image: torch.Tensor, source: torch.Tensor,
             rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's CutPaste: a square of side ``s ~ U[0.15 S, 0.2 S)`` moved from ``source``.

    The square is cut at top-left ``(c, c)``, ``c ~ U[S/2 - s, S/2)`` (one ``c`` for both
    axes), and pasted at top-left ``(r1, r2)``, each ``~ U[0.3 S - s, 0.7 S)``.

    Args:
        image, source: ``(3, S, S)`` float in [0, 1].
    Returns:
        ``(anomalous image (3, S, S), mask (S, S) bool)``, the mask being the pasted square.
    """
    _, size, _ = image.shape
    side = _randint(math.ceil(0.15 * size), math.ceil(0.2 * size), rng)
    side = max(side, 1)
    c = _randint(max(size // 2 - side, 0), size // 2, rng)
    r1 = _randint(max(int(0.3 * size) - side, 0), int(0.7 * size), rng)
    r2 = _randint(max(int(0.3 * size) - side, 0), int(0.7 * size), rng)
    out = image.clone()
    out[:, r1:r1 + side, r2:r2 + side] = source[:, c:c + side, c:c + side]
    mask = torch.zeros(image.shape[1:], dtype=torch.bool)
    mask[r1:r1 + side, r2:r2 + side] = True
    return out, mask


def _color_jitter(patch: torch.Tensor, rng: torch.Generator, strength: float = 0.1) -> torch.Tensor:
    """Brightness, contrast, saturation and hue jitter (``strength`` as in torchvision's ColorJitter)."""
    from torchvision.transforms import functional as TF  # here: torchvision takes 1.5 s to import

    patch = TF.adjust_brightness(patch, _uniform(1 - strength, 1 + strength, rng))
    patch = TF.adjust_contrast(patch, _uniform(1 - strength, 1 + strength, rng))
    patch = TF.adjust_saturation(patch, _uniform(1 - strength, 1 + strength, rng))
    patch = TF.adjust_hue(patch, _uniform(-strength, strength, rng))
    return patch.clamp(0, 1)


def scar(image: torch.Tensor, source: torch.Tensor,
         rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """CutPaste-scar (Li et al., CVPR 2021): a thin strip, colour-jittered, rotated, pasted.

    At 256 px the strip is 2-16 px wide and 10-25 px long (scaled with ``S / 256`` for other
    sizes, at least 1 x 2 px), rotated by an angle in [-45, 45] degrees and pasted with its
    centre anywhere the rotated strip stays inside the image.

    Args:
        image, source: ``(3, S, S)`` float in [0, 1].
    Returns:
        ``(anomalous image (3, S, S), mask (S, S) bool)`` of the rotated strip's pixels.
    """
    _, height, width = image.shape
    scale = min(height, width) / 256
    strip_w = max(1, round(_uniform(2, 16, rng) * scale))
    strip_h = max(2, round(_uniform(10, 25, rng) * scale))
    strip_w, strip_h = min(strip_w, width), min(strip_h, height)
    top = _randint(0, height - strip_h + 1, rng)
    left = _randint(0, width - strip_w + 1, rng)
    strip = _color_jitter(source[:, top:top + strip_h, left:left + strip_w], rng)

    angle = math.radians(_uniform(-45, 45, rng))
    cos, sin = math.cos(angle), math.sin(angle)
    # Half extents of the rotated strip's bounding box, so it stays inside the image.
    half_y = 0.5 * (abs(cos) * strip_h + abs(sin) * strip_w)
    half_x = 0.5 * (abs(sin) * strip_h + abs(cos) * strip_w)
    cy = _uniform(half_y, max(half_y, height - half_y), rng)
    cx = _uniform(half_x, max(half_x, width - half_x), rng)

    # Inverse-map every destination pixel into the strip's own frame (nearest neighbour).
    ys = torch.arange(height, dtype=torch.float32)[:, None] + 0.5 - cy
    xs = torch.arange(width, dtype=torch.float32)[None, :] + 0.5 - cx
    u = cos * xs + sin * ys + strip_w / 2  # along the strip's width
    v = -sin * xs + cos * ys + strip_h / 2  # along its length
    mask = (u >= 0) & (u < strip_w) & (v >= 0) & (v < strip_h)
    ui = u[mask].long().clamp(0, strip_w - 1)
    vi = v[mask].long().clamp(0, strip_h - 1)
    out = image.clone()
    out[:, mask] = strip[:, vi, ui]
    return out, mask
