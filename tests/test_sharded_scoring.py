"""Scoring split over two torchrun processes (gloo, CPU) gives the one-process files exactly.

One torchrun start runs every job (tests/sharded_worker.py); the same jobs run here in one
process, with the threads of one torchrun process and so the same batches and kernels, are the
reference: ``scores.csv`` byte for byte, ``results.json``'s metrics, scores and
search report equal. A rank killed mid-run leaves no result and a non-zero exit.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch

from scoring import ScoreConfig, ScoringRun, score_categories

torchrun = pytest.importorskip("torch.distributed.run")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_jobs(launch, jobs: list[dict], path: Path) -> int | None:
    path.write_text(json.dumps(jobs))
    return launch(["--nnodes=1", "--nproc_per_node=2", f"--master_port={free_port()}",
                   "--rdzv_backend=static", "--master_addr=127.0.0.1", "--node_rank=0",
                   str(Path(__file__).parent / "sharded_worker.py"), str(path)])


def job(tiny_root, trained, out: Path, category="widget", images=None, shard_bank=False, **config) -> dict:
    return {"category": category,
            "config": {"batch_size": 2, **config},
            "run": {"data_root": str(tiny_root), "ckpt_dir": str(trained), "checkpoint": f"{category}-wave18",
                    "out": str(out), "images": images, "pictures": False, "shard_bank": shard_bank}}


def run_here(spec: dict) -> None:
    """One process, with the threads torchrun gives each of its processes (OMP_NUM_THREADS=1): on
    some CPUs (Intel with AMX) a convolution's rounding depends on its thread count (layer-3
    features 7.6e-5 apart at 1 and 2 threads), as on its batch; with both the same, the numbers are."""
    config = ScoreConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec["config"].items()})
    threads = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))  # what torchrun's workers get
    try:
        score_categories(config, ScoringRun(**spec["run"]), [spec["category"]], "cpu", echo=False)
    finally:
        torch.set_num_threads(threads)


COMPARED = ("metrics", "per_defect_image_auroc", "image_f1_threshold", "search", "bank", "threshold", "images")


def test_two_processes_give_the_one_process_results(tiny_root, trained, tmp_path, torchrun_launch, copy_run):
    # A private copy without the session's bank cache: a bank cached by another test (at that
    # process's thread count) would be read by some runs here and rebuilt by the sharded ones.
    copy_run(trained, "widget-wave18", tmp_path / "ckpt")
    trained = tmp_path / "ckpt"
    scratch = str(tiny_root / "widget" / "test" / "scratch")
    # name -> the one-process run it must equal, and its settings (shard_bank: split the bank, not the images)
    references = {
        # refine 1: re-searched means that float32 does not hold exactly; smooth: per-image blurs; balance:
        # the layers' scales, summed over the ranks where the bank is split (bank-concat-coreset-k2)
        "concat-coreset-k2": {"fusion": "concatenation", "coreset": 0.5, "k": 2, "refine": 1, "balance": True},
        "mult-exact": {"fusion": "multiplication", "smooth": 4.0},
        "mult-coreset": {"fusion": "multiplication", "coreset": 0.5},
        "images-coreset": {"fusion": "concatenation", "coreset": 0.5, "images": scratch},
        # the recipe's settings: a non-square frame larger than the training side, a certified coreset
        "frame-coreset": {"fusion": "multiplication", "coreset": 0.5, "frame": "64x32"},
        # image scores at the square view, maps at the frame (scoring.engine.views) with layer 3 upsampled
        # bilinearly, the layers balanced (their scales summed over the ranks where the bank is split), less
        # half their floor
        "square-view": {"fusion": "concatenation", "coreset": 0.5, "frame": "64x32", "image_view": "square",
                        "cells": 4, "floor": 0.5, "upsample": "bilinear", "balance": True},
        "images-threshold": {"fusion": "multiplication", "coreset": 0.5, "k": 2, "images": scratch,
                             "threshold": 1.0},
    }
    sharded = {name: (name, settings) for name, settings in references.items() if name != "images-threshold"}
    # (the bank split of mult-coreset is its two neighbours': a coreset chosen across processes, a
    # multiplication's banks searched in parts)
    sharded.update({f"bank-{name}": (name, {**references[name], "shard_bank": True})
                    for name in ("concat-coreset-k2", "mult-exact", "images-threshold")})
    jobs = [job(tiny_root, trained, tmp_path / "two" / name, **settings) for name, (_, settings) in sharded.items()]
    # Last, a run whose rank 1 is killed (SIGKILL) before it hands over its scores.
    jobs.append({**job(tiny_root, trained, tmp_path / "killed", fusion="concatenation"), "die_rank": 1})
    assert run_jobs(torchrun_launch, jobs, tmp_path / "jobs.json") != 0  # the killed run fails the launch
    assert not (tmp_path / "killed").exists() or not any((tmp_path / "killed").iterdir())  # and leaves nothing
    for name, settings in references.items():
        run_here(job(tiny_root, trained, tmp_path / "one" / name, **settings))
    for name, (reference, settings) in sharded.items():
        one, two = tmp_path / "one" / reference, tmp_path / "two" / name
        assert (two / "results.json").is_file(), f"{name}: no results (see the captured output)"
        a, b = json.loads((one / "results.json").read_text()), json.loads((two / "results.json").read_text())
        assert b["torchrun"] == {"processes": 2, "split": "bank" if settings.get("shard_bank") else "images"}
        a["bank"].pop("cached"), b["bank"].pop("cached")  # the second run reads the first one's bank cache
        for key in COMPARED:
            assert a.get(key) == b.get(key), (name, key)
        table = "scores.csv" if "images" in settings else "results.csv"
        assert (one / table).read_bytes() == (two / table).read_bytes(), name


@pytest.mark.parametrize("count, world, align", [(6, 2, 2), (7, 3, 2), (1, 2, 4), (100, 4, 16), (0, 2, 1)])
def test_shares_are_whole_batches_in_order(count, world, align):
    from common.distributed import DistInfo, block

    shares = [block(count, DistInfo(rank, world), align) for rank in range(world)]
    assert [i for share in shares for i in share] == list(range(count))  # every item once, in order
    assert all(share.start % align == 0 for share in shares if len(share))  # batches are the one process's
