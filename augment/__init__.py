"""Synthetic anomaly makers, by name, and the one path that applies them (:mod:`augment.samples`).

Every anomaly maker is ``make(image, source, rng) -> (anomalous_image, mask)`` with ``image``
and ``source`` ``(3, S, S)`` floats in [0, 1], ``rng`` a ``torch.Generator`` (the only source of
randomness) and ``mask`` the ``(S, S)`` bool map of changed pixels. :mod:`augment.batched` has
the same makers for whole batches (``BATCH_MAKERS``). ``cutpaste``, ``perlin`` and ``scar`` are
the papers'; ``poisson`` (seamless blending), ``scratch`` (thin curved strokes), ``texture``
(procedural patterns) and ``shapes`` (ellipse/polygon CutPaste) aim closer to real defects.
Nothing calls a maker directly: the training set, the device batches, the anomaly preview and
the synthetic check all go through :func:`make_anomalies` / :func:`make_anomalies_batch`.
"""

from __future__ import annotations

from common.errors import SettingError

from .cutpaste import cutpaste, scar
from .perlin import perlin_blend, perlin_mask, perlin_noise
from .poisson import poisson
from .samples import (
    Maker,
    batch_seed,
    make_anomalies,
    make_anomalies_batch,
    other_index,
    other_indices,
    sample_seed,
)
from .scratch import scratch
from .shapes import shapes
from .texture import texture

MAKERS: dict[str, Maker] = {
    "cutpaste": cutpaste,
    "perlin": perlin_blend,
    "scar": scar,
    # Closer to real defects (none is in the paper): see each module's docstring.
    "poisson": poisson,
    "scratch": scratch,
    "texture": texture,
    "shapes": shapes,
}


def parse_augs(spec: str | list[str] | tuple[str, ...], setting: str = "augs") -> list[str]:
    """``"cutpaste,perlin"`` -> ``["cutpaste", "perlin"]``, checking every name is an anomaly maker,
    given once (errors are :class:`SettingError` of ``setting``)."""
    names = [n.strip() for n in spec.split(",")] if isinstance(spec, str) else list(spec)
    names = [n for n in names if n]
    unknown = [n for n in names if n not in MAKERS]
    if unknown or not names:
        raise SettingError(setting, ",".join(names) or "(empty)", f"unknown anomaly maker "
                           f"{', '.join(unknown) or '(none given)'}; choose from {', '.join(MAKERS)}")
    if len(set(names)) != len(names):
        raise SettingError(setting, ",".join(names), "an anomaly maker is listed twice")
    return names


__all__ = ["MAKERS", "Maker", "batch_seed", "cutpaste", "make_anomalies", "make_anomalies_batch", "other_index",
           "other_indices", "parse_augs", "perlin_blend", "perlin_mask", "perlin_noise", "poisson", "sample_seed",
           "scar", "scratch", "shapes", "texture"]
