"""What the training and the scoring configs share: frozen dataclasses whose fields carry a role.

Each field of :class:`training.config.TrainConfig` and :class:`scoring.config.ScoreConfig` is
made with :func:`setting`, which records its ``role`` (what a change of it affects) in the
field's metadata; every list of settings elsewhere is derived from those roles with
:meth:`Settings.names` / :meth:`Settings.subset`, never written by hand.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import field

from common.errors import SettingError


def setting(default, role: str, **metadata):
    """A dataclass field with a default and its ``role`` (plus any other metadata)."""
    return field(default=default, metadata={"role": role, **metadata})


def is_number(value) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_whole(value, low: int) -> bool:
    """An int (not a bool) of at least ``low``."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


class Settings:
    """Mixin for a frozen settings dataclass (see the module docstring). A subclass lists what is
    wrong with its values in ``problems()`` and calls :meth:`check` from ``__post_init__``."""

    def problems(self) -> list[tuple[str, str]]:
        """``[(field, what is wrong)]`` of the values no run can take (empty when all are fine)."""
        return []

    def check(self) -> None:
        """The first of :meth:`problems` as a :class:`SettingError` naming the field and its value."""
        for name, problem in self.problems():
            raise SettingError(name, getattr(self, name), problem)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    @classmethod
    def names(cls, *roles: str) -> tuple[str, ...]:
        """Field names with one of ``roles`` (all fields when none is given)."""
        return tuple(f.name for f in dataclasses.fields(cls) if not roles or f.metadata["role"] in roles)

    @classmethod
    def default(cls, name: str):
        """The default of field ``name``: the one value that the API and the command line share."""
        return {f.name: f.default for f in dataclasses.fields(cls)}[name]

    def subset(self, *roles: str) -> dict:
        """``{name: value}`` of the fields with one of ``roles``, as plain JSON types (tuples as lists)."""
        return {name: list(value) if isinstance(value, tuple) else value
                for name in self.names(*roles) for value in [getattr(self, name)]}

    def to_dict(self) -> dict:
        return self.subset()

    @classmethod
    def from_dict(cls, values: dict):
        """The inverse of :meth:`to_dict` (lists back to tuples); unknown keys (paths, settings of
        another version) are ignored."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) and isinstance(known[k].default, tuple) else v
                      for k, v in values.items() if k in known})
