"""The trained detector as one object: network + memory banks + fusion + threshold + preprocessing.

>>> from scoring import Detector, ScoreConfig
>>> detector = Detector.fit("ckpt/pill-wave18/model.pt", "demo_data/pill/train/good")
>>> result = detector.predict(["photo.png"])        # paths, PIL images, uint8 arrays, float tensors
>>> result.scores, result.maps.shape, result.verdicts
>>> detector.save("pill.detector.pt")               # one file: weights, banks, threshold, settings
>>> Detector.load("pill.detector.pt").predict(["photo.png"])

The scoring itself is :class:`scoring.engine.model.AnomalyModel` (one ``nn.Module``: network, banks,
search, fusion); a detector adds what a user needs around it: reading images
(:mod:`scoring.inputs`), the threshold, provenance and the one-file format. The inference
scripts score with the same module, so ``predict`` gives the scores of their
``image_scores.csv`` / ``scores.csv``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

import models
from common.errors import UserError
from common.runtime import resolve_device
from common.settings import is_number
from data.frames import Frame
from models.checkpoint import (
    HEAD_PREFIX,
    UNREADABLE,
    empty_network,
    load_weights,
    save_atomic,
)

from .config import ScoreConfig
from .engine import dense
from .engine.calibration import Threshold
from .engine.features import pooled_features
from .engine.model import AnomalyModel, balances_layers, bank_grids
from .inputs import ImageLike, as_image_list
from .metrics import above_threshold

FORMAT = "wavecnet-anomaly-detector"
FORMAT_VERSION = 1




@dataclass
class Prediction:
    """What :meth:`Detector.predict` returns for ``N`` images.

    ``scores`` ``(N,)`` float32 raw anomaly scores (distances); ``maps`` ``(N, S, S)`` float32
    (a list of ``(H_i, W_i)`` maps with ``original_size=True``); ``verdicts`` ``(N,)`` bool,
    ``score > threshold`` (``None`` without a threshold); ``normalized_scores`` = score /
    threshold, so 1.0 is the decision boundary on every model. ``search``: what the memory-bank
    search did (:func:`scoring.engine.model.search_report`: with a coreset, how many image scores are
    certified equal to the exact bank's and how many patches were re-searched per image).
    """

    scores: np.ndarray
    maps: np.ndarray | list[np.ndarray]
    verdicts: np.ndarray | None
    threshold: float | None
    search: dict | None = None

    @property
    def normalized_scores(self) -> np.ndarray | None:
        return None if self.threshold is None else self.scores / np.float32(self.threshold)

    def __len__(self) -> int:
        return len(self.scores)


class Detector:
    """A trained network with its memory banks and threshold, ready to score images.

    Build one with :meth:`fit` (from a checkpoint and normal images), :meth:`load` (a file
    written by :meth:`save`) or from an :class:`AnomalyModel` directly.

    Attributes:
        model: the :class:`AnomalyModel` that computes every score.
        calibration: the :class:`Threshold` (value and where it comes from), or ``None``.
        provenance: checkpoint, training images, creation time.
    """

    def __init__(self, model: AnomalyModel, calibration: Threshold | None = None, provenance: dict | None = None,
                 device: str | torch.device = "cpu"):
        self.device = resolve_device(device)
        self.model = model.to(self.device)
        self.calibration, self.provenance = calibration, dict(provenance or {})

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def fit(cls, checkpoint: str | Path, train_images: str | Path | Iterable[str | Path],
            config: ScoreConfig | None = None, device: str | torch.device = "auto", calibrate: bool = True,
            arch: str | None = None, wavelet: str | None = None) -> Detector:
        """Load ``checkpoint``, build the banks from ``train_images`` (a folder or paths of normal
        images) and, unless ``config.threshold`` is given or ``calibrate`` is off, calibrate the
        threshold on them (cross-fitted, no labels): :func:`scoring.building.build_detector`."""
        from . import building  # it builds Detectors: imported when one is built

        device = resolve_device(device)
        if not isinstance(config, (ScoreConfig, type(None))):
            raise UserError(f"Detector.fit's config must be a ScoreConfig, got {type(config).__name__} "
                            "(e.g. ScoreConfig(k=1))")
        network, info = building.load_network(checkpoint, device, arch, wavelet)
        paths = building.image_paths(train_images)
        config = building.resolve_config(config or ScoreConfig(), info, paths)
        return building.build_detector(network, info, config, building.TrainingImages.of(paths), device,
                                       calibrate=calibrate)[0]

    # -- scoring -----------------------------------------------------------------------------
    @property
    def config(self) -> ScoreConfig:
        return self.model.config

    @property
    def size(self) -> int:
        """The network's training input size (the frame may be larger: :attr:`frame`)."""
        return self.config.size

    @property
    def frame(self) -> Frame:
        """``(H, W)``: what every image is resized to before the network (:mod:`data.frames`)."""
        return self.config.frame_hw

    @property
    def threshold(self) -> float | None:
        """The decision value: a verdict is ``score > threshold`` (``None``: no threshold)."""
        return None if self.calibration is None else float(self.calibration.value)

    def preprocess(self, image: ImageLike) -> tuple[torch.Tensor, tuple[int, int]]:
        """One image -> ``(3, *frame)`` float in [0, 1] and its own ``(H, W)``."""
        return self.config.preprocessing.prepare(image)

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """``(N, 3, S, S)`` float -> per layer ``(N, C_l, h_l, w_l)`` float32 CPU features."""
        return self.model.batched_features(images, self.device)

    def score_features(self, feats: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per layer features -> image scores ``(N,)`` and maps ``(N, S, S)`` (:class:`AnomalyScorer`)."""
        return self.model.scorer.score(feats)

    def predict(self, images: ImageLike | Sequence[ImageLike], original_size: bool = False) -> Prediction:
        """Score one image, a list, or a batch (see :mod:`scoring.inputs` for what is accepted).

        With ``original_size``, each map is resized (bilinear) back to its input's own size.
        """
        images = as_image_list(images)
        if len(images) == 0:
            raise UserError("predict() needs at least one image")
        prepared = [self.preprocess(image) for image in images]
        scores, maps = self.model.score_images(torch.stack([image for image, _ in prepared]), self.device)
        scores_np = scores.float().numpy().astype(np.float32)
        if original_size:
            maps_out = [F.interpolate(m[None, None], size=hw, mode="bilinear", align_corners=False)[0, 0].numpy()
                        .astype(np.float32) for m, (_, hw) in zip(maps, prepared)]
        else:
            maps_out = maps.float().numpy().astype(np.float32)
        threshold = self.threshold
        verdicts = None if threshold is None else above_threshold(scores_np, threshold)
        return Prediction(scores_np, maps_out, verdicts, threshold, dict(self.model.scorer.search_stats))

    __call__ = predict

    # -- files -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything the detector is, as tensors and plain values (``torch.load(weights_only=True)``)."""
        network = self.model.network
        return {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "network": {"arch": self.provenance.get("arch"), "wavelet": self.provenance.get("wavelet"),
                        "num_classes": self.provenance.get("num_classes"),
                        "state_dict": {k: v.detach().cpu() for k, v in network.state_dict().items()}},
            # The whole bank beside a coreset is kept only where it is searched (refinement).
            "banks": [bank.state() for bank in self.model.scorer.all_banks()],
            "config": self.config.to_dict(),
            "threshold": None if self.calibration is None else self.calibration.to_dict(),
            "map_norm": self.model.scorer.map_norm,
            "provenance": self.provenance,
        }

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """One file (written atomically) that :meth:`load` turns back into this detector.

        Never replaces a file that is not a detector file (a training checkpoint, anything else),
        and replaces a detector file only with ``overwrite``: a ``UserError`` says so instead."""
        path = Path(path)
        if path.is_dir():
            raise UserError(f"{path} is a folder; save the detector to a file in it, e.g. {path / 'detector.pt'}")
        if path.exists():
            if detector_state(path) is None:
                raise UserError(f"{path} exists and is not a detector file (a training checkpoint?); it is left as "
                                "it is: choose another path")
            if not overwrite:
                raise UserError(f"{path} holds a detector already; pass overwrite=True to replace it, or choose "
                                "another path")
        save_atomic(self.state_dict(), path)
        return path

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "auto") -> Detector:
        """A detector saved by :meth:`save`; another format version or a damaged file is a ``UserError``."""
        from . import building  # it builds Detectors: imported when one is built

        state = read_detector_file(Path(path))
        device = resolve_device(device)
        config = ScoreConfig.from_dict(state["config"])
        net = state["network"]
        network = empty_network(net["arch"], net["wavelet"], net["num_classes"],
                                any(k.startswith(HEAD_PREFIX) for k in net["state_dict"]))
        load_weights(network, net["state_dict"], str(path), net["arch"])  # strict: every weight is set
        network = network.to(device, memory_format=torch.channels_last).eval()
        widths = bank_widths(network, config, device)
        found = [int(bank["rows"].shape[1]) for bank in state["banks"]]
        if found != widths:
            raise UserError(f"detector file {path} is damaged or was edited: its memory banks have {found} features, "
                            f"its network gives {widths}; save it again")
        calibration = {"threshold": state["threshold"], "map_norm": state.get("map_norm")}
        return building.assemble(network, config, state["banks"], calibration, state["provenance"], device)

    def __repr__(self) -> str:
        threshold = "none" if self.threshold is None else f"{self.threshold:.4g}"
        return (f"Detector({self.provenance.get('arch')}, {self.config.fusion}, {self.size} px, "
                f"frame {self.config.frame}, "
                f"banks {[tuple(b.search.rows.shape) for b in self.model.scorer.all_banks()]}, threshold {threshold})")



def read_detector_file(path: Path) -> dict:
    """The state of a detector file; a missing, damaged or foreign file is a ``UserError``."""
    if not path.is_file():
        raise UserError(f"detector file {path} not found; write one with --save-detector or Detector.save()")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except UNREADABLE as exc:
        raise UserError(f"detector file {path} cannot be read ({type(exc).__name__}); it is truncated or not a "
                        "detector file: save it again") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{path} is not a detector file (a training checkpoint? build a detector with "
                        "inference_*.py --save-detector or Detector.fit)")
    version = state.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:
        raise UserError(f"detector file {path} has format version {version!r} ({type(version).__name__}), this "
                        f"version reads {FORMAT_VERSION!r} (int); save it again with this version")
    problem = detector_state_problem(state)
    if problem:
        raise UserError(f"detector file {path} is damaged or was edited: {problem}; save it again")
    return state


def detector_state_problem(state: dict) -> str | None:
    """What makes a detector file's state unusable (edited by hand, damaged), or ``None``: its
    entries' types, the banks' count for the fusion, finite banks and threshold."""
    try:
        config = ScoreConfig.from_dict(state["config"])
    except Exception as exc:  # noqa: BLE001 - any malformed settings entry, named in one line
        return f"its settings cannot be read ({type(exc).__name__}: {str(exc)[:120]})"
    banks = state.get("banks")
    if config.image_view == "auto":
        return "its image view is auto, never chosen (a detector holds the view it chose)"
    wanted = 1 if config.fusion == "concatenation" else len(config.layers)
    with contextlib.suppress(ValueError):  # an unresolved frame: named by the checks below or by load
        wanted *= 1 + (config.view_preprocessing is not None)  # the square view's banks follow the frame's
    if not isinstance(banks, list) or len(banks) != wanted:
        return f"{config.fusion} over layers {list(config.layers)} needs {wanted} memory bank(s), the file holds " \
               f"{len(banks) if isinstance(banks, list) else type(banks).__name__}"
    for i, bank in enumerate(banks):
        rows = bank.get("rows") if isinstance(bank, dict) else None
        if not isinstance(rows, torch.Tensor) or rows.ndim != 2 or rows.shape[0] == 0:
            return f"memory bank {i} is not a (rows, features) tensor"
        full = bank.get("full")
        for name, tensor in (("rows", rows), ("whole bank", full)):
            if isinstance(tensor, torch.Tensor) and not bool(torch.isfinite(tensor).all()):
                return f"memory bank {i}'s {name} hold NaN or infinite values"
        starts = bank.get("cell_starts")
        if starts is not None and not (isinstance(starts, torch.Tensor) and isinstance(full, torch.Tensor)
                                       and starts.shape == rows.shape[:1] and not starts.is_floating_point()
                                       and bool(((starts >= 0) & (starts < full.shape[0])).all())):
            return f"memory bank {i}'s cell starts are not one place in its whole bank per coreset row"
    scales = banks[0].get("scales") if isinstance(banks[0], dict) else None
    if balances_layers(config) and not (isinstance(scales, list) and len(scales) == len(config.layers)
                                        and all(is_number(v) and 0 < v < math.inf for v in scales)):
        return f"its balanced layers need one positive scale per layer ({list(config.layers)}), it holds {scales!r}"
    if "threshold" not in state:
        return "it has no threshold entry (None when it has no threshold)"
    threshold = state["threshold"]
    if threshold is not None:
        value = threshold.get("value") if isinstance(threshold, dict) else None
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            return f"its threshold is {value!r}, not a finite number"
        if not isinstance(threshold.get("source"), str):
            return "its threshold does not say where it comes from (source)"
    norm = state.get("map_norm")
    if dense.uses_head(config.map_source) and not (
            isinstance(norm, dict) and all(is_number(norm.get(key)) for key in dense.norm_keys(config.map_source))):
        return f"the {config.map_source} map source needs the maps' normalisation (map_norm), it holds {norm!r}"
    if not isinstance(state.get("provenance"), dict):
        return "it has no provenance entry"
    network = state.get("network")
    if not isinstance(network, dict) or not isinstance(network.get("state_dict"), dict):
        return "it holds no network weights"
    if network.get("arch") not in models.list_models() or not isinstance(network.get("num_classes"), int) \
            or not isinstance(network.get("wavelet"), str):
        return (f"its network entry names arch {network.get('arch')!r}, wavelet {network.get('wavelet')!r}, "
                f"{network.get('num_classes')!r} classes")
    return None


@torch.no_grad()
def bank_widths(network: torch.nn.Module, config: ScoreConfig, device: torch.device) -> list[int]:
    """The features per patch of each memory bank ``network`` gives at ``config`` (one small pass)."""
    side = config.size or 64
    probe = torch.zeros(1, 3, side, side, device=device).contiguous(memory_format=torch.channels_last)
    feats = pooled_features(network, probe, list(config.layers))
    widths = [int(grid.shape[1]) for grid in bank_grids(config, feats)]
    return widths * 2 if config.view_preprocessing is not None else widths  # the square view's banks too


def detector_state(path: Path) -> dict | None:
    """The state of a detector file, read lazily (tensors memory-mapped, not loaded), or ``None``
    when ``path`` holds something else (of any format version: only the format name counts)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return None
    return state if isinstance(state, dict) and state.get("format") == FORMAT else None




