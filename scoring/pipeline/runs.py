"""What a scoring run reads and writes: its checkpoint, its identity, its output folder.

Everything here is about files and folders, not about scores: which checkpoint ``checkpoint``
names, what a run's results depend on (its *identity*, see :mod:`scoring.outputs.folders`), the
settings ``results.json`` records, and where the run writes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import models
from common.errors import SettingError
from common.settings import check_run_fields

from ..config import ScoreConfig
from .synthetic_check import CHECK_AUGS

CHECKPOINT_NAMES = ("model.pt", "e1600_model.pt")


@dataclass(frozen=True)
class ScoringRun:
    """What a scoring run reads and writes (everything that is not a scoring setting)."""

    data_root: str = "./mvtec_anomaly_detection"
    ckpt_dir: str = "ckpt"
    checkpoint: str | None = None  # checkpoint file or run folder; '{category}' is replaced
    arch: str | None = None  # expected arch (None: whatever the checkpoint holds)
    wavelet: str | None = None  # for checkpoints that do not record one
    images: str | None = None  # score this folder of unlabeled images instead of the test set
    out: str | None = None  # explicit output folder (None: versioned results/<run>/<fusion>/v<N>)
    overwrite: bool = False
    save_maps: bool = False
    pictures: bool = True
    synthetic_check: bool = False
    check_kinds: tuple[str, ...] = CHECK_AUGS  # the synthetic check's anomaly makers
    rebuild_bank: bool = False
    save_detector: str | None = None  # write the detector file here ('' = <run folder>/detector-<fusion>.pt)
    shard_bank: bool = False  # under torchrun: each process holds 1/N of the bank (else 1/N of the images)
    command: str = ""  # the command line, for results.json

    def __post_init__(self):
        check_run_fields(self)


def default_run(ckpt_dir: str | Path, category: str, arch: str | None) -> str:
    """The run folder when no checkpoint is named: ``<category>-<arch>`` with ``arch``, else the one
    run of ``category`` under ``ckpt_dir`` (whatever its arch; the paper's wave50 when there is none)."""
    if arch is not None:
        return f"{category}-{arch}"
    found = [f"{category}-{name}" for name in models.list_models()
             if any((Path(ckpt_dir) / f"{category}-{name}" / ckpt).is_file() for ckpt in CHECKPOINT_NAMES)]
    if len(found) > 1:
        raise SettingError("checkpoint", None, f"{ckpt_dir}/ holds {len(found)} trained runs of {category} "
                                               f"({', '.join(found)}); choose one, e.g. {found[0]}")
    return found[0] if found else f"{category}-wave50"


def resolve_checkpoint(run: ScoringRun, category: str) -> Path:
    """``run.checkpoint``: a file, or a folder under ``run.ckpt_dir`` holding model.pt / e1600_model.pt."""
    name = run.checkpoint or default_run(run.ckpt_dir, category, run.arch)
    name = name.replace("{category}", category)
    direct = Path(name)
    if direct.is_file():
        return direct
    # A sub-folder of ckpt_dir (the paper's form), or a folder path given directly.
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
    # Let read_checkpoint phrase the error with what the checkpoint folder holds; a name of a file
    # (``.../model.pt``, ``best.pth``) that is not there is that file, not a folder holding model.pt.
    if not folder.is_dir() and direct.suffix in (".pt", ".pth"):
        return direct
    return folder / CHECKPOINT_NAMES[0] if folder.is_dir() else Path(run.ckpt_dir) / name / CHECKPOINT_NAMES[0]


def run_name(ckpt_path: Path) -> str:
    """Name of a checkpoint's results folder: its run folder's name, plus the file's stem when the
    file is not a default name (``ckpt/zipper-wave50/e800.pt`` -> ``zipper-wave50-e800``)."""
    folder = Path(os.path.abspath(ckpt_path)).parent.name or "checkpoint"
    return folder if ckpt_path.name in CHECKPOINT_NAMES else f"{folder}-{ckpt_path.stem}"


def detector_target(run: ScoringRun, ckpt_path: Path, fusion: str) -> Path | None:
    """Where ``run.save_detector`` writes the detector file (``None``: it is not written)."""
    if run.save_detector is None:
        return None
    return Path(run.save_detector) if run.save_detector else ckpt_path.parent / f"detector-{fusion}.pt"


# How the numbers are made, recorded beside the settings so results.json explains itself (the
# words are part of a run's identity: a change makes every earlier run a different one).
PROTOCOL = {
    "mask_protocol": "masks resized with nearest neighbour, defective where >= 128 (or 1 in 0/1 masks) "
                     "(pixel_auroc_paper_masks: bilinear resize, defective where > 0, as the paper's code)",
    "image_score": "max of the patch map (concatenation) / of the product map (multiplication), "
                   "before --smooth and --floor",
}


def settings_record(config: ScoreConfig, backend: str) -> dict:
    """``results.json``'s ``settings``: every config field (the k-NN backend resolved), and the protocol."""
    record = config.to_dict()
    record.pop("workers")
    if config.coreset >= 1:
        record["refine"] = 0  # nothing to refine without a coreset
    return {**record, "knn": backend, **PROTOCOL}


def run_identity(config: ScoreConfig, run: ScoringRun, category: str, ckpt_sha: str, train_digest: str,
                 data_digest: str | None = None) -> dict:
    """What a run's results depend on (see :mod:`scoring.outputs.folders`): speed settings left out; the
    training images by content (``train_digest``: they make the bank); the data scored by its files
    (``data_digest``: names and contents of an ``--images`` folder's files, or of the test set's
    images and masks), so scoring tomorrow's images in the same folder, or a test set with images
    removed, makes a new version instead of mixing with the earlier one."""
    source = {"images": os.path.abspath(run.images), "images_sha256": data_digest} if run.images is not None \
        else {"data_root": os.path.abspath(run.data_root), "test_sha256": data_digest}
    settings = {k: v for k, v in settings_record(config, "").items() if k not in ScoreConfig.names("speed")}
    return {"checkpoint_sha256": ckpt_sha, "category": category, "fusion": config.fusion, **source,
            "train_files_sha256": train_digest, "settings": settings}


def output_place(run: ScoringRun, ckpt_path: Path, fusion: str, category: str,
                 out_per_category: bool) -> tuple[Path, bool]:
    """Where the run writes, for :func:`scoring.outputs.folders.run_folder`: ``run.out`` (or ``<out>/<category>``)
    as given (``True``: explicit), else the versioned ``results/<run>/<fusion>[-images]``."""
    if run.out:
        return (Path(run.out) / category if out_per_category else Path(run.out)), True
    return Path("results") / run_name(ckpt_path) / (fusion + ("-images" if run.images is not None else "")), False
