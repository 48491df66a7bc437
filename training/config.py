"""The training settings as one frozen dataclass: one field per setting, defaults = the paper's.

Built from the command line at its edge (``main.py``) or by hand in Python::

    from training import TrainConfig, TrainRun, train_categories
    config = TrainConfig(arch="wave18", size=128, epochs=20)
    train_categories(config, TrainRun(data_root="../shared/datasets"), ["magnetic_tile"])

Every list of settings elsewhere is derived from the fields' metadata. ``role``:

- ``weights``: decides the trained weights (what a reused or resumed run must match);
- ``label``: recorded, changes nothing by itself (the recipe the defaults came from);
- ``speed``: changes only how fast (workers, memory layout, compilation, the wavelet layer's form).

``resume`` (of ``weights`` fields) says what ``--resume`` does when this run's value differs
from the checkpoint's: ``refuse`` (the network would not fit), ``extend`` (more epochs continue
the run) or ``warn`` (continue, saying the weights will differ from an uninterrupted run).

What a run reads and writes (folders, saving, logging) is :class:`TrainRun`, not a setting.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from augment import parse_augs
from common.errors import SettingError
from common.runtime import PRECISIONS
from common.settings import Settings, check_run_fields, is_number, is_whole, setting
from data.frames import frame_problem, parse_frame
from models import MAX_SIZE, MIN_SIZE, list_models

ROLES = ("weights", "label", "speed")
SCHEDULES = ("constant", "cosine")
ANOMALY_SITES = ("auto", "device", "loader")
DWT_IMPLS = ("auto", "conv", "matmul")  # models.WaveletDownsample.IMPLS


def _setting(default, role: str, resume: str = "warn"):
    """A field with its ``role`` and what ``--resume`` does when it changes (see the module docstring)."""
    return setting(default, role, resume=resume)


@dataclass(frozen=True)
class TrainConfig(Settings):
    """How a network is trained (stage 1). See ``python main.py --help`` for each setting.

    Every field is checked when the config is made: a value no training can take is a
    :class:`common.errors.SettingError` naming the field (``TrainConfig(lr=0)`` -> ``lr=0: must be a
    positive finite number``; ``main.py`` words it ``--lr 0: ...``).
    """

    arch: str = _setting("wave50", "weights", resume="refuse")
    wavelet: str = _setting("bior2.2", "weights", resume="refuse")  # models.DEFAULT_WAVELET
    size: int = _setting(256, "weights", resume="refuse")
    frame: str = _setting("square", "weights")  # data.frames: square (the paper), auto or HxW; tiles of size
    whole_share: float = _setting(0.0, "weights")  # of the samples: the whole image at size x size, not a tile
    antialias: bool = _setting(False, "weights")
    augs: tuple[str, ...] = _setting(("cutpaste", "perlin"), "weights", resume="refuse")
    rotflip: bool = _setting(False, "weights")
    dense: bool = _setting(False, "weights", resume="refuse")  # segmentation head on the anomaly masks
    dense_weight: float = _setting(1.0, "weights")  # its loss (focal + soft Dice) beside the cross-entropy
    epochs: int = _setting(1600, "weights", resume="extend")
    batch_size: int = _setting(32, "weights")
    lr: float = _setting(0.03, "weights")
    weight_decay: float = _setting(3e-5, "weights")
    momentum: float = _setting(0.9, "weights")
    sched: str = _setting("constant", "weights")
    warmup: int = _setting(0, "weights")
    seed: int = _setting(0, "weights")
    precision: str = _setting("auto", "weights")  # auto: bf16 where the device has it natively
    anomalies_on: str = _setting("auto", "weights")  # auto: device on CUDA
    recipe: str = _setting("paper", "label")
    workers: int | None = _setting(None, "speed")  # None: 0 on the CPU, up to 8 feeding a GPU
    pin_memory: bool = _setting(True, "speed")
    channels_last: bool = _setting(True, "speed")
    cudnn_benchmark: bool = _setting(True, "speed")
    compile: bool = _setting(False, "speed")
    dwt_impl: str = _setting("auto", "speed")

    def __post_init__(self):
        if not isinstance(self.augs, (str, list, tuple)):
            raise SettingError("augs", self.augs, "give anomaly maker names, e.g. ('cutpaste', 'perlin')")
        object.__setattr__(self, "augs", tuple(parse_augs(self.augs)))
        self.check()

    def problems(self) -> list[tuple[str, str]]:
        """``[(field, what is wrong)]`` of the values no training can take (empty when all are fine)."""
        checks = [
            ("arch", self.arch in list_models(), f"choose one of {', '.join(list_models())}"),
            ("size", is_whole(self.size, MIN_SIZE) and self.size <= MAX_SIZE,
             f"the network needs {MIN_SIZE} to {MAX_SIZE} px (it halves the image 5 times); use 128 or 256"),
            ("frame", frame_problem(self.frame) is None, frame_problem(self.frame) or ""),
            ("frame", frame_problem(self.frame) is not None or not is_whole(self.size, MIN_SIZE)
             or min(parse_frame(self.frame) or (self.size,)) >= self.size,  # the rules always fit
             f"each side must be at least the size ({self.size} px): the network trains on tiles of that size"),
            ("whole_share", is_number(self.whole_share) and 0 <= self.whole_share <= 1,
             "must be a share from 0 to 1 (0: tiles only)"),
            ("whole_share", not self.whole_share or self.frame != "square",
             "needs a frame larger than the size (auto or HxW): with a square frame each tile is the whole image"),
            ("epochs", is_whole(self.epochs, 0), "must be 0 or more (the paper: 1600)"),
            ("batch_size", is_whole(self.batch_size, 1), "must be at least 1"),
            ("lr", is_number(self.lr) and self.lr > 0, "must be a positive finite number (the paper: 0.03)"),
            ("momentum", is_number(self.momentum) and 0 <= self.momentum < 1,
             "momentum must be in [0, 1) (the paper: 0.9)"),
            ("weight_decay", is_number(self.weight_decay) and self.weight_decay >= 0,
             "weight decay must be a finite number, 0 or more (the paper: 3e-5)"),
            ("dense_weight", is_number(self.dense_weight) and self.dense_weight >= 0,
             "must be a finite number, 0 or more"),
            ("warmup", is_whole(self.warmup, 0), "must be 0 or more"),
            ("sched", self.sched in SCHEDULES, f"choose one of {', '.join(SCHEDULES)}"),
            ("precision", self.precision in PRECISIONS, f"choose one of {', '.join(PRECISIONS)}"),
            ("anomalies_on", self.anomalies_on in ANOMALY_SITES, f"choose one of {', '.join(ANOMALY_SITES)}"),
            ("dwt_impl", self.dwt_impl in DWT_IMPLS, f"choose one of {', '.join(DWT_IMPLS)}"),
            ("workers", self.workers is None or is_whole(self.workers, 0), "must be 0 or more (None: automatic)"),
        ]
        return [(name, problem) for name, ok, problem in checks if not ok]

    @property
    def num_classes(self) -> int:
        """Normal plus one class per anomaly generator."""
        return 1 + len(self.augs)

    @classmethod
    def resume_names(cls, action: str) -> tuple[str, ...]:
        """The ``weights`` fields whose change ``--resume`` meets with ``action`` (refuse / extend / warn)."""
        return tuple(f.name for f in dataclasses.fields(cls)
                     if f.metadata["role"] == "weights" and f.metadata["resume"] == action)


@dataclass(frozen=True)
class TrainRun:
    """What a training run reads and writes: everything that is not a training setting."""

    data_root: str = "./mvtec_anomaly_detection"
    ckpt_dir: str = "ckpt"
    resume: str | None = None  # "auto": <ckpt_dir>/<category>-<arch>/model.pt; else a checkpoint file
    overwrite: bool = False  # move a run folder that holds a run aside (main.py's RunClaim)
    save_every: int = 50  # also save every N epochs (0 = at the end only)
    tensorboard: bool = True

    def __post_init__(self):
        check_run_fields(self)

    def run_dir(self, category: str, arch: str) -> Path:
        return Path(self.ckpt_dir) / f"{category}-{arch}"

    def to_dict(self) -> dict:
        return {f.name: str(v) if isinstance(v, Path) else v
                for f in dataclasses.fields(self) for v in [getattr(self, f.name)]}


# The settings that decide the trained weights (what a reused or resumed run must match).
WEIGHT_SETTINGS = TrainConfig.names("weights")
# What --resume refuses to change (the network would not fit the checkpoint).
RESUME_REFUSED_SETTINGS = TrainConfig.resume_names("refuse")
# What a resume may change with a warning (--epochs is left out on purpose: more epochs extend a run).
RESUME_WARN_SETTINGS = TrainConfig.resume_names("warn")
