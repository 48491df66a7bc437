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
from models import HEAD_STAGES

from ..inputs import Preprocessing

# Frames with a side over TILE_SIDE px go through the network in tiles of at most TILE_SIDE x TILE_SIDE
# with TILE_HALO px of context around each (its features dropped): the memory of one pass stays
# bounded (a 4096 x 4096 frame would need about 10 GB for wave18's first stage alone).
TILE_SIDE = 1024
TILE_HALO = 128
TILE_STEP = 32  # the network's largest stride: tile edges on it keep every grid aligned


class ImageFiles(Dataset):
    """Image files for feature extraction: ``{"image", "path", "ok", "reason"}``.

    ``image`` is ``(3, *frame)`` float as ``preprocessing`` (:class:`scoring.inputs.Preprocessing`,
    the one way in) makes it; with ``skip_bad`` an unreadable file gives ``ok=False`` (and a zero
    image) instead of an error.
    """

    def __init__(self, paths: list[Path], preprocessing: Preprocessing, skip_bad: bool = False):
        if not isinstance(preprocessing, Preprocessing):
            raise TypeError(f"ImageFiles takes a Preprocessing (ScoreConfig.preprocessing), got {preprocessing!r}")
        self.paths, self.preprocessing, self.skip_bad = paths, preprocessing, skip_bad

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        path = self.paths[index]
        try:
            image, ok, reason = self.preprocessing.file(path), True, ""
        except UserError as exc:
            if not self.skip_bad:
                raise
            image, ok, reason = torch.zeros(3, *self.preprocessing.frame), False, str(exc)
        return {"image": image, "path": str(path), "ok": ok, "reason": reason}


def pooled_features(model: torch.nn.Module, images: torch.Tensor, layers: list[int], head: bool = False,
                    tile: int | None = None, halo: int | None = None,
                    view: Preprocessing | None = None) -> list[torch.Tensor]:
    """``(N, 3, H, W)`` -> ``[(N, C_l, H / 2**(l+1), W / 2**(l+1)) for l in layers]`` (1-based stages),
    followed by the segmentation head's logits ``(N, 1, H/4, W/4)`` when ``head`` (dense networks),
    then, with a ``view`` (``ScoreConfig.view_preprocessing``), the layers' features of the images
    remade at the view's frame (``view.from_input``): ``[(N, C_l, h'_l, w'_l) for l in layers]``.

    A frame with a side over ``tile`` (default :data:`TILE_SIDE`; both sides multiples of
    :data:`TILE_STEP`) goes through the
    network in overlapping tiles: each tile's core of at most ``tile x tile`` px is run with
    ``halo`` px of the image around it, and only the core's features are kept and stitched, at
    full resolution. Memory then grows with the tile, not the frame; the positions depend on the
    frame alone, so a traced graph unrolls the same loop.
    """
    if images.shape[0] > 1 and images.device.type == "cpu" and not torch.jit.is_tracing():
        # One image per pass on the CPU: oneDNN's convolutions round by their batch (Intel: an image
        # alone and in a batch of 3 differ by 5e-7 of the features, 2.4e-4 of a score), and an
        # image's score must not depend on the images beside it (predict, the scripts, torchrun's
        # shares). It costs little there: wave18, 2 cores, 256 px 20 against 24 ms an image in a
        # batch of 16, 128 px 7.5 against 6.0. A GPU keeps its batches (and its own rounding).
        parts = [pooled_features(model, one, layers, head, tile, halo, view) for one in images.split(1)]
        return [torch.cat(level) for level in zip(*parts)]
    feats = _tiled_features(model, images, layers, head, tile, halo)
    if view is None:
        return feats
    remade = view.from_input(images)
    if images.is_contiguous(memory_format=torch.channels_last):  # as the frame's input runs
        remade = remade.contiguous(memory_format=torch.channels_last)
    return feats + _tiled_features(model, remade, layers, False, tile, halo)


def _tiled_features(model: torch.nn.Module, images: torch.Tensor, layers: list[int], head: bool,
                    tile: int | None, halo: int | None) -> list[torch.Tensor]:
    """:func:`pooled_features` of one view, in tiles where the frame is large."""
    # Read here, not bound as defaults: a test (or a user with little memory) may set the module's values.
    tile, halo = TILE_SIDE if tile is None else tile, TILE_HALO if halo is None else halo
    # Plain ints, also in a traced graph (the frame is fixed there: images are resized to it first):
    # traced sizes would turn the ceilings below into integer divisions, which ONNX truncates
    # towards zero (a 1088 px side got one tile instead of two, and an "invalid expand shape").
    height, width = (int(side) for side in images.shape[-2:])
    whole = max(height, width) <= tile or height % TILE_STEP or width % TILE_STEP
    if whole:
        return _pooled(model, images, layers, head)
    rows, cols = _tile_spans(height, tile, halo), _tile_spans(width, tile, halo)
    out: list[torch.Tensor] | None = None
    for top, bottom, window_top, window_bottom in rows:
        for left, right, window_left, window_right in cols:
            part = _pooled(model, images[..., window_top:window_bottom, window_left:window_right], layers, head)
            if out is None:
                out = [f.new_zeros(*f.shape[:2], height * f.shape[-2] // (window_bottom - window_top),
                                   width * f.shape[-1] // (window_right - window_left)) for f in part]
            for whole_map, piece in zip(out, part):
                stride = height // whole_map.shape[-2]
                whole_map[..., top // stride:bottom // stride, left // stride:right // stride] = \
                    piece[..., (top - window_top) // stride:(bottom - window_top) // stride,
                          (left - window_left) // stride:(right - window_left) // stride]
    assert out is not None
    return out


def _tile_spans(length: int, tile: int, halo: int) -> list[tuple[int, int, int, int]]:
    """Cores ``[start, stop)`` of at most ``tile`` px covering ``length``, each with its window
    ``[start - halo, stop + halo)`` clipped to the image; all multiples of :data:`TILE_STEP`."""
    count = -(-length // tile)
    step = TILE_STEP * -(-length // (count * TILE_STEP))  # equal cores, the last one shorter
    spans = []
    for start in range(0, length, step):
        stop = min(length, start + step)
        spans.append((start, stop, max(0, start - halo), min(length, stop + halo)))
    return spans


def _pooled(model: torch.nn.Module, images: torch.Tensor, layers: list[int], head: bool) -> list[torch.Tensor]:
    stages = model.forward_features(images, stages=max(*layers, HEAD_STAGES if head else 1))
    feats = [F.avg_pool2d(stages[layer - 1], 3, stride=1, padding=1) for layer in layers]
    return feats + [model.seg_head(stages)] if head else feats


@torch.no_grad()
def extract(model: torch.nn.Module, loader, layers: list[int], device: torch.device, bf16: bool = False,
            desc: str = "features", head: bool = False,
            view: Preprocessing | None = None) -> tuple[list[torch.Tensor], list[dict]]:
    """Run ``model`` over every batch of ``loader`` (dicts with an ``image`` entry).

    Returns:
        per layer one float32 CPU tensor ``(N, C_l, h_l, w_l)`` (then the head's logits when
        ``head``, then a ``view``'s, see :func:`pooled_features`), and the batches' other entries (labels, masks,
        paths, ...) as a list of dicts, one per batch.
    """
    model.eval()
    chunks: list[list[torch.Tensor]] = [[] for _ in range(len(layers) * (1 + (view is not None)) + head)]
    extras = []
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    for batch in tqdm(loader, desc=desc, unit="batch", leave=False, dynamic_ncols=True):
        images = batch["image"].to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with autocast:
            feats = pooled_features(model, images, layers, head, view=view)
        for store, feat in zip(chunks, feats):
            store.append(feat.float().cpu())
        extras.append({k: v for k, v in batch.items() if k != "image"})
    return [torch.cat(store) for store in chunks], extras


@torch.no_grad()
def batched_features(model: torch.nn.Module, images: torch.Tensor, layers: list[int], batch_size: int,
                     device: torch.device, bf16: bool = False, head: bool = False,
                     view: Preprocessing | None = None) -> list[torch.Tensor]:
    """``(N, 3, S, S)`` float images -> per layer ``(N, C_l, h_l, w_l)`` float32 CPU features (then the
    head's logits when ``head``, then a ``view``'s features: :func:`pooled_features`)."""
    out: list[list[torch.Tensor]] = [[] for _ in range(len(layers) * (1 + (view is not None)) + head)]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size].to(device).contiguous(memory_format=torch.channels_last)
        with autocast:
            feats = pooled_features(model, batch, layers, head, view=view)
        for store, feat in zip(out, feats):
            store.append(feat.float().cpu())
    return [torch.cat(store) for store in out]

