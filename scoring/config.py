"""The scoring settings as one frozen dataclass: one field per setting, defaults = the paper's.

Built from the command line at its edge (``scoring/cli.py``) or by hand in Python; every list
of settings elsewhere (the memory-bank cache key, ``results.json``'s ``settings``, a run's
identity, the accuracy benchmark's reuse check) is derived from the fields' ``role``:

- ``bank``: decides the memory bank's rows (a change builds a new bank);
- ``score``: changes scores or maps, not the bank;
- ``speed``: changes only how fast (same numbers).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

FUSIONS = ("concatenation", "multiplication")


def _setting(default, role: str, **kwargs):
    return field(default=default, metadata={"role": role}, **kwargs)


@dataclass(frozen=True)
class ScoreConfig:
    """How a trained network scores images (stage 2). See the README's options table."""

    fusion: str = _setting("concatenation", "bank")
    size: int | None = _setting(None, "bank")  # None: the checkpoint's training size (else 256)
    antialias: bool = _setting(False, "bank")
    layers: tuple[int, ...] = _setting((2, 3), "bank")
    precision: str = _setting("fp32", "bank")  # feature extraction: fp32 or bf16
    coreset: float = _setting(1.0, "bank")
    coreset_dim: int = _setting(32, "bank")
    seed: int = _setting(0, "bank")  # coreset and calibration split
    k: int = _setting(1, "score")
    refine: int = _setting(16, "score")  # with a coreset: top patches re-searched in the whole bank
    smooth: float = _setting(0.0, "score")
    threshold: float | None = _setting(None, "score")  # None: calibrated on the training images
    calib_percentile: float = _setting(99.0, "score")
    recipe: str = _setting("paper", "score")
    knn: str = _setting("auto", "speed")
    knn_precision: str = _setting("auto", "speed")
    batch_size: int = _setting(32, "speed")
    workers: int | None = _setting(None, "speed")

    def __post_init__(self):
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, not {self.fusion!r}")
        object.__setattr__(self, "layers", tuple(sorted(self.layers)))

    def replace(self, **changes) -> ScoreConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def names(cls, *roles: str) -> tuple[str, ...]:
        """Field names with one of ``roles`` (all fields when none is given)."""
        return tuple(f.name for f in dataclasses.fields(cls) if not roles or f.metadata["role"] in roles)

    def subset(self, *roles: str) -> dict:
        """``{name: value}`` of the fields with one of ``roles``, as plain JSON types."""
        return {name: list(value) if isinstance(value, tuple) else value
                for name in self.names(*roles) for value in [getattr(self, name)]}

    def to_dict(self) -> dict:
        return self.subset()

    @classmethod
    def from_dict(cls, values: dict) -> ScoreConfig:
        """The inverse of :meth:`to_dict`; unknown keys (from a newer version) are ignored."""
        known = {k: (tuple(v) if k == "layers" else v) for k, v in values.items() if k in cls.names()}
        return cls(**known)
