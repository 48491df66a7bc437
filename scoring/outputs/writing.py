"""Writing what a scoring run found: CSV / NPZ / PNG files, tables, and the console line.

Inputs are the result objects of :mod:`scoring.pipeline.evaluation`; every file is written atomically
(:mod:`scoring.outputs.report`) into the run's output folder (:mod:`scoring.outputs.folders`).
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from tqdm import tqdm

from common import fileio
from data import TestSet

from .. import metrics
from ..pipeline.evaluation import FolderResult, TestSetResult
from .pictures import heat_scale, save_panel, save_roc
from .report import write_csv, write_json, write_table

METRIC_COLUMNS = [("image_auroc", "image AUROC"), ("pixel_auroc", "pixel AUROC"), ("aupro", "AUPRO"),
                  ("image_f1_max", "image F1-max"), ("pixel_ap", "pixel AP")]


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    """``np.savez_compressed`` through :func:`common.fileio.atomic_write` (a reader never sees half a file)."""
    fileio.atomic_write(path, lambda handle: np.savez_compressed(handle, **arrays))


def format_metric(value: float | None, digits: int = 4) -> str:
    """A metric for tables and the console: ``n/a`` when it could not be computed."""
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def image_uint8(image: torch.Tensor) -> np.ndarray:
    """``(3, S, S)`` float in [0, 1] -> ``(S, S, 3)`` uint8."""
    return (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def panel_files(images: list[str]) -> list[str]:
    """The panel file of each image, from its path relative to ``heatmaps/`` (``scratch/a.jpg`` ->
    ``scratch/a.png``): one extension. Images of one folder that share a stem (``a.png``,
    ``a.jpg``) keep theirs in the name (``a_png.png``, ``a_jpg.png``), whatever the order."""
    paths = [PurePosixPath(Path(image).as_posix()) for image in images]
    stems = Counter((p.parent, p.stem) for p in paths)
    names = [p.parent / (p.stem + ".png" if stems[p.parent, p.stem] == 1 else f"{p.stem}_{p.suffix[1:]}.png")
             for p in paths]
    taken, holders = set(names), defaultdict(list)
    for i, name in enumerate(names):
        holders[name].append(i)
    for name, indices in sorted(holders.items()):
        # ``a_png.jpg`` beside ``a.png`` + ``a.jpg``: a number settles what the rule above cannot,
        # given in the order of the images' paths (so it too does not depend on the listing's order).
        clash = sorted(indices, key=lambda i: paths[i].as_posix())
        number = 2
        for i in clash[1:]:
            while name.with_name(f"{name.stem}-{number}.png") in taken:
                number += 1
            names[i] = name.with_name(f"{name.stem}-{number}.png")
            taken.add(names[i])
    return [name.as_posix() for name in names]


def verdict(score: float, threshold: float | None) -> str | None:
    if threshold is None or not np.isfinite(threshold):
        return None
    return "anomalous" if metrics.above_threshold(score, threshold) else "normal"


def panel_text(path: str, score: float, threshold: float | None, label: str | None = None) -> dict:
    """The words a heatmap panel carries: file (and label), score, threshold, verdict."""
    return {"score": score, "verdict": verdict(score, threshold), "title": Path(path).name, "label": label}


def save_test_pictures(out_dir: Path, dataset: TestSet, result: TestSetResult, threshold: float | None,
                       title: str, panels: list[str]) -> dict:
    """A panel per test image (``panels``: their paths below ``heatmaps/``) on the run's colour scale
    and the ROC curves; returns the scale (``pictures`` of ``results.json``)."""
    maps = result.maps
    scale = heat_scale(maps, threshold)
    for i, path in enumerate(tqdm(result.paths, desc=f"{title}: pictures", unit="img", leave=False)):
        save_panel(out_dir / "heatmaps" / panels[i], image_uint8(dataset[i]["image"]), maps[i], scale.low,
                   scale.high, threshold, result.masks[i], scale_caption=scale.caption,
                   **panel_text(path, float(result.scores[i]), threshold, label=result.defects[i]))
    curves = {}
    if result.metrics["image_auroc"] is not None:
        curves["image"] = (*metrics.roc_points(result.labels, result.scores), result.metrics["image_auroc"])
    if result.metrics["pixel_auroc"] is not None:
        curves["pixel"] = (*metrics.roc_points(result.masks.reshape(-1), maps.reshape(-1)),
                           result.metrics["pixel_auroc"])
    save_roc(out_dir / "roc.png", curves, title)
    return scale.to_dict()


def heatmap_column(out_dir: Path, panels: list[str], pictures: bool) -> tuple[list[str], str | None]:
    """Each image's heatmap file below ``out_dir`` (``""``: none) and the heatmaps folder (``None``:
    none). A run without pictures names the panels an earlier run of the same identity left in its
    folder (:mod:`.folders` keeps them: the same scores and maps), so its tables still lead to them."""
    heatmaps = out_dir / "heatmaps"
    column = [f"heatmaps/{panel}" if pictures or (heatmaps / panel).is_file() else "" for panel in panels]
    return column, str(heatmaps) if pictures or any(column) else None


def write_test_set(out_dir: Path, result: TestSetResult, dataset: TestSet, threshold: float | None, title: str,
                   save_maps: bool, pictures: bool) -> dict:
    """``image_scores.csv`` (and ``maps.npz``, the heatmaps and ``roc.png``); returns ``{kind: path}``
    (and the pictures' colour scale under ``pictures``)."""
    if save_maps:
        save_npz(out_dir / "maps.npz", maps=result.maps.astype(np.float32), masks=result.masks.astype(np.uint8),
                 labels=result.labels.astype(np.int64), scores=result.scores.astype(np.float32),
                 paths=np.array(result.paths), defects=np.array(result.defects))
    panels = panel_files([f"{defect}/{Path(path).name}" for path, defect in zip(result.paths, result.defects)])
    column, heatmaps = heatmap_column(out_dir, panels, pictures)
    write_csv(out_dir / "image_scores.csv", ["path", "defect", "label", "score", "heatmap"],
              [[path, defect, int(label), f"{score:.9g}", heatmap]
               for path, defect, label, score, heatmap in zip(result.paths, result.defects, result.labels,
                                                              result.scores, column)])
    files = {"heatmaps": heatmaps,
             "roc": str(out_dir / "roc.png") if pictures or (out_dir / "roc.png").is_file() else None,
             "maps": str(out_dir / "maps.npz") if save_maps else None,
             "image_scores": str(out_dir / "image_scores.csv")}
    if pictures:
        files["pictures"] = save_test_pictures(out_dir, dataset, result, threshold, title, panels)
    return files


def write_folder(out_dir: Path, result: FolderResult, folder: Path, threshold: float,
                 save_maps: bool, pictures: bool) -> dict:
    """``scores.csv`` with verdicts (and ``maps.npz``, the heatmaps); returns ``{kind: path}`` (and
    the pictures' colour scale under ``pictures``)."""
    scores = result.scores.tolist()
    panels = panel_files([Path(path).relative_to(folder).as_posix() for path in result.paths])
    column, heatmaps = heatmap_column(out_dir, panels, pictures)
    # Raw scores are distances whose scale differs from model to model; divided by the threshold,
    # 1.0 is the decision boundary on every model.
    write_csv(out_dir / "scores.csv", ["path", "score", "normalized_score", "verdict", "heatmap"],
              [[path, f"{score:.9g}", f"{score / threshold:.6f}", verdict(score, threshold), heatmap]
               for path, score, heatmap in zip(result.paths, scores, column)])
    if save_maps:
        save_npz(out_dir / "maps.npz", maps=result.maps.astype(np.float32), scores=result.scores,
                 paths=np.array(result.paths))
    files = {"scores": str(out_dir / "scores.csv"), "heatmaps": heatmaps}
    if pictures:
        scale = heat_scale(result.maps, threshold)
        for i, path in enumerate(tqdm(result.paths, desc="images: pictures", unit="img", leave=False)):
            image = image_uint8(result.dataset[result.index[path]]["image"])
            save_panel(out_dir / "heatmaps" / panels[i], image, result.maps[i], scale.low, scale.high, threshold,
                       scale_caption=scale.caption, **panel_text(path, float(scores[i]), threshold))
        files["pictures"] = scale.to_dict()
    return files


def write_run_table(out_dir: Path, record: dict) -> None:
    row = [record["category"], record["fusion"]] + [format_metric(record["metrics"][k]) for k, _ in METRIC_COLUMNS]
    write_table(out_dir / "results", ["category", "fusion"] + [name for _, name in METRIC_COLUMNS], [row])


def metric_means(records: list[dict]) -> dict[str, float | None]:
    """Each metric's mean over the categories where it exists (``None`` where none has it)."""
    means = {}
    for key, _ in METRIC_COLUMNS:
        values = [r["metrics"][key] for r in records if r["metrics"].get(key) is not None]
        means[key] = float(np.mean(values)) if values else None
    return means


def write_summary(base: Path, records: list[dict], fusion: str) -> Path:
    """Per-category table with the mean row (over the categories where a metric exists), as
    ``base.md``, ``base.csv`` and ``base.json``."""
    header = ["category"] + [name for _, name in METRIC_COLUMNS] + ["s / test image"]
    rows = []
    for r in records:
        rows.append([r["category"]] + [format_metric(r["metrics"][k]) for k, _ in METRIC_COLUMNS]
                    + [f"{r['timings']['s_per_test_image']:.3f}"])
    means = metric_means(records)
    rows.append(["**mean**"] + [format_metric(means[k]) for k, _ in METRIC_COLUMNS]
                + [f"{np.mean([r['timings']['s_per_test_image'] for r in records]):.3f}"])
    write_table(base, header, rows)
    write_json(base.with_suffix(".json"), {"fusion": fusion, "categories": [
        {"category": r["category"], **r["metrics"], "results": os.path.join(r["out_dir"], "results.json")}
        for r in records], "mean": means})
    return base.with_suffix(".md")


def format_record(record: dict) -> str:
    """One console line for a scored category: its metrics (or verdict counts), timing and folder."""
    head = f"{record['category']} [{record['fusion']}]"
    if "metrics" in record:
        m = {k: format_metric(v) for k, v in record["metrics"].items()}
        body = (f"image AUROC {m['image_auroc']} | pixel AUROC {m['pixel_auroc']} | "
                f"AUPRO {m['aupro']} | F1-max {m['image_f1_max']} | pixel AP {m['pixel_ap']}")
    else:
        scored = record["images"]["scored"]
        body = (f"{scored} image{'' if scored == 1 else 's'} scored, {record['images']['anomalous']} anomalous "
                f"(threshold {record['threshold']['value']:.4f} = normalised score 1.0), "
                f"{len(record['images']['skipped'])} skipped")
    if "synthetic_check" in record:
        c = record["synthetic_check"]
        body += (f" | synthetic check: image AUROC {format_metric(c['image_auroc'])}, pixel AUROC "
                 f"{format_metric(c['pixel_auroc'])}, AUPRO {format_metric(c['aupro'])}")
    search = record.get("search", {})
    if search.get("bank") in ("certified", "uncertified", "coreset only"):
        body += (f" | coreset ({search['bank']}): {search['certified_images']}/{search['images']} scores certified "
                 f"exact, {search['re_searched_per_image_mean']:.0f} patches re-searched per image (max "
                 f"{search['re_searched_per_image_max']})")
    # The detector's build: its banks (or the cached ones) and what the cache did not hold (a calibration).
    timing = (f"detector {record['timings']['bank_s']:.1f}s{' (banks cached)' if record['bank']['cached'] else ''}, "
              f"{record['timings']['s_per_test_image'] * 1000:.0f} ms/image")
    detector = record.get("files", {}).get("detector")
    return f"{head} {body} | {timing} -> {record['out_dir']}" + (f" | detector -> {detector}" if detector else "")
