"""Pictures of a scoring run: one PNG panel per image and the ROC curves.

Panel: the input image | the heatmap over the image | the image with the ground-truth outline
(green) and the predicted region (red outline: map >= threshold). One colour scale for the
whole run (``vmin``, ``vmax``), so panels compare with each other.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from scipy import ndimage  # noqa: E402

_JET = (plt.get_cmap("jet")(np.linspace(0, 1, 256))[:, :3] * 255).astype(np.uint8)


def outline(mask: np.ndarray) -> np.ndarray:
    """``(H, W)`` bool -> its 1-px inner border, bool."""
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def colorize(heat: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """``(H, W)`` float -> ``(H, W, 3)`` uint8 jet colours on the run's fixed scale."""
    scaled = np.clip((heat - vmin) / max(vmax - vmin, 1e-12), 0, 1)
    return _JET[(scaled * 255).astype(np.uint8)]


def panel(image: np.ndarray, heat: np.ndarray, vmin: float, vmax: float, threshold: float,
          mask: np.ndarray | None = None) -> np.ndarray:
    """``image`` (H, W, 3) uint8, ``heat`` (H, W) -> ``(H, 3W + 8, 3)`` uint8 panel."""
    overlay = (0.5 * image + 0.5 * colorize(heat, vmin, vmax)).astype(np.uint8)
    marked = image.copy()
    if mask is not None and mask.any():
        marked[outline(mask)] = (0, 255, 0)
    predicted = heat >= threshold
    if predicted.any():
        marked[outline(predicted)] = (255, 0, 0)
    gap = np.full((image.shape[0], 4, 3), 255, np.uint8)
    return np.concatenate([image, gap, overlay, gap, marked], axis=1)


MIN_PANEL_HEIGHT = 256


def save_panel(path: Path, image: np.ndarray, heat: np.ndarray, vmin: float, vmax: float,
               threshold: float, mask: np.ndarray | None = None) -> None:
    """Write the panel; small images are enlarged by an integer factor (nearest) to stay legible."""
    out = panel(image, heat, vmin, vmax, threshold, mask)
    scale = max(1, MIN_PANEL_HEIGHT // image.shape[0])
    if scale > 1:
        out = out.repeat(scale, axis=0).repeat(scale, axis=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(out).save(path)


def save_roc(path: Path, curves: dict[str, tuple[np.ndarray, np.ndarray, float]], title: str) -> None:
    """``curves``: name -> (fpr, tpr, auc). Writes a PNG with one line per curve."""
    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=100)
    for name, (fpr, tpr, auc) in curves.items():
        ax.plot(fpr, tpr, label=f"{name} (AUROC {auc:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title, xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
