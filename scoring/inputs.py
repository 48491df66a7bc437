"""What ``Detector.predict`` accepts, checked, and turned into the network's input.

Accepted, one or a list (anything else is a :class:`errors.UserError` naming the shape, type or
range, never a score):

- file paths (``str`` / ``Path``): decoded as the training pipeline decodes them (EXIF
  orientation, 16-bit scaling, box-reduction of huge images);
- PIL images (turned upright by their EXIF orientation);
- uint8 NumPy arrays: one image ``(H, W)`` or ``(H, W, C)``, or a batch ``(N, H, W, C)``, with
  ``C`` = 1 (grey), 3 (RGB) or 4 (RGBA, alpha dropped). A 3-D array is always one image: a batch
  of grey images is ``(N, H, W, 1)`` or a list of ``(H, W)`` arrays;
- float tensors in [0, 1] with no NaN or infinity: one image ``(C, H, W)`` or a batch
  ``(N, C, H, W)``, ``C`` = 1 or 3.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F

from common.errors import UserError
from data.frames import Frame, as_frame
from data.images import load_image, to_float, upright_size, upright_uint8

from .model import prepare_uint8

ImageLike = str | Path | Image.Image | np.ndarray | torch.Tensor
ARRAY_CHANNELS = (1, 3, 4)
TENSOR_CHANNELS = (1, 3)


def as_image_list(images) -> list:
    """One image, a list of images or a batch (see the module docstring) -> a list of single images."""
    if isinstance(images, np.ndarray) and images.ndim == 4:  # a uint8 batch (N, H, W, C)
        return list(images)
    if isinstance(images, torch.Tensor) and images.ndim == 4:  # a float batch (N, C, H, W)
        return list(images.unbind(0))
    if isinstance(images, (str, Path, Image.Image, np.ndarray, torch.Tensor)) or not isinstance(images, Sequence):
        return [images]  # prepare() names what it cannot score
    return list(images)


def check_array(image: np.ndarray) -> np.ndarray:
    """A uint8 ``(H, W)`` or ``(H, W, C)`` array -> ``(H, W, C)`` with ``C`` in 1, 3, 4; else a ``UserError``."""
    if image.dtype != np.uint8:
        raise UserError(f"a NumPy image must be uint8, got {image.dtype} {image.shape}; convert it with "
                        ".astype(np.uint8) (8-bit values 0..255)")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in ARRAY_CHANNELS:
        raise UserError(f"a NumPy image must be (H, W) or (H, W, C) with C = 1, 3 or 4, got shape {image.shape}; "
                        "a batch of grey images is (N, H, W, 1) or a list of (H, W) arrays")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise UserError(f"an empty image (shape {image.shape}) cannot be scored")
    return image


def check_tensor(image: torch.Tensor) -> torch.Tensor:
    """A float ``(C, H, W)`` tensor in [0, 1], ``C`` = 1 or 3 -> ``(3, H, W)`` float32 CPU; else a ``UserError``."""
    if not image.is_floating_point() or image.ndim != 3 or image.shape[0] not in TENSOR_CHANNELS:
        raise UserError(f"a tensor image must be float (3, H, W) or (1, H, W) in [0, 1] (a batch (N, C, H, W)), got "
                        f"{image.dtype} {tuple(image.shape)}")
    if image.shape[1] == 0 or image.shape[2] == 0:
        raise UserError(f"an empty image (shape {tuple(image.shape)}) cannot be scored")
    chw = image.detach().float().cpu()
    if not torch.isfinite(chw).all():
        raise UserError("a tensor image holds NaN or infinite values; only finite values in [0, 1] can be scored")
    low, high = float(chw.min()), float(chw.max())
    if low < 0 or high > 1:
        raise UserError(f"a float tensor image must be in [0, 1], got values in [{low:.4g}, {high:.4g}]; "
                        "divide 8-bit values by 255")
    return chw.expand(3, -1, -1)


def prepare(image: ImageLike, size: int | Frame, antialias: bool) -> tuple[torch.Tensor, tuple[int, int]]:
    """One image -> ``(3, *frame)`` float in [0, 1] as the training pipeline makes it (``size``: a square
    side or the frame ``(H', W')``), and its own ``(H, W)``."""
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise UserError(f"{path}: no such image file")
        return to_float(load_image(path, size, antialias)), upright_size(path)
    if isinstance(image, Image.Image):
        image = upright_uint8(image)
    if isinstance(image, np.ndarray):
        array = check_array(image)
        hwc = torch.from_numpy(np.array(array))  # a copy: inputs stay untouched
        return prepare_uint8(hwc[None], size, antialias)[0], tuple(array.shape[:2])
    if isinstance(image, torch.Tensor):
        chw = check_tensor(image)
        if tuple(chw.shape[-2:]) != as_frame(size):
            chw = F.interpolate(chw[None], size=as_frame(size), mode="bilinear", align_corners=False,
                                antialias=antialias)[0]
        return chw.clamp(0, 1), tuple(image.shape[-2:])
    raise UserError(f"cannot score a {type(image).__name__}: pass file paths, PIL images, uint8 NumPy "
                    "arrays or float tensors")
