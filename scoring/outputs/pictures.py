"""Pictures of a scoring run: one PNG panel per image and the ROC curves.

A panel explains itself, so it can be read without this file:

* a header: the title (file name, defect type) and ``score S / threshold T -> ANOMALOUS``;
* three captioned tiles: the input ``image`` | the ``heatmap`` over the image | the image with
  the ground-truth outline (green) and the predicted region (red outline: map > threshold), the
  rest dimmed (when nothing is above the threshold, its caption says so);
* under the heatmap, its colour bar from ``vmin`` to ``vmax`` with the threshold marked.

One colour scale for the whole run, so panels compare with each other: 0 .. 2 x threshold
(:func:`heat_scale`), so the threshold is the middle of the bar and a heatmap is blue where the
map is well below it and red where well above, whatever the run's range (a single outlier no
longer turns every other heatmap blue).
Panels are drawn with PIL (not matplotlib): a run writes hundreds of them, at ~10 ms each.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..metrics import above_threshold

# matplotlib and SciPy are imported where they are used: about 1 s of every start otherwise.
GREEN, RED = (0, 255, 0), (255, 0, 0)
VERDICT_COLOURS = {"ANOMALOUS": (200, 0, 0), "NORMAL": (0, 120, 0)}
MIN_PANEL_HEIGHT = 256  # smaller images are enlarged (nearest, integer factor) to at least this
MIN_TILE_WIDTH = 192  # and narrow ones (a 416 x 160 frame) to at least this wide: the words must fit
DIM = 0.4  # brightness kept outside the predicted region in the third tile


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@functools.cache
def jet_colours() -> np.ndarray:
    """``(256, 3)`` uint8: matplotlib's jet colour map."""
    return (pyplot().get_cmap("jet")(np.linspace(0, 1, 256))[:, :3] * 255).astype(np.uint8)


@functools.lru_cache(maxsize=8)
def font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """PIL's built-in font at ``size`` px (no font file needed); its fixed small bitmap font
    where Pillow is built without FreeType."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError, AttributeError):
        return ImageFont.load_default()


def font_size(tile_height: int) -> int:
    """Text height for tiles of this many pixels: legible at 256 px, not tiny on large panels."""
    return max(13, min(28, round(tile_height / 18)))


def text_width(text: str, face) -> int:
    return math.ceil(face.getlength(text))


def wrap(text: str, width: int, face) -> list[str]:
    """Greedy word wrap of ``text`` to lines at most ``width`` px wide (a long word stays whole)."""
    lines: list[str] = []
    for word in text.split():
        if lines and text_width(f"{lines[-1]} {word}", face) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


def shorten(text: str, width: int, face) -> str:
    """``text``, cut at the start with ``...`` to fit ``width`` px (a path's end says most)."""
    if text_width(text, face) <= width:
        return text
    while len(text) > 1 and text_width("..." + text, face) > width:
        text = text[1:]
    return "..." + text


def fmt(value: float) -> str:
    """A score or map value in 4 significant digits (scores range from 1e-3 to 1e3)."""
    return f"{value:.4g}"


def outline(mask: np.ndarray, width: int = 1, outer: bool = False) -> np.ndarray:
    """``(H, W)`` bool -> its ``width``-px border just inside (or, ``outer``, just outside), bool."""
    from scipy.ndimage import binary_dilation, binary_erosion

    if outer:
        return binary_dilation(mask, iterations=width) & ~mask
    return mask & ~binary_erosion(mask, iterations=width, border_value=0)


def colorize(heat: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """``(H, W)`` float -> ``(H, W, 3)`` uint8 jet colours on the run's fixed scale."""
    scaled = np.clip((heat - vmin) / max(vmax - vmin, 1e-12), 0, 1)
    return jet_colours()[(scaled * 255).astype(np.uint8)]


def has_threshold(threshold: float | None) -> bool:
    return threshold is not None and math.isfinite(threshold)


@dataclass(frozen=True)
class HeatScale:
    """A run's heatmap colour scale: map values ``low`` .. ``high`` (clipped beyond), and how it was chosen."""

    low: float
    high: float
    rule: str  # "0 .. 2 x threshold" or "the run's range"

    @property
    def caption(self) -> str:
        """The heatmap tile's caption."""
        if self.rule == THRESHOLD_SCALE:
            return f"heatmap (0 .. {fmt(self.high)} = 2 x threshold, clipped)"
        return f"heatmap ({fmt(self.low)} .. {fmt(self.high)}, the run's range)"

    def to_dict(self) -> dict:
        return {"heat_scale": asdict(self)}


THRESHOLD_SCALE = "0 .. 2 x threshold"


def heat_scale(maps: np.ndarray, threshold: float | None) -> HeatScale:
    """The colour scale of a run's ``maps`` ``(N, H, W)``: 0 .. 2 x ``threshold`` (the same for
    every image; the threshold in the middle), or the maps' range where there is no positive threshold."""
    if has_threshold(threshold) and threshold > 0:
        return HeatScale(0.0, 2.0 * float(threshold), THRESHOLD_SCALE)
    low, high = (float(maps.min()), float(maps.max())) if maps.size else (0.0, 1.0)
    return HeatScale(low, high, "the run's range")


def panel(image: np.ndarray, heat: np.ndarray, vmin: float, vmax: float, threshold: float | None,
          mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The three tiles, each ``(H, W, 3)`` uint8, from ``image`` (H, W, 3) uint8 and ``heat`` (H, W).

    The third tile keeps the predicted region (``heat > threshold``, red outline) at full
    brightness and dims the rest, so it never just repeats the image; the ground truth ``mask``
    (H, W) bool is outlined in green just outside it, so a prediction that matches it exactly
    shows both outlines side by side.
    """
    overlay = (0.5 * image + 0.5 * colorize(heat, vmin, vmax)).astype(np.uint8)
    predicted = above_threshold(heat, threshold) if has_threshold(threshold) else np.zeros(heat.shape, bool)
    marked = np.where(predicted[..., None], image, (DIM * image).astype(np.uint8))
    width = max(1, image.shape[0] // 300)  # 1 px up to 599 px, then thicker so it stays visible
    if mask is not None and mask.any():
        marked[outline(mask, width, outer=True)] = GREEN
    if predicted.any():
        marked[outline(predicted, width)] = RED
    return image, overlay, marked


def colour_bar(width: int, height: int) -> np.ndarray:
    """``(height, width, 3)`` uint8: the jet scale from left (vmin) to right (vmax)."""
    return np.broadcast_to(jet_colours()[np.linspace(0, 255, width).astype(np.intp)], (height, width, 3))


def header_lines(threshold: float | None, score: float | None, verdict: str | None, title: str | None,
                 label: str | None, width: int, face) -> list[tuple[str, tuple[int, int, int]]]:
    """The panel's header: what the picture is, then score / threshold -> verdict, with its colour."""
    thresholded = has_threshold(threshold)
    if verdict is None and score is not None and thresholded:
        verdict = "anomalous" if above_threshold(score, threshold) else "normal"
    header: list[tuple[str, tuple[int, int, int]]] = []
    if title:
        header.append((shorten(title, width, face), (0, 0, 0)))
    numbers = [f"score {fmt(score)}"] if score is not None else []
    numbers.append(f"threshold {fmt(threshold)}" if thresholded else "no threshold")
    text = " / ".join(numbers)
    if verdict:
        text += f" -> {verdict.upper()}"
    if label:
        text += f"   (truth: {label})"
    header.append((shorten(text, width, face), VERDICT_COLOURS.get((verdict or "").upper(), (0, 0, 0))))
    return header


def draw_scale_labels(draw: ImageDraw.ImageDraw, vmin: float, vmax: float, threshold: float | None, left: int,
                      tile_w: int, bar_top: int, bar_h: int, pointer: int, line: int, margin: int,
                      legend_left: int, face) -> None:
    """Colour bar labels: the run's scale ends, then the threshold's place on it (a pointer under
    the bar and its value, on the same line when it does not collide with the ends)."""
    right = left + tile_w
    below = bar_top + bar_h + pointer
    low, high = fmt(vmin), fmt(vmax)
    draw.text((left, below), low, fill=(0, 0, 0), font=face)
    draw.text((right - text_width(high, face), below), high, fill=(0, 0, 0), font=face)
    if not has_threshold(threshold):
        return
    fraction = (threshold - vmin) / (vmax - vmin) if vmax > vmin else 0.5
    x = left + round(min(max(fraction, 0.0), 1.0) * (tile_w - 1))
    draw.rectangle((x - 1, bar_top - 2, x + 1, bar_top + bar_h), fill=(0, 0, 0))
    draw.polygon([(x, bar_top + bar_h), (x - pointer + 1, below - 1), (x + pointer - 1, below - 1)], fill=(0, 0, 0))
    side = "" if 0 <= fraction <= 1 else (" (below the scale)" if fraction < 0 else " (above the scale)")
    text = f"threshold {fmt(threshold)}{side}"
    size = text_width(text, face)
    text_x = min(max(x - size // 2, left), right - size)
    pad = text_width("  ", face)
    clear = text_x >= left + text_width(low, face) + pad and text_x + size <= right - text_width(high, face) - pad
    draw.text((max(text_x, margin), below if clear else below + line), text, fill=(0, 0, 0), font=face)
    draw.text((legend_left, below), "red: heat > threshold", fill=(0, 0, 0), font=face)


def render_panel(image: np.ndarray, heat: np.ndarray, vmin: float, vmax: float, threshold: float | None,
                 mask: np.ndarray | None = None, *, score: float | None = None, verdict: str | None = None,
                 title: str | None = None, label: str | None = None, scale_caption: str | None = None) -> np.ndarray:
    """The annotated panel ``(H', W', 3)`` uint8 for ``image`` (H, W, 3) uint8 and ``heat`` (H, W).

    See :func:`save_panel` for the arguments.
    """
    scale = max(1, MIN_PANEL_HEIGHT // image.shape[0], -(-MIN_TILE_WIDTH // image.shape[1]))
    tiles = [t.repeat(scale, axis=0).repeat(scale, axis=1) if scale > 1 else t
             for t in panel(image, heat, vmin, vmax, threshold, mask)]
    tile_h, tile_w = tiles[0].shape[:2]
    face = font(font_size(min(tile_h, 2 * tile_w)))  # a tall, narrow tile: text sized by its width
    line = face.getbbox("Ag")[3] + 4  # one text line's height
    gap, margin = max(4, line // 3), max(6, line // 2)
    width = 3 * tile_w + 2 * gap + 2 * margin
    header = header_lines(threshold, score, verdict, title, label, width - 2 * margin, face)
    third = "ground truth (green) and prediction (red)" if mask is not None else "prediction (red)"
    thresholded = has_threshold(threshold)
    if not (thresholded and above_threshold(heat, threshold).any()):
        # Said above the tile, never over it: a box across the middle hid the defect it should show.
        third += ": none above the threshold" if thresholded else ": no threshold set"
    heat_caption = scale_caption or f"heatmap ({fmt(vmin)} .. {fmt(vmax)})"
    captions = [wrap(c, tile_w, face) for c in ("image", heat_caption, third)]
    caption_h = max(len(c) for c in captions) * line
    bar_h, pointer = max(8, line // 2), max(5, line // 3)
    footer_h = bar_h + pointer + 2 * line  # colour bar, threshold pointer, the min/max line, one spare
    top_tiles = margin + len(header) * line + gap + caption_h
    height = top_tiles + tile_h + gap + footer_h + margin

    canvas = np.full((height, width, 3), 255, np.uint8)
    lefts = [margin + i * (tile_w + gap) for i in range(3)]
    for left, tile in zip(lefts, tiles):
        canvas[top_tiles:top_tiles + tile_h, left:left + tile_w] = tile
    bar_top = top_tiles + tile_h + gap
    canvas[bar_top:bar_top + bar_h, lefts[1]:lefts[1] + tile_w] = colour_bar(tile_w, bar_h)
    picture = Image.fromarray(canvas)
    draw = ImageDraw.Draw(picture)
    y = margin
    for text, colour in header:
        draw.text((margin, y), text, fill=colour, font=face)
        y += line
    for left, lines in zip(lefts, captions):
        for i, text in enumerate(lines):
            draw.text((left, y + gap + i * line), text, fill=(0, 0, 0), font=face)
    draw_scale_labels(draw, vmin, vmax, threshold, lefts[1], tile_w, bar_top, bar_h, pointer, line, margin,
                      lefts[2], face)
    return np.asarray(picture)


def save_panel(path: Path, image: np.ndarray, heat: np.ndarray, vmin: float, vmax: float,
               threshold: float | None, mask: np.ndarray | None = None, *, score: float | None = None,
               verdict: str | None = None, title: str | None = None, label: str | None = None,
               scale_caption: str | None = None) -> None:
    """Write the annotated panel of one image to ``path`` (PNG).

    ``image`` (H, W, 3) uint8, ``heat`` (H, W) its anomaly map, ``vmin``/``vmax`` the run's colour
    scale, ``threshold`` the map value that marks the predicted region (``None`` or NaN: none),
    ``mask`` (H, W) bool the ground truth (``None``: unlabelled). Keyword-only: ``score`` (the
    image score), ``verdict`` (e.g. ``"anomalous"``; derived from ``score > threshold`` when
    omitted), ``title`` (e.g. the file name and defect type), ``label`` (the true class, e.g.
    ``"good"`` or ``"scratch"``), ``scale_caption`` (the heatmap's caption, e.g. :attr:`HeatScale.caption`).
    Small images are enlarged by an integer factor (nearest) to stay legible.
    """
    out = render_panel(image, heat, vmin, vmax, threshold, mask, score=score, verdict=verdict, title=title,
                       label=label, scale_caption=scale_caption)
    path.parent.mkdir(parents=True, exist_ok=True)
    # compress_level 1: 4x faster than the default 6 (18 vs 80 ms at 256 px) for 5% larger files.
    Image.fromarray(out).save(path, compress_level=1)


def save_roc(path: Path, curves: dict[str, tuple[np.ndarray, np.ndarray, float]], title: str) -> None:
    """``curves``: name -> (fpr, tpr, auc). Writes a PNG with one line per curve."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=100)
    for name, (fpr, tpr, auc) in curves.items():
        ax.plot(fpr, tpr, label=f"{name} (AUROC {auc:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title, xlim=(0, 1), ylim=(0, 1.01))
    if curves:  # a test set of one class has no curve to draw (the metrics say why)
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
