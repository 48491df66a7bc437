"""Training batches built on the training device: the GPU path of the data pipeline.

On a GPU the network eats thousands of images a second; CPU workers cutting and pasting one
image at a time cannot keep up. Here the whole decoded, resized training set lives on the
device as uint8 (Magnetic Tile at 256 px: 150 MB), and each batch is gathered, turned into float,
and given its synthetic anomalies by :func:`augment.make_anomalies_batch` with the batched anomaly
makers of :mod:`augment.batched`: a handful of kernels per batch, no host round trip, no worker
processes.

The sample order is the same sampler as the loader path (so ``--seed`` and DDP sharding behave
the same); the anomalies come from a device ``torch.Generator`` (``rng``) seeded by
``augment.batch_seed(seed, epoch, step)``, so a resumed run sees the same batches as an
uninterrupted one.
"""

from __future__ import annotations

import math

import torch
from torch.utils.data import Sampler

from augment import batch_seed, make_anomalies_batch, other_indices
from augment.batched import BATCH_MAKERS
from data import TrainSet, to_float
from data.frames import mixed_views, random_tiles, whole_draws


class DeviceBatches:
    """Iterable of ``(normal (B, 3, S, S), anomalies (B, G, 3, S, S))`` float batches on ``device``
    (and ``masks (B, G, S, S)`` bool when the data set is ``with_masks``).

    A drop-in replacement for the ``DataLoader`` of :class:`data.TrainSet` (same sampler, same
    batch layout); call ``set_epoch`` on the sampler as usual.
    """

    def __init__(self, dataset: TrainSet, sampler: Sampler[int], batch_size: int, device: torch.device):
        if dataset.images is None:
            raise ValueError("DeviceBatches needs the in-memory image cache of the training set")
        self.dataset, self.sampler, self.batch_size, self.device = dataset, sampler, batch_size, device
        self.images = dataset.images.to(device)  # (N, 3, H, W) uint8 (the frame; tiles of S x S are cut)
        # (N, 3, S, S) uint8: the whole images a share of the samples are (TrainSet's whole_share; smaller
        # than the frame-sized cache, so cached whenever it is)
        self.wholes = dataset.wholes.to(device) if dataset.whole_share > 0 else None
        self.makers = [BATCH_MAKERS[name] for name in dataset.augs]

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)

    def __iter__(self):
        order = torch.as_tensor(list(self.sampler), dtype=torch.long).to(self.device, non_blocking=True)
        for step, start in enumerate(range(0, len(order), self.batch_size)):
            index = order[start:start + self.batch_size]
            rng = torch.Generator(device=self.device)
            rng.manual_seed(batch_seed(self.dataset.seed, self.dataset.epoch, step))
            yield self.make(index, rng)

    def make(self, index: torch.Tensor, rng: torch.Generator) -> tuple[torch.Tensor, ...]:
        """Training indices ``(B,)`` -> ``(normal (B, 3, S, S), anomalies (B, G, 3, S, S))`` in [0, 1]
        (and their masks, see the class)."""
        whole = whole_draws(len(index), self.dataset.whole_share, rng)
        normal, anomalies, masks = make_anomalies_batch(
            self.views(index, whole, rng), self.makers,
            lambda rng: self.views(other_indices(index, len(self.images), rng), whole, rng),
            rng, self.dataset.rotflip)
        return (normal, anomalies, masks) if self.dataset.with_masks else (normal, anomalies)

    def views(self, index: torch.Tensor, whole: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
        """Training indices ``(B,)`` -> ``(B, 3, S, S)`` float: a random tile of each image, or the
        whole image where ``whole`` ``(B,)`` is true."""
        tiles = random_tiles(self.images[index], self.dataset.size, rng)
        return to_float(tiles if self.wholes is None else mixed_views(tiles, self.wholes[index], whole))

