"""Patch features of a trained network: chosen stages, each through a 3x3 average pool (and the
segmentation head's logits of a dense network); the image files they are extracted from.

The paper scores ``layer2`` and ``layer3`` outputs after ``AvgPool2d(3, stride=1, padding=1)``
(``count_include_pad=True``, PyTorch's default), which gives each patch its neighbourhood.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch.nn import functional as F
from torch.utils.data import Dataset
from tqdm import tqdm

from common.errors import UserError
from data import load_image, to_float
from data.frames import Frame, as_frame
from models import HEAD_STAGES


class ImageFiles(Dataset):
    """Plain images for feature extraction: ``{"image", "path", "ok", "reason"}``.

    ``image`` is ``(3, H, W)`` float (``size``: a square side or a frame ``(H, W)``); with ``skip_bad``
    an unreadable file gives ``ok=False``
    (and a zero image) instead of an error.
    """

    def __init__(self, paths: list[Path], size: int | Frame, antialias: bool = False, skip_bad: bool = False):
        self.paths, self.size, self.antialias, self.skip_bad = paths, as_frame(size), antialias, skip_bad

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        path = self.paths[index]
        try:
            image, ok, reason = to_float(load_image(path, self.size, self.antialias)), True, ""
        except UserError as exc:
            if not self.skip_bad:
                raise
            image, ok, reason = torch.zeros(3, *self.size), False, str(exc)
        return {"image": image, "path": str(path), "ok": ok, "reason": reason}


def pooled_features(model: torch.nn.Module, images: torch.Tensor, layers: list[int],
                    head: bool = False) -> list[torch.Tensor]:
    """``(N, 3, S, S)`` -> ``[(N, C_l, S / 2**(l+1), S / 2**(l+1)) for l in layers]`` (1-based stages),
    followed by the segmentation head's logits ``(N, 1, S/4, S/4)`` when ``head`` (dense networks)."""
    stages = model.forward_features(images, stages=max(*layers, HEAD_STAGES if head else 1))
    feats = [F.avg_pool2d(stages[layer - 1], 3, stride=1, padding=1) for layer in layers]
    return feats + [model.seg_head(stages)] if head else feats


@torch.no_grad()
def extract(model: torch.nn.Module, loader, layers: list[int], device: torch.device,
            bf16: bool = False, desc: str = "features", head: bool = False) -> tuple[list[torch.Tensor], list[dict]]:
    """Run ``model`` over every batch of ``loader`` (dicts with an ``image`` entry).

    Returns:
        per layer one float32 CPU tensor ``(N, C_l, h_l, w_l)`` (then the head's logits when
        ``head``, see :func:`pooled_features`), and the batches' other entries (labels, masks,
        paths, ...) as a list of dicts, one per batch.
    """
    model.eval()
    chunks: list[list[torch.Tensor]] = [[] for _ in range(len(layers) + head)]
    extras = []
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    for batch in tqdm(loader, desc=desc, unit="batch", leave=False, dynamic_ncols=True):
        images = batch["image"].to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with autocast:
            feats = pooled_features(model, images, layers, head)
        for store, feat in zip(chunks, feats):
            store.append(feat.float().cpu())
        extras.append({k: v for k, v in batch.items() if k != "image"})
    return [torch.cat(store) for store in chunks], extras


@torch.no_grad()
def batched_features(model: torch.nn.Module, images: torch.Tensor, layers: list[int], batch_size: int,
                     device: torch.device, bf16: bool = False, head: bool = False) -> list[torch.Tensor]:
    """``(N, 3, S, S)`` float images -> per layer ``(N, C_l, h_l, w_l)`` float32 CPU features (then the
    head's logits when ``head``)."""
    out: list[list[torch.Tensor]] = [[] for _ in range(len(layers) + head)]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size].to(device).contiguous(memory_format=torch.channels_last)
        with autocast:
            feats = pooled_features(model, batch, layers, head)
        for store, feat in zip(out, feats):
            store.append(feat.float().cpu())
    return [torch.cat(store) for store in out]

