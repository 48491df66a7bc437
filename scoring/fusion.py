"""The paper's two ways of fusing multi-level patch features into one anomaly map.

- *Concatenation*: every chosen layer is upsampled (nearest) onto the first (finest) layer's
  grid and concatenated on channels; one memory bank; the ``h x w`` nearest-neighbour distance
  map is resized bilinearly to ``S x S``; the image score is the maximum of the ``h x w`` map.
- *Multiplication*: one bank and one distance map per layer, each resized bilinearly to
  ``S x S``, multiplied together; the image score is the maximum of the product map.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn import functional as F

from .bank import MemoryBank, to_patches
from .config import FUSIONS

__all__ = ["FUSIONS", "Scorer", "concat_layers", "fuse_maps", "gaussian_smooth", "resize_map", "to_patches"]


def concat_layers(feats: list[torch.Tensor]) -> torch.Tensor:
    """``[(N, C_l, h_l, w_l)]`` -> ``(N, sum C_l, h_0, w_0)``: nearest upsampling onto layer 0's grid."""
    target = feats[0].shape[-2:]
    resized = [f if f.shape[-2:] == target else F.interpolate(f, size=target, mode="nearest") for f in feats]
    return torch.cat(resized, dim=1)


def resize_map(maps: torch.Tensor, size: int) -> torch.Tensor:
    """``(N, h, w)`` -> ``(N, size, size)`` bilinear (half-pixel centres, no antialiasing)."""
    return F.interpolate(maps[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]


def gaussian_smooth(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """``(N, H, W)`` Gaussian blur truncated at 4 sigma, mirrored borders (scipy's gaussian_filter, mode='mirror')."""
    if sigma <= 0:
        return maps
    radius = int(4 * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(maps.dtype)
    out = maps[:, None]
    pad_h = min(radius, out.shape[-2] - 1)
    pad_w = min(radius, out.shape[-1] - 1)
    out = F.pad(out, (pad_w, pad_w, pad_h, pad_h), mode="reflect")
    k_h = kernel[radius - pad_h: radius + pad_h + 1] if pad_h < radius else kernel
    k_w = kernel[radius - pad_w: radius + pad_w + 1] if pad_w < radius else kernel
    out = F.conv2d(out, k_h.view(1, 1, -1, 1))
    out = F.conv2d(out, k_w.view(1, 1, 1, -1))
    return out[:, 0]


class Scorer:
    """The fusion of one category's memory banks: scores new features (the paper's two ways).

    Args:
        fusion: ``concatenation`` (one bank of concatenated layers) or ``multiplication`` (one per layer).
        banks: fitted :class:`MemoryBank` s, as :meth:`fit` makes them.
    """

    def __init__(self, fusion: str, banks: list[MemoryBank]):
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}")
        self.fusion, self.banks = fusion, banks

    @staticmethod
    def grids(fusion: str, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per layer ``(N, C_l, h_l, w_l)`` -> what each bank holds: ``[(N, sum C_l, h_0, w_0)]`` for
        concatenation, the layers themselves for multiplication."""
        return [concat_layers(feats)] if fusion == "concatenation" else list(feats)

    @classmethod
    def fit(cls, fusion: str, train_feats: list[torch.Tensor], make_bank: Callable[[], MemoryBank]) -> Scorer:
        """Banks from the normal training images' per-layer features ``(N, C_l, h_l, w_l)``."""
        return cls(fusion, [make_bank().fit(to_patches(grid)) for grid in cls.grids(fusion, train_feats)])

    @property
    def backend(self) -> str:
        return self.banks[0].backend

    def patch_maps(self, feats: list[torch.Tensor], k: int = 1) -> list[torch.Tensor]:
        """Per bank the ``(N, h, w)`` nearest-neighbour distance map (before resizing and fusion)."""
        grids = self.grids(self.fusion, feats)
        names = ["concatenated layers"] if self.fusion == "concatenation" else \
            [f"layer {i + 1} of {len(grids)}" for i in range(len(grids))]
        return [bank.patch_map(grid, k, desc=f"k-NN search, {name}")
                for bank, grid, name in zip(self.banks, grids, names)]

    def score(self, feats: list[torch.Tensor], size: int, k: int = 1,
              smooth: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Per layer ``(N, C_l, h_l, w_l)`` -> image scores ``(N,)`` and maps ``(N, size, size)``.

        ``smooth`` blurs the maps only; image scores follow the paper (see module doc).
        """
        return fuse_maps(self.fusion, self.patch_maps(feats, k), size, smooth)


def fuse_maps(fusion: str, patch_maps: list[torch.Tensor], size: int,
              smooth: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per bank ``(N, h_b, w_b)`` distance maps -> image scores ``(N,)`` and maps ``(N, size, size)``."""
    if fusion == "concatenation":
        scores = patch_maps[0].flatten(1).max(1).values
        maps = resize_map(patch_maps[0], size)
    else:
        maps = resize_map(patch_maps[0], size)
        for layer_map in patch_maps[1:]:
            maps = maps * resize_map(layer_map, size)
        scores = maps.flatten(1).max(1).values
    return scores, gaussian_smooth(maps, smooth)
