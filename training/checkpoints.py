"""Training checkpoints: what ``model.pt`` holds, resuming from one, and saving as epochs end.

The checkpoint keeps the paper's keys (``netD_state_dict``, ``epoch``, ``optimizer``) so the
paper's code and older versions of this one read it, plus what rebuilds the run: ``arch``,
``wavelet``, ``size``, ``augs``, ``num_classes``, ``recipe`` and ``args`` (every setting as a
plain dict); with ``--dense``, the segmentation head's weights as ``seg_head_state_dict``.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from pathlib import Path

import torch
from tqdm import tqdm

from common.errors import SETTING, SettingError
from common.provenance import git_commit
from models.checkpoint import HEAD_KEY, load_weights, network_state, read_checkpoint, save_atomic, split_head_state

from .config import RESUME_REFUSED_SETTINGS, RESUME_WARN_SETTINGS, TrainConfig, TrainRun

FORMAT_VERSION = 1
CHECKPOINT_NAME = "model.pt"


def checkpoint_payload(model_state: dict, optimizer_state: dict, epoch: int, config: TrainConfig, run: TrainRun,
                       category: str, frame: tuple[int, int] | None = None) -> dict:
    """The checkpoint dict: the paper's keys plus what rebuilds the run (plain types only); the
    segmentation head's weights (dense self-supervision) go beside ``netD_state_dict``, not in it."""
    net_state, head_state = split_head_state(model_state)
    return {
        "format_version": FORMAT_VERSION,
        "epoch": epoch,
        "netD_state_dict": net_state,
        **({HEAD_KEY: head_state, "dense": True} if head_state else {}),
        "optimizer": optimizer_state,
        "arch": config.arch,
        "wavelet": config.wavelet,
        "size": config.size,
        "frame": list(frame or (config.size, config.size)),  # (H, W) the images were resized to (data.frames)
        "augs": list(config.augs),
        "num_classes": config.num_classes,
        "category": category,
        "seed": config.seed,
        "recipe": config.recipe,
        "args": {**config.to_dict(), "category": category, **run.to_dict()},
        "torch": str(torch.__version__),
        "git_commit": git_commit(),
    }


def check_resume_compatible(ckpt: dict, config: TrainConfig, path: Path) -> None:
    """A checkpoint of another network (arch, wavelet, size, anomaly classes) is a ``SettingError``."""
    for key in RESUME_REFUSED_SETTINGS:
        if key == "dense":
            if bool(ckpt.get("dense", False)) != config.dense:
                has = "has a segmentation head (dense)" if ckpt.get("dense") else "has no segmentation head"
                raise SettingError("resume", str(path), f"the checkpoint {has}; use the same `dense={config.dense}` "
                                                        "setting, or another checkpoint folder")
        elif key == "augs":
            if "augs" in ckpt and list(ckpt["augs"]) != list(config.augs):
                raise SettingError("resume", str(path), f"checkpoint was trained with `augs={','.join(ckpt['augs'])}`")
        elif key in ckpt and ckpt[key] != getattr(config, key):
            raise SettingError("resume", str(path), f"checkpoint has {key}={ckpt[key]} but this run asks "
                                                    f"`{key}={getattr(config, key)}`; use the same settings or another "
                                                    "checkpoint folder")


def resume_setting_changes(ckpt: dict, config: TrainConfig) -> list[str]:
    """``["lr 0.03 -> 0.05", ...]``: settings of this run that differ from the checkpoint's run."""
    saved = ckpt.get("args") or {}
    now = config.to_dict()
    return [f"{key} {saved[key]} -> {now[key]}" for key in RESUME_WARN_SETTINGS
            if key in saved and saved[key] != now[key]]


def check_not_fewer_epochs(epochs: int, done: int, path: Path) -> None:
    """Continuing a run asks for at least the epochs its checkpoint ``path`` already holds (``done``)."""
    if epochs < done:
        raise SettingError("epochs", epochs, f"{path} already holds {done} epochs; give {SETTING}{done} or more to "
                                             f"continue it ({SETTING}{done}: nothing to train), or start over instead "
                                             "of resuming (overwrite)")


def read_resume(config: TrainConfig, run: TrainRun, ckpt_path: Path, device: torch.device,
                main_rank: bool) -> tuple[dict | None, Path | None, bool]:
    """The checkpoint ``run.resume`` continues from: ``(checkpoint or None, its path, finished)``.

    ``finished``: the run's own checkpoint already holds ``config.epochs`` epochs (said so on the
    main rank); there is nothing to train and nothing may be written. Fewer epochs than it holds
    is a ``UserError``.
    """
    if not run.resume:
        return None, None, False
    path = ckpt_path if run.resume == "auto" else Path(run.resume)
    if not path.is_file():
        if run.resume != "auto":
            raise SettingError("resume", str(path), "no such checkpoint")
        return None, path, False
    ckpt = read_checkpoint(path, map_location=device)
    check_resume_compatible(ckpt, config, path)
    done = int(ckpt.get("epoch", 0))
    check_not_fewer_epochs(config.epochs, done, path)
    finished = config.epochs == done and path.resolve() == ckpt_path.resolve()
    if finished and main_rank:
        changed = resume_setting_changes(ckpt, config)
        tqdm.write(f"{ckpt_path} already holds all {done} epochs: nothing to train, nothing changed "
                   f"(give --e more than {done} to continue it"
                   + (f"; not applied: {', '.join(changed)})" if changed else ")"))
    return ckpt, path, finished


def restore(ckpt: dict, path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, config: TrainConfig,
            main_rank: bool) -> int:
    """Load the checkpoint's weights and optimiser state; returns the epoch to continue from.

    The settings of this run win over the saved hyper-parameters (the momentum buffers stay).
    """
    if main_rank:
        changed = resume_setting_changes(ckpt, config)
        if changed:
            tqdm.write(f"--resume {path}: continuing with {', '.join(changed)}; the weights will differ from an "
                       f"uninterrupted run with the checkpoint's settings")
    load_weights(model, network_state(ckpt, str(path)), str(path), config.arch)
    if "optimizer" in ckpt:
        fused = any(group.get("fused") for group in optimizer.param_groups)
        optimizer.load_state_dict(ckpt["optimizer"])
        for group in optimizer.param_groups:
            group.update(lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay, fused=fused)
    start_epoch = int(ckpt.get("epoch", 0))
    if main_rank:
        tqdm.write(f"resumed {path} at epoch {start_epoch}")
    return start_epoch


def copy_tensors(state, into=None):
    """A copy of ``state`` (nested dicts / lists of tensors and plain values) with its own tensors.

    Tensors of ``into`` (an earlier copy) with the same shape, dtype and device are reused: the
    values are copied into them, on their device, without a new allocation.
    """
    if isinstance(state, torch.Tensor):
        if (isinstance(into, torch.Tensor) and into.shape == state.shape and into.dtype == state.dtype
                and into.device == state.device):
            return into.copy_(state.detach())
        return state.detach().clone()
    if isinstance(state, dict):
        old = into if isinstance(into, dict) else {}
        out = OrderedDict() if isinstance(state, OrderedDict) else {}
        for key, value in state.items():
            out[key] = copy_tensors(value, old.get(key))
        if hasattr(state, "_metadata"):  # a module state dict's version records
            out._metadata = copy.deepcopy(state._metadata)
        return out
    if isinstance(state, (list, tuple)):
        old = into if isinstance(into, (list, tuple)) and len(into) == len(state) else [None] * len(state)
        return type(state)(copy_tensors(value, previous) for value, previous in zip(state, old))
    return copy.deepcopy(state)


class CheckpointSaver:
    """Saves ``model.pt`` as epochs end, and on Ctrl-C the last completed epoch.

    An epoch that is not saved leaves a copy of the model's and optimiser's tensors (reused
    buffers on their device, see :func:`copy_tensors`), so that a Ctrl-C in the middle of the next
    epoch, when the live weights are partway into it, saves the completed one. Only the main
    rank writes (and keeps copies).
    """

    def __init__(self, path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, config: TrainConfig,
                 run: TrainRun, category: str, main_rank: bool, saved_epoch: int,
                 frame: tuple[int, int] | None = None):
        self.path, self.model, self.optimizer, self.frame = path, model, optimizer, frame
        self.config, self.run, self.category, self.main_rank = config, run, category, main_rank
        self.saved_epoch = saved_epoch
        self.kept_epoch: int | None = None  # the epoch the copies hold, if newer than the file
        self.kept: tuple[dict, dict] | None = None

    def save(self, epoch: int, states: tuple[dict, dict] | None = None) -> None:
        if self.main_rank:
            model_state, optimizer_state = states or (self.model.state_dict(), self.optimizer.state_dict())
            save_atomic(checkpoint_payload(model_state, optimizer_state, epoch, self.config, self.run, self.category,
                                           self.frame),
                        self.path)
        self.saved_epoch = epoch

    def epoch_done(self, done: int) -> None:
        """Epoch ``done`` (1-based) is complete: save it every ``save_every`` epochs, else keep a copy."""
        every = self.run.save_every
        if every and done % every == 0 and done < self.config.epochs:
            self.save(done)
            self.kept_epoch = None
        elif self.main_rank:
            previous = self.kept or (None, None)
            self.kept = (copy_tensors(self.model.state_dict(), previous[0]),
                         copy_tensors(self.optimizer.state_dict(), previous[1]))
            self.kept_epoch = done

    def save_interrupted(self) -> None:
        """After Ctrl-C: save the last completed epoch (if not saved yet) and say how to continue."""
        if self.kept_epoch is not None and self.main_rank:
            self.save(self.kept_epoch, self.kept)
        if self.main_rank:
            tqdm.write(f"interrupted: {self.path} holds epoch {self.saved_epoch}; continue with the same "
                       f"command plus --resume")
