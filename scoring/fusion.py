"""The paper's two ways of fusing multi-level patch features into one anomaly map.

- *Concatenation*: every chosen layer is upsampled (nearest) onto the first (finest) layer's
  grid and concatenated on channels; one memory bank; the ``h x w`` nearest-neighbour distance
  map is resized bilinearly to ``S x S``; the image score is the maximum of the ``h x w`` map.
- *Multiplication*: one bank and one distance map per layer, each resized bilinearly to
  ``S x S``, multiplied together; the image score is the maximum of the product map.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F
from tqdm import tqdm

from .knn import NearestNeighbours, greedy_coreset

FUSIONS = ("concatenation", "multiplication")


def concat_layers(feats: list[torch.Tensor]) -> torch.Tensor:
    """``[(N, C_l, h_l, w_l)]`` -> ``(N, sum C_l, h_0, w_0)``: nearest upsampling onto layer 0's grid."""
    target = feats[0].shape[-2:]
    resized = [f if f.shape[-2:] == target else F.interpolate(f, size=target, mode="nearest") for f in feats]
    return torch.cat(resized, dim=1)


def to_patches(feat: torch.Tensor) -> torch.Tensor:
    """``(N, C, h, w)`` -> ``(N h w, C)``, row-major over (image, y, x)."""
    return feat.permute(0, 2, 3, 1).reshape(-1, feat.shape[1])


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


def knn_map(index: NearestNeighbours, feat: torch.Tensor, k: int, batch_images: int = 64,
            exact: NearestNeighbours | None = None, refine: int = 0, desc: str = "k-NN search") -> torch.Tensor:
    """``(N, C, h, w)`` features -> ``(N, h, w)`` mean distance to the ``k`` nearest bank patches.

    With a coreset ``index``, ``exact`` (the whole bank) and ``refine > 0``, the ``refine``
    highest-scoring patches of every image are searched again in the whole bank, so that the
    image score (the maximum) and the peaks of the map are exact at a small extra cost.
    """
    n, _, h, w = feat.shape
    out = []
    bar = tqdm(total=n, desc=desc, unit="img", leave=False, disable=n <= batch_images, dynamic_ncols=True)
    for i in range(0, n, batch_images):
        patches = to_patches(feat[i:i + batch_images])
        dist = index.search(patches, k).mean(1).view(-1, h * w)
        if exact is not None and refine > 0:
            top = dist.topk(min(refine, h * w), dim=1).indices  # (b, refine) patch positions
            rows = (top + torch.arange(dist.shape[0])[:, None] * (h * w)).reshape(-1)
            dist.scatter_(1, top, exact.search(patches[rows], k).mean(1).view(top.shape))
        out.append(dist.view(-1, h, w))
        bar.update(dist.shape[0])
    bar.close()
    return torch.cat(out)


class Scorer:
    """Nearest-neighbour search over a memory bank (or one per layer), scoring new features.

    Args:
        fusion: ``concatenation`` or ``multiplication``.
        banks: from :meth:`build_banks`: one ``(B, sum C_l)`` bank, or one ``(B_l, C_l)`` per layer.
        backend, device: see ``NearestNeighbours``.
    """

    def __init__(self, fusion: str, banks: list[torch.Tensor], backend: str = "auto",
                 device: torch.device | str = "cpu", full_banks: list[torch.Tensor] | None = None,
                 refine: int = 0, precision: str = "auto"):
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}")
        self.fusion = fusion
        self.banks = banks
        self.indices = [NearestNeighbours(bank, backend, device, precision=precision) for bank in banks]
        self.backend = self.indices[0].backend
        self.refine = refine if full_banks is not None else 0
        self.exact = ([NearestNeighbours(bank, backend, device, precision=precision) for bank in full_banks]
                      if self.refine
                      else [None] * len(banks))

    @staticmethod
    def build_banks(fusion: str, train_feats: list[torch.Tensor], coreset: float = 1.0, seed: int = 0,
                    proj_dim: int = 32, device: torch.device | str = "cpu"
                    ) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """Bank rows ``(B, D)``: one bank of concatenated features, or one bank per layer.

        ``train_feats``: per layer ``(N, C_l, h_l, w_l)`` features of the normal training images;
        ``coreset``: fraction of each bank kept by greedy k-center (1.0 keeps all, the paper).
        Returns ``(banks searched, whole banks)``; the second is ``None`` without a coreset.
        """
        grids = [concat_layers(train_feats)] if fusion == "concatenation" else train_feats
        full = [to_patches(grid).contiguous() for grid in grids]
        if coreset >= 1:
            return full, None
        banks = [bank[greedy_coreset(bank, coreset, seed=seed, proj_dim=proj_dim, device=device)].contiguous()
                 for bank in full]
        return banks, full

    def score(self, feats: list[torch.Tensor], size: int, k: int = 1,
              smooth: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Per layer ``(N, C_l, h_l, w_l)`` -> image scores ``(N,)`` and maps ``(N, size, size)``.

        ``smooth`` blurs the maps only; image scores follow the paper (see module doc).
        """
        if self.fusion == "concatenation":
            patch_map = knn_map(self.indices[0], concat_layers(feats), k, exact=self.exact[0], refine=self.refine,
                                desc="k-NN search, concatenated layers")
            scores = patch_map.flatten(1).max(1).values
            maps = resize_map(patch_map, size)
        else:
            maps = None
            for layer, (index, exact, feat) in enumerate(zip(self.indices, self.exact, feats)):
                layer_map = resize_map(knn_map(index, feat, k, exact=exact, refine=self.refine,
                                               desc=f"k-NN search, layer {layer + 1} of {len(feats)}"), size)
                maps = layer_map if maps is None else maps * layer_map
            scores = maps.flatten(1).max(1).values
        return scores, gaussian_smooth(maps, smooth)
