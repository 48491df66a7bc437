"""Stage 1: train a WaveCNet to tell normal images from their synthetic anomalies.

One call of :func:`train_category` trains one category: the batch is
``[normal; anomaly_1; ...; anomaly_G]`` with labels ``0, 1, ..., G`` and a cross-entropy loss,
SGD with momentum (the paper's optimiser). Every random choice derives from the seed and the
epoch, so a run resumed from a checkpoint ends with the same weights as an uninterrupted one.
Settings come as a :class:`TrainConfig`, folders and outputs as a :class:`TrainRun`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, DistributedSampler, Sampler
from tqdm import tqdm

import models
from common.distributed import DistInfo, all_reduce_sum, barrier
from common.errors import SETTING, SettingError, UserError
from common.runtime import resolve_precision, resolve_workers
from data import TrainSet, train_images
from data.frames import frame_for_images

from .checkpoints import CHECKPOINT_NAME, CheckpointSaver, read_resume, restore
from .config import RESUME_WARN_SETTINGS, WEIGHT_SETTINGS, TrainConfig, TrainRun
from .device_batches import DeviceBatches
from .interrupt import StopRequest, ignore_sigint_in_worker
from .logger import EpochLogger
from .preview import save_preview
from .segmentation import mask_batch, segmentation_loss

PREVIEW_NAME = "anomaly_preview.png"

__all__ = ["CHECKPOINT_NAME", "PREVIEW_NAME", "RESUME_WARN_SETTINGS", "WEIGHT_SETTINGS", "EpochShuffleSampler",
           "Trainer", "lr_at", "make_batch", "train_category"]


class EpochShuffleSampler(Sampler[int]):
    """A permutation of ``range(n)`` drawn from ``(seed, epoch)``: same order on every resume."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=gen).tolist())

    def __len__(self) -> int:
        return self.n


def lr_at(epoch: int, config: TrainConfig) -> float:
    """Learning rate of ``epoch`` (0-based): constant (the paper), or linear warm-up then cosine.

    A pure function of the epoch, so a resumed run follows the same schedule.
    """
    if config.sched == "constant":
        return config.lr
    warmup = min(config.warmup, config.epochs)
    if epoch < warmup:
        return config.lr * (epoch + 1) / warmup
    span = max(config.epochs - warmup, 1)
    return 0.5 * config.lr * (1 + math.cos(math.pi * (epoch - warmup) / span))


def schedule_note(config: TrainConfig) -> str | None:
    """A warning where the cosine schedule cannot decay (fewer than warm-up + 2 epochs: :func:`lr_at`
    reaches ``lr`` and ends there), else ``None``; short smoke runs of ``--recipe best`` meet it."""
    if config.sched != "cosine" or config.epochs - config.warmup >= 2:
        return None
    return (f"warning: --warmup {config.warmup} leaves no room to decay in --e {config.epochs} epochs: the learning "
            f"rate rises to --lr and stays there; the cosine schedule needs at least {config.warmup + 2} epochs")


def make_batch(normal: torch.Tensor, anomalies: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, 3, S, S)``, ``(B, G, 3, S, S)`` -> images ``((G+1) B, 3, S, S)``, labels ``((G+1) B,)``.

    Order as the paper: all normals, then all of generator 1, then generator 2, ...
    """
    groups = [normal] + list(anomalies.unbind(1))
    labels = torch.arange(len(groups), device=normal.device).repeat_interleave(normal.shape[0])
    return torch.cat(groups), labels


def anomalies_on_device(config: TrainConfig, device: torch.device, dataset: TrainSet) -> bool:
    """Make anomalies batched on the device (auto = on CUDA when the images fit in memory)."""
    if config.anomalies_on == "auto":
        return device.type == "cuda" and dataset.images is not None
    if config.anomalies_on == "device" and dataset.images is None:
        raise SettingError("anomalies_on", "device", "needs the training images cached in memory, but they are "
                                                      "larger than the cache limit; use `anomalies_on=loader` or a "
                                                      "smaller image size")
    return config.anomalies_on == "device"


def make_dataset(config: TrainConfig, run: TrainRun, category: str, dist_info: DistInfo) -> TrainSet:
    """The category's training set; a batch larger than a process's share of it is a ``UserError``."""
    frame = frame_for_images(config.frame, config.size, train_images(run.data_root, category))
    dataset = TrainSet(run.data_root, category, config.size, list(config.augs), seed=config.seed,
                       antialias=config.antialias, rotflip=config.rotflip, with_masks=config.dense, frame=frame,
                       whole_share=config.whole_share)
    per_rank = math.ceil(len(dataset) / dist_info.world_size)
    if config.batch_size > per_rank:
        raise SettingError("batch_size", config.batch_size, f"is larger than the {len(dataset)} training images of "
                                                            f"{category}{' per process' if dist_info.enabled else ''}; "
                                                            f"use {SETTING}{per_rank} or less")
    return dataset


def make_loader(config: TrainConfig, dataset: TrainSet, device: torch.device,
                dist_info: DistInfo) -> tuple[Sampler, Iterable]:
    """The epoch's sample order and the batches: built on the device, or by loader workers."""
    if dist_info.enabled:
        sampler = DistributedSampler(dataset, num_replicas=dist_info.world_size, rank=dist_info.rank,
                                     shuffle=True, seed=config.seed, drop_last=False)
    else:
        sampler = EpochShuffleSampler(len(dataset), config.seed)
    if anomalies_on_device(config, device, dataset):
        return sampler, DeviceBatches(dataset, sampler, config.batch_size, device)
    workers = resolve_workers(config.workers, device)
    loader_kwargs = {"batch_size": config.batch_size, "sampler": sampler, "num_workers": workers,
                     "pin_memory": device.type == "cuda" and config.pin_memory, "drop_last": False}
    if workers > 0:
        # Not persistent_workers: workers hold a copy of the data set, and set_epoch (which
        # seeds the anomalies) only reaches workers started after it.
        loader_kwargs["prefetch_factor"] = 4
        loader_kwargs["worker_init_fn"] = ignore_sigint_in_worker
    return sampler, DataLoader(dataset, **loader_kwargs)


def make_model(config: TrainConfig, device: torch.device) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The network (initialised from the seed) and its SGD optimiser."""
    torch.manual_seed(config.seed)
    model = models.create_model(config.arch, wavelet=config.wavelet, num_classes=config.num_classes,
                                downsample_layer=partial(models.WaveletDownsample, impl=config.dwt_impl),
                                dense=config.dense)
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    model = model.to(device=device, memory_format=memory_format)
    # One fused kernel for the whole update on CUDA instead of a launch per parameter tensor.
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay, fused=device.type == "cuda")
    return model, optimizer


def wrap_model(model: torch.nn.Module, config: TrainConfig, device: torch.device,
               dist_info: DistInfo) -> torch.nn.Module:
    """What the steps call: the model, in DistributedDataParallel under torchrun, compiled if asked."""
    net = model
    if dist_info.enabled:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if config.compile:
        net = torch.compile(net)
    return net


def open_run_dir(run_dir: Path, run: TrainRun, dataset: TrainSet, seed: int, start_epoch: int,
                 main_rank: bool) -> EpochLogger:
    """The epoch log (cut back to ``start_epoch`` on resume) and the anomaly preview, on the main rank."""
    logger = EpochLogger(run_dir, enabled=main_rank, tensorboard=run.tensorboard)
    if main_rank:
        run_dir.mkdir(parents=True, exist_ok=True)
        if run.resume:
            # Epochs past the checkpoint are redone. A new run has no log to cut: its folder was
            # checked to be free of one (RunClaim), and a log is never emptied behind a user's back.
            logger.truncate_after(start_epoch)
        if start_epoch == 0 or not (run_dir / PREVIEW_NAME).exists():
            save_preview(dataset, run_dir / PREVIEW_NAME, seed=seed)
    return logger


@dataclass
class Trainer:
    """What one epoch needs: the network, its optimiser, the batches and how steps run."""

    net: torch.nn.Module
    optimizer: torch.optim.Optimizer
    sampler: Sampler
    dataset: TrainSet
    loader: Iterable
    config: TrainConfig
    device: torch.device
    precision: str  # resolved: fp32 or bf16
    dist_info: DistInfo = field(default_factory=DistInfo)

    def __post_init__(self):
        self.class_names = ["normal", *self.config.augs]
        self.memory_format = torch.channels_last if self.config.channels_last else torch.contiguous_format
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    def epoch(self, epoch: int, stop: StopRequest) -> tuple[torch.Tensor, float]:
        """Train epoch ``epoch`` (0-based); returns ``[loss sum, hits per class, samples per class]`` summed
        over the processes, and the seconds it took. ``stop`` is checked after every step."""
        self.sampler.set_epoch(epoch)
        self.dataset.set_epoch(epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(epoch, self.config)
        self.net.train()
        num = len(self.class_names)
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        correct = torch.zeros(num, device=self.device, dtype=torch.float64)
        seen = torch.zeros(num, device=self.device, dtype=torch.float64)
        start = time.perf_counter()
        batches = tqdm(self.loader, desc=f"epoch {epoch + 1}", leave=False, unit="batch",
                       disable=not self.dist_info.is_main or len(self.loader) < 20, dynamic_ncols=True)
        try:
            for batch in batches:
                loss, logits, labels = self.step(*batch)
                # Accumulated on the device: no host synchronisation inside the step.
                loss_sum += loss.detach() * labels.numel()
                hits = (logits.detach().argmax(1) == labels).double()
                correct.index_add_(0, labels, hits)
                seen.index_add_(0, labels, torch.ones_like(hits))
                stop.check()
        except RuntimeError:
            # A worker killed by the same Ctrl-C (before it could ignore it) fails the fetch.
            if stop.requested:
                raise KeyboardInterrupt from None
            raise
        stats = all_reduce_sum(torch.cat([loss_sum[None], correct, seen]), self.dist_info).cpu()
        return stats, time.perf_counter() - start

    def step(self, normal: torch.Tensor, anomalies: torch.Tensor,
             masks: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One SGD step on a batch; returns the loss, the logits and the labels. With ``config.dense``
        the anomalies' ``masks`` ``(B, G, S, S)`` also train the segmentation head."""
        normal = normal.to(self.device, non_blocking=True)
        anomalies = anomalies.to(self.device, non_blocking=True)
        images, labels = make_batch(normal, anomalies)
        images = images.contiguous(memory_format=self.memory_format)
        with self.autocast:
            outputs = self.net(images)
        logits = outputs[0]
        loss = F.cross_entropy(logits.float(), labels)
        if self.config.dense:
            target = mask_batch(normal, masks.to(self.device, non_blocking=True))
            loss = loss + self.config.dense_weight * segmentation_loss(outputs[2], target)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss, logits, labels


def epoch_summary(stats: torch.Tensor, seconds: float, epoch: int, class_names: list[str],
                  lr: float) -> tuple[dict, dict]:
    """An epoch's ``log.jsonl`` record and the progress bar's postfix, from :meth:`Trainer.epoch`'s sums."""
    num = len(class_names)
    total = float(stats[1 + num:].sum())
    loss = float(stats[0]) / max(total, 1)
    accuracy = {f"acc_{name}": float(stats[1 + i] / max(stats[1 + num + i], 1)) for i, name in enumerate(class_names)}
    record = {"epoch": epoch + 1, "loss": round(loss, 6), **{k: round(v, 4) for k, v in accuracy.items()},
              "lr": lr, "images_per_s": round(total / seconds, 1), "seconds": round(seconds, 2)}
    postfix = {"loss": f"{loss:.4f}", **{name: f"{accuracy[f'acc_{name}']:.2f}" for name in class_names},
               "ips": f"{total / seconds:.0f}"}
    return record, postfix


def check_finite(record: dict, saver: CheckpointSaver, lr: float, network: torch.nn.Module) -> None:
    """A NaN or infinite epoch loss, or weights that became so (the last step of an epoch can
    diverge after its loss was taken), stop the run before anything is saved, naming the last good
    checkpoint."""
    loss_ok = math.isfinite(record["loss"])
    bad = next((name for name, value in network.state_dict().items()
                if value.is_floating_point() and not bool(torch.isfinite(value).all())), None) if loss_ok else None
    if loss_ok and bad is None:
        return
    where = f"{saver.path} (epoch {saver.saved_epoch})" if saver.saved_epoch > 0 and saver.path.exists() \
        else "none: no checkpoint was saved yet"
    what = f"loss became {record['loss']}" if not loss_ok else f"weights became NaN or infinite ({bad})"
    raise UserError(f"{what} in epoch {record['epoch']}; training stopped without saving it, the last "
                    f"good checkpoint is {where}; lower --lr (now {lr})")


def run_epochs(trainer: Trainer, saver: CheckpointSaver, logger: EpochLogger, start_epoch: int, desc: str) -> None:
    """Epochs ``start_epoch`` .. ``config.epochs``: log each, save as :class:`CheckpointSaver` says, and
    on Ctrl-C save the last completed epoch before the ``KeyboardInterrupt`` goes on."""
    config = trainer.config
    bar = tqdm(range(start_epoch, config.epochs), desc=desc, unit="epoch", disable=not saver.main_rank,
               initial=start_epoch, total=config.epochs, dynamic_ncols=True)
    stop = StopRequest().install()
    try:
        for epoch in bar:
            stats, seconds = trainer.epoch(epoch, stop)
            record, postfix = epoch_summary(stats, seconds, epoch, trainer.class_names,
                                            trainer.optimizer.param_groups[0]["lr"])
            check_finite(record, saver, config.lr, trainer.net)
            logger.log(record)
            bar.set_postfix(**postfix)
            saver.epoch_done(epoch + 1)
            stop.check()
        saver.save(config.epochs)
    except KeyboardInterrupt:
        saver.save_interrupted()
        raise
    finally:
        stop.restore()
        bar.close()
        logger.close()


def train_category(config: TrainConfig, run: TrainRun, category: str, device: torch.device,
                   dist_info: DistInfo) -> tuple[Path, bool]:
    """Train one category; returns the final checkpoint's path and whether anything was trained.

    The run folder is expected to be claimed already (``training.rundir.RunClaim``: locked, and
    empty unless ``run.resume`` continues it). A resumed run that already holds ``config.epochs``
    epochs is left byte-identical; fewer epochs than it holds is a ``UserError``.
    """
    run_dir = run.run_dir(category, config.arch)
    ckpt_path = run_dir / CHECKPOINT_NAME
    main_rank = dist_info.is_main
    precision = resolve_precision(config.precision, device)  # unsupported: fails before any work
    # Read first: a resume with nothing to train must return before anything is written.
    ckpt, resume_path, finished = read_resume(config, run, ckpt_path, device, main_rank)
    if finished:
        return ckpt_path, False
    dataset = make_dataset(config, run, category, dist_info)
    sampler, loader = make_loader(config, dataset, device, dist_info)
    model, optimizer = make_model(config, device)
    start_epoch = 0 if ckpt is None else restore(ckpt, resume_path, model, optimizer, config, main_rank)
    del ckpt
    trainer = Trainer(wrap_model(model, config, device, dist_info), optimizer, sampler, dataset, loader, config,
                      device, precision, dist_info)
    logger = open_run_dir(run_dir, run, dataset, config.seed, start_epoch, main_rank)
    saver = CheckpointSaver(ckpt_path, model, optimizer, config, run, category, main_rank, saved_epoch=start_epoch,
                            frame=dataset.frame)
    run_epochs(trainer, saver, logger, start_epoch, desc=f"{category} {config.arch}")
    barrier(dist_info)
    return ckpt_path, True
