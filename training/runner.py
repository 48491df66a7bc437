"""Stage 1 as a Python call: train categories with a :class:`TrainConfig` and a :class:`TrainRun`.

    from training import TrainConfig, TrainRun, train_categories
    config = TrainConfig(arch="wave18", size=96, epochs=15, batch_size=20)
    [(checkpoint, trained)] = train_categories(config, TrainRun(data_root="demo_data"), ["pill"])

Every run folder is checked and locked before the first category trains (a folder that holds a
run is refused unless ``run.resume`` continues it or ``run.overwrite`` moves it aside), and the
locks are released on every way out. ``main.py`` is this call behind its flags; under
``torchrun`` each process calls it with its :class:`DistInfo`.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from common.distributed import DistInfo, all_reduce_sum, cleanup
from common.runtime import resolve_device
from common.settings import category_list, check_stage_arguments

from .config import TrainConfig, TrainRun
from .loop import schedule_note, train_category
from .rundir import RunClaim


def train_categories(config: TrainConfig, run: TrainRun, categories: list[str],
                     device: str | torch.device = "auto", dist_info: DistInfo | None = None,
                     why_overwrite: str = "overwrite", banner: str = "") -> list[tuple[Path, bool]]:
    """Train every category; returns each checkpoint's path and whether it was trained.

    ``why_overwrite`` names what moved an earlier run aside in the message saying so (the
    command line passes its flag); ``banner`` (what is about to be trained) is printed once the
    run folders are claimed, so a refusal is one line.
    """
    check_stage_arguments(config, TrainConfig, run, TrainRun)
    categories = category_list(categories)
    dist_info = dist_info or DistInfo()
    device = resolve_device(device, dist_info.local_rank)
    done = []
    try:
        with claim_runs(config, run, categories, device, dist_info, why_overwrite):
            if banner:
                print(banner, flush=True)
            if dist_info.is_main and (note := schedule_note(config)):
                print(note, flush=True)
            for category in categories:
                done.append(train_category(config, run, category, device, dist_info))
    finally:
        cleanup(dist_info)
    return done


def claim_runs(config: TrainConfig, run: TrainRun, categories: list[str], device: torch.device,
               dist_info: DistInfo, why_overwrite: str = "overwrite") -> contextlib.ExitStack:
    """Check, lock and (``run.overwrite``) move aside every run folder; only rank 0 does it under torchrun.

    Returns the context that releases the locks. The other ranks learn whether rank 0 succeeded
    through one all-reduce, so a refusal stops every process instead of leaving them waiting in
    the first collective.
    """
    held = contextlib.ExitStack()
    failure = None
    if dist_info.is_main:
        claim = RunClaim([run.run_dir(c, config.arch) for c in categories], run.resume, run.overwrite,
                         epochs=config.epochs, why_overwrite=why_overwrite)
        try:
            held.enter_context(claim)
        except BaseException as exc:  # passed on to the other ranks first, then raised
            failure = exc
    if dist_info.enabled:
        flag = all_reduce_sum(torch.tensor([float(failure is not None)], device=device), dist_info)
        if flag.item() and failure is None:
            raise SystemExit(2)  # rank 0 prints the reason
    if failure is not None:
        raise failure
    return held
