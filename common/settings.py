"""What the training and the scoring configs share: frozen dataclasses whose fields carry a role.

Each field of :class:`training.config.TrainConfig` and :class:`scoring.config.ScoreConfig` is
made with :func:`setting`, which records its ``role`` (what a change of it affects) in the
field's metadata; every list of settings elsewhere is derived from those roles with
:meth:`Settings.names` / :meth:`Settings.subset`, never written by hand.
"""

from __future__ import annotations

import dataclasses
import math
import os
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
        """The first of :meth:`common_problems` and :meth:`problems` as a :class:`SettingError` naming
        the field and its value."""
        for name, problem in self.common_problems() + self.problems():
            raise SettingError(name, getattr(self, name), problem)

    def common_problems(self) -> list[tuple[str, str]]:
        """What every settings class checks: a switch (a field whose default is a bool) is a bool
        (``"no"`` is true in Python), and a ``seed`` is a whole number a generator takes."""
        found = [(f.name, "must be True or False") for f in dataclasses.fields(self)
                 if isinstance(f.default, bool) and not isinstance(getattr(self, f.name), bool)]
        seed = getattr(self, "seed", 0)
        if not (is_whole(seed, 0) and seed < 2 ** 63):
            found.append(("seed", "must be a whole number from 0 to 2**63 - 1"))
        return found

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


def check_run_fields(run) -> None:
    """A run dataclass (paths and outputs, e.g. ``TrainRun`` / ``ScoringRun``): each field holds the
    kind of value its default is (a path for a path, a bool for a switch, a whole number for a
    count), else a :class:`SettingError` naming it, so ``data_root=None`` fails where it is made."""
    for f in dataclasses.fields(run):
        value, default = getattr(run, f.name), f.default
        if isinstance(default, bool):
            ok, kind = isinstance(value, bool), "True or False"
        elif isinstance(default, str):
            ok, kind = isinstance(value, (str, os.PathLike)), "a path or text"
        elif isinstance(default, int):
            ok, kind = is_whole(value, 0), "a whole number, 0 or more"
        else:
            continue
        if not ok:
            raise SettingError(f.name, value, f"must be {kind}")


def category_list(categories) -> list[str]:
    """Category names as a list; a single name given as a string (which Python would iterate letter
    by letter) or anything else is a :class:`SettingError` saying what to pass."""
    if isinstance(categories, (str, bytes)) or not isinstance(categories, (list, tuple)) or \
            not all(isinstance(c, str) and c for c in categories):
        raise SettingError("categories", categories, "must be a list of category names, e.g. ['bottle']")
    return list(categories)


def check_stage_arguments(config, config_type: type, run, run_type: type) -> None:
    """A stage's Python call takes its config and run objects; anything else (``None``, a dict) is a
    :class:`SettingError` naming what to pass, not an ``AttributeError`` later."""
    for name, value, kind in (("config", config, config_type), ("run", run, run_type)):
        if not isinstance(value, kind):
            raise SettingError(name, value, f"must be a {kind.__name__} (e.g. {kind.__name__}())")
