"""Training batches built on the training device: the GPU path of the data pipeline.

On a GPU the network eats thousands of images a second; CPU workers cutting and pasting one
image at a time cannot keep up. Here the whole decoded, resized training set lives on the
device as uint8 (Magnetic Tile at 256 px: 150 MB), and each batch is gathered, turned into float,
and given its synthetic anomalies by the batched generators of :mod:`augment.batched`: a handful
of kernels per batch, no host round trip, no worker processes.

The sample order is the same sampler as the loader path (so ``--seed`` and DDP sharding behave
the same); the anomalies come from a device generator seeded by ``(seed, epoch, step)``, so a
resumed run sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

import math

import torch
from torch.utils.data import Sampler

from augment.batched import BATCH_GENERATORS, rotflip_batch
from data import TrainSet
from data.mvtec import other_indices, sample_seed


class DeviceBatches:
    """Iterable of ``(normal (B, 3, S, S), anomalies (B, G, 3, S, S))`` float batches on ``device``.

    A drop-in replacement for the ``DataLoader`` of :class:`data.TrainSet` (same sampler, same
    batch layout); call ``set_epoch`` on the sampler as usual.
    """

    def __init__(self, dataset: TrainSet, sampler: Sampler[int], batch_size: int, device: torch.device):
        if dataset.images is None:
            raise ValueError("DeviceBatches needs the in-memory image cache of the training set")
        self.dataset, self.sampler, self.batch_size, self.device = dataset, sampler, batch_size, device
        self.images = dataset.images.to(device)  # (N, 3, S, S) uint8
        self.generators = [BATCH_GENERATORS[name] for name in dataset.augs]

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)

    def __iter__(self):
        order = torch.as_tensor(list(self.sampler), dtype=torch.long).to(self.device, non_blocking=True)
        for step, start in enumerate(range(0, len(order), self.batch_size)):
            index = order[start:start + self.batch_size]
            generator = torch.Generator(device=self.device)
            # Offset so the step seeds never collide with the per-sample seeds of the loader path.
            generator.manual_seed(sample_seed(self.dataset.seed, self.dataset.epoch, 1_000_000_007 + step))
            yield self.make(index, generator)

    def make(self, index: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Training indices ``(B,)`` -> ``(normal (B, 3, S, S), anomalies (B, G, 3, S, S))`` in [0, 1]."""
        normal = self.images[index].float().div_(255)
        if self.dataset.rotflip:
            normal = rotflip_batch(normal, generator)
        anomalies = []
        for make in self.generators:
            # Source: another random normal image per sample, as in the paper (not rotated/flipped,
            # as in the loader path).
            source = self.images[other_indices(index, len(self.images), generator)].float().div_(255)
            anomalies.append(make(normal, source, generator)[0])
        return normal, torch.stack(anomalies, 1)
