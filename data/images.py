"""Reading images and masks from disk into fixed-size tensors, as the paper's pipeline does.

Any format PIL reads (PNG, JPEG, BMP, TIFF, ...); grayscale, RGBA, palette, 16-bit and float
images all become 8-bit RGB. The EXIF orientation tag is applied, so a phone photo is read the
way every viewer shows it (and its mask, drawn on the upright picture, fits it). Resizing is
plain bilinear without antialiasing (half-pixel centres, like OpenCV's INTER_LINEAR that the
released checkpoints were trained with) unless ``antialias`` is asked for; the result is rounded
to uint8 as OpenCV would return it. Masks are resized with nearest neighbour and a pixel is
defective when its value is >= 128; masks stored as 0/1 (the whole mask's maximum is 1) are
read as binary, 1 = defective.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.nn import functional as F

from common.errors import UserError

from .frames import Frame, as_frame

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
MASK_THRESHOLD = 128
# Decompression-bomb guard off: inspection images can be legitimately huge (e.g. 8000 x 6000).
Image.MAX_IMAGE_PIXELS = None

WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")  # 16-bit, 32-bit integer and float
# EXIF Orientation (tag 0x0112) -> the transpose that makes the picture upright (as PIL.ImageOps.exif_transpose).
EXIF_ORIENTATION_TAG = 0x0112
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# Wide-mode images are converted this many pixels at a time, so no full-size float64 copy
# (8 bytes a pixel: 1.15 GB for 12000 x 12000) is ever made.
STRIP_PIXELS = 1 << 20


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name."""
    return sorted(p for p in folder.iterdir() if is_image_file(p)) if folder.is_dir() else []


def is_mask_name(path: Path) -> bool:
    """``True`` for MVTec mask names (``<stem>_mask.<ext>``), which belong in ``ground_truth``."""
    return path.stem.lower().endswith("_mask")


def wide_mode_max(img: Image.Image) -> float:
    """The value that maps to 255 for a 16-bit, 32-bit or float image (from the whole image's maximum).

    16-bit and integer images use 65535 when any value exceeds 255 (else they already are
    8-bit values); float images use 1.0 when all values are <= 1, else 255.
    """
    high = img.getextrema()[1]
    if img.mode == "F":
        return 1.0 if high <= 1.0 else 255.0
    return 65535.0 if high > 255 else 255.0


def _to_uint8_array(img: Image.Image, high: float | None = None) -> np.ndarray:
    """Any PIL mode -> ``(H, W)`` or ``(H, W, C)`` uint8, scaling 16-bit and float ranges.

    ``high`` is the value mapped to 255 for wide modes (:func:`wide_mode_max` of the image when
    ``None``; pass the full image's when ``img`` has been reduced). Wide modes are converted in
    strips of rows, so memory stays near the decoded image's own size.
    """
    if img.mode in WIDE_MODES:
        high = wide_mode_max(img) if high is None else high
        arr = np.asarray(img)  # native uint16 / int32 / float32
        out = np.empty(arr.shape, np.uint8)
        rows = max(1, STRIP_PIXELS // max(1, arr.shape[1]))
        for top in range(0, arr.shape[0], rows):
            block = arr[top:top + rows].astype(np.float64)
            if img.mode == "F":
                np.nan_to_num(block, copy=False)
            out[top:top + rows] = np.clip(np.rint(block / high * 255.0), 0, 255)
        return out
    if img.mode in ("P", "PA"):
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "La", "RGBa"):
        img = img.convert("RGB" if img.mode != "LA" else "L")
    if img.mode not in ("L", "RGB"):
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.uint8)


def open_image(path: Path) -> Image.Image:
    """Open and fully decode ``path``; unreadable, truncated or non-image files are a ``UserError``.

    The EXIF orientation is not applied yet (see :func:`exif_orientation`), so a huge image can
    be reduced before it is turned.
    """
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


def exif_orientation(img: Image.Image) -> int:
    """The EXIF Orientation value of an opened image (1 = upright; also for no or broken EXIF)."""
    try:
        value = img.getexif().get(EXIF_ORIENTATION_TAG, 1)
    except Exception:  # a corrupt EXIF block must not make an otherwise readable image unreadable
        return 1
    return value if value in _UPRIGHT else 1


def upright(img: Image.Image, orientation: int) -> Image.Image:
    """Apply an EXIF orientation value (from :func:`exif_orientation`) to ``img``."""
    return img.transpose(_UPRIGHT[orientation]) if orientation in _UPRIGHT else img


# Images at least this many times the target size are first shrunk by PIL's box reduction
# (fast, antialiased) so that huge photographs (e.g. 8000 x 6000) do not need gigabytes of floats.
PRE_REDUCE_FACTOR = 8


def box_reduce(img: Image.Image, factor: int) -> Image.Image:
    """PIL's ``Image.reduce`` (box average over ``factor x factor`` blocks) for any mode.

    16-bit modes, which ``reduce`` rejects, are widened to 32-bit ``I`` a strip of rows at a
    time (strip heights are multiples of ``factor``, so the blocks are those of a whole-image
    reduce); the full-size image is never copied.
    """
    if img.mode.startswith("I;16"):
        width, height = img.size
        out = Image.new("I", (-(-width // factor), -(-height // factor)))
        step = factor * max(1, STRIP_PIXELS // (factor * width))
        for top in range(0, height, step):
            strip = img.crop((0, top, width, min(height, top + step))).convert("I").reduce(factor)
            out.paste(strip, (0, top // factor))
        return out
    if img.mode not in ("L", "RGB", "RGBA", "I", "F"):
        img = Image.fromarray(_to_uint8_array(img))  # palette, LA, CMYK, 1-bit, ... -> L or RGB
    return img.reduce(factor)


def read_rgb(path: Path, target: int | None = None) -> torch.Tensor:
    """``path`` -> ``(3, H, W)`` uint8 RGB, upright (grayscale repeated on the three channels).

    With ``target``, an image whose short side is ``>= 8 * target`` is first reduced by an
    integer factor (to a short side of at least ``4 * target``), whatever its bit depth.
    """
    img = open_image(path)
    orientation = exif_orientation(img)
    high = None
    if target is not None and min(img.size) >= PRE_REDUCE_FACTOR * target:
        high = wide_mode_max(img) if img.mode in WIDE_MODES else None
        img = box_reduce(img, min(img.size) // (4 * target))
    arr = _to_uint8_array(upright(img, orientation), high)
    tensor = torch.from_numpy(arr if arr.flags.writeable else arr.copy())
    if tensor.ndim == 2:
        return tensor.expand(3, *tensor.shape).contiguous()
    return tensor.permute(2, 0, 1).contiguous()


def upright_uint8(img: Image.Image) -> np.ndarray:
    """A PIL image, turned upright by its EXIF orientation -> ``(H, W)`` or ``(H, W, C)`` uint8."""
    return _to_uint8_array(upright(img, exif_orientation(img)))


def upright_size(path: Path) -> tuple[int, int]:
    """``(H, W)`` of an image file as viewers show it (EXIF orientation applied), without decoding it."""
    with Image.open(path) as img:
        width, height = img.size
        return (width, height) if exif_orientation(img) in (5, 6, 7, 8) else (height, width)


def read_gray(path: Path) -> torch.Tensor:
    """``path`` -> ``(H, W)`` uint8, upright (colour masks are reduced to their maximum channel)."""
    arr = upright_uint8(open_image(path))
    if arr.ndim == 3:
        arr = arr.max(axis=2)
    return torch.from_numpy(np.array(arr, copy=True))


def read_mask(path: Path) -> torch.Tensor:
    """A ground-truth mask: ``(H, W)`` uint8 where defective pixels are ``>= 128``.

    Masks stored as 0/1 (the whole mask's maximum is 1, as many tools other than MVTec's
    write them) are read as binary masks: 1 becomes 255. A soft 0..255 mask always has values
    above 1 where it matters, so it is never mistaken for one.
    """
    mask = read_gray(path)
    if int(mask.max()) == 1:
        mask.mul_(255)
    return mask


def resize_rounded(images: torch.Tensor, size: int | Frame, antialias: bool = False) -> torch.Tensor:
    """``(N, C, H, W)`` 8-bit values (any dtype) -> ``(N, C, *frame)`` float (``size``: a square side
    or a frame ``(H', W')``, see :mod:`data.frames`), bilinear (half-pixel centres), rounded to whole
    8-bit values: the one resize of images for the network, in training, scoring and exported files
    alike (traceable)."""
    out = F.interpolate(images.float(), size=as_frame(size), mode="bilinear", align_corners=False,
                        antialias=antialias)
    return out.round().clamp(0, 255)


def resize_image(image: torch.Tensor, size: int | Frame, antialias: bool = False) -> torch.Tensor:
    """``(3, H, W)`` uint8 -> ``(3, *frame)`` uint8 (:func:`resize_rounded`)."""
    if tuple(image.shape[-2:]) == as_frame(size):
        return image
    return resize_rounded(image[None], size, antialias)[0].to(torch.uint8)


def resize_mask(mask: torch.Tensor, size: int | Frame) -> torch.Tensor:
    """``(H, W)`` uint8 soft mask -> ``(*frame)`` bool: nearest neighbour, then ``>= 128``."""
    if tuple(mask.shape) != as_frame(size):
        mask = F.interpolate(mask[None, None].float(), size=as_frame(size), mode="nearest")[0, 0]
    return mask >= MASK_THRESHOLD


def resize_mask_paper(mask: torch.Tensor, size: int | Frame) -> torch.Tensor:
    """The paper code's mask convention, for comparable numbers: bilinear resize, defective where > 0.

    Counting every non-zero value of a bilinearly resized soft mask widens each defect by about
    a pixel (and by the whole soft rim of JPEG-like masks such as Magnetic Tile's).
    """
    out = F.interpolate(mask[None, None].float(), size=as_frame(size), mode="bilinear", align_corners=False)[0, 0]
    return out > 0


def load_image(path: Path, size: int | Frame, antialias: bool = False) -> torch.Tensor:
    """Read and resize: ``(3, *frame)`` uint8 (``size``: a square side or a frame ``(H, W)``)."""
    return resize_image(read_rgb(path, min(as_frame(size))), size, antialias)


def network_input(values: torch.Tensor, frame: Frame, antialias: bool = False) -> torch.Tensor:
    """``(N, C, H, W)`` 8-bit values (any dtype; ``C`` = 1 or 3) -> ``(N, 3, *frame)`` float in [0, 1]:
    :func:`resize_rounded`, then divided by 255. The one step from an image to the network's input,
    whatever it came as (file, PIL image, uint8 array, float tensor, an exported file's uint8 input);
    traceable. Equal to ``to_float(resize_image(...))``, what training reads."""
    values = values.expand(-1, 3, -1, -1)  # grayscale (C = 1) -> 3 channels; no-op for RGB
    return resize_rounded(values, as_frame(frame), antialias) / 255.0


def to_float(image: torch.Tensor) -> torch.Tensor:
    """uint8 ``(..., 3, S, S)`` -> float32 in [0, 1] (no mean/std normalisation, as the paper)."""
    return image.float().div_(255)
