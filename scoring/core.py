"""Stage 2, the one scoring core behind both inference scripts.

For a category: load the checkpoint, build (or reuse) the memory bank from the normal training
images, score the labelled test set (metrics, pictures, ``results.json``) or a folder of new
images (``scores.csv`` with verdicts from a threshold calibrated on training images only).
The scoring itself is :class:`scoring.Detector`'s; this module adds the cache, the files and
the metrics. Settings come as a :class:`ScoreConfig`, paths and outputs as a :class:`ScoringRun`.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import models
from data import IMAGE_SUFFIXES, TestSet, train_images
from errors import UserError
from models.checkpoint import save_atomic
from runtime import resolve_workers

from . import dense, metrics
from .config import ScoreConfig
from .detector import FORMAT as DETECTOR_FORMAT
from .detector import (
    Detector,
    calibration,
    features_of,
    files_digest,
    fit_scorer,
    given_threshold,
    load_network,
    make_bank,
    provenance,
    resolve_config,
)
from .features import ImageFiles
from .fusion import Scorer
from .output import output_dir
from .pictures import save_panel, save_roc
from .report import environment, write_csv, write_json, write_table
from .synthetic_check import CHECK_AUGS, synthetic_check

# 3: training files keyed by content; 4: banks stored as MemoryBank state dicts; 5: thresholds (and map
# normalisations) kept per scoring settings ("calibrations"), not one per bank.
BANK_FORMAT = 5
CHECKPOINT_NAMES = ("model.pt", "e1600_model.pt")


@dataclass(frozen=True)
class ScoringRun:
    """What a scoring run reads and writes (everything that is not a scoring setting)."""

    data_root: str = "./mvtec_anomaly_detection"
    ckpt_dir: str = "ckpt"
    p: str | None = None  # checkpoint file or run folder; '{category}' is replaced
    arch: str | None = None  # expected arch (None: whatever the checkpoint holds)
    wavelet: str | None = None  # for checkpoints that do not record one
    images: str | None = None  # score this folder of unlabeled images instead of the test set
    out: str | None = None  # explicit output folder (None: versioned results/<p>/<fusion>/v<N>)
    overwrite: bool = False
    save_maps: bool = False
    pictures: bool = True
    synthetic_check: bool = False
    check_kinds: tuple[str, ...] = CHECK_AUGS  # the synthetic check's anomaly makers
    rebuild_bank: bool = False
    save_detector: str | None = None  # write the detector file here ('' = ckpt/<p>/detector.pt)
    command: str = ""  # the command line, for results.json


def default_run(ckpt_dir: str | Path, category: str, arch: str | None) -> str:
    """The run folder when ``--p`` is not given: ``<category>-<arch>`` with ``--arch``, else the one
    run of ``category`` under ``ckpt_dir`` (whatever its arch; the paper's wave50 when there is none)."""
    if arch is not None:
        return f"{category}-{arch}"
    found = [f"{category}-{name}" for name in models.list_models()
             if any((Path(ckpt_dir) / f"{category}-{name}" / ckpt).is_file() for ckpt in CHECKPOINT_NAMES)]
    if len(found) > 1:
        raise UserError(f"{ckpt_dir}/ holds {len(found)} trained runs of {category} ({', '.join(found)}); "
                        f"choose one with --p, e.g. --p {found[0]}")
    return found[0] if found else f"{category}-wave50"


def resolve_checkpoint(run: ScoringRun, category: str) -> Path:
    """``--p``: a file, or a folder under ``--ckpt-dir`` holding model.pt / e1600_model.pt."""
    name = run.p or default_run(run.ckpt_dir, category, run.arch)
    name = name.replace("{category}", category)
    direct = Path(name)
    if direct.is_file():
        return direct
    # A sub-folder of --ckpt-dir (the paper's form), or a folder path given directly.
    folder = Path(run.ckpt_dir) / name
    if not folder.is_dir() and direct.is_dir():
        folder = direct
    for candidate in CHECKPOINT_NAMES:
        if (folder / candidate).is_file():
            return folder / candidate
    if folder.is_dir():
        found = sorted(folder.glob("*.pt"))
        if len(found) == 1:
            return found[0]
    # Let read_checkpoint phrase the error with what the checkpoint folder holds.
    return folder / CHECKPOINT_NAMES[0] if folder.is_dir() else Path(run.ckpt_dir) / name / CHECKPOINT_NAMES[0]


def run_name(ckpt_path: Path) -> str:
    """Name of a checkpoint's results folder: its run folder's name, plus the file's stem when the
    file is not a default name (``ckpt/zipper-wave50/e800.pt`` -> ``zipper-wave50-e800``)."""
    folder = Path(os.path.abspath(ckpt_path)).parent.name or "checkpoint"
    return folder if ckpt_path.name in CHECKPOINT_NAMES else f"{folder}-{ckpt_path.stem}"


def bank_settings(config: ScoreConfig, ckpt_sha: str, train_digest: str) -> dict:
    """Everything the bank depends on; any change makes a new cache entry. Training files count
    by name and content (``train_digest``: :func:`scoring.detector.files_digest`)."""
    return {"format": BANK_FORMAT, "checkpoint_sha256": ckpt_sha, **config.subset("bank"),
            "train_files": train_digest}


def bank_cache_path(ckpt_path: Path, settings: dict) -> Path:
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    return ckpt_path.parent / "banks" / f"{settings['fusion']}-{key}.pt"


def load_or_build_detector(config: ScoreConfig, run: ScoringRun, model: torch.nn.Module, info: dict,
                           ckpt_path: Path, category: str, device: torch.device,
                           need_threshold: bool) -> tuple[Detector, bool, float]:
    """The category's detector, its banks (and calibrated threshold) from the cache when they are
    there for these settings, else built from the training images and cached."""
    paths = train_images(run.data_root, category)
    # Hashed once here, for the cache key and the detector's provenance.
    train_digest = files_digest(paths)
    settings = bank_settings(config, info["sha256"], train_digest)
    cache = bank_cache_path(ckpt_path, settings)
    start = time.perf_counter()
    entry = None
    if cache.is_file() and not run.rebuild_bank:
        try:
            entry = torch.load(cache, map_location="cpu", weights_only=True)
        except Exception:  # a damaged cache is rebuilt, never trusted
            entry = None
        if not isinstance(entry, dict) or entry.get("settings") != settings:
            entry = None
    cached = entry is not None
    # Thresholds and map normalisations depend on the scoring settings too (k, smoothing, map source, ...).
    calibrations = entry.setdefault("calibrations", {}) if entry is not None else {}
    score_key = json.dumps({k: v for k, v in config.subset("score").items() if k != "threshold"}, sort_keys=True)
    known = calibrations.get(score_key, {})
    need_norm = dense.uses_head(config.map_source)
    if entry is None or (need_threshold and "threshold" not in known) or (need_norm and "map_norm" not in known):
        train_feats, _ = features_of(model, ImageFiles(paths, config.size, config.antialias), config, device,
                                     f"{category}: train features", workers=config_workers(config, device))
        if entry is None:
            scorer = fit_scorer(config, train_feats, device)
            entry = {"settings": settings, "banks": [bank.state_dict() for bank in scorer.banks],
                     "train_images": len(paths), "calibrations": calibrations}
        if need_threshold or need_norm:
            # Once the maps are cross-fitted for the normalisation, the threshold costs nothing more: kept too.
            threshold, norm = calibration(config, train_feats, device)
            known = {**known, **({"threshold": threshold} if threshold else {}), **({"map_norm": norm} if norm else {})}
            calibrations[score_key] = known
        try:
            save_atomic(entry, cache)
        except OSError as exc:  # a read-only checkpoint folder or a full disk only costs the cache
            tqdm.write(f"warning: cannot cache the memory bank at {cache} ({exc.strerror}); continuing",
                       file=sys.stderr)
    scorer = Scorer(config.fusion, [make_bank(config, device).load_state_dict(b) for b in entry["banks"]])
    threshold = given_threshold(config.threshold) if config.threshold is not None else known.get("threshold")
    detector = Detector(model, scorer, config, threshold, provenance(info, paths, train_digest), device,
                        known.get("map_norm"))
    return detector, cached, time.perf_counter() - start


def config_workers(config: ScoreConfig, device: torch.device) -> int:
    """Loader workers: the config's, or none on the CPU and up to 8 feeding a GPU."""
    return resolve_workers(config.workers, device)


def peak_memory() -> dict:
    out = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda_max_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def image_uint8(image: torch.Tensor) -> np.ndarray:
    """``(3, S, S)`` float in [0, 1] -> ``(S, S, 3)`` uint8."""
    return (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


# How the numbers are made, recorded beside the settings so results.json explains itself.
PROTOCOL = {
    "mask_protocol": "masks resized with nearest neighbour, defective where >= 128 (or 1 in 0/1 masks) "
                     "(pixel_auroc_paper_masks: bilinear resize, defective where > 0, as the paper's code)",
    "image_score": "max of the patch map (concatenation) / of the product map (multiplication), before --smooth",
}


def settings_record(config: ScoreConfig, backend: str) -> dict:
    """``results.json``'s ``settings``: every config field (the k-NN backend resolved), and the protocol."""
    record = config.to_dict()
    record.pop("workers")
    if config.coreset >= 1:
        record["refine"] = 0  # nothing to refine without a coreset
    return {**record, "knn": backend, **PROTOCOL}


def run_identity(config: ScoreConfig, run: ScoringRun, category: str, ckpt_sha: str) -> dict:
    """What a run's results depend on (see :mod:`scoring.output`): speed settings left out."""
    source = {"images": os.path.abspath(run.images)} if run.images is not None else \
        {"data_root": os.path.abspath(run.data_root)}
    settings = {k: v for k, v in settings_record(config, "").items() if k not in ScoreConfig.names("speed")}
    return {"checkpoint_sha256": ckpt_sha, "category": category, "fusion": config.fusion, **source,
            "settings": settings}


def check_replaceable(target: Path) -> None:
    """``--save-detector`` may replace an older detector file, never anything else (e.g. a checkpoint)."""
    if not target.exists():
        return
    try:
        state = torch.load(target, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        state = None
    if not isinstance(state, dict) or state.get("format") != DETECTOR_FORMAT:
        raise UserError(f"--save-detector {target}: the file exists and is not a detector file; choose another path")


def run_output_dir(run: ScoringRun, identity: dict, ckpt_path: Path, category: str, out_per_category: bool) -> Path:
    """``--out`` (or ``<out>/<category>``) as given, else the versioned ``results/<p>/<fusion>[-images]``."""
    if run.out:
        return output_dir(Path(run.out) / category if out_per_category else Path(run.out), identity,
                          explicit=True, overwrite=run.overwrite)
    folder = identity["fusion"] + ("-images" if run.images is not None else "")
    return output_dir(Path("results") / run_name(ckpt_path) / folder, identity, explicit=False,
                      overwrite=run.overwrite)


def score_category(config: ScoreConfig, run: ScoringRun, category: str, device: torch.device,
                   out_per_category: bool = False) -> dict:
    """Score one category; writes the run's files under its output folder and returns the record.

    ``out_per_category``: ``run.out`` names a parent folder and each category writes to ``<out>/<category>``.
    """
    total_start = time.perf_counter()
    ckpt_path = resolve_checkpoint(run, category)
    model, info = load_network(ckpt_path, device, run.arch, run.wavelet)
    config = resolve_config(config, info)
    unlabeled = run.images is not None
    if unlabeled and not Path(run.images).is_dir():
        raise UserError(f"--images {run.images}: no such folder")

    if run.save_detector is not None:
        detector_target = Path(run.save_detector) if run.save_detector else \
            ckpt_path.parent / f"detector-{config.fusion}.pt"
        check_replaceable(detector_target)
    detector, cached, bank_seconds = load_or_build_detector(
        config, run, model, info, ckpt_path, category, device,
        need_threshold=(unlabeled or run.save_detector is not None) and config.threshold is None)
    identity = run_identity(config, run, category, info["sha256"])
    out_dir = run_output_dir(run, identity, ckpt_path, category, out_per_category)
    banks = [bank.rows for bank in detector.scorer.banks]
    record = {
        "category": category, "fusion": config.fusion,
        "checkpoint": dict(info),
        "settings": settings_record(config, detector.scorer.backend),
        "bank": {"patches": [int(b.shape[0]) for b in banks], "dim": [int(b.shape[1]) for b in banks],
                 "train_images": detector.provenance["train_images"], "cached": cached},
    }
    if unlabeled:
        record.update(score_folder(detector, run, device, out_dir))
    else:
        record.update(score_test_set(detector, run, device, out_dir, category))
    if run.synthetic_check:
        check_start = time.perf_counter()
        record["synthetic_check"] = synthetic_check(
            model, config, run.data_root, category, device,
            lambda dataset, desc: features_of(model, dataset, config, device, desc,
                                              workers=config_workers(config, device)),
            kinds=run.check_kinds)
        record["timings"]["synthetic_check_s"] = round(time.perf_counter() - check_start, 3)
    if run.save_detector is not None:
        record["files"]["detector"] = str(detector.save(detector_target))
    record["timings"]["bank_s"] = round(bank_seconds, 3)
    record["timings"]["total_s"] = round(time.perf_counter() - total_start, 3)
    record["memory"] = peak_memory()
    record.update(environment(config.seed, run.command))
    record["out_dir"] = str(out_dir)
    record["identity"] = identity
    write_json(out_dir / "results.json", record)
    if not unlabeled:
        write_run_table(out_dir, record)
    return record


# Why a metric cannot be computed on a test set, by what its labels / masks lack.
IMAGE_METRICS = ("image_auroc", "image_f1_max")
PIXEL_METRICS = ("pixel_auroc", "aupro", "pixel_ap", "pixel_auroc_paper_masks")


def unavailable_metrics(labels: np.ndarray, masks: np.ndarray) -> dict[str, str]:
    """``{metric: reason}`` for the metrics the test set cannot give (reported as n/a, not NaN)."""
    reasons = {}
    if labels.min() == labels.max():
        why = "the test set has only good images" if labels.max() == 0 else "the test set has no good images"
        reasons.update(dict.fromkeys(IMAGE_METRICS, why))
    if labels.max() == 0:
        reasons.update(dict.fromkeys(PIXEL_METRICS, "the test set has only good images (no ground-truth masks)"))
    elif not masks.any():
        reasons.update(dict.fromkeys(PIXEL_METRICS, "no defective pixel in the ground-truth masks (masks are "
                                                    "defective where >= 128, or 1 in 0/1 masks)"))
    elif masks.all():
        reasons.update(dict.fromkeys(PIXEL_METRICS, "every pixel is defective in the ground-truth masks"))
    return reasons


def heatmap_name(path: str | Path) -> str:
    """``a.jpg`` -> ``a.jpg.png``: the image's own extension is kept, so ``a.png`` and ``a.jpg`` differ."""
    return Path(path).name + ".png"


def test_metrics(labels: np.ndarray, masks: np.ndarray, paper_masks: np.ndarray, scores: np.ndarray,
                 maps: np.ndarray, defects: list[str]) -> dict:
    """The test set's metrics (``None`` with a reason where the labels or masks cannot give one).

    ``labels`` ``(N,)``, ``masks`` / ``paper_masks`` ``(N, S, S)`` bool, ``scores`` ``(N,)``, ``maps``
    ``(N, S, S)``. Returns ``metrics``, ``unavailable_metrics``, ``per_defect_image_auroc`` and
    ``image_f1_threshold``.
    """
    unavailable = unavailable_metrics(labels, masks)
    f1, f1_threshold = metrics.f1_max(labels, scores) if "image_f1_max" not in unavailable else (None, None)
    computed = {
        "image_auroc": lambda: metrics.image_auroc(labels, scores),
        "pixel_auroc": lambda: metrics.pixel_auroc(masks, maps),
        "aupro": lambda: metrics.aupro(masks, maps),
        "image_f1_max": lambda: f1,
        "pixel_ap": lambda: metrics.pixel_ap(masks, maps),
        # The same maps against the paper code's wider masks (bilinear resize, any non-zero value).
        "pixel_auroc_paper_masks": lambda: metrics.pixel_auroc(paper_masks, maps),
    }
    result = {name: None if name in unavailable else compute() for name, compute in computed.items()}
    for name, reason in unavailable.items():
        tqdm.write(f"note: {name.replace('_', ' ')} not available: {reason}", file=sys.stderr)
    per_defect = {}
    if "image_auroc" not in unavailable:
        for defect in sorted(set(defects) - {"good"}):
            keep = np.array([d in ("good", defect) for d in defects])
            per_defect[defect] = metrics.image_auroc(labels[keep], scores[keep])
    return {"metrics": result, "unavailable_metrics": unavailable, "per_defect_image_auroc": per_defect,
            "image_f1_threshold": f1_threshold}


def save_test_pictures(out_dir: Path, dataset: TestSet, tested: dict, threshold: float | None, title: str) -> None:
    """A panel per test image (one colour scale for the run) and the ROC curves."""
    labels, masks, scores, maps = tested["labels"], tested["masks"], tested["scores"], tested["maps"]
    vmin, vmax = float(maps.min()), float(maps.max())
    for i, (path, defect) in enumerate(tqdm(list(zip(tested["paths"], tested["defects"])), desc=f"{title}: pictures",
                                            unit="img", leave=False)):
        save_panel(out_dir / "heatmaps" / defect / heatmap_name(path), image_uint8(dataset[i]["image"]), maps[i],
                   vmin, vmax, threshold, masks[i], **panel_text(path, float(scores[i]), threshold, label=defect))
    curves = {}
    if tested["metrics"]["image_auroc"] is not None:
        curves["image"] = (*metrics.roc_points(labels, scores), tested["metrics"]["image_auroc"])
    if tested["metrics"]["pixel_auroc"] is not None:
        curves["pixel"] = (*metrics.roc_points(masks.reshape(-1), maps.reshape(-1)), tested["metrics"]["pixel_auroc"])
    save_roc(out_dir / "roc.png", curves, title)


def score_test_set(detector: Detector, run: ScoringRun, device: torch.device, out_dir: Path, category: str) -> dict:
    config = detector.config
    dataset = TestSet(run.data_root, category, config.size, config.antialias)
    start = time.perf_counter()
    feats, extras = features_of(detector.model, dataset, config, device, f"{category}: test features",
                                workers=config_workers(config, device))
    scores, maps = detector.score_features(feats)
    test_seconds = time.perf_counter() - start
    tested = {"labels": np.concatenate([np.asarray(e["label"]) for e in extras]),
              "masks": torch.cat([e["mask"] for e in extras]).numpy(),
              "paths": [p for e in extras for p in e["path"]], "defects": [d for e in extras for d in e["defect"]],
              "scores": scores.numpy(), "maps": maps.numpy()}
    labels, paths, defects = tested["labels"], tested["paths"], tested["defects"]
    found = test_metrics(labels, tested["masks"], torch.cat([e["paper_mask"] for e in extras]).numpy(),
                         tested["scores"], tested["maps"], defects)
    if config.threshold is not None:
        threshold, source = config.threshold, "--threshold"
    elif found["image_f1_threshold"] is not None:
        threshold, source = found["image_f1_threshold"], "image F1-max on the test labels (pictures only)"
    else:
        threshold, source = None, "none: no --threshold and no F1-max without both good and defect images"
    if run.save_maps:
        np.savez_compressed(out_dir / "maps.npz", maps=tested["maps"].astype(np.float32),
                            masks=tested["masks"].astype(np.uint8), labels=labels.astype(np.int64),
                            scores=tested["scores"].astype(np.float32), paths=np.array(paths),
                            defects=np.array(defects))
    write_csv(out_dir / "image_scores.csv", ["path", "defect", "label", "score"],
              [[path, defect, int(label), f"{score:.6f}"]
               for path, defect, label, score in zip(paths, defects, labels, tested["scores"])])
    if run.pictures:
        save_test_pictures(out_dir, dataset, {**tested, **found}, threshold, f"{category} ({config.fusion})")
    return {
        **found, "threshold": {"value": threshold, "source": source},
        "data": {"root": str(run.data_root), "test_images": len(paths), "test_good": int((labels == 0).sum()),
                 "test_defect": int((labels == 1).sum()),
                 "defect_types": {d: defects.count(d) for d in sorted(set(defects))}},
        "timings": {"test_s": round(test_seconds, 3), "s_per_test_image": round(test_seconds / len(paths), 4)},
        "files": {"heatmaps": str(out_dir / "heatmaps") if run.pictures else None,
                  "roc": str(out_dir / "roc.png") if run.pictures else None,
                  "maps": str(out_dir / "maps.npz") if run.save_maps else None,
                  "image_scores": str(out_dir / "image_scores.csv")},
    }


def verdict(score: float, threshold: float | None) -> str | None:
    if threshold is None or not np.isfinite(threshold):
        return None
    return "anomalous" if score > threshold else "normal"


def panel_text(path: str, score: float, threshold: float | None, label: str | None = None) -> dict:
    """The words a heatmap panel carries: file (and label), score, threshold, verdict."""
    return {"score": score, "verdict": verdict(score, threshold), "title": Path(path).name, "label": label}


def score_folder(detector: Detector, run: ScoringRun, device: torch.device, out_dir: Path) -> dict:
    config = detector.config
    folder = Path(run.images)
    candidates = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    paths = [p for p in candidates if p.suffix.lower() in IMAGE_SUFFIXES]
    skipped = [{"path": str(p), "reason": "not an image file (by extension)"} for p in candidates if p not in paths]
    if not paths:
        raise UserError(f"--images {folder}: no image files (png/jpg/bmp/tif) found")
    dataset = ImageFiles(paths, config.size, config.antialias, skip_bad=True)
    start = time.perf_counter()
    feats, extras = features_of(detector.model, dataset, config, device, "images: features",
                                workers=config_workers(config, device))
    ok = torch.tensor([flag for e in extras for flag in e["ok"]], dtype=torch.bool)
    all_paths = [p for e in extras for p in e["path"]]
    reasons = [r for e in extras for r in e["reason"]]
    for path, flag, reason in zip(all_paths, ok.tolist(), reasons):
        if not flag:
            tqdm.write(f"warning: skipped {reason}", file=sys.stderr)
            skipped.append({"path": path, "reason": reason})
    good_paths = [p for p, flag in zip(all_paths, ok.tolist()) if flag]
    if not good_paths:
        raise UserError(f"--images {folder}: none of the {len(all_paths)} files could be read")
    scores, maps = detector.score_features([f[ok] for f in feats])
    seconds = time.perf_counter() - start
    threshold = detector.threshold_info
    value = threshold["value"]
    verdicts = [verdict(s, value) for s in scores.tolist()]
    # Raw scores are distances whose scale differs from model to model; divided by the threshold,
    # 1.0 is the decision boundary on every model.
    write_csv(out_dir / "scores.csv", ["path", "score", "normalized_score", "verdict"],
              [[path, f"{score:.6f}", f"{score / value:.6f}", v]
               for path, score, v in zip(good_paths, scores.tolist(), verdicts)])
    maps_np = maps.numpy()
    if run.save_maps:
        np.savez_compressed(out_dir / "maps.npz", maps=maps_np.astype(np.float32), scores=scores.numpy(),
                            paths=np.array(good_paths))
    if run.pictures:
        vmin, vmax = float(maps_np.min()), float(maps_np.max())
        index = {p: i for i, p in enumerate(all_paths)}
        for i, path in enumerate(tqdm(good_paths, desc="images: pictures", unit="img", leave=False)):
            image = image_uint8(dataset[index[path]]["image"])
            rel = Path(path).relative_to(folder)
            save_panel(out_dir / "heatmaps" / rel.parent / heatmap_name(rel), image, maps_np[i], vmin, vmax, value,
                       **panel_text(path, float(scores[i]), value))
    return {
        "images": {"folder": str(folder), "scored": len(good_paths), "skipped": skipped,
                   "anomalous": verdicts.count("anomalous")},
        "threshold": threshold,
        "timings": {"test_s": round(seconds, 3), "s_per_test_image": round(seconds / len(good_paths), 4)},
        "files": {"scores": str(out_dir / "scores.csv"),
                  "heatmaps": str(out_dir / "heatmaps") if run.pictures else None},
    }


METRIC_COLUMNS = [("image_auroc", "image AUROC"), ("pixel_auroc", "pixel AUROC"), ("aupro", "AUPRO"),
                  ("image_f1_max", "image F1-max"), ("pixel_ap", "pixel AP")]


def format_metric(value: float | None, digits: int = 4) -> str:
    """A metric for tables and the console: ``n/a`` when it could not be computed."""
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def write_run_table(out_dir: Path, record: dict) -> None:
    row = [record["category"], record["fusion"]] + [format_metric(record["metrics"][k]) for k, _ in METRIC_COLUMNS]
    write_table(out_dir / "results", ["category", "fusion"] + [name for _, name in METRIC_COLUMNS], [row])


def write_summary(base: Path, records: list[dict], fusion: str) -> Path:
    """Per-category table with the mean row (over the categories where a metric exists), as
    ``base.md``, ``base.csv`` and ``base.json``."""
    header = ["category"] + [name for _, name in METRIC_COLUMNS] + ["s / test image"]
    rows = []
    for r in records:
        rows.append([r["category"]] + [format_metric(r["metrics"][k]) for k, _ in METRIC_COLUMNS]
                    + [f"{r['timings']['s_per_test_image']:.3f}"])
    means = {}
    for key, _ in METRIC_COLUMNS:
        values = [r["metrics"][key] for r in records if r["metrics"][key] is not None]
        means[key] = float(np.mean(values)) if values else None
    rows.append(["**mean**"] + [format_metric(means[k]) for k, _ in METRIC_COLUMNS]
                + [f"{np.mean([r['timings']['s_per_test_image'] for r in records]):.3f}"])
    write_table(base, header, rows)
    write_json(base.with_suffix(".json"), {"fusion": fusion, "categories": [
        {"category": r["category"], **r["metrics"], "results": os.path.join(r["out_dir"], "results.json")}
        for r in records], "mean": means})
    return base.with_suffix(".md")
