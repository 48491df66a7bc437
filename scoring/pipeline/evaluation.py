"""Scoring a labelled test set or a folder of new images with a detector: results, no files.

:func:`evaluate_test_set` returns a :class:`TestSetResult` (scores, maps, labels, masks and the
metrics); :func:`score_image_folder` a :class:`FolderResult` (scores and maps of the readable
images, and what was skipped, why). Both run the detector's :class:`scoring.engine.model.AnomalyModel`
(features through a data loader, then its scorer); writing them is :mod:`scoring.outputs.writing`.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Subset
from tqdm import tqdm

from common.distributed import DistInfo, block, gather_to_main
from common.errors import SettingError
from data import IMAGE_SUFFIXES, TestSet

from .. import metrics
from ..building import features_of
from ..config import ScoreConfig
from ..detector import Detector
from ..engine.features import ImageFiles
from ..engine.model import search_report
from ..outputs.folders import IDENTITY_FILE, RUN_FILES

# Why a metric cannot be computed on a test set, by what its labels / masks lack.
IMAGE_METRICS = ("image_auroc", "image_f1_max")
PIXEL_METRICS = ("pixel_auroc", "aupro", "pixel_ap", "pixel_auroc_paper_masks")
ONE_PROCESS = DistInfo()


@dataclass
class TestSetResult:
    """A labelled test set scored: per image ``paths``, ``defects`` (``good`` or the defect type),
    ``labels`` ``(N,)`` 0/1, ``masks`` / ``paper_masks`` ``(N, S, S)`` bool, ``scores`` ``(N,)`` and
    ``maps`` ``(N, S, S)``; the metrics (``None`` where the labels cannot give one, with the reason
    in ``unavailable``), image AUROC per defect type, the image F1-max threshold, and the seconds
    the scoring took."""

    paths: list[str]
    defects: list[str]
    labels: np.ndarray
    masks: np.ndarray
    paper_masks: np.ndarray
    scores: np.ndarray
    maps: np.ndarray
    metrics: dict = field(default_factory=dict)
    unavailable: dict = field(default_factory=dict)
    per_defect_image_auroc: dict = field(default_factory=dict)
    f1_threshold: float | None = None
    seconds: float = 0.0
    pixel_labels: bool = True  # False: the test set is labelled per image only (masks all empty)


@dataclass
class FolderResult:
    """A folder of new images scored: the ``paths`` scored with their ``scores`` ``(N,)`` and ``maps``
    ``(N, S, S)``, the files ``skipped`` (``{"path", "reason"}``), the dataset the images came from
    (for pictures: ``dataset[index[path]]``) and the seconds the scoring took."""

    paths: list[str]
    scores: np.ndarray
    maps: np.ndarray
    skipped: list[dict]
    dataset: ImageFiles
    index: dict[str, int]
    seconds: float = 0.0


def unavailable_metrics(labels: np.ndarray, masks: np.ndarray, pixel_labels: bool = True) -> dict[str, str]:
    """``{metric: reason}`` for the metrics the test set cannot give (reported as n/a, not NaN);
    ``pixel_labels`` ``False``: the test set is labelled per image only (no ``ground_truth`` folder)."""
    reasons = {}
    if labels.min() == labels.max():
        why = "the test set has only good images" if labels.max() == 0 else "the test set has no good images"
        reasons.update(dict.fromkeys(IMAGE_METRICS, why))
    if not pixel_labels:
        reasons.update(dict.fromkeys(PIXEL_METRICS, "the test set is labelled per image only (no ground_truth/ "
                                                    "folder of masks)"))
    elif labels.max() == 0:
        reasons.update(dict.fromkeys(PIXEL_METRICS, "the test set has only good images (no ground-truth masks)"))
    elif not masks.any():
        reasons.update(dict.fromkeys(PIXEL_METRICS, "no defective pixel in the ground-truth masks (masks are "
                                                    "defective where >= 128, or 1 in 0/1 masks)"))
    elif masks.all():
        reasons.update(dict.fromkeys(PIXEL_METRICS, "every pixel is defective in the ground-truth masks"))
    return reasons


def add_metrics(result: TestSetResult) -> TestSetResult:
    """Fill in ``result``'s metrics (``None`` with a reason where the labels or masks cannot give one)."""
    labels, masks, scores, maps = result.labels, result.masks, result.scores, result.maps
    unavailable = unavailable_metrics(labels, masks, result.pixel_labels)
    f1, f1_threshold = metrics.f1_max(labels, scores) if "image_f1_max" not in unavailable else (None, None)
    computed = {
        "image_auroc": lambda: metrics.image_auroc(labels, scores),
        "pixel_auroc": lambda: metrics.pixel_auroc(masks, maps),
        "aupro": lambda: metrics.aupro(masks, maps),
        "image_f1_max": lambda: f1,
        "pixel_ap": lambda: metrics.pixel_ap(masks, maps),
        # The same maps against the paper code's wider masks (bilinear resize, any non-zero value).
        "pixel_auroc_paper_masks": lambda: metrics.pixel_auroc(result.paper_masks, maps),
    }
    result.metrics = {name: None if name in unavailable else compute() for name, compute in computed.items()}
    for name, reason in unavailable.items():
        tqdm.write(f"note: {name.replace('_', ' ')} not available: {reason}", file=sys.stderr)
    if "image_auroc" not in unavailable:
        for defect in sorted(set(result.defects) - {"good"}):
            keep = np.array([d in ("good", defect) for d in result.defects])
            result.per_defect_image_auroc[defect] = metrics.image_auroc(labels[keep], scores[keep])
    result.unavailable, result.f1_threshold = unavailable, f1_threshold
    return result


def category_test_set(data_root: str | Path, category: str, config: ScoreConfig) -> TestSet:
    """The category's labelled test set at ``config``'s frame and resize (its :class:`Preprocessing`)."""
    preprocessing = config.preprocessing
    return TestSet(data_root, category, preprocessing.frame, preprocessing.antialias)


def evaluate_test_set(detector: Detector, dataset: TestSet, workers: int = 0, desc: str = "test",
                      shards: DistInfo = ONE_PROCESS) -> TestSetResult | None:
    """Score every image of ``dataset`` and compute the metrics. Under torchrun (``shards``) each
    rank scores its block of whole batches and rank 0 gets the result (the others ``None``): the
    same numbers as one process, whose batches they are."""
    start = time.perf_counter()
    share = block(len(dataset), shards, align=detector.config.batch_size)
    part: dict = {"search": None}
    if len(share):
        subset = dataset if len(share) == len(dataset) else Subset(dataset, share)
        feats, extras = features_of(detector.model.network, subset, detector.config, detector.device,
                                    f"{desc}: test features", workers=workers)
        scores, maps = detector.score_features(feats)
        part = {"paths": [p for e in extras for p in e["path"]], "defects": [d for e in extras for d in e["defect"]],
                "labels": np.concatenate([np.asarray(e["label"]) for e in extras]),
                "masks": torch.cat([e["mask"] for e in extras]).numpy(),
                "paper_masks": torch.cat([e["paper_mask"] for e in extras]).numpy(),
                "scores": scores.numpy(), "maps": maps.numpy(), "search": detector.model.scorer.search_counts}
    parts = gather_to_main(part, shards)
    if parts is None:
        return None
    parts = [p for p in parts if "scores" in p]
    merge_search_counts(detector, [p["search"] for p in parts])
    joined = {key: [v for p in parts for v in p[key]] if key in ("paths", "defects") else
              np.concatenate([p[key] for p in parts]) for key in parts[0] if key != "search"}
    return add_metrics(TestSetResult(**joined, seconds=time.perf_counter() - start,
                                     pixel_labels=getattr(dataset, "pixel_labels", True)))


def folder_images(folder: Path) -> tuple[list[Path], list[dict]]:
    """The image files under ``folder`` (by extension, sorted) and the other files, as skipped
    entries (broken links among them)."""
    # What a scoring run wrote (its results and heatmaps, beside its .identity.json) is output, not
    # input, also when --out lies inside the folder scored or is the folder itself: only those files
    # are left out, so the user's own images beside them are still scored.
    written = {marker.parent / name for marker in folder.rglob(IDENTITY_FILE) for name in RUN_FILES}
    entries = sorted(p for p in folder.rglob("*") if not p.name.startswith(".") and (p.is_file() or p.is_symlink())
                     and p not in written and written.isdisjoint(p.parents))
    broken = [p for p in entries if not p.exists()]  # a link whose target is gone
    candidates = [p for p in entries if p.is_file()]
    paths = [p for p in candidates if p.suffix.lower() in IMAGE_SUFFIXES]
    skipped = [{"path": str(p), "reason": "not an image file (by extension)"} for p in candidates if p not in paths]
    skipped += [{"path": str(p), "reason": f"broken link (its target {os.readlink(p)} does not exist)"}
                for p in broken]
    if not paths:
        raise SettingError("images", str(folder), "no image files (png/jpg/bmp/tif) found")
    return paths, skipped


def score_image_folder(detector: Detector, folder: Path, workers: int = 0,
                       listing: tuple[list[Path], list[dict]] | None = None,
                       shards: DistInfo = ONE_PROCESS) -> FolderResult | None:
    """Score every readable image under ``folder`` (``listing``: its :func:`folder_images`, when the
    caller has it already); unreadable ones are skipped with their reason. Under torchrun
    (``shards``) each rank scores its block of whole batches and rank 0 gets the result (the
    others ``None``)."""
    paths, skipped = listing if listing is not None else folder_images(folder)
    config = detector.config
    dataset = ImageFiles(paths, config.preprocessing, skip_bad=True)
    start = time.perf_counter()
    share = block(len(paths), shards, align=config.batch_size)
    part = {"paths": [], "scores": np.zeros(0, np.float32), "maps": None, "skipped": [], "search": None}
    if len(share):
        subset = dataset if len(share) == len(dataset) else Subset(dataset, share)
        feats, extras = features_of(detector.model.network, subset, config, detector.device, "images: features",
                                    workers=workers)
        ok = torch.tensor([flag for e in extras for flag in e["ok"]], dtype=torch.bool)
        all_paths = [p for e in extras for p in e["path"]]
        for path, flag, reason in zip(all_paths, ok.tolist(), [r for e in extras for r in e["reason"]]):
            if not flag:
                tqdm.write(f"warning: skipped {reason}", file=sys.stderr)
                part["skipped"].append({"path": path, "reason": reason})
        part["paths"] = [p for p, flag in zip(all_paths, ok.tolist()) if flag]
        if part["paths"]:
            scores, maps = detector.score_features([f[ok] for f in feats])
            part.update(scores=scores.numpy(), maps=maps.numpy(), search=detector.model.scorer.search_counts)
    parts = gather_to_main(part, shards)
    if parts is None:
        return None
    good_paths = [p for part in parts for p in part["paths"]]
    if not good_paths:
        raise SettingError("images", str(folder), f"none of the {len(paths)} files could be read")
    merge_search_counts(detector, [p["search"] for p in parts if p["paths"]])
    scored = [p for p in parts if p["paths"]]
    return FolderResult(good_paths, np.concatenate([p["scores"] for p in scored]),
                        np.concatenate([p["maps"] for p in scored]),
                        list(skipped) + [s for p in parts for s in p["skipped"]], dataset,
                        {str(p): i for i, p in enumerate(paths)}, time.perf_counter() - start)


def merge_search_counts(detector: Detector, counts: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """The detector's search report of several ranks' images, from their per-image counts (the
    numbers one process reports)."""
    scorer = detector.model.scorer
    scorer.search_counts = (torch.cat([c[0] for c in counts]), torch.cat([c[1] for c in counts]))
    scorer.search_stats = search_report(scorer, *scorer.search_counts)
