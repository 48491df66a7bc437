"""Label-free check of a network and its scoring settings: synthetic anomalies on held-out normal images.

Choosing options (layers, ``--k``, ``--smooth``, a training recipe) on the test set's labels
overfits it. This check uses the normal training images only: a seeded fifth of them is held
out, the memory bank is built from the rest, and every held-out image is scored as it is and
with one synthetic anomaly of each kind asked (``--check-kinds``; by default ``CHECK_AUGS``:
CutPaste, Perlin blend, CutPaste scar), whose masks are known. Image AUROC (held-out normal vs.
anomalous) and pixel AUROC / AUPRO against the synthetic masks are the selection signal. The
kinds are the same for every recipe, so recipes that train on fewer kinds are compared on equal
terms; kinds no compared training learnt (``HELD_OUT_KINDS``) do not favour the trainings that
learnt the default kinds.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset

import augment
from common.errors import UserError
from data import to_float, train_images
from data.frames import random_tiles
from data.mvtec import load_cached

from .. import metrics
from ..config import ScoreConfig
from ..engine import dense
from ..engine.calibration import cross_fitted_calibration
from ..engine.model import AnomalyScorer

CHECK_AUGS = ("cutpaste", "perlin", "scar")
# Makers no recipe trains on: a check with these does not reward having learnt its anomalies.
HELD_OUT_KINDS = ("poisson", "scratch", "texture")
HOLDOUT_FRACTION = 0.2
# Offsets the check's random streams from the training's, which uses the same seeds.
SEED_OFFSET = 7_919


class HeldOutImages(Dataset):
    """``{"image"}`` items of a fixed ``(N, 3, S, S)`` float tensor, for feature extraction."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        return {"image": self.images[index]}


def split_train(count: int, seed: int, fraction: float = HOLDOUT_FRACTION) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded ``(fit, held_out)`` index tensors over ``count`` images; both non-empty."""
    if count < 3:
        raise UserError(f"the synthetic check needs at least 3 training images, found {count}")
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed + SEED_OFFSET))
    held = min(count - 2, max(1, round(fraction * count)))
    return order[held:], order[:held]


def anomaly_in_square(normal: torch.Tensor, maker, pick_source,
                      rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One anomaly of ``maker`` in ``normal`` ``(3, H, W)`` -> ``((1, 3, H, W), (1, H, W) bool)``.

    The makers draw on squares: a non-square frame gets its anomaly in a random square of side
    ``min(H, W)`` (from a random square of the source), as training makes anomalies per tile.
    """
    _, height, width = normal.shape
    if height == width:
        return augment.make_anomalies(normal, [maker], pick_source, rng)[1:]
    side = min(height, width)
    top = int(torch.randint(height - side + 1, (1,), generator=rng))
    left = int(torch.randint(width - side + 1, (1,), generator=rng))
    window = (slice(top, top + side), slice(left, left + side))
    _, anomaly, mask = augment.make_anomalies(normal[(slice(None), *window)], [maker],
                                              lambda rng: random_tiles(pick_source(rng)[None], side, rng)[0], rng)
    image, full = normal.clone()[None], torch.zeros(1, height, width, dtype=torch.bool)
    image[(0, slice(None), *window)], full[(0, *window)] = anomaly[0], mask[0]
    return image, full


def synthetic_images(images: torch.Tensor, held_out: torch.Tensor, fit: torch.Tensor, seed: int,
                     augs: tuple[str, ...] = CHECK_AUGS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Held-out normals followed by one anomaly per kind for each of them, kind by kind.

    ``images``: ``(N, 3, S, S)`` uint8 training images. Returns ``(M, 3, S, S)`` float images,
    ``(M, S, S)`` bool masks (empty for the normals) and ``(M,)`` labels, with
    ``M = len(held_out) * (1 + len(augs))``; the pasted/blended source is a random fit image.
    """
    rng = torch.Generator().manual_seed(seed + SEED_OFFSET)
    normals = to_float(images[held_out])

    def pick_source(rng: torch.Generator) -> torch.Tensor:
        return to_float(images[fit[int(torch.randint(len(fit), (1,), generator=rng))]])

    out_images, out_masks = [normals], [torch.zeros(normals.shape[0], *normals.shape[-2:], dtype=torch.bool)]
    for name in augs:  # kind by kind, not image by image: the order this stream has always been drawn in
        for normal in normals:
            anomaly, mask = anomaly_in_square(normal, augment.MAKERS[name], pick_source, rng)
            out_images.append(anomaly)
            out_masks.append(mask)
    labels = torch.tensor([0] * len(normals) + [1] * len(normals) * len(augs))
    return torch.cat(out_images), torch.cat(out_masks), labels


def synthetic_check(model: torch.nn.Module, config: ScoreConfig, data_root: str | Path, category: str,
                    device: torch.device, features, kinds: tuple[str, ...] = CHECK_AUGS) -> dict:
    """Score held-out training images with and without synthetic anomalies; returns the metrics.

    ``features(dataset, desc)`` extracts per-layer features the way the run does (its layers,
    batch size, precision, map source); the bank follows the config's fusion, coreset, ``k`` and
    ``smooth``; ``config.frame`` must be resolved. ``kinds``: names of
    ``augment.MAKERS``, one anomaly of each per held-out image.
    """
    size = config.frame_hw
    paths = train_images(data_root, category)
    images = load_cached(paths, size, config.antialias, f"{category}: synthetic check, caching train")
    if images is None:
        raise UserError(f"the synthetic check: the {len(paths)} training images of {category} do not fit in "
                        "memory at this size; leave the check out")
    fit, held_out = split_train(len(paths), config.seed)
    fit_feats, _ = features(HeldOutImages(to_float(images[fit])), f"{category}: synthetic check bank")
    check_images, masks, labels = synthetic_images(images, held_out, fit, config.seed, tuple(kinds))
    check_feats, _ = features(HeldOutImages(check_images), f"{category}: synthetic check images")
    # A head map is normalised on the bank's images, as the run normalises it on all training images.
    norm = cross_fitted_calibration(config, fit_feats, device)[1] if dense.uses_head(config.map_source) else None
    scores, maps = AnomalyScorer.fit(config, fit_feats, norm, device).score(check_feats, "synthetic check")
    scores_np, maps_np, masks_np, labels_np = scores.numpy(), maps.numpy(), masks.numpy(), labels.numpy()
    return {
        "image_auroc": metrics.image_auroc(labels_np, scores_np),
        "pixel_auroc": metrics.pixel_auroc(masks_np, maps_np),
        "aupro": metrics.aupro(masks_np, maps_np),
        "held_out_images": len(held_out), "bank_images": len(fit), "kinds": list(kinds),
        "seed": config.seed,
    }
