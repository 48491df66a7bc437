"""The scoring settings as one frozen dataclass: one field per setting, defaults = the paper's.

Built from the command line at its edge (``scoring/cli.py``) or by hand in Python; every list
of settings elsewhere (the memory-bank cache key, ``results.json``'s ``settings``, a run's
identity, the accuracy benchmark's reuse check) is derived from the fields' ``role``:

- ``bank``: decides the memory bank's rows (a change builds a new bank);
- ``score``: changes scores or maps, not the bank;
- ``speed``: changes only how fast (same numbers).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from common.runtime import PRECISIONS
from common.settings import Settings, is_number, is_whole, setting
from data.frames import Frame, frame_problem, parse_frame
from models import MAX_SIZE, MIN_SIZE

from .inputs import Preprocessing

FUSIONS = ("concatenation", "multiplication")
BACKENDS = ("auto", "torch", "faiss")  # scoring.engine.knn
MAP_SOURCES = ("knn", "head", "fused")  # scoring.engine.dense
IMAGE_VIEWS = ("frame", "square", "auto")  # scoring.engine.views
UPSAMPLINGS = ("nearest", "bilinear")  # concatenation: the coarser layers onto the finest grid
MAX_SMOOTH = 100  # px: a Gaussian sigma; its kernel is 8 sigma wide, wider than any frame side it could matter on
MAX_FLOOR = 1.0  # a share of each map's own minimum: 1 puts every map's lowest value at 0
# Settings that move the k-NN maps only, after their image scores are taken: where the maps are not
# kept they are off (a square view's bank, cross-fitted scores) and a k-NN threshold does not depend on them.
MAP_ONLY_SETTINGS = ("smooth", "floor")


@dataclass(frozen=True)
class ScoreConfig(Settings):
    """How a trained network scores images (stage 2). See the README's options table.

    Every field is checked when the config is made: a value no run can take is a
    :class:`common.errors.SettingError` naming the field (``ScoreConfig(k=0)`` -> ``k=0: must be at least 1``).
    """

    fusion: str = setting("concatenation", "bank")
    size: int | None = setting(None, "bank")  # the network's training side; None: the checkpoint's (else 256)
    frame: str | None = setting(None, "bank")  # data.frames: None = the checkpoint's; square, auto or HxW
    antialias: bool = setting(False, "bank")
    layers: tuple[int, ...] = setting((2, 3), "bank")
    upsample: str = setting("nearest", "bank")  # concatenation: nearest (the paper) or bilinear (scoring.engine.model)
    balance: bool = setting(False, "bank")  # concatenation: layers scaled to vary alike (engine.model.layer_scales)
    precision: str = setting("fp32", "bank")  # feature extraction: fp32 or bf16
    coreset: float = setting(1.0, "bank")
    coreset_dim: int = setting(32, "bank")
    seed: int = setting(0, "bank")  # coreset and calibration split
    cells: int = setting(0, "bank")  # coreset and k = 1: rows of each patch's coreset cell read (scoring.engine.cells)
    image_view: str = setting("frame", "bank")  # the image score's view: frame, square or auto (scoring.engine.views)
    k: int = setting(1, "score")
    refine: int = setting(16, "score")  # with a coreset: patches re-searched in the whole bank per round
    certify: bool = setting(True, "score")  # with a coreset: image scores certified equal to the exact bank's
    smooth: float = setting(0.0, "score")
    floor: float = setting(0.0, "score")  # each k-NN map less this share of its own minimum (scoring.engine.model)
    map_source: str = setting("knn", "score")  # the paper's k-NN map; head / fused: networks trained with --dense
    threshold: float | None = setting(None, "score")  # None: calibrated on the training images
    calib_percentile: float = setting(99.0, "score")
    recipe: str = setting("paper", "score")
    knn: str = setting("auto", "speed")
    knn_precision: str = setting("auto", "speed")
    batch_size: int = setting(32, "speed")
    workers: int | None = setting(None, "speed")

    def __post_init__(self):
        with contextlib.suppress(TypeError):  # not a collection of stage numbers: problems() names it
            object.__setattr__(self, "layers", tuple(sorted(self.layers)))
        self.check()

    @property
    def frame_hw(self) -> Frame:
        """The ``(H, W)`` images are resized to: the resolved frame (``HxW``), else ``size x size``.
        ``size`` is the network's training side; only this is what images become."""
        explicit = parse_frame(self.frame) if self.frame else None
        if explicit is not None:
            return explicit
        if self.frame in (None, "square") and self.size is not None:
            return self.size, self.size
        raise ValueError(f"config.frame={self.frame!r} must be resolved first (scoring.building.resolve_config)")

    @property
    def view_preprocessing(self) -> Preprocessing | None:
        """The square view the image score is taken at besides the frame's maps (``image_view`` square,
        or auto before it is chosen): ``size x size`` made from the frame's input; ``None`` where
        the image score is the frame's map's maximum, or the frame is the square already."""
        if self.image_view == "frame" or self.map_source != "knn" or self.frame_hw == (self.size, self.size):
            return None  # (auto with a head map source: the frame, see scoring.engine.views)
        return Preprocessing((self.size, self.size), self.antialias)

    @property
    def view_config(self) -> ScoreConfig:
        """The settings of the square view's bank: these with the square frame, no smoothing and no floor (its
        maps are not kept, only its image scores) and the paper's nearest ``upsample`` (a choice for the
        frame's maps: the view is the paper's, docs/results.md "Layer 3 resized bilinearly"), its layers
        unscaled (``balance`` off, the paper's, as ``upsample``). Its cells stay:
        they tighten the bounds the certification reads, so fewer patches are re-searched in the whole bank
        (docs/speed.md)."""
        return self.replace(frame="square", image_view="frame", upsample="nearest", balance=False,
                            **self.maps_untouched)

    @property
    def maps_untouched(self) -> dict:
        """``{setting: 0.0}`` of :data:`MAP_ONLY_SETTINGS`: the overrides that leave the k-NN maps as searched."""
        return dict.fromkeys(MAP_ONLY_SETTINGS, 0.0)

    @property
    def preprocessing(self) -> Preprocessing:
        """How images reach the network at these settings (the frame, the resize): every way in uses it."""
        return Preprocessing(self.frame_hw, self.antialias)

    def problems(self) -> list[tuple[str, str]]:
        """``[(field, what is wrong)]`` of the values no scoring run can take (empty when all are fine)."""
        checks = [
            ("fusion", self.fusion in FUSIONS, f"choose one of {', '.join(FUSIONS)}"),
            ("map_source", self.map_source in MAP_SOURCES, f"choose one of {', '.join(MAP_SOURCES)}"),
            ("size", self.size is None or (is_whole(self.size, MIN_SIZE) and self.size <= MAX_SIZE),
             f"the network needs {MIN_SIZE} to {MAX_SIZE} px; use 128 or 256"),
            ("frame", self.frame is None or frame_problem(self.frame) is None, frame_problem(self.frame) or ""),
            ("layers", isinstance(self.layers, tuple) and bool(self.layers)
             and all(is_whole(layer, 1) and layer <= 4 for layer in self.layers)
             and len(set(self.layers)) == len(self.layers), "stages are numbered 1 to 4, each at most once (e.g. 2,3)"),
            ("upsample", self.upsample in UPSAMPLINGS, f"choose one of {', '.join(UPSAMPLINGS)}"),
            ("balance", isinstance(self.balance, bool), "must be True (layers scaled to vary alike) or False"),
            ("precision", self.precision in ("fp32", "bf16"), "choose fp32 or bf16"),
            ("coreset", is_number(self.coreset) and 0 < self.coreset <= 1,
             "must be in (0, 1]; 1 keeps the whole bank (the paper)"),
            ("coreset_dim", is_whole(self.coreset_dim, 0), "must be 0 or more"),
            ("k", is_whole(self.k, 1), "must be at least 1"),
            ("refine", is_whole(self.refine, 0), "must be 0 or more"),
            ("cells", is_whole(self.cells, 0), "must be 0 (off) or more"),
            ("refine", not (self.certify and is_number(self.coreset) and self.coreset < 1 and self.refine == 0),
             "must be at least 1 for certified coreset scores (0 = the coreset alone, uncertified: add "
             "`certify=False`)"),
            ("map_source", not (self.certify and is_number(self.coreset) and self.coreset < 1
                                and self.map_source == "fused"),
             "certified coreset scores cover the knn and head maps, not the fused one; add `certify=False` "
             "(uncertified) or keep the whole bank (`coreset=1`)"),
            ("image_view", self.image_view in IMAGE_VIEWS, f"choose one of {', '.join(IMAGE_VIEWS)}"),
            ("image_view", self.image_view != "square" or self.map_source == "knn",
             "a square view scores images with the k-NN map only; use {setting}frame or `map_source=knn`"),
            ("smooth", is_number(self.smooth) and 0 <= self.smooth <= MAX_SMOOTH,
             f"must be a number from 0 to {MAX_SMOOTH} px (a Gaussian sigma; PatchCore uses 4)"),
            ("floor", is_number(self.floor) and 0 <= self.floor <= MAX_FLOOR,
             f"must be a number from 0 (off) to {MAX_FLOOR:g}: the share of each map's own minimum taken off it"),
            ("threshold", self.threshold is None or (is_number(self.threshold) and self.threshold > 0),
             "must be a positive number (scores are distances); leave it out to calibrate one on the training images"),
            ("calib_percentile", is_number(self.calib_percentile) and 0 < self.calib_percentile <= 100,
             "must be in (0, 100]"),
            ("knn", self.knn in BACKENDS, f"choose one of {', '.join(BACKENDS)}"),
            ("knn_precision", self.knn_precision in PRECISIONS, f"choose one of {', '.join(PRECISIONS)}"),
            ("batch_size", is_whole(self.batch_size, 1), "must be at least 1"),
            ("workers", self.workers is None or is_whole(self.workers, 0),
             "must be 0 or more (None: automatic)"),
        ]
        return [(name, problem) for name, ok, problem in checks if not ok]
