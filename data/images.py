"""Reading images and masks from disk into fixed-size tensors, as the paper's pipeline does.

Any format PIL reads (PNG, JPEG, BMP, TIFF, ...); grayscale, RGBA, palette, 16-bit and float
images all become 8-bit RGB. Resizing is plain bilinear without antialiasing (half-pixel
centres, like OpenCV's INTER_LINEAR that the released checkpoints were trained with) unless
``antialias`` is asked for; the result is rounded to uint8 as OpenCV would return it. Masks are
resized with nearest neighbour and a pixel is defective when its value is >= 128.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.nn import functional as F

from errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
MASK_THRESHOLD = 128
# Decompression-bomb guard off: inspection images can be legitimately huge (e.g. 8000 x 6000).
Image.MAX_IMAGE_PIXELS = None


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name."""
    return sorted(p for p in folder.iterdir() if is_image_file(p)) if folder.is_dir() else []


def _to_uint8_array(img: Image.Image) -> np.ndarray:
    """Any PIL mode -> ``(H, W)`` or ``(H, W, C)`` uint8, scaling 16-bit and float ranges."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if img.mode == "F":
            hi = 1.0 if arr.max() <= 1.0 else 255.0
        else:
            hi = 65535.0 if arr.max() > 255 else 255.0
        return np.clip(np.rint(arr / hi * 255.0), 0, 255).astype(np.uint8)
    if img.mode in ("P", "PA"):
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "La", "RGBa"):
        img = img.convert("RGB" if img.mode != "LA" else "L")
    if img.mode not in ("L", "RGB"):
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.uint8)


def open_image(path: Path) -> Image.Image:
    """Open and fully decode ``path``; unreadable, truncated or non-image files are a ``UserError``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(path)
            img.load()
        return img
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        first_line = (str(exc).splitlines() or [type(exc).__name__])[0][:100]
        reason = "empty file" if path.exists() and path.stat().st_size == 0 else first_line
        raise UserError(f"cannot read image {path} ({reason}); replace or remove the file") from None


# Images at least this many times the target size are first shrunk by PIL's box reduction
# (fast, antialiased) so that huge photographs (e.g. 8000 x 6000) do not need gigabytes of floats.
PRE_REDUCE_FACTOR = 8


def read_rgb(path: Path, target: int | None = None) -> torch.Tensor:
    """``path`` -> ``(3, H, W)`` uint8 RGB (grayscale repeated on the three channels).

    With ``target``, an image whose short side is ``>= 8 * target`` is first reduced by an
    integer factor (to a short side of at least ``4 * target``).
    """
    img = open_image(path)
    if target is not None and min(img.size) >= PRE_REDUCE_FACTOR * target and img.mode in ("L", "RGB", "RGBA", "P"):
        img = img.convert("RGB") if img.mode == "P" else img
        img = img.reduce(min(img.size) // (4 * target))
    arr = _to_uint8_array(img)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    return torch.from_numpy(np.array(arr, copy=True)).permute(2, 0, 1).contiguous()


def read_gray(path: Path) -> torch.Tensor:
    """``path`` -> ``(H, W)`` uint8 (colour masks are reduced to their maximum channel)."""
    arr = _to_uint8_array(open_image(path))
    if arr.ndim == 3:
        arr = arr.max(axis=2)
    return torch.from_numpy(np.array(arr, copy=True))


def resize_image(image: torch.Tensor, size: int, antialias: bool = False) -> torch.Tensor:
    """``(3, H, W)`` uint8 -> ``(3, size, size)`` uint8, bilinear (half-pixel centres), rounded."""
    if image.shape[-2:] == (size, size):
        return image
    out = F.interpolate(image[None].float(), size=(size, size), mode="bilinear",
                        align_corners=False, antialias=antialias)[0]
    return out.round_().clamp_(0, 255).to(torch.uint8)


def resize_mask(mask: torch.Tensor, size: int) -> torch.Tensor:
    """``(H, W)`` uint8 soft mask -> ``(size, size)`` bool: nearest neighbour, then ``>= 128``."""
    if mask.shape != (size, size):
        mask = F.interpolate(mask[None, None].float(), size=(size, size), mode="nearest")[0, 0]
    return mask >= MASK_THRESHOLD


def resize_mask_paper(mask: torch.Tensor, size: int) -> torch.Tensor:
    """The paper code's mask convention, for comparable numbers: bilinear resize, defective where > 0.

    Counting every non-zero value of a bilinearly resized soft mask widens each defect by about
    a pixel (and by the whole soft rim of JPEG-like masks such as Magnetic Tile's).
    """
    out = F.interpolate(mask[None, None].float(), size=(size, size), mode="bilinear", align_corners=False)[0, 0]
    return out > 0


def load_image(path: Path, size: int, antialias: bool = False) -> torch.Tensor:
    """Read and resize: ``(3, size, size)`` uint8."""
    return resize_image(read_rgb(path, size), size, antialias)


def to_float(image: torch.Tensor) -> torch.Tensor:
    """uint8 ``(..., 3, S, S)`` -> float32 in [0, 1] (no mean/std normalisation, as the paper)."""
    return image.float().div_(255)
