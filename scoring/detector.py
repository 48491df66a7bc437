"""The trained detector as one object: network + memory banks + fusion + threshold + preprocessing.

>>> from scoring import Detector, ScoreConfig
>>> detector = Detector.fit("ckpt/pill-wave18/model.pt", "demo_data/pill/train/good")
>>> result = detector.predict(["photo.png"])        # paths, PIL images, uint8 arrays, float tensors
>>> result.scores, result.maps.shape, result.verdicts
>>> detector.save("pill.detector.pt")               # one file: weights, banks, threshold, settings
>>> Detector.load("pill.detector.pt").predict(["photo.png"])

The inference scripts are command lines over this class, so ``predict`` gives the scores of
their ``image_scores.csv`` / ``scores.csv``.
"""

from __future__ import annotations

import datetime
import hashlib
import pickle
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F
from torch.utils.data import DataLoader

import models
from data.images import _to_uint8_array, exif_orientation, list_images, load_image, resize_image, to_float, upright
from errors import UserError
from models.checkpoint import HEAD_PREFIX, build_from_checkpoint, load_weights, read_checkpoint, save_atomic

from . import dense
from .bank import MemoryBank
from .config import ScoreConfig
from .features import ImageFiles, batched_features, extract
from .fusion import Scorer

FORMAT = "wavecnet-anomaly-detector"
FORMAT_VERSION = 1
ImageLike = str | Path | Image.Image | np.ndarray | torch.Tensor


def image_to_uint8(img: Image.Image) -> np.ndarray:
    """A PIL image, turned upright by its EXIF orientation -> ``(H, W)`` or ``(H, W, C)`` uint8."""
    return _to_uint8_array(upright(img, exif_orientation(img)))


def upright_size(path: Path) -> tuple[int, int]:
    """``(H, W)`` of an image file as viewers show it (EXIF orientation applied), without decoding it."""
    with Image.open(path) as img:
        width, height = img.size
        return (width, height) if exif_orientation(img) in (5, 6, 7, 8) else (height, width)


def pick_device(device: str | torch.device) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; a CUDA device that is not there is an error."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {device}: no CUDA GPU is visible to PyTorch; use device 'cpu'")
    return torch.device(device)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


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


def make_bank(config: ScoreConfig, device: torch.device) -> MemoryBank:
    """An empty :class:`MemoryBank` with the config's coreset, refine and k-NN settings."""
    return MemoryBank(coreset=config.coreset, coreset_dim=config.coreset_dim, refine=config.refine,
                      seed=config.seed, backend=config.knn, precision=config.knn_precision, device=device)


def fit_scorer(config: ScoreConfig, train_feats: list[torch.Tensor], device: torch.device) -> Scorer:
    """Banks of the config's fusion from per-layer training features ``(N, C_l, h_l, w_l)`` (a head's
    logits after the layers, see :func:`scoring.features.pooled_features`, are not banked)."""
    return Scorer.fit(config.fusion, train_feats[:len(config.layers)], lambda: make_bank(config, device))


def score_maps(config: ScoreConfig, scorer: Scorer, feats: list[torch.Tensor],
               norm: dict | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (per layer, then the head's logits for a head map source) -> image scores ``(N,)`` and
    maps ``(N, S, S)``: the k-NN maps of ``scorer`` (``config.k``, ``config.smooth``), alone or with the
    head's map (:mod:`scoring.dense`, normalised by ``norm``)."""
    if config.map_source == "head":  # no k-NN search: the head's map alone
        return dense.combine("head", None, feats[len(config.layers)], norm, config.size)
    scores, maps = scorer.score(feats[:len(config.layers)], config.size, config.k, config.smooth)
    if not dense.uses_head(config.map_source):
        return scores, maps
    return dense.combine(config.map_source, maps, feats[len(config.layers)], norm, config.size)


def cross_fitted_maps(config: ScoreConfig, train_feats: list[torch.Tensor], device: torch.device,
                      keep_maps: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each half of the training images scored against a bank of the other half: k-NN image scores
    ``(N,)`` and (``keep_maps``) maps ``(N, S, S)``, with no image scored against itself."""
    count = train_feats[0].shape[0]
    if count < 2:
        raise UserError("calibrating a threshold needs at least 2 training images; give a threshold instead")
    order = torch.randperm(count, generator=torch.Generator().manual_seed(config.seed))
    halves = [order[: count // 2], order[count // 2:]]
    scores = torch.empty(count)
    maps = torch.empty(count, config.size, config.size) if keep_maps else None
    for fit, held_out in ((halves[0], halves[1]), (halves[1], halves[0])):
        scorer = fit_scorer(config, [f[fit] for f in train_feats], device)
        held_scores, held_maps = scorer.score([f[held_out] for f in train_feats[:len(config.layers)]],
                                              config.size, config.k, config.smooth if keep_maps else 0.0)
        scores[held_out] = held_scores
        if keep_maps:
            maps[held_out] = held_maps
    return scores, maps


def calibration(config: ScoreConfig, train_feats: list[torch.Tensor],
                device: torch.device) -> tuple[dict, dict | None]:
    """From the training images only (no test image, no label): the threshold and, for a head map
    source, the maps' normalisation (:func:`scoring.dense.map_norm`; else ``None``).

    Cross-fitted k-NN maps (:func:`cross_fitted_maps`); the threshold is the ``calib_percentile``
    percentile of the training images' scores. The bank used for scoring stays whole.
    """
    norm, knn_maps = None, None
    if config.map_source != "head":  # the head's map alone needs no k-NN map
        scores, knn_maps = cross_fitted_maps(config, train_feats, device, keep_maps=config.map_source == "fused")
    if dense.uses_head(config.map_source):
        head = train_feats[len(config.layers)]
        norm = dense.map_norm(knn_maps, dense.head_map(head, config.size))
        scores, _ = dense.combine(config.map_source, knn_maps, head, norm, config.size)
    value = float(np.percentile(scores.numpy(), config.calib_percentile))
    return {"value": value, "source": f"cross-fitted training scores, {config.calib_percentile}th percentile",
            "train_score_mean": float(scores.mean()), "train_score_max": float(scores.max())}, norm


def given_threshold(value: float) -> dict:
    return {"value": float(value), "source": "given (--threshold)"}


def load_network(checkpoint: str | Path, device: torch.device, arch: str | None = None,
                 wavelet: str | None = None) -> tuple[torch.nn.Module, dict]:
    """The checkpoint's network in eval mode on ``device``, and what is known about it (+ path, sha256)."""
    path = Path(checkpoint)
    model, info = build_from_checkpoint(read_checkpoint(path), str(path), arch, wavelet)
    # channels_last lets the wavelet layers take their fastest (convolution) form on CPU and GPU.
    model = model.to(device, memory_format=torch.channels_last).eval()
    return model, {**info, "path": str(path), "sha256": file_sha256(path)}


@dataclass
class Prediction:
    """What :meth:`Detector.predict` returns for ``N`` images.

    ``scores`` ``(N,)`` float32 raw anomaly scores (distances); ``maps`` ``(N, S, S)`` float32
    (a list of ``(H_i, W_i)`` maps with ``original_size=True``); ``verdicts`` ``(N,)`` bool,
    ``score > threshold`` (``None`` without a threshold); ``normalized_scores`` = score /
    threshold, so 1.0 is the decision boundary on every model.
    """

    scores: np.ndarray
    maps: np.ndarray | list[np.ndarray]
    verdicts: np.ndarray | None
    threshold: float | None

    @property
    def normalized_scores(self) -> np.ndarray | None:
        return None if self.threshold is None else self.scores / np.float32(self.threshold)

    def __len__(self) -> int:
        return len(self.scores)


class Detector:
    """A trained network with its memory banks, ready to score images.

    Build one with :meth:`fit` (from a checkpoint and normal images) or :meth:`load` (a file
    written by :meth:`save`).
    """

    def __init__(self, model: torch.nn.Module, scorer: Scorer, config: ScoreConfig, threshold: dict | None = None,
                 provenance: dict | None = None, device: str | torch.device = "cpu", map_norm: dict | None = None):
        if config.size is None:
            raise ValueError("config.size must be resolved (the network's input size)")
        if dense.uses_head(config.map_source) and map_norm is None:
            raise ValueError("a head map source needs map_norm (scoring.detector.calibration)")
        self.model, self.scorer, self.config, self.map_norm = model, scorer, config, map_norm
        self.threshold_info, self.provenance = threshold, dict(provenance or {})
        self.device = pick_device(device)

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def fit(cls, checkpoint: str | Path, train_images: str | Path | Iterable[str | Path],
            config: ScoreConfig | None = None, device: str | torch.device = "auto", calibrate: bool = True,
            arch: str | None = None, wavelet: str | None = None) -> Detector:
        """Load ``checkpoint``, build the banks from ``train_images`` (a folder or paths of normal
        images) and, unless ``config.threshold`` is given or ``calibrate`` is off, calibrate the
        threshold on them (cross-fitted, no labels)."""
        config = config or ScoreConfig()
        device = pick_device(device)
        model, info = load_network(checkpoint, device, arch, wavelet)
        config = resolve_config(config, info)
        paths = image_paths(train_images)
        feats = features_of(model, ImageFiles(paths, config.size, config.antialias), config, device,
                            "train features")[0]
        scorer = fit_scorer(config, feats, device)
        wants_threshold = config.threshold is None and calibrate
        threshold, norm = None, None
        if wants_threshold or dense.uses_head(config.map_source):
            threshold, norm = calibration(config, feats, device)
            threshold = threshold if wants_threshold else None
        if config.threshold is not None:
            threshold = given_threshold(config.threshold)
        return cls(model, scorer, config, threshold, provenance(info, paths), device, norm)

    # -- scoring -----------------------------------------------------------------------------
    @property
    def size(self) -> int:
        return self.config.size

    @property
    def threshold(self) -> float | None:
        return None if self.threshold_info is None else float(self.threshold_info["value"])

    def preprocess(self, image: ImageLike) -> tuple[torch.Tensor, tuple[int, int]]:
        """One image -> ``(3, S, S)`` float in [0, 1] as the training pipeline makes it, and its ``(H, W)``."""
        if isinstance(image, (str, Path)):
            path = Path(image)
            if not path.is_file():
                raise UserError(f"{path}: no such image file")
            return to_float(load_image(path, self.size, self.config.antialias)), upright_size(path)
        if isinstance(image, Image.Image):
            image = image_to_uint8(image)
        if isinstance(image, np.ndarray):
            if image.dtype != np.uint8 or image.ndim not in (2, 3):
                raise UserError(f"a NumPy image must be uint8 (H, W) or (H, W, C), got {image.dtype} "
                                f"{image.shape}; convert it with .astype(np.uint8)")
            array = image[:, :, None] if image.ndim == 2 else image[:, :, :3]
            if array.shape[2] == 1:
                array = np.repeat(array, 3, axis=2)
            chw = torch.from_numpy(np.array(array)).permute(2, 0, 1).contiguous()  # a copy: inputs stay untouched
            return to_float(resize_image(chw, self.size, self.config.antialias)), tuple(chw.shape[-2:])
        if isinstance(image, torch.Tensor):
            if not image.is_floating_point() or image.ndim != 3 or image.shape[0] not in (1, 3):
                raise UserError(f"a tensor image must be float (3, H, W) or (1, H, W) in [0, 1], got "
                                f"{image.dtype} {tuple(image.shape)}")
            chw = image.detach().float().cpu().expand(3, -1, -1)
            if chw.shape[-2:] != (self.size, self.size):
                chw = F.interpolate(chw[None], size=(self.size, self.size), mode="bilinear", align_corners=False,
                                    antialias=self.config.antialias)[0]
            return chw.clamp(0, 1), tuple(image.shape[-2:])
        raise UserError(f"cannot score a {type(image).__name__}: pass file paths, PIL images, uint8 NumPy "
                        "arrays or float tensors")

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """``(N, 3, S, S)`` float -> per layer ``(N, C_l, h_l, w_l)`` float32 CPU features."""
        return batched_features(self.model, images, list(self.config.layers), self.config.batch_size, self.device,
                                self.config.precision == "bf16", dense.uses_head(self.config.map_source))

    def score_features(self, feats: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per layer features -> image scores ``(N,)`` and maps ``(N, S, S)`` (:func:`score_maps`)."""
        return score_maps(self.config, self.scorer, feats, self.map_norm)

    def predict(self, images: ImageLike | Sequence[ImageLike], original_size: bool = False) -> Prediction:
        """Score one image, a list, a uint8 batch ``(N, H, W, C)`` or a float batch ``(N, 3, H, W)``
        (see :meth:`preprocess` for the accepted kinds of image).

        With ``original_size``, each map is resized (bilinear) back to its input's own size.
        """
        if isinstance(images, np.ndarray) and images.ndim == 4:  # a uint8 batch (N, H, W, C)
            images = list(images)
        elif isinstance(images, (str, Path, Image.Image, np.ndarray)) or \
                (isinstance(images, torch.Tensor) and images.ndim == 3):
            images = [images]
        elif isinstance(images, torch.Tensor):  # a float batch (N, 3, H, W)
            images = list(images.unbind(0))
        elif not isinstance(images, Sequence):
            images = [images]  # preprocess() names what it cannot score
        if len(images) == 0:
            raise UserError("predict() needs at least one image")
        prepared = [self.preprocess(image) for image in images]
        batch = torch.stack([image for image, _ in prepared])
        scores, maps = self.score_features(self.features(batch))
        scores_np = scores.float().numpy().astype(np.float32)
        if original_size:
            maps_out = [F.interpolate(m[None, None], size=hw, mode="bilinear", align_corners=False)[0, 0].numpy()
                        .astype(np.float32) for m, (_, hw) in zip(maps, prepared)]
        else:
            maps_out = maps.float().numpy().astype(np.float32)
        threshold = self.threshold
        verdicts = None if threshold is None else scores_np > threshold
        return Prediction(scores_np, maps_out, verdicts, threshold)

    __call__ = predict

    # -- files -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything the detector is, as tensors and plain values (``torch.load(weights_only=True)``)."""
        return {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "network": {"arch": self.provenance.get("arch"), "wavelet": self.provenance.get("wavelet"),
                        "num_classes": self.provenance.get("num_classes"),
                        "state_dict": {k: v.detach().cpu() for k, v in self.model.state_dict().items()}},
            # The whole bank beside a coreset only serves --refine: without it the file keeps the coreset alone.
            "banks": [{**bank.state_dict(), "full": bank.full if bank.refining else None}
                      for bank in self.scorer.banks],
            "config": self.config.to_dict(),
            "threshold": self.threshold_info,
            "map_norm": self.map_norm,
            "provenance": self.provenance,
        }

    def save(self, path: str | Path) -> Path:
        """One file (written atomically) that :meth:`load` turns back into this detector."""
        save_atomic(self.state_dict(), path)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "auto") -> Detector:
        """A detector saved by :meth:`save`; another format version or a damaged file is a ``UserError``."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"detector file {path} not found; write one with --save-detector or Detector.save()")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError) as exc:
            raise UserError(f"detector file {path} cannot be read ({type(exc).__name__}); it is truncated or not a "
                            "detector file: save it again") from None
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise UserError(f"{path} is not a detector file (a training checkpoint? build a detector with "
                            "inference_*.py --save-detector or Detector.fit)")
        if state.get("format_version") != FORMAT_VERSION:
            raise UserError(f"detector file {path} has format version {state.get('format_version')}, this version "
                            f"reads {FORMAT_VERSION}; save it again with this version")
        device = pick_device(device)
        config = ScoreConfig.from_dict(state["config"])
        net = state["network"]
        model = models.create_model(net["arch"], wavelet=net["wavelet"], num_classes=net["num_classes"],
                                    dense=any(k.startswith(HEAD_PREFIX) for k in net["state_dict"]))
        load_weights(model, net["state_dict"], str(path), net["arch"])
        model = model.to(device, memory_format=torch.channels_last).eval()
        scorer = Scorer(config.fusion, [make_bank(config, device).load_state_dict(b) for b in state["banks"]])
        return cls(model, scorer, config, state["threshold"], state["provenance"], device, state.get("map_norm"))

    def __repr__(self) -> str:
        threshold = "none" if self.threshold is None else f"{self.threshold:.4g}"
        return (f"Detector({self.provenance.get('arch')}, {self.config.fusion}, {self.size} px, "
                f"banks {[tuple(b.rows.shape) for b in self.scorer.banks]}, threshold {threshold})")


def features_of(model: torch.nn.Module, dataset, config: ScoreConfig, device: torch.device, desc: str,
                workers: int = 0) -> tuple[list[torch.Tensor], list[dict]]:
    """:func:`extract` over ``dataset`` with the config's batch size, layers, precision and map source."""
    loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=False, num_workers=workers,
                        pin_memory=device.type == "cuda")
    return extract(model, loader, list(config.layers), device, config.precision == "bf16", desc,
                   head=dense.uses_head(config.map_source))


def resolve_config(config: ScoreConfig, info: dict) -> ScoreConfig:
    """The config with what depends on the network filled in: the size (the checkpoint's training
    size, else 256) and the map source (checked: ``head`` and ``fused`` need a segmentation head)."""
    return config.replace(size=config.size or info["size"] or 256,
                          map_source=dense.resolve_map_source(config.map_source, bool(info.get("dense"))))


def files_digest(paths: list[Path]) -> str:
    """One sha256 over the files' names and contents, in order: a replaced image with the same
    size and time stamp still changes it; hashing costs far less than extracting features."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode() + b"\0" + file_sha256(path).encode())
    return digest.hexdigest()


def provenance(info: dict, train_paths: list[Path], train_digest: str | None = None) -> dict:
    """Where a detector comes from: its checkpoint (path, sha256, arch, ...) and training images
    (``train_digest``: their :func:`files_digest`, when the caller has it already)."""
    return {**{k: v for k, v in info.items() if isinstance(v, (str, int, float, bool, list, type(None)))},
            "train_images": len(train_paths), "train_files_sha256": train_digest or files_digest(train_paths),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
