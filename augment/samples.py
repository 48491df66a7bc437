"""The one path from normal images to their synthetic anomalies: per image and per batch.

Every user of the anomaly makers goes through here: the training set (:class:`data.TrainSet`,
per image, in the data loader), the device batches (:class:`training.device_batches.DeviceBatches`,
whole batches on the training device), the anomaly preview (the training set's own samples of
epoch 0) and the synthetic check (held-out training images, sources from the bank images).

The recipe, in the order it draws from ``rng`` (a ``torch.Generator``, the only source of
randomness):

1. with ``rotflip``, one of the 8 symmetries of the square for the normal image (a random
   quarter-turn, then a random mirror);
2. for each anomaly maker in order: a source image, ``pick_source(rng)`` (another normal
   image, as in the paper; never rotated or mirrored), then the maker's own draws.

The order of the draws is part of the contract: the accuracies in the README were measured with
these streams (``tests/test_samples.py`` pins them). The per-image and the batched makers draw
differently (see :mod:`augment.batched`), so the two forms give different anomalies for a seed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .batched import rotflip_batch

# An anomaly maker: (image(s), source(s), rng) -> (anomalous image(s), mask(s)); augment.MAKERS, BATCH_MAKERS.
Maker = Callable[[torch.Tensor, torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]]
SourcePicker = Callable[[torch.Generator], torch.Tensor]
Made = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (normal(s), anomalies, masks)

# Batch seeds use indices past any data set's size, so they never equal a per-sample seed.
BATCH_SEED_OFFSET = 1_000_000_007


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The 63-bit seed of training sample ``index`` in ``epoch``, stable across processes and runs."""
    value = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB)
    return value % (2**63 - 1)


def batch_seed(seed: int, epoch: int, step: int) -> int:
    """The seed of batch ``step`` of ``epoch`` on the device path (never equal to a :func:`sample_seed`)."""
    return sample_seed(seed, epoch, BATCH_SEED_OFFSET + step)


def other_indices(index: torch.Tensor, count: int, rng: torch.Generator) -> torch.Tensor:
    """For each entry of ``index`` ``(B,)``, a uniformly random index in ``range(count)`` other than
    it (itself when ``count == 1``), drawn on ``rng``'s device."""
    if count < 2:
        return index.clone()
    other = torch.randint(0, count - 1, index.shape, generator=rng, device=rng.device)
    return other + (other >= index).long()


def other_index(index: int, count: int, rng: torch.Generator) -> int:
    """:func:`other_indices` for one index."""
    return int(other_indices(torch.tensor([index]), count, rng)[0])


def make_anomalies(normal: torch.Tensor, makers: Sequence[Maker], pick_source: SourcePicker,
                   rng: torch.Generator, rotflip: bool = False) -> Made:
    """One normal image -> ``(normal, anomalies (G, 3, S, S), masks (G, S, S) bool)``, one per maker.

    Args:
        normal: ``(3, S, S)`` float in [0, 1].
        makers: per-image anomaly makers (values of ``augment.MAKERS``).
        pick_source: ``rng -> (3, S, S)`` float source image, called once before each maker.
        rng: the only source of randomness (drawn in the order of the module docstring).
        rotflip: first apply a random symmetry of the square to ``normal`` (returned as used).
    """
    if rotflip:
        # The batched draw on a batch of one: on the CPU the same values as two scalar draws.
        normal = rotflip_batch(normal[None], rng)[0]
    anomalies, masks = [], []
    for make in makers:
        source = pick_source(rng)
        anomalous, mask = make(normal, source, rng)
        anomalies.append(anomalous)
        masks.append(mask)
    return normal, torch.stack(anomalies), torch.stack(masks)


def make_anomalies_batch(normals: torch.Tensor, makers: Sequence[Maker], pick_sources: SourcePicker,
                         rng: torch.Generator, rotflip: bool = False) -> Made:
    """:func:`make_anomalies` for a batch, on its device: ``normals (B, 3, S, S)`` ->
    ``(normals, anomalies (B, G, 3, S, S), masks (B, G, S, S) bool)``.

    ``makers`` are batched makers (values of ``augment.batched.BATCH_MAKERS``) and
    ``pick_sources(rng)`` returns one source per image, ``(B, 3, S, S)``; ``rng`` lives on the
    batch's device.
    """
    if rotflip:
        normals = rotflip_batch(normals, rng)
    anomalies, masks = [], []
    for make in makers:
        sources = pick_sources(rng)
        anomalous, mask = make(normals, sources, rng)
        anomalies.append(anomalous)
        masks.append(mask)
    return normals, torch.stack(anomalies, 1), torch.stack(masks, 1)
