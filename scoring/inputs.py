"""How every image reaches the network: one :class:`Preprocessing` (the frame and the resize), and
what ``Detector.predict`` accepts, checked.

Every way in (``predict``, the test set, ``--images``, the training images of a bank, the
calibration, the synthetic check, torchrun, the benchmarks, exported files) turns an image into
8-bit values ``(3, H, W)`` and then through :func:`data.images.network_input`: the same bilinear
resize to the frame, the same rounding to whole 8-bit values. Accepted, one or a list (anything
else is a :class:`errors.UserError` naming the shape, type or range, never a score):

- file paths (``str`` / ``Path``): decoded as the training pipeline decodes them (EXIF
  orientation, 16-bit scaling, box-reduction of huge images);
- PIL images (turned upright by their EXIF orientation);
- uint8 NumPy arrays: one image ``(H, W)`` or ``(H, W, C)``, or a batch ``(N, H, W, C)``, with
  ``C`` = 1 (grey), 3 (RGB) or 4 (RGBA, alpha dropped). A 3-D array is always one image: a batch
  of grey images is ``(N, H, W, 1)`` or a list of ``(H, W)`` arrays;
- float tensors in [0, 1] with no NaN or infinity: one image ``(C, H, W)`` or a batch
  ``(N, C, H, W)``, ``C`` = 1 or 3; taken as 8-bit values (``round(255 x)``), so ``u8 / 255``
  scores exactly as the uint8 array ``u8``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common.errors import UserError
from data.frames import Frame
from data.images import network_input, read_rgb, upright_size, upright_uint8

ImageLike = str | Path | Image.Image | np.ndarray | torch.Tensor
ARRAY_CHANNELS = (1, 3, 4)
TENSOR_CHANNELS = (1, 3)


def as_image_list(images) -> list:
    """One image, a list of images or a batch (see the module docstring) -> a list of single images."""
    if isinstance(images, np.ndarray) and images.ndim == 4:  # a uint8 batch (N, H, W, C)
        return list(images)
    if isinstance(images, torch.Tensor) and images.ndim == 4:  # a float batch (N, C, H, W)
        return list(images.unbind(0))
    if isinstance(images, (str, Path, Image.Image, np.ndarray, torch.Tensor, bytes, bytearray)) or \
            not isinstance(images, Sequence):
        return [images]  # Preprocessing.prepare() names what it cannot score
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


def eight_bit_values(image: ImageLike, target: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """One image of any accepted kind -> ``(3, H, W)`` 8-bit values (uint8 or whole floats) and its own
    ``(H, W)``; ``target``: the frame's short side (a huge file is box-reduced first, see
    :func:`data.images.read_rgb`)."""
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise UserError(f"{path}: no such image file" + (" (a folder: pass its image files, e.g. "
                                                             "sorted(Path(folder).glob('*.png')))"
                                                             if path.is_dir() else ""))
        return read_rgb(path, target), upright_size(path)
    if isinstance(image, Image.Image):
        image = upright_uint8(image)
    if isinstance(image, np.ndarray):
        array = check_array(image)
        chw = torch.from_numpy(np.array(array[..., :3])).permute(2, 0, 1)  # a copy: inputs stay untouched
        return chw.expand(3, -1, -1), tuple(array.shape[:2])
    if isinstance(image, torch.Tensor):
        return check_tensor(image).mul(255).round(), tuple(image.shape[-2:])
    kind = "bytes (decode them first, e.g. Image.open(io.BytesIO(data)))" if isinstance(image, (bytes, bytearray)) \
        else f"a {type(image).__name__}"
    raise UserError(f"cannot score {kind}: pass file paths, PIL images, uint8 NumPy arrays or float tensors")


@dataclass(frozen=True)
class Preprocessing:
    """How images become the network's input: resized to ``frame`` ``(H, W)`` (never the network's
    training side: see :mod:`data.frames`), bilinear (``antialias`` as trained), rounded to whole
    8-bit values, divided by 255. ``ScoreConfig.preprocessing`` makes the one a detector uses."""

    frame: Frame
    antialias: bool = False

    def __post_init__(self):
        frame = self.frame
        if not (isinstance(frame, tuple) and len(frame) == 2 and all(isinstance(v, int) and v > 0 for v in frame)):
            raise ValueError(f"a frame is (H, W) in pixels, got {frame!r}")

    def prepare(self, image: ImageLike) -> tuple[torch.Tensor, tuple[int, int]]:
        """One image -> ``(3, *frame)`` float in [0, 1] and its own ``(H, W)``."""
        values, own = eight_bit_values(image, min(self.frame))
        return network_input(values[None], self.frame, self.antialias)[0], own

    def from_input(self, images: torch.Tensor) -> torch.Tensor:
        """Network inputs of another frame ``(N, 3, H, W)`` (whole 8-bit values / 255) -> ``(N, 3, *frame)``:
        the same resize and rounding, from what the other frame made of the image (how a second
        view is made from the one input every way in gives; traceable)."""
        return network_input(images.mul(255).round(), self.frame, self.antialias)

    def file(self, path: Path) -> torch.Tensor:
        """An image file -> ``(3, *frame)`` float in [0, 1] (unreadable: a ``UserError`` naming it)."""
        return network_input(read_rgb(path, min(self.frame))[None], self.frame, self.antialias)[0]
