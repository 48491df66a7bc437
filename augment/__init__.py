"""Synthetic anomaly generators, by name.

Every generator is ``fn(image, source, generator) -> (anomalous_image, mask)`` with ``image``
and ``source`` ``(3, S, S)`` floats in [0, 1], ``generator`` a ``torch.Generator`` (the only
source of randomness) and ``mask`` the ``(S, S)`` bool map of changed pixels.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from errors import UserError

from .cutpaste import cutpaste, scar
from .perlin import perlin_blend, perlin_mask, perlin_noise

Generator = Callable[[torch.Tensor, torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]]

GENERATORS: dict[str, Generator] = {
    "cutpaste": cutpaste,
    "perlin": perlin_blend,
    "scar": scar,
}


def parse_augs(spec: str | list[str]) -> list[str]:
    """``"cutpaste,perlin"`` -> ``["cutpaste", "perlin"]``, checking every name."""
    names = [n.strip() for n in spec.split(",")] if isinstance(spec, str) else list(spec)
    names = [n for n in names if n]
    unknown = [n for n in names if n not in GENERATORS]
    if unknown or not names:
        raise UserError(f"--augs {','.join(names) or '(empty)'}: unknown generator "
                        f"{', '.join(unknown) or '(none given)'}; choose from {', '.join(GENERATORS)}")
    if len(set(names)) != len(names):
        raise UserError(f"--augs {','.join(names)}: a generator is listed twice")
    return names


__all__ = ["GENERATORS", "cutpaste", "parse_augs", "perlin_blend", "perlin_mask", "perlin_noise", "scar"]
