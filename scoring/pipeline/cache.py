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
from pathlib import Path

import torch
from tqdm import tqdm

from models.checkpoint import save_atomic

from ..config import MAP_ONLY_SETTINGS, ScoreConfig
from ..engine.calibration import CALIBRATION_FOLDS
from ..engine.model import balances_layers
from ..engine.views import VIEW_SPLITS

# 3: training files keyed by content; 4: banks stored as MemoryBank state dicts; 5: thresholds (and map
# normalisations) kept per scoring settings ("calibrations"), not one per bank. The bank states of
# scoring.engine.model.bank_states are the same dicts as format 4's and 5's; 6: coreset banks hold their
# cell lists (scoring.engine.cells).
BANK_FORMAT = 6


def bank_settings(config: ScoreConfig, ckpt_sha: str, train_digest: str) -> dict:
    """Everything the bank depends on; any change makes a new cache entry. Training files count
    by name and content (``train_digest``: :func:`scoring.building.files_digest`)."""
    # auto's choice, kept in the entry, depends on its halvings too (scoring.engine.views).
    halvings = {"view_splits": VIEW_SPLITS} if config.image_view == "auto" else {}
    bank = config.subset("bank")
    # Keyed only where it moves the rows (concatenation, bilinear): the banks built before the setting
    # existed still serve, and a multiplication bank is one entry whatever the recipe sets.
    if config.fusion != "concatenation" or config.upsample == "nearest":
        del bank["upsample"]
    if not balances_layers(config):  # likewise: unscaled layers keep the key they had
        del bank["balance"]
    return {"format": BANK_FORMAT, "checkpoint_sha256": ckpt_sha, **bank, **halvings, "train_files": train_digest}


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


def calibration_key(config: ScoreConfig) -> str:
    """The scoring settings a calibration depends on (the given threshold left out, and for the
    k-NN map source the settings that move its maps only: its threshold comes from image scores
    taken before them, so trying another ``--smooth`` or ``--floor`` reuses it; a fused map's
    normalisation reads the maps)."""
    skipped = {"threshold", *(MAP_ONLY_SETTINGS if config.map_source == "knn" else ())}
    # The folds too: a threshold cached from halves (before 2026-12-07) is calibrated again.
    return json.dumps({**{k: v for k, v in config.subset("score").items() if k not in skipped},
                       "calibration_folds": CALIBRATION_FOLDS}, sort_keys=True)


class BankCache:
    """One cache entry beside a checkpoint: the banks of ``config``'s bank settings over the training
    images of ``train_digest``, and their calibrations per scoring settings. ``rebuild``: never read
    (rebuilt and written again); ``writable=False``: never written (torchrun's other ranks)."""

    def __init__(self, ckpt_path: Path, config: ScoreConfig, ckpt_sha: str, train_digest: str,
                 rebuild: bool = False, writable: bool = True):
        self.settings = bank_settings(config, ckpt_sha, train_digest)
        self.path = bank_cache_path(Path(ckpt_path), self.settings)
        self.rebuild, self.writable = rebuild, writable

    def read(self) -> dict | None:
        """The entry (``banks``, ``train_images``, ``calibrations``), or ``None``: absent, damaged, other settings."""
        return None if self.rebuild else read_entry(self.path, self.settings)

    def calibration(self, entry: dict, config: ScoreConfig) -> dict:
        """What ``entry`` knows for ``config``'s scoring settings: ``threshold`` and ``map_norm``, either absent."""
        return dict(entry.get("calibrations", {}).get(calibration_key(config), {}))

    def write(self, entry: dict, config: ScoreConfig, calibration: dict) -> None:
        """``entry`` (with the calibrations it holds for other settings) and ``calibration`` kept for
        ``config``'s scoring settings, written atomically; a cache that cannot be written (a read-only
        folder, a full disk) only costs the cache."""
        if not self.writable:
            return
        calibrations = dict(entry.get("calibrations", {}))
        if calibration:
            calibrations[calibration_key(config)] = calibration
        try:
            save_atomic({**entry, "settings": self.settings, "calibrations": calibrations}, self.path)
        except OSError as exc:
            tqdm.write(f"warning: cannot cache the memory bank at {self.path} ({exc.strerror}); continuing",
                       file=sys.stderr)
