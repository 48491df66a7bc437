"""Stage 2, the one scoring core behind both inference scripts.

For a category: load the checkpoint, build (or reuse) the memory bank from the normal training
images, score the labelled test set (metrics, pictures, ``results.json``) or a folder of new
images (``scores.csv`` with verdicts from a threshold calibrated on training images only).
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import sys
import time
from argparse import Namespace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

import cli
from data import IMAGE_SUFFIXES, TestSet, load_image, to_float, train_images
from errors import UserError
from models.checkpoint import build_from_checkpoint, read_checkpoint, save_atomic

from . import metrics
from .features import extract
from .fusion import Scorer
from .pictures import save_panel, save_roc
from .report import environment, write_json, write_table
from .synthetic_check import synthetic_check

BANK_FORMAT = 2  # 2: whole banks kept beside coreset banks (for --refine)
CHECKPOINT_NAMES = ("model.pt", "e1600_model.pt")


class ImageFiles(Dataset):
    """Plain images for feature extraction: ``{"image", "path", "ok"}``; unreadable ones give ``ok=False``."""

    def __init__(self, paths: list[Path], size: int, antialias: bool = False, skip_bad: bool = False):
        self.paths, self.size, self.antialias, self.skip_bad = paths, size, antialias, skip_bad

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        path = self.paths[index]
        try:
            image, ok, reason = to_float(load_image(path, self.size, self.antialias)), True, ""
        except UserError as exc:
            if not self.skip_bad:
                raise
            image, ok, reason = torch.zeros(3, self.size, self.size), False, str(exc)
        return {"image": image, "path": str(path), "ok": ok, "reason": reason}


def resolve_checkpoint(args: Namespace, category: str) -> Path:
    """``--p``: a file, or a folder under ``--ckpt-dir`` holding model.pt / e1600_model.pt."""
    name = args.p or f"{category}-{args.arch or 'wave50'}"
    name = name.replace("{category}", category)
    direct = Path(name)
    if direct.is_file():
        return direct
    # A sub-folder of --ckpt-dir (the paper's form), or a folder path given directly.
    folder = Path(args.ckpt_dir) / name
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
    return folder / CHECKPOINT_NAMES[0] if folder.is_dir() else Path(args.ckpt_dir) / name / CHECKPOINT_NAMES[0]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def dataset_features(model: torch.nn.Module, dataset: Dataset, args: Namespace, device: torch.device,
                     desc: str) -> tuple[list[torch.Tensor], list[dict]]:
    """``extract`` over ``dataset`` with the run's batch size, workers, layers and precision."""
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=False,
                        num_workers=cli.resolve_workers(args.workers, device), pin_memory=device.type == "cuda")
    return extract(model, loader, args.layers, device, args.precision == "bf16", desc)


def bank_settings(args: Namespace, fusion: str, ckpt_sha: str, size: int, paths: list[Path]) -> dict:
    """Everything the bank depends on; any change makes a new cache entry."""
    files = [(p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in paths]
    return {"format": BANK_FORMAT, "fusion": fusion, "checkpoint_sha256": ckpt_sha, "size": size,
            "layers": args.layers, "coreset": args.coreset, "coreset_dim": args.coreset_dim,
            "seed": args.seed, "precision": args.precision, "antialias": args.antialias,
            "train_files": hashlib.sha256(json.dumps(files).encode()).hexdigest()}


def bank_cache_path(ckpt_path: Path, settings: dict) -> Path:
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    return ckpt_path.parent / "banks" / f"{settings['fusion']}-{key}.pt"


def calibrate_threshold(fusion: str, train_feats: list[torch.Tensor], args: Namespace, device: torch.device,
                        size: int) -> dict:
    """Score each half of the training images against a bank of the other half (cross-fitting).

    The threshold is the ``--calib-percentile`` percentile of those scores. No test image and no
    label is used, and the bank used for scoring stays whole.
    """
    count = train_feats[0].shape[0]
    if count < 2:
        raise UserError("calibrating a threshold needs at least 2 training images; pass --threshold")
    order = torch.randperm(count, generator=torch.Generator().manual_seed(args.seed))
    halves = [order[: count // 2], order[count // 2:]]
    scores = torch.empty(count)
    for fit, held_out in ((halves[0], halves[1]), (halves[1], halves[0])):
        banks, full = Scorer.build_banks(fusion, [f[fit] for f in train_feats], args.coreset, args.seed,
                                         args.coreset_dim, device)
        scorer = Scorer(fusion, banks, args.knn, device, full, args.refine, args.knn_precision)
        held_scores, _ = scorer.score([f[held_out] for f in train_feats], size, args.k)
        scores[held_out] = held_scores
    value = float(np.percentile(scores.numpy(), args.calib_percentile))
    return {"value": value, "source": f"cross-fitted training scores, {args.calib_percentile}th percentile",
            "train_score_mean": float(scores.mean()), "train_score_max": float(scores.max())}


def load_or_build_bank(fusion: str, model: torch.nn.Module, args: Namespace, device: torch.device, size: int,
                       ckpt_path: Path, ckpt_sha: str, category: str, need_threshold: bool) -> tuple[dict, bool, float]:
    """The cached bank entry (banks + settings [+ threshold]); builds and saves it when missing."""
    paths = train_images(args.data_root, category)
    settings = bank_settings(args, fusion, ckpt_sha, size, paths)
    cache = bank_cache_path(ckpt_path, settings)
    start = time.perf_counter()
    entry = None
    if cache.is_file() and not args.rebuild_bank:
        try:
            entry = torch.load(cache, map_location="cpu", weights_only=True)
        except Exception:  # a damaged cache is rebuilt, never trusted
            entry = None
        if entry is not None and entry.get("settings") != settings:
            entry = None
    cached = entry is not None
    if entry is None or (need_threshold and "threshold" not in entry):
        train_feats, _ = dataset_features(model, ImageFiles(paths, size, args.antialias), args, device,
                                          f"{category}: train features")
        if entry is None:
            banks, full = Scorer.build_banks(fusion, train_feats, args.coreset, args.seed, args.coreset_dim, device)
            entry = {"settings": settings, "banks": banks, "full_banks": full, "train_images": len(paths)}
        if need_threshold:
            entry["threshold"] = calibrate_threshold(fusion, train_feats, args, device, size)
        try:
            save_atomic(entry, cache)
        except OSError as exc:  # a read-only checkpoint folder only costs the cache
            tqdm.write(f"warning: cannot cache the memory bank at {cache} ({exc.strerror}); continuing",
                       file=sys.stderr)
    return entry, cached, time.perf_counter() - start


def peak_memory() -> dict:
    out = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda_max_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def image_uint8(image: torch.Tensor) -> np.ndarray:
    """``(3, S, S)`` float in [0, 1] -> ``(S, S, 3)`` uint8."""
    return (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def settings_record(args: Namespace, size: int, backend: str) -> dict:
    return {"recipe": args.recipe, "size": size, "layers": args.layers, "k": args.k, "coreset": args.coreset,
            "coreset_dim": args.coreset_dim, "refine": args.refine if args.coreset < 1 else 0,
            "smooth": args.smooth, "knn": backend,
            "precision": args.precision, "seed": args.seed, "batch_size": args.batch_size,
            "antialias": args.antialias,
            "mask_protocol": "masks resized with nearest neighbour, defective where >= 128 "
                             "(pixel_auroc_paper_masks: bilinear resize, defective where > 0, as the paper's code)",
            "image_score": "max of the patch map (concatenation) / of the product map (multiplication), "
                           "before --smooth"}


def score_category(args: Namespace, fusion: str, category: str, device: torch.device) -> dict:
    """Score one category; writes the run's files under its output folder and returns the record."""
    total_start = time.perf_counter()
    ckpt_path = resolve_checkpoint(args, category)
    checkpoint = read_checkpoint(ckpt_path)
    model, info = build_from_checkpoint(checkpoint, str(ckpt_path), args.arch, args.wavelet)
    size = args.size or info["size"] or 256
    for layer in args.layers:
        if not 1 <= layer <= 4:
            raise UserError(f"--layers {','.join(map(str, args.layers))}: stages are numbered 1 to 4")
    # channels_last lets the wavelet layers take their fastest (convolution) form on CPU and GPU.
    model = model.to(device, memory_format=torch.channels_last).eval()
    ckpt_sha = file_sha256(ckpt_path)
    p_name = (args.p or f"{category}-{info['arch']}").replace("{category}", category)
    unlabeled = args.images is not None
    out_dir = Path(args.out) if args.out else Path("results") / p_name / (fusion + ("-images" if unlabeled else ""))
    if args.out and args.category_count > 1:
        out_dir = out_dir / category
    out_dir.mkdir(parents=True, exist_ok=True)

    entry, cached, bank_seconds = load_or_build_bank(
        fusion, model, args, device, size, ckpt_path, ckpt_sha, category,
        need_threshold=unlabeled and args.threshold is None)
    scorer = Scorer(fusion, entry["banks"], args.knn, device, entry.get("full_banks"), args.refine,
                    args.knn_precision)

    record = {
        "category": category, "fusion": fusion,
        "checkpoint": {"path": str(ckpt_path), "sha256": ckpt_sha, **info},
        "settings": settings_record(args, size, scorer.backend),
        "bank": {"patches": [int(b.shape[0]) for b in entry["banks"]], "dim": [int(b.shape[1]) for b in entry["banks"]],
                 "train_images": entry["train_images"], "cached": cached},
    }
    if unlabeled:
        record.update(score_folder(args, model, scorer, entry, size, device, out_dir))
    else:
        record.update(score_test_set(args, model, scorer, size, device, out_dir, category))
    if args.synthetic_check:
        check_start = time.perf_counter()
        record["synthetic_check"] = synthetic_check(
            model, args, fusion, category, device, size,
            lambda dataset, desc: dataset_features(model, dataset, args, device, desc))
        record["timings"]["synthetic_check_s"] = round(time.perf_counter() - check_start, 3)
    record["timings"]["bank_s"] = round(bank_seconds, 3)
    record["timings"]["total_s"] = round(time.perf_counter() - total_start, 3)
    record["memory"] = peak_memory()
    record.update(environment(args))
    write_json(out_dir / "results.json", record)
    if not unlabeled:
        write_run_table(out_dir, record)
    record["out_dir"] = str(out_dir)
    return record


def score_test_set(args, model, scorer, size, device, out_dir: Path, category: str) -> dict:
    dataset = TestSet(args.data_root, category, size, args.antialias)
    start = time.perf_counter()
    feats, extras = dataset_features(model, dataset, args, device, f"{category}: test features")
    scores, maps = scorer.score(feats, size, args.k, args.smooth)
    test_seconds = time.perf_counter() - start
    labels = np.concatenate([np.asarray(e["label"]) for e in extras])
    masks = torch.cat([e["mask"] for e in extras]).numpy()
    paper_masks = torch.cat([e["paper_mask"] for e in extras]).numpy()
    paths = [p for e in extras for p in e["path"]]
    defects = [d for e in extras for d in e["defect"]]
    scores_np, maps_np = scores.numpy(), maps.numpy()

    f1, f1_threshold = metrics.f1_max(labels, scores_np)
    result = {
        "image_auroc": metrics.image_auroc(labels, scores_np),
        "pixel_auroc": metrics.pixel_auroc(masks, maps_np),
        "aupro": metrics.aupro(masks, maps_np),
        "image_f1_max": f1,
        "pixel_ap": metrics.pixel_ap(masks, maps_np),
        # The same maps against the paper code's wider masks (bilinear resize, any non-zero value).
        "pixel_auroc_paper_masks": metrics.pixel_auroc(paper_masks, maps_np),
    }
    per_defect = {}
    for defect in sorted(set(defects) - {"good"}):
        keep = np.array([d in ("good", defect) for d in defects])
        per_defect[defect] = metrics.image_auroc(labels[keep], scores_np[keep])
    threshold = args.threshold if args.threshold is not None else f1_threshold
    source = "--threshold" if args.threshold is not None else "image F1-max on the test labels (pictures only)"

    if args.save_maps:
        np.savez_compressed(out_dir / "maps.npz", maps=maps_np.astype(np.float32), masks=masks.astype(np.uint8),
                            labels=labels.astype(np.int64), scores=scores_np.astype(np.float32),
                            paths=np.array(paths), defects=np.array(defects))
    with (out_dir / "image_scores.csv").open("w") as handle:
        handle.write("path,defect,label,score\n")
        for path, defect, label, score in zip(paths, defects, labels, scores_np):
            handle.write(f"{path},{defect},{int(label)},{score:.6f}\n")
    if not args.no_pictures:
        vmin, vmax = float(maps_np.min()), float(maps_np.max())
        for i in tqdm(range(len(paths)), desc=f"{category}: pictures", unit="img", leave=False):
            image = image_uint8(dataset[i]["image"])
            save_panel(out_dir / "heatmaps" / defects[i] / f"{Path(paths[i]).stem}.png", image, maps_np[i],
                       vmin, vmax, threshold, masks[i])
        curves = {}
        if labels.min() != labels.max():
            curves["image"] = (*metrics.roc_points(labels, scores_np), result["image_auroc"])
        if masks.any():
            curves["pixel"] = (*metrics.roc_points(masks.reshape(-1), maps_np.reshape(-1)), result["pixel_auroc"])
        save_roc(out_dir / "roc.png", curves, f"{category} ({scorer.fusion})")
    return {
        "metrics": result, "image_f1_threshold": f1_threshold, "per_defect_image_auroc": per_defect,
        "threshold": {"value": threshold, "source": source},
        "data": {"root": str(args.data_root), "test_images": len(paths), "test_good": int((labels == 0).sum()),
                 "test_defect": int((labels == 1).sum()),
                 "defect_types": {d: defects.count(d) for d in sorted(set(defects))}},
        "timings": {"test_s": round(test_seconds, 3), "s_per_test_image": round(test_seconds / len(paths), 4)},
        "files": {"heatmaps": None if args.no_pictures else str(out_dir / "heatmaps"),
                  "roc": None if args.no_pictures else str(out_dir / "roc.png"),
                  "maps": str(out_dir / "maps.npz") if args.save_maps else None,
                  "image_scores": str(out_dir / "image_scores.csv")},
    }


def score_folder(args, model, scorer, entry, size, device, out_dir: Path) -> dict:
    folder = Path(args.images)
    if not folder.is_dir():
        raise UserError(f"--images {folder}: no such folder")
    candidates = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    paths = [p for p in candidates if p.suffix.lower() in IMAGE_SUFFIXES]
    skipped = [{"path": str(p), "reason": "not an image file (by extension)"} for p in candidates if p not in paths]
    if not paths:
        raise UserError(f"--images {folder}: no image files (png/jpg/bmp/tif) found")
    dataset = ImageFiles(paths, size, args.antialias, skip_bad=True)
    start = time.perf_counter()
    feats, extras = dataset_features(model, dataset, args, device, "images: features")
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
    scores, maps = scorer.score([f[ok] for f in feats], size, args.k, args.smooth)
    seconds = time.perf_counter() - start
    if args.threshold is not None:
        threshold = {"value": float(args.threshold), "source": "--threshold"}
    else:
        threshold = entry["threshold"]
    verdicts = ["anomalous" if s >= threshold["value"] else "normal" for s in scores.tolist()]
    with (out_dir / "scores.csv").open("w") as handle:
        handle.write("path,score,verdict\n")
        for path, score, verdict in zip(good_paths, scores.tolist(), verdicts):
            handle.write(f"{path},{score:.6f},{verdict}\n")
    maps_np = maps.numpy()
    if args.save_maps:
        np.savez_compressed(out_dir / "maps.npz", maps=maps_np.astype(np.float32), scores=scores.numpy(),
                            paths=np.array(good_paths))
    if not args.no_pictures:
        vmin, vmax = float(maps_np.min()), float(maps_np.max())
        index = {p: i for i, p in enumerate(all_paths)}
        for i, path in enumerate(tqdm(good_paths, desc="images: pictures", unit="img", leave=False)):
            image = image_uint8(dataset[index[path]]["image"])
            rel = Path(path).relative_to(folder)
            save_panel(out_dir / "heatmaps" / rel.with_suffix(".png"), image, maps_np[i], vmin, vmax,
                       threshold["value"])
    return {
        "images": {"folder": str(folder), "scored": len(good_paths), "skipped": skipped,
                   "anomalous": verdicts.count("anomalous")},
        "threshold": threshold,
        "timings": {"test_s": round(seconds, 3), "s_per_test_image": round(seconds / len(good_paths), 4)},
        "files": {"scores": str(out_dir / "scores.csv"),
                  "heatmaps": None if args.no_pictures else str(out_dir / "heatmaps")},
    }


METRIC_COLUMNS = [("image_auroc", "image AUROC"), ("pixel_auroc", "pixel AUROC"), ("aupro", "AUPRO"),
                  ("image_f1_max", "image F1-max"), ("pixel_ap", "pixel AP")]


def write_run_table(out_dir: Path, record: dict) -> None:
    row = [record["category"], record["fusion"]] + [f"{record['metrics'][k]:.4f}" for k, _ in METRIC_COLUMNS]
    write_table(out_dir / "results", ["category", "fusion"] + [name for _, name in METRIC_COLUMNS], [row])


def write_summary(out_root: Path, records: list[dict], fusion: str) -> Path:
    """Per-category table with the mean row, as Markdown, CSV and JSON."""
    header = ["category"] + [name for _, name in METRIC_COLUMNS] + ["s / test image"]
    rows = []
    for r in records:
        rows.append([r["category"]] + [f"{r['metrics'][k]:.4f}" for k, _ in METRIC_COLUMNS]
                    + [f"{r['timings']['s_per_test_image']:.3f}"])
    means = [float(np.nanmean([r["metrics"][k] for r in records])) for k, _ in METRIC_COLUMNS]
    rows.append(["**mean**"] + [f"{m:.4f}" for m in means]
                + [f"{np.mean([r['timings']['s_per_test_image'] for r in records]):.3f}"])
    base = out_root / f"summary-{fusion}"
    write_table(base, header, rows)
    write_json(base.with_suffix(".json"), {"fusion": fusion, "categories": [
        {"category": r["category"], **r["metrics"], "results": os.path.join(r["out_dir"], "results.json")}
        for r in records], "mean": dict(zip([k for k, _ in METRIC_COLUMNS], means))})
    return base.with_suffix(".md")
