"""The results page (``index.html`` of a scoring run) in a real browser, its files, and the heat scale.

The page is loaded from the file system in headless Chromium (``tests/browser.py``): it must list
every image, give for any threshold the counts that the run's CSV implies under the one rule
(``score > threshold``), step through the images, log no error and ask for nothing outside its
folder. Skipped, with the reason, only where Chromium or Playwright cannot be installed.
"""

from __future__ import annotations

import csv
import json
import shlex
from pathlib import Path

import numpy as np
import pytest
from browser import chromium, unavailable
from test_scoring_cli import infer

from scoring.outputs.page import rerun_command, write_page
from scoring.outputs.pictures import THRESHOLD_SCALE, colorize, heat_scale, jet_colours
from scoring.outputs.writing import panel_files

needs_browser = pytest.mark.skipif(unavailable() is not None, reason=f"browser test: {unavailable()}")


def csv_rows(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def open_page(page, page_file: Path) -> dict:
    """Load ``page_file`` in ``page``; returns the lists its console errors and requests go to."""
    seen = {"errors": [], "requests": []}
    page.on("console", lambda m: m.type in ("error", "warning") and seen["errors"].append(m.text))
    page.on("pageerror", lambda e: seen["errors"].append(str(e)))
    page.on("request", lambda r: seen["requests"].append(r.url))
    page.goto(page_file.resolve().as_uri())
    page.wait_for_load_state("load")
    return seen


def set_threshold(page, value: float) -> None:
    page.fill("#threshold-value", repr(float(value)))  # the shortest repr: JavaScript reads the same double


def count(page, element: str) -> int:
    return int(page.inner_text(f"#{element}"))


def table_order(page) -> list[int]:
    return [int(i) for i in page.eval_on_selector_all("#images tbody tr", "rows => rows.map(r => r.dataset.index)")]


def check_clean(seen: dict, folder: Path) -> None:
    assert seen["errors"] == []
    inside = folder.resolve().as_uri() + "/"
    assert seen["requests"] and all(url.startswith(inside) for url in seen["requests"]), seen["requests"]


@pytest.fixture(scope="module")
def test_set_run(tiny_root, trained, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("page") / "run"
    run = infer("inference_concatenation.py", tiny_root, trained, out, "--c", "widget", "--p", "widget-wave18")
    assert run.returncode == 0, run.stderr[-2000:]
    return out


@needs_browser
def test_the_page_of_a_test_set_counts_what_image_scores_csv_says(test_set_run):
    rows = csv_rows(test_set_run / "image_scores.csv")
    scores = np.array([float(r["score"]) for r in rows])
    labels = np.array([int(r["label"]) for r in rows])
    record = json.loads((test_set_run / "results.json").read_text())
    assert record["files"]["page"] == str(test_set_run / "index.html")
    with chromium() as page:
        seen = open_page(page, test_set_run / "index.html")
        assert page.locator("#images tbody tr").count() == len(rows) == 6
        shown = page.eval_on_selector_all("#images tbody tr",
                                          "rows => rows.map(r => [r.dataset.index, r.cells[3].textContent])")
        for index, text in shown:  # 4 significant digits of the CSV's score (2569.98 -> 2570, not 257)
            assert float(text) == pytest.approx(scores[int(index) - 1], rel=6e-4)
        assert page.evaluate("() => [fmt(2569.98), fmt(1000), fmt(0.25), fmt(1.5e-7)]") == ["2570", "1000", "0.25",
                                                                                             "1.5e-7"]
        # Starts at the run's threshold; a tie sits on the normal side (score > t).
        assert float(page.input_value("#threshold-value")) == pytest.approx(record["threshold"]["value"])
        for value in [record["threshold"]["value"], float(np.median(scores)), float(scores[3]), float(scores.min()) - 1,
                      float(scores.max()) + 1]:
            set_threshold(page, value)
            above = scores > value
            assert count(page, "count-above") == above.sum() and count(page, "count-below") == (~above).sum()
            verdicts = page.eval_on_selector_all("#images tbody tr", "rows => rows.map(r => [r.dataset.index, "
                                                 "r.cells[r.cells.length - 1].textContent])")
            assert {int(i): v.split()[0] for i, v in verdicts} == {
                i + 1: "anomalous" if is_above else "normal" for i, is_above in enumerate(above)}
            assert count(page, "tp") == (above & (labels == 1)).sum()
            assert count(page, "fp") == (above & (labels == 0)).sum()
            assert count(page, "fn") == (~above & (labels == 1)).sum()
            command = page.inner_text("#threshold-snippet").split()
            assert command[:2] == ["python", "inference_concatenation.py"]
            assert float(command[command.index("--threshold") + 1]) == value
            # "wrong only" keeps exactly the images the threshold decides wrongly.
            page.check("#filter-wrong")
            assert page.locator("#images tbody tr").count() == (above != (labels == 1)).sum()
            page.uncheck("#filter-wrong")
        # The slider's value is the threshold; its arrow keys step from one verdict change to the next.
        for value in (float(np.median(scores)), float(scores.max()) - 1e-3):
            page.eval_on_selector("#threshold-range",
                                  "(el, v) => { el.value = v; el.dispatchEvent(new Event('input')); }", value)
            assert float(page.input_value("#threshold-value")) == pytest.approx(value, rel=1e-12)
            assert count(page, "count-above") == (scores > value).sum()
        distinct = np.unique(scores)
        page.focus("#threshold-range")
        for _ in range(len(distinct) + 1):
            page.keyboard.press("ArrowLeft")
        assert count(page, "count-above") == len(scores)
        for position in range(1, len(distinct) + 1):
            page.keyboard.press("ArrowRight")
            value = float(page.input_value("#threshold-value"))
            assert count(page, "count-above") == (scores > value).sum() == len(distinct) - position
        # A filter that leaves no image leaves no picture either.
        page.fill("#filter-text", "no such name")
        assert page.locator("#images tbody tr").count() == 0 and page.get_attribute("#viewer-img", "src") is None
        assert "no image" in page.inner_text("#viewer-title")
        check_clean(seen, test_set_run)


@needs_browser
def test_stepping_through_the_table_changes_the_large_picture(test_set_run):
    rows = csv_rows(test_set_run / "image_scores.csv")
    with chromium() as page:
        seen = open_page(page, test_set_run / "index.html")
        order = table_order(page)  # by score, highest first
        scores = [float(rows[i - 1]["score"]) for i in order]
        assert scores == sorted(scores, reverse=True)
        shown = []
        for _ in order:
            shown.append(page.get_attribute("#viewer-img", "src"))
            page.wait_for_function("() => document.getElementById('viewer-img').naturalWidth > 0")
            page.keyboard.press("j")
        assert shown == [rows[i - 1]["heatmap"] for i in order] and len(set(shown)) == len(order)
        page.keyboard.press("ArrowUp")
        assert page.get_attribute("#viewer-img", "src") == rows[order[-2] - 1]["heatmap"]
        page.click('#images th[data-key="file"]')  # sorted by name: the order the keys follow now
        names = [f"{r['defect']}/{Path(r['path']).name}" for r in rows]
        order = table_order(page)
        assert [names[i - 1] for i in order] == sorted(names)
        page.keyboard.press("j")
        assert page.get_attribute("#viewer-img", "src") == rows[order[1] - 1]["heatmap"]
        page.select_option("#filter-defect", "good")
        assert page.locator("#images tbody tr").count() == sum(r["defect"] == "good" for r in rows)
        check_clean(seen, test_set_run)


@needs_browser
def test_the_page_of_new_images_counts_what_scores_csv_says(tiny_root, trained, tmp_path):
    folder = tmp_path / "new"
    folder.mkdir()
    for p, name in zip(sorted((tiny_root / "widget" / "test").rglob("*.png")),
                       ["a.png", "s #2.png", "p%41.png", "q?.png", "<b>&.png", "part 7, left.png"]):
        (folder / name).write_bytes(p.read_bytes())  # names a URL or HTML would misread
    out = tmp_path / "out"
    run = infer("inference_multiplication.py", tiny_root, trained, out, "--c", "widget", "--p", "widget-wave18",
                "--images", str(folder))
    assert run.returncode == 0, run.stderr[-2000:]
    rows = csv_rows(out / "scores.csv")
    scores = np.array([float(r["score"]) for r in rows])
    with chromium() as page:
        seen = open_page(page, out / "index.html")
        assert page.locator("#images tbody tr").count() == len(rows) == 6
        assert count(page, "count-above") == sum(r["verdict"] == "anomalous" for r in rows)
        for value in (float(np.median(scores)), float(scores[0])):
            set_threshold(page, value)
            assert count(page, "count-above") == (scores > value).sum()
        assert page.locator("#filter-wrong").is_hidden()
        for _ in rows:  # every picture loads, whatever its name
            page.wait_for_function("() => document.getElementById('viewer-img').naturalWidth > 0")
            page.keyboard.press("j")
        files = page.eval_on_selector_all("#images td.file", "cells => cells.map(c => c.textContent)")
        assert sorted(files) == sorted(Path(r["path"]).name for r in rows)  # as text, "<b>&.png" among them
        check_clean(seen, out)


def test_a_run_without_pictures_writes_no_page_and_all_categories_get_a_summary_page(tiny_root, trained, tmp_path):
    run = infer("inference_concatenation.py", tiny_root, trained, tmp_path / "quiet", "--c", "widget", "--p",
                "widget-wave18", "--no-pictures")
    assert run.returncode == 0, run.stderr[-2000:]
    assert not (tmp_path / "quiet" / "index.html").exists()
    assert "page" not in json.loads((tmp_path / "quiet" / "results.json").read_text())["files"]
    run = infer("inference_concatenation.py", tiny_root, trained, tmp_path / "all", "--c", "all")
    assert run.returncode == 0, run.stderr[-2000:]
    summary = (tmp_path / "all" / "summary-concatenation.html").read_text()
    for category in ("widget", "gizmo"):
        assert f'href="{category}/index.html"' in summary and (tmp_path / "all" / category / "index.html").is_file()
        # Each page's command scores its own category again, into a new folder (not --c all, not --out).
        command = rerun_command(json.loads((tmp_path / "all" / category / "results.json").read_text()))
        words = shlex.split(command)
        assert words[words.index("--c") + 1] == category and "--out" not in words and "all" not in words
    assert "<th>mean</th>" in summary


def test_heat_is_scaled_around_the_threshold_the_same_for_every_image(test_set_run):
    record = json.loads((test_set_run / "results.json").read_text())
    threshold = record["threshold"]["value"]
    assert record["pictures"]["heat_scale"] == {"low": 0.0, "high": 2 * threshold, "rule": THRESHOLD_SCALE}
    scale = heat_scale(np.array([[[0.1, 40.0]]]), threshold)
    assert (scale.low, scale.high) == (0.0, 2 * threshold) and "2 x threshold" in scale.caption
    # The threshold is the middle colour; far above it is clipped to the top.
    values = np.array([[threshold, 50 * threshold, 0.0]])
    assert (colorize(values, scale.low, scale.high)[0] == jet_colours()[[127, 255, 0]]).all()
    # No threshold (one class, no --threshold): the run's range, said so.
    assert heat_scale(np.array([[[0.5, 2.0]]]), None).caption.endswith("the run's range)")


def test_panel_files_have_one_extension_and_never_collide():
    images = ["good/a.png", "good/a.jpg", "good/b.tif", "crack/a.png", "good/a_png.jpg", "c.bmp"]
    names = panel_files(images)
    assert names == ["good/a_png.png", "good/a_jpg.png", "good/b.png", "crack/a.png", "good/a_png-2.png", "c.png"]
    assert panel_files(images[::-1])[::-1] == names  # the names do not depend on the listing's order


@needs_browser
def test_a_large_run_draws_rows_in_pages_and_counts_them_all(test_set_run, tmp_path):
    """1,200 images (the run's record, a made-up CSV): 500 rows drawn at a time, counts over all."""
    rng = np.random.default_rng(0)
    labels = (rng.random(1200) < 0.3).astype(int)
    scores = rng.normal(5 + 3 * labels, 2).astype(np.float32)
    with (tmp_path / "image_scores.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "defect", "label", "score", "heatmap"])
        for i, (label, score) in enumerate(zip(labels, scores)):
            defect = "scratch" if label else "good"
            writer.writerow([f"/data/{defect}/{i}.png", defect, label, f"{score:.9g}", ""])
    write_page(tmp_path, json.loads((test_set_run / "results.json").read_text()))
    csv_scores = np.array([float(r["score"]) for r in csv_rows(tmp_path / "image_scores.csv")])
    with chromium() as page:
        open_page(page, tmp_path / "index.html")
        assert page.locator("#images tbody tr[data-index]").count() == 500
        set_threshold(page, 6.0)
        assert count(page, "count-above") == (csv_scores > 6.0).sum()
        assert count(page, "tp") == ((csv_scores > 6.0) & (labels == 1)).sum()
        page.click("#more")
        assert page.locator("#images tbody tr[data-index]").count() == 1000
        page.click('#images th[data-key="index"]')  # back to one page, in file order
        page.click("#images tbody tr[data-index='1']")
        for _ in range(700):  # stepping past the drawn rows draws them
            page.keyboard.press("j")
        assert page.inner_text("#viewer-pos").startswith("701 /")
        assert page.locator("#images tbody tr.selected").get_attribute("data-index") == "701"
