"""Pictures explain themselves: heatmap panels carry captions, a colour bar with the threshold,
the score and verdict; a normal image's third tile is not the image again; the anomaly
preview labels its rows."""

import inspect

import numpy as np
import pytest
from PIL import Image

from data import TrainSet
from scoring.outputs.pictures import VERDICT_COLOURS, colour_bar, font, panel, render_panel, save_panel, shorten, wrap
from training.preview import save_preview


def find(canvas: np.ndarray, patch: np.ndarray) -> list[tuple[int, int]]:
    """Top-left corners where ``patch`` (h, w, 3) appears exactly in ``canvas`` (H, W, 3)."""
    h, w = patch.shape[:2]
    hits = []
    for y in range(canvas.shape[0] - h + 1):
        row = canvas[y]
        for x in np.flatnonzero((row[: canvas.shape[1] - w + 1] == patch[0, 0]).all(axis=1)):
            if np.array_equal(canvas[y:y + h, x:x + w], patch):
                hits.append((y, int(x)))
    return hits


def sample(size=32, seed=0):
    """A textured image with a bright defect, its map (high on the defect) and the defect mask."""
    rng = np.random.default_rng(seed)
    image = rng.integers(60, 180, (size, size, 3)).astype(np.uint8)
    mask = np.zeros((size, size), bool)
    mask[size // 4:size // 2, size // 4:size // 2] = True
    image[mask] = 250
    heat = rng.random((size, size)) * 0.3 + mask * 0.6
    return image, heat, mask


def header(out: np.ndarray, image: np.ndarray) -> np.ndarray:
    """The rows of a rendered panel above its tiles (title, numbers, captions)."""
    (top, _), = find(out, enlarge(image, 256 // image.shape[0]))
    return out[:top]


def enlarge(tile, scale):
    return tile.repeat(scale, axis=0).repeat(scale, axis=1)


def test_positional_call_still_works_and_small_images_are_enlarged(tmp_path):
    image, heat, mask = sample(32)
    save_panel(tmp_path / "a" / "p.png", image, heat, 0.0, 1.0, 0.5, mask)  # the old call, unchanged
    saved = np.asarray(Image.open(tmp_path / "a" / "p.png").convert("RGB"))
    assert saved.shape[0] > 256
    assert len(find(saved, enlarge(image, 8))) == 1  # 32 px shown as 256 px, nearest
    assert "score" in inspect.signature(save_panel).parameters
    kinds = {name: p.kind for name, p in inspect.signature(save_panel).parameters.items()}
    assert all(kinds[k] == inspect.Parameter.KEYWORD_ONLY for k in ("score", "verdict", "title", "label"))


def test_normal_image_third_tile_says_no_region():
    image, _, _ = sample(64)
    heat = np.full((64, 64), 0.1)
    tiles = panel(image, heat, 0.0, 1.0, 0.5)
    assert not np.array_equal(tiles[2], tiles[0])  # dimmed, not a copy of the image
    out = render_panel(image, heat, 0.0, 1.0, 0.5, score=0.1)
    big_image, big_overlay = enlarge(image, 4), enlarge(tiles[1], 4)
    (y, x_image), = find(out, big_image)  # the image appears once: the third tile is not it again
    (_, x_heat), = find(out, big_overlay)
    third = out[y:y + 256, 2 * x_heat - x_image:][:, :256]
    # The dimmed image, with nothing drawn over it (the caption above says nothing is predicted).
    assert np.array_equal(third, enlarge(tiles[2], 4))
    caption = out[y - 40:y, 2 * x_heat - x_image:][:, :256]
    assert (caption < 128).all(axis=2).sum() > 50  # dark words above the tile
    assert not (third == (255, 0, 0)).all(axis=2).any()  # no red outline: nothing predicted


def test_a_narrow_frame_panel_keeps_its_words_inside():
    """416 x 160 (KolektorSDD's frame): the tiles are widened (integer factor) so the title, the
    captions and the legend fit; nothing is drawn past the panel's edge."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (416, 160, 3), dtype=np.uint8)
    heat = np.zeros((416, 160))
    heat[200:220, 70:90] = 1.0
    mask = heat > 0.5
    out = render_panel(image, heat, 0.0, 1.0, 0.5, mask, score=1.0, title="kos10_part5.png (crack)", label="crack")
    assert out.shape[1] >= 3 * 192  # each tile at least MIN_TILE_WIDTH wide
    assert (out[:, -4:] == 255).all() and (out[-4:] == 255).all()  # a white margin: no word cut at the edge


def test_outlines_ground_truth_and_prediction():
    image, heat, mask = sample(64)
    _, _, marked = panel(image, heat, 0.0, 1.0, 0.5, mask)
    green, red = (marked == (0, 255, 0)).all(axis=2), (marked == (255, 0, 0)).all(axis=2)
    predicted = heat >= 0.5
    assert np.array_equal(predicted, mask)  # a perfect prediction: both outlines still show
    assert green.any() and not (green & mask).any()  # ground truth: just outside the region
    assert red.any() and not (red & ~mask).any()  # prediction: just inside it
    inner = predicted & ~red
    assert np.array_equal(marked[inner], image[inner])  # the predicted region at full brightness
    away = ~predicted & ~green
    assert (marked[away].astype(int) < image[away].astype(int)).all()  # the rest dimmed


@pytest.mark.parametrize(("score", "shown", "absent"), [(0.9, "ANOMALOUS", "NORMAL"), (0.2, "NORMAL", "ANOMALOUS")])
def test_verdict_written_in_its_colour(score, shown, absent):
    image, heat, mask = sample(64)
    out = header(render_panel(image, heat, 0.0, 1.0, 0.5, mask, score=score, title="scratch/000.png (scratch)"),
                 image)
    assert (out == VERDICT_COLOURS[shown]).all(axis=2).sum() > 10
    assert not (out == VERDICT_COLOURS[absent]).all(axis=2).any()
    explicit = header(render_panel(image, heat, 0.0, 1.0, 0.5, mask, score=score, verdict=absent.lower()), image)
    assert (explicit == VERDICT_COLOURS[absent]).all(axis=2).sum() > 10
    plain = header(render_panel(image, heat, 0.0, 1.0, 0.5, mask), image)
    assert not any((plain == c).all(axis=2).any() for c in VERDICT_COLOURS.values())
    assert out.shape[0] > plain.shape[0]  # the title line


@pytest.mark.parametrize("threshold", [0.25, 0.75])
def test_colour_bar_with_threshold_marker(threshold):
    image, heat, mask = sample(64)
    out = render_panel(image, heat, 0.0, 1.0, threshold, mask, score=0.9)
    (_, x_heat), = find(out, enlarge(panel(image, heat, 0.0, 1.0, threshold, mask)[1], 4))
    bar = colour_bar(256, 1)[0]
    marker = x_heat + round(threshold * 255)
    rows = []
    for y in range(out.shape[0]):
        segment = out[y, x_heat:x_heat + 256]
        keep = np.ones(256, bool)
        keep[marker - x_heat - 1:marker - x_heat + 2] = False
        if np.array_equal(segment[keep], bar[keep]):
            rows.append(y)
            assert (segment[~keep] == 0).all()  # the threshold's black mark at its place on the scale
    assert len(rows) >= 8


def test_no_threshold_draws_no_region():
    image, heat, mask = sample(64)
    _, _, marked = panel(image, heat, 0.0, 1.0, None, mask)
    assert not (marked == (255, 0, 0)).all(axis=2).any()
    out = header(render_panel(image, heat, 0.0, 1.0, float("nan"), None, score=0.9), image)
    assert not any((out == c).all(axis=2).any() for c in VERDICT_COLOURS.values())  # no verdict without one


def test_text_helpers():
    face = font(14)
    assert shorten("short.png", 500, face) == "short.png"
    cut = shorten("a/very/long/folder/name/" * 10 + "000.png", 150, face)
    assert cut.startswith("...") and cut.endswith("000.png") and face.getlength(cut) <= 150
    lines = wrap("ground truth (green) and prediction (red)", 200, face)
    assert len(lines) == 2 and " ".join(lines) == "ground truth (green) and prediction (red)"


def test_preview_rows_labelled(tiny_root, tmp_path):
    dataset = TrainSet(tiny_root, "widget", 32, ["cutpaste", "perlin", "scar"])
    path = save_preview(dataset, tmp_path / "anomaly_preview.png", columns=4)
    assert list(inspect.signature(save_preview).parameters) == ["dataset", "path", "columns", "seed"]
    grid = np.asarray(Image.open(path).convert("RGB"))
    first = enlarge((dataset.image(0).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8), 3)
    (top, left), = find(grid, first)  # 32 px tiles enlarged to 96
    assert left > 40 and top > 10  # room for the row labels and the title
    assert (grid[:top - 2] < 100).all(axis=2).sum() > 50  # title text
    labels = [grid[top + r * 98:top + r * 98 + 96, :left - 2] for r in range(4)]
    dark = [(band < 100).all(axis=2) for band in labels]
    assert all(d.sum() > 20 for d in dark)  # "normal", "cutpaste", "perlin", "scar"
    assert len({d.tobytes() for d in dark}) == 4
