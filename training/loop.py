"""Stage 1: train a WaveCNet to tell normal images from their synthetic anomalies.

One call of :func:`train_category` trains one category: the batch is
``[normal; anomaly_1; ...; anomaly_G]`` with labels ``0, 1, ..., G`` and a cross-entropy loss,
SGD with momentum (the paper's optimiser). Every random choice derives from ``--seed`` and the
epoch, so a run resumed from a checkpoint ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import copy
import math
import time
from argparse import Namespace
from functools import partial
from pathlib import Path

import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, DistributedSampler, Sampler
from tqdm import tqdm

import models
from cli import bf16_available, resolve_workers
from data import TrainSet
from errors import UserError
from models.checkpoint import extract_state_dict, load_weights, read_checkpoint, save_atomic
from scoring.report import git_commit

from .device_batches import DeviceBatches
from .distributed import DistInfo, all_reduce_sum, barrier
from .interrupt import StopRequest, ignore_sigint_in_worker
from .logger import EpochLogger
from .preview import save_preview

FORMAT_VERSION = 1
CHECKPOINT_NAME = "model.pt"
PREVIEW_NAME = "anomaly_preview.png"


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


def anomalies_on_device(args: Namespace, device: torch.device, dataset: TrainSet) -> bool:
    """Make anomalies batched on the device (``--anomalies-on``; auto = on CUDA when the images fit in memory)."""
    site = getattr(args, "anomalies_on", "auto")
    if site == "auto":
        return device.type == "cuda" and dataset.images is not None
    if site == "device" and dataset.images is None:
        raise UserError("--anomalies-on device needs the training images cached in memory, but they are "
                        "larger than the cache limit; use --anomalies-on loader or a smaller --size")
    return site == "device"


def run_dir_for(ckpt_dir: str | Path, category: str, arch: str) -> Path:
    return Path(ckpt_dir) / f"{category}-{arch}"


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if bf16_available(device) else "fp32"
    if precision == "bf16" and not bf16_available(device):
        raise UserError(f"--precision bf16: this {device.type.upper()} has no native bfloat16; use fp32")
    return precision


def lr_at(epoch: int, args: Namespace) -> float:
    """Learning rate of ``epoch`` (0-based): constant (the paper), or linear warm-up then cosine.

    A pure function of the epoch, so a resumed run follows the same schedule.
    """
    if args.sched == "constant":
        return args.lr
    warmup = min(args.warmup, args.epochs)
    if epoch < warmup:
        return args.lr * (epoch + 1) / warmup
    span = max(args.epochs - warmup, 1)
    return 0.5 * args.lr * (1 + math.cos(math.pi * (epoch - warmup) / span))


def make_batch(normal: torch.Tensor, anomalies: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, 3, S, S)``, ``(B, G, 3, S, S)`` -> images ``((G+1) B, 3, S, S)``, labels ``((G+1) B,)``.

    Order as the paper: all normals, then all of generator 1, then generator 2, ...
    """
    groups = [normal] + list(anomalies.unbind(1))
    labels = torch.arange(len(groups), device=normal.device).repeat_interleave(normal.shape[0])
    return torch.cat(groups), labels


def checkpoint_payload(model: torch.nn.Module, optimizer: torch.optim.Optimizer, epoch: int,
                       args: Namespace, category: str) -> dict:
    """The checkpoint dict: the paper's keys plus what rebuilds the run (plain types only)."""
    plain_args = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                  if isinstance(v, (str, int, float, bool, type(None), Path, list))}
    return {
        "format_version": FORMAT_VERSION,
        "epoch": epoch,
        "netD_state_dict": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "arch": args.arch,
        "wavelet": args.wavelet,
        "size": args.size,
        "augs": list(args.augs),
        "num_classes": 1 + len(args.augs),
        "category": category,
        "seed": args.seed,
        "recipe": getattr(args, "recipe", "paper"),
        "args": plain_args,
        "torch": str(torch.__version__),
        "git_commit": git_commit(),
    }


def check_resume_compatible(ckpt: dict, args: Namespace, path: Path) -> None:
    for key in ("arch", "wavelet", "size"):
        if key in ckpt and ckpt[key] != getattr(args, key):
            raise UserError(f"--resume {path}: checkpoint has {key}={ckpt[key]} but this run asks "
                            f"--{key} {getattr(args, key)}; use the same settings or another --ckpt-dir")
    if "augs" in ckpt and list(ckpt["augs"]) != list(args.augs):
        raise UserError(f"--resume {path}: checkpoint was trained with --augs {','.join(ckpt['augs'])}")


def warn_resume_changes(ckpt: dict, args: Namespace, path: Path) -> None:
    changed = resume_setting_changes(ckpt, args)
    if changed:
        tqdm.write(f"--resume {path}: continuing with {', '.join(changed)}; the weights will differ from an "
                   f"uninterrupted run with the checkpoint's settings")


# The settings that decide the trained weights (what a reused or resumed run must match); paths,
# logging and pure speed flags (workers, pin memory, channels_last, compile) are left out.
WEIGHT_SETTINGS = ("category", "size", "antialias", "arch", "wavelet", "augs", "rotflip", "epochs", "batch_size",
                   "lr", "weight_decay", "momentum", "sched", "warmup", "seed", "precision", "anomalies_on")
# Of those, the ones a resume may change with a warning: arch, wavelet, size and augs are refused
# above, and --epochs is left out on purpose (resuming with more epochs extends a run).
RESUME_WARN_SETTINGS = tuple(k for k in WEIGHT_SETTINGS
                             if k not in ("category", "epochs", "arch", "wavelet", "size", "augs"))


def resume_setting_changes(ckpt: dict, args: Namespace) -> list[str]:
    """``["lr 0.03 -> 0.05", ...]``: settings of this run that differ from the checkpoint's run."""
    saved = ckpt.get("args") or {}
    return [f"{key} {saved[key]} -> {getattr(args, key)}" for key in RESUME_WARN_SETTINGS
            if key in saved and hasattr(args, key) and saved[key] != getattr(args, key)]


def train_category(args: Namespace, category: str, device: torch.device, dist_info: DistInfo) -> tuple[Path, bool]:
    """Train one category; returns the final checkpoint's path and whether anything was trained.

    The run folder is expected to be claimed already (``training.rundir.RunClaim``: locked, and
    empty unless ``--resume`` continues it). A resumed run that already holds ``--e`` epochs is
    left byte-identical; fewer epochs than it holds is a ``UserError``.
    """
    run_dir = run_dir_for(args.ckpt_dir, category, args.arch)
    ckpt_path = run_dir / CHECKPOINT_NAME
    main_rank = dist_info.is_main
    precision = resolve_precision(args.precision, device)
    channels_last = args.channels_last
    memory_format = torch.channels_last if channels_last else torch.contiguous_format

    # Read first: a resume with nothing to train must return before anything is written.
    ckpt, resume_path = None, None
    if args.resume:
        resume_path = ckpt_path if args.resume == "auto" else Path(args.resume)
        if resume_path.is_file():
            ckpt = read_checkpoint(resume_path, map_location=device)
            check_resume_compatible(ckpt, args, resume_path)
            done = int(ckpt.get("epoch", 0))
            if args.epochs < done:
                raise UserError(f"--e {args.epochs}: {resume_path} already holds {done} epochs; give --e {done} or "
                                f"more to continue it, or drop --resume and add --overwrite to start over")
            if args.epochs == done and resume_path.resolve() == ckpt_path.resolve():
                if main_rank:
                    changed = resume_setting_changes(ckpt, args)
                    tqdm.write(f"{ckpt_path} already holds all {done} epochs: nothing to train, nothing changed "
                               f"(give --e more than {done} to continue it"
                               + (f"; not applied: {', '.join(changed)})" if changed else ")"))
                return ckpt_path, False
        elif args.resume != "auto":
            raise UserError(f"--resume {resume_path}: no such checkpoint")

    dataset = TrainSet(args.data_root, category, args.size, list(args.augs), seed=args.seed,
                       antialias=args.antialias, rotflip=args.rotflip)
    per_rank = math.ceil(len(dataset) / dist_info.world_size)
    if args.batch_size > per_rank:
        raise UserError(f"--b {args.batch_size} is larger than the {len(dataset)} training images of "
                        f"{category}{' per process' if dist_info.enabled else ''}; use --b {per_rank} or less")
    if dist_info.enabled:
        sampler = DistributedSampler(dataset, num_replicas=dist_info.world_size, rank=dist_info.rank,
                                     shuffle=True, seed=args.seed, drop_last=False)
    else:
        sampler = EpochShuffleSampler(len(dataset), args.seed)
    if anomalies_on_device(args, device, dataset):
        loader = DeviceBatches(dataset, sampler, args.batch_size, device)
    else:
        workers = resolve_workers(args.workers, device)
        loader_kwargs = {"batch_size": args.batch_size, "sampler": sampler, "num_workers": workers,
                         "pin_memory": device.type == "cuda" and args.pin_memory, "drop_last": False}
        if workers > 0:
            # Not persistent_workers: workers hold a copy of the data set, and set_epoch (which
            # seeds the anomalies) only reaches workers started after it.
            loader_kwargs["prefetch_factor"] = 4
            loader_kwargs["worker_init_fn"] = ignore_sigint_in_worker
        loader = DataLoader(dataset, **loader_kwargs)

    torch.manual_seed(args.seed)
    model = models.create_model(args.arch, wavelet=args.wavelet, num_classes=1 + len(args.augs),
                                downsample_layer=partial(models.WaveletDownsample,
                                                         impl=getattr(args, "dwt_impl", "auto")))
    model = model.to(device=device, memory_format=memory_format)
    # One fused kernel for the whole update on CUDA instead of a launch per parameter tensor.
    fused = device.type == "cuda"
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay, fused=fused)

    start_epoch = 0
    if ckpt is not None:
        if main_rank:
            warn_resume_changes(ckpt, args, resume_path)
        load_weights(model, extract_state_dict(ckpt, str(resume_path)), str(resume_path), args.arch)
        if "optimizer" in ckpt:
            optimizer.load_state_dict(ckpt["optimizer"])
            # The flags of this run win over the saved hyper-parameters (momentum buffers stay).
            for group in optimizer.param_groups:
                group.update(lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay, fused=fused)
        start_epoch = int(ckpt.get("epoch", 0))
        if main_rank:
            tqdm.write(f"resumed {resume_path} at epoch {start_epoch}")
        del ckpt
    net = model
    if dist_info.enabled:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if getattr(args, "compile", False):
        net = torch.compile(net)

    logger = EpochLogger(run_dir, enabled=main_rank, tensorboard=not args.no_tensorboard)
    if main_rank:
        run_dir.mkdir(parents=True, exist_ok=True)
        if args.resume:
            # Epochs past the checkpoint are redone. A new run has no log to cut: its folder was
            # checked to be free of one (RunClaim), and a log is never emptied behind a user's back.
            logger.truncate_after(start_epoch)
        if start_epoch == 0 or not (run_dir / PREVIEW_NAME).exists():
            save_preview(dataset, run_dir / PREVIEW_NAME, seed=args.seed)

    class_names = ["normal", *args.augs]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    saved_epoch = start_epoch
    # The last completed epoch's weights, kept so that Ctrl-C can save a resumable state.
    snapshot = None

    def save(epoch: int, state: dict | None = None) -> None:
        nonlocal saved_epoch
        if main_rank:
            payload = state or checkpoint_payload(model, optimizer, epoch, args, category)
            save_atomic(payload, ckpt_path)
        saved_epoch = epoch

    epochs = range(start_epoch, args.epochs)
    bar = tqdm(epochs, desc=f"{category} {args.arch}", unit="epoch", disable=not main_rank,
               initial=start_epoch, total=args.epochs, dynamic_ncols=True)
    stop = StopRequest().install()
    try:
        for epoch in bar:
            sampler.set_epoch(epoch)
            dataset.set_epoch(epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(epoch, args)
            net.train()
            loss_sum = torch.zeros((), device=device, dtype=torch.float64)
            correct = torch.zeros(len(class_names), device=device, dtype=torch.float64)
            seen = torch.zeros(len(class_names), device=device, dtype=torch.float64)
            start = time.perf_counter()
            batches = tqdm(loader, desc=f"epoch {epoch + 1}", leave=False, unit="batch",
                           disable=not main_rank or len(loader) < 20, dynamic_ncols=True)
            try:
                for normal, anomalies in batches:
                    normal = normal.to(device, non_blocking=True)
                    anomalies = anomalies.to(device, non_blocking=True)
                    images, labels = make_batch(normal, anomalies)
                    images = images.contiguous(memory_format=memory_format)
                    with autocast:
                        logits, _ = net(images)
                    loss = F.cross_entropy(logits.float(), labels)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
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
            stats = all_reduce_sum(torch.cat([loss_sum[None], correct, seen]), dist_info).cpu()
            seconds = time.perf_counter() - start
            total = float(stats[1 + len(class_names):].sum())
            loss_value = float(stats[0]) / max(total, 1)
            if not math.isfinite(loss_value):
                where = f"{ckpt_path} (epoch {saved_epoch})" if saved_epoch > 0 and ckpt_path.exists() \
                    else "no checkpoint was saved yet"
                raise UserError(f"loss became {loss_value} in epoch {epoch + 1}; training stopped, the last "
                                f"good checkpoint is {where}; lower --lr (now {args.lr})")
            accuracy = {f"acc_{name}": float(stats[1 + i] / max(stats[1 + len(class_names) + i], 1))
                        for i, name in enumerate(class_names)}
            record = {"epoch": epoch + 1, "loss": round(loss_value, 6),
                      **{k: round(v, 4) for k, v in accuracy.items()},
                      "lr": optimizer.param_groups[0]["lr"], "images_per_s": round(total / seconds, 1),
                      "seconds": round(seconds, 2)}
            logger.log(record)
            bar.set_postfix(loss=f"{loss_value:.4f}", **{name: f"{accuracy[f'acc_{name}']:.2f}"
                                                        for name in class_names},
                            ips=f"{total / seconds:.0f}")
            done = epoch + 1
            if args.save_every and done % args.save_every == 0 and done < args.epochs:
                save(done)
                snapshot = None
            else:
                snapshot = copy.deepcopy(checkpoint_payload(model, optimizer, done, args, category))
            stop.check()
        save(args.epochs)
    except KeyboardInterrupt:
        if snapshot is not None and main_rank:
            save(snapshot["epoch"], snapshot)
        if main_rank:
            tqdm.write(f"interrupted: {ckpt_path} holds epoch {saved_epoch}; continue with the same "
                       f"command plus --resume")
        raise
    finally:
        stop.restore()
        bar.close()
        logger.close()
    barrier(dist_info)
    return ckpt_path, True
