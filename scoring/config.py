"""The scoring settings as one frozen dataclass: one field per setting, defaults = the paper's.

Built from the command line at its edge (``scoring/cli.py``) or by hand in Python; every list
of settings elsewhere (the memory-bank cache key, ``results.json``'s ``settings``, a run's
identity, the accuracy benchmark's reuse check) is derived from the fields' ``role``:

- ``bank``: decides the memory bank's rows (a change builds a new bank);
- ``score``: changes scores or maps, not the bank;
- ``speed``: changes only how fast (same numbers).
"""

from __future__ import annotations

from dataclasses import dataclass

from settings import Settings, setting

FUSIONS = ("concatenation", "multiplication")
MAP_SOURCES = ("knn", "head", "fused")  # scoring.dense


@dataclass(frozen=True)
class ScoreConfig(Settings):
    """How a trained network scores images (stage 2). See the README's options table."""

    fusion: str = setting("concatenation", "bank")
    size: int | None = setting(None, "bank")  # None: the checkpoint's training size (else 256)
    antialias: bool = setting(False, "bank")
    layers: tuple[int, ...] = setting((2, 3), "bank")
    precision: str = setting("fp32", "bank")  # feature extraction: fp32 or bf16
    coreset: float = setting(1.0, "bank")
    coreset_dim: int = setting(32, "bank")
    seed: int = setting(0, "bank")  # coreset and calibration split
    k: int = setting(1, "score")
    refine: int = setting(16, "score")  # with a coreset: top patches re-searched in the whole bank
    smooth: float = setting(0.0, "score")
    map_source: str = setting("knn", "score")  # the paper's k-NN map; head / fused: networks trained with --dense
    threshold: float | None = setting(None, "score")  # None: calibrated on the training images
    calib_percentile: float = setting(99.0, "score")
    recipe: str = setting("paper", "score")
    knn: str = setting("auto", "speed")
    knn_precision: str = setting("auto", "speed")
    batch_size: int = setting(32, "speed")
    workers: int | None = setting(None, "speed")

    def __post_init__(self):
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, not {self.fusion!r}")
        if self.map_source not in MAP_SOURCES:
            raise ValueError(f"map_source must be one of {MAP_SOURCES}, not {self.map_source!r}")
        object.__setattr__(self, "layers", tuple(sorted(self.layers)))
