"""The frame: the ``(H, W)`` every image of a category is resized to for the network.

The paper squashes every image to ``size x size``: a 900 x 900 bottle becomes a 16 x 16 grid of
patches at 128 px, and a 500 x 1,260 commutator is squashed 2.5:1 on top. The network is fully
convolutional and the memory bank is a set of patches, so neither needs a square: a frame keeps
the images' aspect ratio and may be larger than the network's training input (``size``), which
then trains on ``size x size`` tiles cut from frame-sized images (:class:`data.TrainSet`); a share
of the samples may instead be the whole image squashed to ``size x size`` (:func:`whole_draws`).

Frame specifications (``TrainConfig.frame`` / ``ScoreConfig.frame``):

- ``"square"``: ``size x size`` (the paper);
- ``"auto"``: follows the training images: their median aspect ratio (height / width) kept, their
  median area, capped at :data:`AUTO_AREA` times ``size**2`` (so scoring costs a bounded multiple
  of the paper's) and at least ``size`` on each side (a training tile must fit);
- ``"HxW"``, e.g. ``"160x416"``: explicit, each side a multiple of :data:`FRAME_STEP`.

Frames are chosen once per category (from the training images) and recorded in the checkpoint;
images of another aspect ratio than the frame's are resized into it (as the paper resizes every
image into its square).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch

from models import MAX_SIZE, MIN_SIZE

FRAME_STEP = 32  # the network halves the image 5 times: sides divisible by 2**5 keep every grid whole
AUTO_AREA = 4.0  # the auto frame's largest area, in units of size**2
FRAME_RULES = ("square", "auto")
_EXPLICIT = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")

Frame = tuple[int, int]


def frame_problem(spec: object) -> str | None:
    """What is wrong with a frame specification, or ``None`` when it is one (see the module docstring)."""
    if isinstance(spec, str) and spec in FRAME_RULES:
        return None
    explicit = _EXPLICIT.match(spec) if isinstance(spec, str) else None
    if explicit is None:
        return "choose square (the paper), auto (from the training images) or HxW in pixels (e.g. 160x416)"
    for side in map(int, explicit.groups()):
        if side % FRAME_STEP or not MIN_SIZE <= side <= MAX_SIZE:
            return f"each side must be a multiple of {FRAME_STEP} from {MIN_SIZE} to {MAX_SIZE} px"
    return None


def parse_frame(spec: str) -> Frame | None:
    """``"HxW"`` -> ``(H, W)``; ``None`` for the rules (``square``, ``auto``)."""
    explicit = _EXPLICIT.match(spec)
    return (int(explicit.group(1)), int(explicit.group(2))) if explicit else None


def frame_text(frame: Frame) -> str:
    """``(H, W)`` -> ``"HxW"`` (how a resolved frame is stored in configs and checkpoints)."""
    return f"{frame[0]}x{frame[1]}"


def _round_side(value: float, least: int) -> int:
    return int(min(MAX_SIZE, max(least, FRAME_STEP * round(value / FRAME_STEP))))


def auto_frame(image_sizes: Sequence[tuple[int, int]], size: int, max_area: float = AUTO_AREA) -> Frame:
    """The ``auto`` frame of images of ``image_sizes`` ``[(H, W)]`` for a network trained at ``size``.

    Median aspect ratio kept; area the median image's, between ``size**2`` and ``max_area * size**2``;
    sides rounded to multiples of :data:`FRAME_STEP`, each at least ``size``.
    """
    if not image_sizes:
        raise ValueError("auto_frame needs at least one image size")
    aspects = sorted(h / w for h, w in image_sizes)
    areas = sorted(h * w for h, w in image_sizes)
    aspect, area = aspects[len(aspects) // 2], areas[len(areas) // 2]
    area = min(max(area, size * size), max_area * size * size)
    return frame_at_area(aspect, area, size)


def frame_at_area(aspect: float, area: float, size: int) -> Frame:
    """The ``(H, W)`` of aspect ratio ``aspect`` (H / W) and about ``area`` px: sides rounded to
    multiples of :data:`FRAME_STEP`, each from ``size`` (rounded up: a training tile must fit) to
    :data:`MAX_SIZE`."""
    least = FRAME_STEP * math.ceil(size / FRAME_STEP)
    return _round_side(math.sqrt(area * aspect), least), _round_side(math.sqrt(area / aspect), least)


def resolve_frame(spec: str, size: int, image_sizes: Sequence[tuple[int, int]] | None = None) -> Frame:
    """A frame specification -> ``(H, W)``; ``auto`` needs the training images' ``image_sizes``."""
    if spec == "square":
        return size, size
    if spec == "auto":
        if image_sizes is None:
            raise ValueError("the auto frame needs the training images' sizes")
        return auto_frame(image_sizes, size)
    frame = parse_frame(spec)
    if frame is None:
        raise ValueError(f"not a frame: {spec!r}")
    return frame


def frame_for_images(spec: str, size: int, paths: Sequence) -> Frame:
    """:func:`resolve_frame` with the ``auto`` rule reading the sizes of the images at ``paths``
    (their headers only, EXIF orientation applied)."""
    from .images import upright_size  # data.images imports this module

    return resolve_frame(spec, size, [upright_size(path) for path in paths] if spec == "auto" else None)


def as_frame(size: int | Sequence[int]) -> Frame:
    """``S`` (a square) or ``(H, W)`` -> ``(H, W)``: what every resize of this package accepts."""
    if isinstance(size, int):
        return size, size
    height, width = size
    return int(height), int(width)


def random_tiles(images: torch.Tensor, size: int, rng: torch.Generator) -> torch.Tensor:
    """One random ``size x size`` tile of each image: ``(B, C, H, W)`` -> ``(B, C, size, size)``.

    Offsets are drawn from ``rng`` (on the images' device), uniformly over the positions that fit;
    images already ``size x size`` are returned as they are, drawing nothing (the paper's path).
    """
    count, _, height, width = images.shape
    if (height, width) == (size, size):
        return images
    if height < size or width < size:
        raise ValueError(f"a {size} px tile does not fit in a {height}x{width} frame")
    top = torch.randint(0, height - size + 1, (count,), generator=rng, device=images.device)
    left = torch.randint(0, width - size + 1, (count,), generator=rng, device=images.device)
    steps = torch.arange(size, device=images.device)
    rows = (top[:, None] + steps)[:, :, None]  # (B, size, 1)
    cols = (left[:, None] + steps)[:, None, :]  # (B, 1, size)
    batch = torch.arange(count, device=images.device)[:, None, None]
    return images.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2).contiguous()


def whole_draws(count: int, share: float, rng: torch.Generator) -> torch.Tensor:
    """Which of ``count`` training samples are whole images rather than tiles: ``(count,)`` bool,
    each true with probability ``share``. Draws ``count`` uniforms from ``rng`` (on its device),
    none when ``share`` is 0 (the tiles-only stream unchanged)."""
    if share <= 0:
        return torch.zeros(count, dtype=torch.bool, device=rng.device)
    return torch.rand(count, generator=rng, device=rng.device) < share


def mixed_views(tiles: torch.Tensor, wholes: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
    """``wholes`` where ``whole`` (``(B,)`` bool, :func:`whole_draws`), else ``tiles``: both
    ``(B, C, S, S)``, the same images (``wholes`` the whole frame resized to ``S x S``) ->
    ``(B, C, S, S)``."""
    return torch.where(whole[:, None, None, None], wholes, tiles)
