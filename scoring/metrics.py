"""Anomaly detection metrics as pure functions on arrays (no data sets, no paths).

- ``image_auroc``, ``pixel_auroc``: the paper's two numbers;
- ``aupro``: per-region overlap integrated up to a false-positive rate of 0.3, divided by 0.3
  (MVTec AD's protocol; regions are 8-connected components of each ground-truth mask);
- ``f1_max``: best F1 over all thresholds of the image scores, with that threshold;
- ``pixel_ap``: average precision over all pixels.

The one threshold rule, everywhere (verdicts, counts, F1, panels, predicted regions, exported
files): a score or a map value is anomalous when it is *above* the threshold,
:func:`above_threshold` (``value > threshold``); a value equal to it is normal.
"""

from __future__ import annotations

import numpy as np

# scikit-learn and SciPy are imported where they are used: together about 1 s of every start.

_trapezoid = getattr(np, "trapezoid", None) or np.trapz  # NumPy 2 renamed it


def _both_classes(labels: np.ndarray) -> bool:
    return labels.min() != labels.max()


def image_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """``labels`` (N,) 0/1, ``scores`` (N,) -> ROC AUC (NaN when only one class is present)."""
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(labels).astype(np.int64)
    return float(roc_auc_score(labels, scores)) if _both_classes(labels) else float("nan")


def pixel_auroc(masks: np.ndarray, maps: np.ndarray) -> float:
    """``masks`` (N, H, W) bool, ``maps`` (N, H, W) float -> ROC AUC over all pixels."""
    from sklearn.metrics import roc_auc_score

    flat = np.asarray(masks).reshape(-1).astype(np.uint8)
    return float(roc_auc_score(flat, np.asarray(maps).reshape(-1))) if _both_classes(flat) else float("nan")


def pixel_ap(masks: np.ndarray, maps: np.ndarray) -> float:
    """``masks`` (N, H, W) bool, ``maps`` (N, H, W) -> average precision over all pixels."""
    from sklearn.metrics import average_precision_score

    flat = np.asarray(masks).reshape(-1).astype(np.uint8)
    return float(average_precision_score(flat, np.asarray(maps).reshape(-1))) if flat.any() else float("nan")


def above_threshold(values, threshold: float):
    """The one threshold rule: ``values > threshold`` (scores or map values; NumPy or torch)."""
    return values > threshold


def f1_max(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """``labels`` (N,), ``scores`` (N,) -> (best F1, a threshold ``t`` reaching it with the one rule,
    ``score > t``): half-way between the lowest score called anomalous and the next lower score
    (as float32, as scores are; the lower score itself where no float32 lies between them)."""
    from sklearn.metrics import precision_recall_curve

    labels = np.asarray(labels).astype(np.int64)
    scores = np.asarray(scores, dtype=np.float32)
    if not labels.any():
        return float("nan"), float("nan")
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    best = int(np.argmax(f1[:-1])) if len(thresholds) else 0
    if not len(thresholds):
        return float(f1[best]), float("nan")
    lowest_called = np.float32(thresholds[best])  # scikit-learn's rule: score >= it
    below = scores[scores < lowest_called]
    if not len(below):  # every image called anomalous
        return float(f1[best]), float(np.nextafter(lowest_called, np.float32(-np.inf)))
    lower = below.max()
    middle = np.float32((float(lower) + float(lowest_called)) / 2)
    return float(f1[best]), float(middle if lower < middle < lowest_called else lower)


def roc_points(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) arrays of the ROC curve, for plotting."""
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(np.asarray(labels).astype(np.int64), scores)
    return fpr, tpr


def pro_curve(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact per-region-overlap curve over every distinct threshold.

    Args:
        masks: ``(N, H, W)`` bool ground truth.
        maps: ``(N, H, W)`` float anomaly maps.
    Returns:
        ``(fpr, pro)``, both ``(T + 1,)`` starting at (0, 0), for thresholds from high to low.
        ``fpr``: share of defect-free pixels at or above the threshold; ``pro``: mean over all
        ground-truth regions of the share of the region's pixels at or above it.
    """
    from scipy import ndimage

    masks = np.asarray(masks, dtype=bool)
    maps = np.asarray(maps, dtype=np.float64)
    structure = np.ones((3, 3), dtype=bool)  # 8-connectivity
    weights = np.zeros(maps.shape, dtype=np.float64)  # each pixel's step of the PRO curve
    n_regions = 0
    region_weights = []
    for i in range(masks.shape[0]):
        labelled, count = ndimage.label(masks[i], structure=structure)
        if count:
            sizes = np.bincount(labelled.ravel())
            per_pixel = np.where(labelled > 0, 1.0 / sizes[labelled], 0.0)
            region_weights.append((i, per_pixel))
            n_regions += count
    normal = ~masks
    n_normal = int(normal.sum())
    if n_regions == 0 or n_normal == 0:
        return np.array([0.0]), np.array([0.0])
    for i, per_pixel in region_weights:
        weights[i] = per_pixel / n_regions
    fp_steps = normal.astype(np.float64) / n_normal

    order = np.argsort(-maps.ravel(), kind="stable")
    sorted_scores = maps.ravel()[order]
    fpr = np.cumsum(fp_steps.ravel()[order])
    pro = np.cumsum(weights.ravel()[order])
    # Only the last index of every run of equal scores is a real threshold.
    last_of_run = np.r_[sorted_scores[1:] != sorted_scores[:-1], True]
    return np.r_[0.0, fpr[last_of_run]], np.r_[0.0, pro[last_of_run]]


def aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3) -> float:
    """Area under the PRO curve up to ``fpr_limit``, divided by ``fpr_limit`` (1.0 is perfect).

    ``masks`` (N, H, W) bool, ``maps`` (N, H, W). The curve is linearly interpolated at the
    limit. Images without defect regions add only defect-free pixels. NaN without any region.
    """
    fpr, pro = pro_curve(masks, maps)
    if len(fpr) == 1:
        return float("nan")
    keep = fpr <= fpr_limit
    x, y = fpr[keep], pro[keep]
    if x[-1] < fpr_limit:
        nxt = int(np.argmax(fpr > fpr_limit)) if (fpr > fpr_limit).any() else None
        if nxt is not None:
            x0, x1, y0, y1 = fpr[nxt - 1], fpr[nxt], pro[nxt - 1], pro[nxt]
            y_lim = y0 + (y1 - y0) * (fpr_limit - x0) / max(x1 - x0, 1e-300)
            x, y = np.r_[x, fpr_limit], np.r_[y, y_lim]
    return float(_trapezoid(y, x) / fpr_limit)
