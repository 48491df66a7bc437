"""Maps of dense self-supervision at scoring time: the segmentation head's, alone or fused with k-NN's.

A network trained with ``--dense`` carries a segmentation head (``models.seghead``). Its logits
and the nearest-neighbour distances live on different scales, so each map is first normalised
by its own distribution on normal training images (``(map - mean) / std`` over their pixels:
k-NN maps cross-fitted, each half of the training images scored against a bank of the other
half, so no image is scored against itself), then:

- ``knn`` (the default): the k-NN map alone (the paper's; the only choice for a network without
  a head). At the CPU budget it is also the best map of a dense-trained network: the head's own
  map is weak, and what dense training adds is in the backbone's features (docs/results.md);
- ``head``: the head's normalised map alone;
- ``fused``: the sum of both normalised maps.

The image score of ``head`` and ``fused`` is the maximum of the map, as for multiplication
(:func:`scoring.engine.model.combine_head`).
"""

from __future__ import annotations

import torch

from common.errors import SettingError

from ..config import MAP_SOURCES

__all__ = ["MAP_SOURCES", "map_norm", "resolve_map_source", "uses_head"]


def resolve_map_source(map_source: str, has_head: bool) -> str:
    """``map_source``, checked against the network: ``head`` or ``fused`` without a head is a ``SettingError``."""
    if map_source in ("head", "fused") and not has_head:
        raise SettingError("map_source", map_source, "needs a network trained with dense self-supervision (this "
                           "checkpoint has no segmentation head); use knn")
    return map_source


def uses_head(map_source: str) -> bool:
    """Whether a (resolved) map source reads the segmentation head."""
    return map_source in ("head", "fused")


def norm_keys(map_source: str) -> tuple[str, ...]:
    """The entries :func:`map_norm` gives for ``map_source`` (``head``: the head's alone; ``fused``: both)."""
    return ("head_mean", "head_std") + (("knn_mean", "knn_std") if map_source == "fused" else ())


def map_norm(knn_maps: torch.Tensor | None, head_maps: torch.Tensor) -> dict[str, float]:
    """Mean and standard deviation of each kind of map ``(N, S, S)`` over normal training images
    (the head's alone when ``knn_maps`` is ``None``: the ``head`` map source)."""
    def stats(maps: torch.Tensor) -> tuple[float, float]:
        values = maps.double()
        return float(values.mean()), max(float(values.std()), 1e-12)

    norm = dict(zip(("head_mean", "head_std"), stats(head_maps)))
    if knn_maps is not None:
        norm.update(zip(("knn_mean", "knn_std"), stats(knn_maps)))
    return norm
