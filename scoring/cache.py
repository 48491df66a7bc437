"""The memory-bank cache: a category's banks (and calibrations) kept beside its checkpoint.

Building the banks means extracting the features of every training image (and with a coreset,
selecting it); a second scoring run with the same checkpoint, training files and bank settings
reads them from ``<run folder>/banks/<fusion>-<key>.pt`` instead. Thresholds and map
normalisations depend on the scoring settings too (``k``, smoothing, map source, ...): they are
kept per scoring settings (``calibrations``) in the same entry. A damaged entry is rebuilt,
never trusted; a cache that cannot be written only costs the cache.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from common.runtime import resolve_workers
from data import train_images
from models.checkpoint import save_atomic

from . import dense
from .calibration import Threshold, cross_fitted_calibration
from .config import ScoreConfig
from .detector import Detector, features_of, files_digest, provenance
from .features import ImageFiles
from .model import AnomalyModel, AnomalyScorer, bank_states

# 3: training files keyed by content; 4: banks stored as MemoryBank state dicts; 5: thresholds (and map
# normalisations) kept per scoring settings ("calibrations"), not one per bank. The bank states of
# scoring.model.bank_states are the same dicts as format 4's and 5's.
BANK_FORMAT = 5


def bank_settings(config: ScoreConfig, ckpt_sha: str, train_digest: str) -> dict:
    """Everything the bank depends on; any change makes a new cache entry. Training files count
    by name and content (``train_digest``: :func:`scoring.detector.files_digest`)."""
    return {"format": BANK_FORMAT, "checkpoint_sha256": ckpt_sha, **config.subset("bank"),
            "train_files": train_digest}


def bank_cache_path(ckpt_path: Path, settings: dict) -> Path:
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    return ckpt_path.parent / "banks" / f"{settings['fusion']}-{key}.pt"


def read_entry(cache: Path, settings: dict) -> dict | None:
    """The cache entry for ``settings``, or ``None`` (absent, damaged or made for other settings)."""
    if not cache.is_file():
        return None
    try:
        entry = torch.load(cache, map_location="cpu", weights_only=True)
    except Exception:  # a damaged cache is rebuilt, never trusted
        return None
    return entry if isinstance(entry, dict) and entry.get("settings") == settings else None


def training_files(data_root: str, category: str) -> tuple[list[Path], str]:
    """The category's training images and their digest (names and contents: the cache key's part)."""
    paths = train_images(data_root, category)
    return paths, files_digest(paths)


def calibration_key(config: ScoreConfig) -> str:
    """The scoring settings a calibration depends on (the given threshold left out)."""
    return json.dumps({k: v for k, v in config.subset("score").items() if k != "threshold"}, sort_keys=True)


def cached_detector(config: ScoreConfig, network: torch.nn.Module, info: dict, ckpt_path: Path, data_root: str,
                    category: str, device: torch.device, need_threshold: bool, rebuild: bool = False,
                    train: tuple[list[Path], str] | None = None, write: bool = True) -> tuple[Detector, bool, float]:
    """The category's detector: banks (and calibrated threshold, map normalisation) from the cache
    when they are there for these settings, else built from the training images and cached.
    ``train``: the training image paths and their :func:`files_digest`, when the caller has them;
    ``write=False`` builds what is missing without writing the cache (torchrun's other ranks).

    Returns the detector, whether the banks came from the cache, and the seconds it took.
    """
    paths, train_digest = train or training_files(data_root, category)
    settings = bank_settings(config, info["sha256"], train_digest)
    cache = bank_cache_path(ckpt_path, settings)
    start = time.perf_counter()
    entry = None if rebuild else read_entry(cache, settings)
    cached = entry is not None
    calibrations = entry.setdefault("calibrations", {}) if entry is not None else {}
    known = calibrations.get(calibration_key(config), {})
    need_norm = dense.uses_head(config.map_source)
    if entry is None or (need_threshold and "threshold" not in known) or (need_norm and "map_norm" not in known):
        train_feats, _ = features_of(network, ImageFiles(paths, config.preprocessing), config, device,
                                     f"{category}: train features", workers=resolve_workers(config.workers, device))
        if entry is None:
            entry = {"settings": settings, "banks": bank_states(config, train_feats, device),
                     "train_images": len(paths), "calibrations": calibrations}
        if need_threshold or need_norm:
            # Once the maps are cross-fitted for the normalisation, the threshold costs nothing more: kept too.
            threshold, norm = cross_fitted_calibration(config, train_feats, device)
            known = {**known, "threshold": threshold.to_dict(), **({"map_norm": norm} if norm else {})}
            calibrations[calibration_key(config)] = known
        try:
            if write:
                save_atomic(entry, cache)
        except OSError as exc:  # a read-only checkpoint folder or a full disk only costs the cache
            tqdm.write(f"warning: cannot cache the memory bank at {cache} ({exc.strerror}); continuing",
                       file=sys.stderr)
    scorer = AnomalyScorer.from_states(config, entry["banks"], known.get("map_norm"), device)
    threshold = Threshold.given(config.threshold) if config.threshold is not None else \
        Threshold.from_dict(known.get("threshold"))
    detector = Detector(AnomalyModel(network, scorer, config), threshold, provenance(info, paths, train_digest), device)
    return detector, cached, time.perf_counter() - start
