"""The one way a detector is built: a checkpoint's network, its training images, the settings.

:func:`build_detector` serves every caller: ``Detector.fit`` (no cache), the inference scripts
(the bank cache beside the checkpoint, :mod:`scoring.pipeline.cache`), torchrun's ranks (whole batches
of the training images per rank for a sharded bank, :mod:`scoring.pipeline.sharding`); ``Detector.load``
ends in the same :func:`assemble` with the banks of a file. Steps, in order:

1. the banks (and calibrations) from the cache, when it holds them for these settings;
2. else the training images' features (the one way in: ``config.preprocessing``), the banks
   (:func:`scoring.engine.model.bank_states`) and, where wanted, the cross-fitted calibration
   (:mod:`scoring.engine.calibration`), written back to the cache;
3. :func:`assemble`: the scorer, the threshold by the one precedence (:func:`decide_threshold`),
   the provenance.

The helpers here turn what a user names (a checkpoint file, a folder of images, settings with
``None`` for "the checkpoint's") into what the builder takes.
"""

from __future__ import annotations

import datetime
import hashlib
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from common.distributed import DistInfo, block
from common.errors import SettingError, UserError
from data.frames import frame_for_images, frame_problem, frame_text
from data.images import list_images
from models.checkpoint import build_from_checkpoint, read_checkpoint

from .config import ScoreConfig
from .detector import Detector
from .engine import dense
from .engine.calibration import Threshold, cross_fitted_calibration
from .engine.features import ImageFiles, extract
from .engine.model import AnomalyModel, AnomalyScorer, bank_states
from .engine.views import choose_view, chosen_config, view_text
from .pipeline.cache import BankCache


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def files_digest(paths: list[Path], root: Path | None = None) -> str:
    """One sha256 over the files' names (their paths below ``root`` when given) and contents, in
    order: a replaced image with the same size and time stamp still changes it; hashing costs far
    less than extracting features."""
    digest = hashlib.sha256()
    for path in paths:
        name = path.name if root is None else path.relative_to(root).as_posix()
        digest.update(name.encode() + b"\0" + file_sha256(path).encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class TrainingImages:
    """The normal images a bank is built from, and their :func:`files_digest` (the cache key's part)."""

    paths: list[Path]
    digest: str

    @classmethod
    def of(cls, paths: list[Path]) -> TrainingImages:
        return cls(list(paths), files_digest(paths))


def image_paths(images: str | Path | Iterable[str | Path]) -> list[Path]:
    """A folder (its image files, sorted) or an iterable of paths -> a list of paths."""
    if isinstance(images, (str, Path)):
        folder = Path(images)
        if not folder.is_dir():
            raise UserError(f"{folder}: not a folder of images")
        paths = list_images(folder)
        if not paths:
            raise UserError(f"{folder} holds no images (png/jpg/bmp/tif)")
        return paths
    return [Path(p) for p in images]


def load_network(checkpoint: str | Path, device: torch.device, arch: str | None = None,
                 wavelet: str | None = None) -> tuple[torch.nn.Module, dict]:
    """The checkpoint's network in eval mode on ``device``, and what is known about it (+ path, sha256)."""
    path = Path(checkpoint)
    network, info = build_from_checkpoint(read_checkpoint(path), str(path), arch, wavelet)
    # channels_last lets the wavelet layers take their fastest (convolution) form on CPU and GPU.
    network = network.to(device, memory_format=torch.channels_last).eval()
    return network, {**info, "path": str(path), "sha256": file_sha256(path)}


def resolve_config(config: ScoreConfig, info: dict, train_paths: list[Path] | None = None) -> ScoreConfig:
    """The config with what depends on the network filled in: the size (the checkpoint's training
    side, else 256), the frame as ``HxW`` or ``square`` (``None``: the checkpoint's, else square;
    ``auto``: from ``train_paths``' image sizes) and the map source (checked: ``head`` and
    ``fused`` need a segmentation head)."""
    size = config.size or info["size"] or 256
    spec = config.frame
    if spec is None:
        recorded = tuple(info["frame"]) if info.get("frame") else None
        # A square frame is the paper's size x size, whatever the size (100 px is fine there; an
        # explicit HxW frame needs sides that are multiples of 32).
        same_size = config.size in (None, info["size"])
        spec = frame_text(recorded) if recorded and same_size and recorded != (size, size) else "square"
    if spec == "auto" and train_paths is None:
        raise ValueError("the auto frame needs the training images (train_paths)")
    frame = frame_text(frame_for_images(spec, size, train_paths or []))
    # Resolved frames are stored as HxW (bank cache keys, identities and detector files read them so);
    # "square" only where HxW cannot say it: a side no multiple of 32 (a network trained at 100 px).
    return config.replace(size=size, frame=frame if frame_problem(frame) is None else "square",
                          map_source=dense.resolve_map_source(config.map_source, bool(info.get("dense"))))


def provenance(info: dict, train: TrainingImages) -> dict:
    """Where a detector comes from: its checkpoint (path, sha256, arch, ...) and training images."""
    return {**{k: v for k, v in info.items() if isinstance(v, (str, int, float, bool, list, type(None)))},
            "train_images": len(train.paths), "train_files_sha256": train.digest,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def features_of(network: torch.nn.Module, dataset, config: ScoreConfig, device: torch.device, desc: str,
                workers: int = 0) -> tuple[list[torch.Tensor], list[dict]]:
    """:func:`scoring.engine.features.extract` over ``dataset`` with the config's batch size, layers,
    precision and map source."""
    loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=False, num_workers=workers,
                        pin_memory=device.type == "cuda")
    return extract(network, loader, list(config.layers), device, config.precision == "bf16", desc,
                   head=dense.uses_head(config.map_source), view=config.view_preprocessing)


def decide_threshold(config: ScoreConfig, calibrated: Threshold | None) -> Threshold | None:
    """The one precedence of a detector's threshold: a given one (``config.threshold``), else the
    calibrated one, else none."""
    return Threshold.given(config.threshold) if config.threshold is not None else calibrated


def assemble(network: torch.nn.Module, config: ScoreConfig, banks: list[dict], calibration: dict,
             provenance: dict, device: torch.device, shards: DistInfo | None = None) -> Detector:
    """A detector from its parts: the network, the bank states (:func:`scoring.engine.model.bank_states`),
    ``calibration`` (``threshold``: a :class:`Threshold` dict, ``map_norm``; either may be absent)."""
    scorer = AnomalyScorer.from_states(config, banks, calibration.get("map_norm"), device, shards)
    threshold = decide_threshold(config, Threshold.from_dict(calibration.get("threshold")))
    return Detector(AnomalyModel(network, scorer, config), threshold, provenance, device)


def build_detector(network: torch.nn.Module, info: dict, config: ScoreConfig, train: TrainingImages,
                   device: torch.device, calibrate: bool = True, cache: BankCache | None = None,
                   shards: DistInfo | None = None, workers: int = 0, desc: str = "train") -> tuple[Detector, bool]:
    """The detector of ``network`` (``info``: :func:`load_network`'s) over the ``train`` images at the
    resolved ``config`` (see the module docstring). ``calibrate``: calibrate a threshold when none
    is given or known; ``cache``: read and write the banks there; ``shards``: a sharded bank, each
    rank building its part from its block of whole batches (no calibration: refused before, see
    :func:`scoring.pipeline.sharding.check_shardable`). Returns the detector and whether the banks came
    from the cache."""
    sharded = shards is not None and shards.enabled
    part = shards if sharded else None  # this rank's part of a sharded bank
    entry = cache.read() if cache is not None else None
    cached = entry is not None
    calibration = cache.calibration(entry, config) if entry is not None else {}
    need_threshold = calibrate and config.threshold is None and "threshold" not in calibration
    need_norm = dense.uses_head(config.map_source) and "map_norm" not in calibration
    if entry is None or need_threshold or need_norm:
        paths = train.paths
        if sharded:
            share = block(len(paths), shards, align=config.batch_size)
            if not len(share):
                raise SettingError("batch_size", config.batch_size, f"leaves process {shards.rank} no training "
                                   f"images ({len(paths)} images, {shards.world_size} processes); use fewer "
                                   "processes or a smaller batch size")
            paths, desc = [paths[i] for i in share], f"{desc} (part {shards.rank + 1}/{shards.world_size})"
        feats, _ = features_of(network, ImageFiles(paths, config.preprocessing), config, device,
                               f"{desc} features", workers=workers)
        if entry is None:
            record = None
            if config.image_view == "auto":  # chosen once, with the banks (scoring.engine.views)
                record = choose_view(config, feats, device)
                tqdm.write(f"image view: {view_text(record)}", file=sys.stderr)
            entry = {"banks": bank_states(chosen_config(config, record), feats, device, part),
                     "train_images": len(train.paths),
                     **({"image_view": record} if record else {})}
        if need_threshold or need_norm:
            if sharded:
                raise UserError("a sharded bank cannot calibrate: give a threshold (see scoring.pipeline.sharding)")
            # Once the maps are cross-fitted for the normalisation, the threshold costs nothing more: kept too.
            threshold, norm = cross_fitted_calibration(chosen_config(config, entry.get("image_view")), feats, device)
            calibration = {**calibration, "threshold": threshold.to_dict(), **({"map_norm": norm} if norm else {})}
        if cache is not None:
            cache.write(entry, config, calibration)
    # calibrate=False: no threshold, whether this call made one for the norm or the cache held one.
    if not calibrate:
        calibration = {k: v for k, v in calibration.items() if k != "threshold"}
    resolved = chosen_config(config, entry.get("image_view"))
    origin = {**provenance(info, train), **({"image_view": entry["image_view"]} if "image_view" in entry else {})}
    detector = assemble(network, resolved, entry["banks"], calibration, origin, device, part)
    return detector, cached
