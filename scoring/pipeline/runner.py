"""Stage 2 as a Python call: score categories with a :class:`ScoreConfig` and a :class:`ScoringRun`.

    from scoring import ScoreConfig, ScoringRun, score_categories
    records = score_categories(ScoreConfig(fusion="multiplication"),
                               ScoringRun(data_root="demo_data", checkpoint="{category}-wave18"), ["pill"])

For each category: load the checkpoint, get its detector from the bank cache
(:mod:`scoring.pipeline.cache`), score the labelled test set or a folder of new images
(:mod:`scoring.pipeline.evaluation`), optionally run the synthetic check, write the files
(:mod:`scoring.outputs.writing`) and ``results.json``, and return that record. The inference scripts
are this call behind their flags; ``main.py --eval`` and the benchmarks call it directly.

Under torchrun (``shards``: :func:`common.distributed.init_distributed`) the processes split the
images (each holds the whole bank, rank 0 builds and caches it first) or, with
``ScoringRun.shard_bank``, the bank (:mod:`scoring.pipeline.sharding`); rank 0 alone writes, the same
files a single process writes.
"""

from __future__ import annotations

import contextlib
import os
import resource
import time
import warnings
from pathlib import Path

import torch

from common.distributed import DistInfo, barrier
from common.errors import SettingError, UserError
from common.runtime import resolve_device, resolve_workers
from common.settings import category_list, check_stage_arguments
from data import train_images
from data.mvtec import test_samples

from ..building import (
    TrainingImages,
    build_detector,
    features_of,
    files_digest,
    load_network,
    resolve_config,
)
from ..config import ScoreConfig
from ..detector import detector_state
from ..metrics import above_threshold
from ..outputs.folders import run_folder, versioned_dir
from ..outputs.page import write_page, write_summary_page
from ..outputs.report import environment, write_json
from ..outputs.writing import format_record, write_folder, write_run_table, write_summary, write_test_set
from .cache import BankCache
from .evaluation import ONE_PROCESS, category_test_set, evaluate_test_set, folder_images, score_image_folder
from .runs import ScoringRun, detector_target, output_place, resolve_checkpoint, run_identity, settings_record
from .sharding import check_shardable
from .synthetic_check import synthetic_check


def peak_memory() -> dict:
    out = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda_max_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def check_replaceable(target: Path, detector, overwrite: bool) -> None:
    """The detector file may replace the same detector (checkpoint, training images and settings),
    or any detector file with ``overwrite``; never another kind of file (e.g. a checkpoint)."""
    if not target.exists():
        return
    state = detector_state(target)  # one lazy read: the bank is not loaded to compare settings
    if state is None:
        raise SettingError("save_detector", str(target), "the file exists and is not a detector file; choose "
                                                          "another path")
    provenance, ours = state.get("provenance", {}), detector.provenance
    same = state.get("config") == detector.config.to_dict() and all(
        provenance.get(key) == ours.get(key) for key in ("sha256", "train_files_sha256"))
    if not same and not overwrite:
        raise SettingError("save_detector", str(target), "holds a detector of another checkpoint, training images "
                                                          "or settings; add `overwrite=True` to replace it, or "
                                                          "choose another path")


def test_set_record(detector, run: ScoringRun, category: str, out_dir: Path | None,
                    shards: DistInfo = ONE_PROCESS) -> dict | None:
    """Score the category's labelled test set; write its files; its part of ``results.json``
    (under torchrun: rank 0's; the others score their share and return ``None``)."""
    config = detector.config
    dataset = category_test_set(run.data_root, category, config)
    result = evaluate_test_set(detector, dataset, resolve_workers(config.workers, detector.device), category, shards)
    if result is None:
        return None
    if config.threshold is not None:
        threshold, source = config.threshold, "--threshold"
    elif result.f1_threshold is not None:
        threshold, source = result.f1_threshold, "image F1-max on the test labels (pictures only)"
    else:
        threshold, source = None, "none: no --threshold and no F1-max without both good and defect images"
    files = write_test_set(out_dir, result, dataset, threshold, f"{category} ({config.fusion})", run.save_maps,
                           run.pictures)
    labels, count = result.labels, len(result.paths)
    return {
        **pictures_record(files),
        "metrics": result.metrics, "unavailable_metrics": result.unavailable,
        "per_defect_image_auroc": result.per_defect_image_auroc, "image_f1_threshold": result.f1_threshold,
        "threshold": {"value": threshold, "source": source},
        "data": {"root": str(run.data_root), "test_images": count, "test_good": int((labels == 0).sum()),
                 "test_defect": int((labels == 1).sum()),
                 "defect_types": {d: result.defects.count(d) for d in sorted(set(result.defects))}},
        "timings": {"test_s": round(result.seconds, 3), "s_per_test_image": round(result.seconds / count, 4)},
        "files": files,
    }


def folder_record(detector, run: ScoringRun, out_dir: Path | None, listing: tuple[list[Path], list[dict]],
                  shards: DistInfo = ONE_PROCESS) -> dict | None:
    """Score the unlabeled images of ``run.images`` (``listing``: :func:`scoring.pipeline.evaluation.folder_images`);
    write ``scores.csv``; its part of ``results.json`` (under torchrun: rank 0's, see :func:`test_set_record`)."""
    folder = Path(run.images)
    result = score_image_folder(detector, folder, resolve_workers(detector.config.workers, detector.device), listing,
                                shards)
    if result is None:
        return None
    threshold = detector.calibration
    files = write_folder(out_dir, result, folder, threshold.value, run.save_maps, run.pictures)
    count = len(result.paths)
    return {
        **pictures_record(files),
        "data": {"root": str(run.data_root)},  # the training images the bank holds are below it
        "images": {"folder": str(folder), "scored": count, "skipped": result.skipped,
                   "anomalous": int(above_threshold(result.scores, threshold.value).sum())},
        "threshold": threshold.to_dict(),
        "timings": {"test_s": round(result.seconds, 3), "s_per_test_image": round(result.seconds / count, 4)},
        "files": files,
    }


def pictures_record(files: dict) -> dict:
    """The pictures' colour scale, moved from the writer's ``files`` (paths only) to a key of its own."""
    scale = files.pop("pictures", None)
    return {"pictures": scale} if scale else {}


def data_digest(run: ScoringRun, category: str, listing: tuple[list[Path], list[dict]] | None) -> str:
    """The files a run scores, by name and content: the ``--images`` folder's images, or the test
    set's images and masks."""
    if listing is not None:
        return files_digest(listing[0])
    samples = test_samples(run.data_root, category)
    files = [s.path for s in samples] + [s.mask_path for s in samples if s.mask_path is not None]
    # by path below the category: good/001.png and crack/001.png differ by their label
    return files_digest(files, root=Path(run.data_root) / category)


def score_category(config: ScoreConfig, run: ScoringRun, category: str, device: torch.device,
                   out_per_category: bool = False, shards: DistInfo = ONE_PROCESS) -> dict | None:
    """Score one category; writes the run's files under its output folder and returns the record
    (what ``results.json`` holds). ``out_per_category``: ``run.out`` names a parent folder and each
    category writes to ``<out>/<category>``. A run that fails leaves no new version (see
    :func:`scoring.outputs.folders.run_folder`). Under torchrun (``shards``) the images are split over the
    ranks (each holds the whole bank); rank 0 writes every file and returns the record, the
    others return ``None``."""
    total_start = time.perf_counter()
    ckpt_path = resolve_checkpoint(run, category)
    network, info = load_network(ckpt_path, device, run.arch, run.wavelet)
    train = TrainingImages.of(train_images(run.data_root, category))
    config = resolve_config(config, info, train.paths)
    listing = None
    if run.images is not None:
        if Path(run.images).is_file():
            raise SettingError("images", run.images, "is a file; give a folder of images (put the file in a "
                                                     "folder, or use Detector.predict for single files)")
        if not Path(run.images).is_dir():
            raise SettingError("images", run.images, "no such folder")
        listing = folder_images(Path(run.images))
    target = detector_target(run, ckpt_path, config.fusion)
    need_threshold = (listing is not None or target is not None) and config.threshold is None
    if run.shard_bank and not shards.enabled:
        raise UserError("--shard-bank (ScoringRun.shard_bank) splits the bank over torchrun processes: run the "
                        "script under torchrun --nproc_per_node=N, or leave it out")
    if run.shard_bank:
        check_shardable(config, need_threshold, target)
    # Only rank 0 writes: the others need no identity (a digest of every file scored).
    identity = run_identity(config, run, category, info["sha256"], train.digest,
                            data_digest(run, category, listing)) if shards.is_main else None
    base, explicit = output_place(run, ckpt_path, config.fusion, category, out_per_category)
    # The folder is claimed before the bank is built: a refusal costs nothing, a failure leaves no version.
    claim = run_folder(base, identity, explicit, run.overwrite) if shards.is_main else contextlib.nullcontext()
    with claim as out_dir:
        detector, cached, bank_seconds = shared_detector(config, network, info, ckpt_path, run, category, device,
                                                         need_threshold, train, shards)
        if target is not None and shards.is_main:
            check_replaceable(target, detector, run.overwrite)
        record = scored_record(detector, info, run, category, out_dir, listing, shards)
        if record is None:
            return None
        if target is not None:
            record["files"]["detector"] = str(detector.save(target, overwrite=True))  # check_replaceable said so
        record["bank"]["cached"] = cached
        if shards.enabled:  # the numbers are one process's; only the time differs
            record["torchrun"] = {"processes": shards.world_size, "split": "bank" if run.shard_bank else "images"}
        record["timings"].update(bank_s=round(bank_seconds, 3), total_s=round(time.perf_counter() - total_start, 3))
        record.update(memory=peak_memory(), **environment(config.seed, run.command), out_dir=str(out_dir),
                      identity=identity)
        if run.pictures:
            record["files"]["page"] = str(write_page(out_dir, record))
        write_json(out_dir / "results.json", record)
        if listing is None:
            write_run_table(out_dir, record)
    return record


def shared_detector(config: ScoreConfig, network, info: dict, ckpt_path: Path, run: ScoringRun, category: str,
                    device: torch.device, need_threshold: bool, train: TrainingImages, shards: DistInfo):
    """:func:`scoring.building.build_detector` with the bank cache; under torchrun rank 0 builds
    (and caches) it first and the other ranks then read the cache (building their own copy only if
    it could not be written). With ``run.shard_bank`` each rank builds its part, uncached
    (:mod:`scoring.pipeline.sharding`). Returns the detector, whether it came from the cache, the seconds."""
    start = time.perf_counter()
    workers = resolve_workers(config.workers, device)
    if run.shard_bank and shards.enabled:
        detector, _ = build_detector(network, info, config, train, device, calibrate=False, shards=shards,
                                     workers=workers, desc=category)
        return detector, False, time.perf_counter() - start

    def get(rank_zero: bool):
        cache = BankCache(ckpt_path, config, info["sha256"], train.digest, rebuild=run.rebuild_bank and rank_zero,
                          writable=rank_zero)
        return build_detector(network, info, config, train, device, calibrate=need_threshold, cache=cache,
                              workers=workers, desc=category)

    if shards.is_main:
        built = get(True)
    barrier(shards)
    detector, cached = built if shards.is_main else get(False)
    return detector, cached, time.perf_counter() - start


def scored_record(detector, info: dict, run: ScoringRun, category: str, out_dir: Path | None, listing,
                  shards: DistInfo = ONE_PROCESS) -> dict | None:
    """Score the test set (``listing`` ``None``) or the listed new images, and the synthetic check;
    write their files into ``out_dir``; the record of ``results.json`` so far (``info``: the
    checkpoint's). Under torchrun only rank 0 gets the record (the others ``None``)."""
    config, network, device = detector.config, detector.model.network, detector.device
    banks = [bank.search.rows for bank in detector.model.scorer.banks]
    scales = detector.model.scorer.banks[0].scales if banks else None
    record = {
        "category": category, "fusion": config.fusion, "checkpoint": dict(info),
        "settings": settings_record(config, detector.model.scorer.backend),
        "bank": {"patches": [bank.search.total for bank in detector.model.scorer.banks],
                 "dim": [int(b.shape[1]) for b in banks],
                 "train_images": detector.provenance["train_images"],
                 # image_view auto: the view chosen and the two spreads it read (scoring.engine.views)
                 **({"image_view": detector.provenance["image_view"]} if "image_view" in detector.provenance
                    else {}),
                 # balance: each layer's scale in the frame's bank (scoring.engine.model.layer_scales)
                 **({"layer_scales": scales} if scales else {})},
    }
    if run.shard_bank and shards.enabled:
        # Every rank searches its part of the bank for every image, in step; rank 0 alone writes.
        if not shards.is_main:
            workers = resolve_workers(config.workers, device)
            if listing is None:
                evaluate_test_set(detector, category_test_set(run.data_root, category, config), workers,
                                  category)
            else:
                score_image_folder(detector, Path(run.images), workers, listing)
            return None
        shards = ONE_PROCESS
    scored = (test_set_record(detector, run, category, out_dir, shards) if listing is None else
              folder_record(detector, run, out_dir, listing, shards))
    if scored is None:
        return None
    record.update(scored)
    record["search"] = dict(detector.model.scorer.search_stats)  # coreset: certified images, re-searched patches
    if run.synthetic_check:
        check_start = time.perf_counter()
        workers = resolve_workers(config.workers, device)
        record["synthetic_check"] = synthetic_check(
            network, config, run.data_root, category, device,
            lambda dataset, desc: features_of(network, dataset, config, device, desc, workers=workers),
            kinds=run.check_kinds)
        record["timings"]["synthetic_check_s"] = round(time.perf_counter() - check_start, 3)
    return record


def score_categories(config: ScoreConfig, run: ScoringRun, categories: list[str],
                     device: str | torch.device = "auto", echo: bool = True,
                     shards: DistInfo = ONE_PROCESS) -> list[dict]:
    """:func:`score_category` for each category (each into ``<out>/<category>`` when there are
    several), then a summary table with the mean over categories. ``echo`` prints a line per
    category and the summary's path. Under torchrun pass ``shards`` (from
    ``init_distributed(device.type, backend="gloo")``: scoring sends objects and host tensors):
    the images are split over the processes and rank 0 writes the results and returns the
    records (the others an empty list)."""
    check_stage_arguments(config, ScoreConfig, run, ScoringRun)
    categories = category_list(categories)
    if shards.enabled and torch.distributed.get_backend() != "gloo":
        raise SettingError("shards", shards, "scoring needs a gloo process group (it sends objects and host "
                                             "tensors): init_distributed(device.type, backend='gloo')")
    if not shards.enabled and int(os.environ.get("RANK", "0")) > 0:  # (rank 0 alone scoring is fine)
        warnings.warn("score_categories runs in a torchrun process other than rank 0 without shards: it scores "
                      "every image and writes the same files as rank 0; pass "
                      "shards=init_distributed(device.type, backend='gloo')", stacklevel=2)
    device = resolve_device(device, shards.local_rank)
    if run.images is not None and len(categories) != 1:
        raise UserError("scoring a folder of new images uses one category's bank: name one category")
    if run.save_detector and len(categories) != 1:
        raise SettingError("save_detector", run.save_detector, "writes one category's detector: name one category, "
                                                               "or leave the path out (each goes to its run folder)")
    records = []
    for category in categories:
        record = score_category(config, run, category, device, out_per_category=len(categories) > 1, shards=shards)
        if record is None:
            continue
        records.append(record)
        if echo:
            print(format_record(record), flush=True)
    if len(records) > 1:
        if run.out:
            base = Path(run.out) / f"summary-{config.fusion}"
        else:
            identity = {"fusion": config.fusion, "runs": [r["identity"] for r in records]}
            base = versioned_dir(Path("results") / f"summary-{config.fusion}", identity) / "summary"
        path = write_summary(base, records, config.fusion)
        if run.pictures:
            path = write_summary_page(base.with_suffix(".html"), records, config.fusion)
        if echo:
            print(f"summary: {path}")
    return records
