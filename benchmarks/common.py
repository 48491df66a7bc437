"""Helpers shared by the benchmark scripts: timing with warm-up, Markdown tables, system info."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from scoring.outputs.report import markdown_table  # noqa: F401  (re-exported for the benchmark scripts)


def checkpoint_parser(doc: str) -> argparse.ArgumentParser:
    """A parser with what the benchmarks on one trained network and its data set share:
    ``--checkpoint``, ``--data-root``, ``--c``; ``doc`` (the module docstring) gives the description."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a trained model.pt")
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--c", dest="category", required=True)
    return parser


def defect_groups(defects: list[str]) -> list[tuple[str, np.ndarray]]:
    """Test images' defect names (``good`` for normal) -> ``("all", every image)``, then per defect kind
    its images with the normal ones: the masks an image AUROC per defect is taken over."""
    groups = [("all", np.ones(len(defects), bool))]
    return groups + [(kind, np.array([d in ("good", kind) for d in defects]))
                     for kind in sorted(set(defects) - {"good"})]


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1,
                   sync: Callable[[], None] | None = None) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs after ``warmup`` untimed runs."""
    sync = sync or (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def device_sync(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def system_info(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d")}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def write_results(out_dir: str | Path, name: str, header: list[str], rows: list[list[object]],
                  info: dict) -> Path:
    """Write ``name.md`` (table + settings) and ``name.json`` (rows as dicts) into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = markdown_table(header, rows)
    (out_dir / f"{name}.md").write_text(f"{table}\n\n{json.dumps(info)}\n")  # settings under the table
    (out_dir / f"{name}.json").write_text(
        json.dumps({"info": info, "rows": [dict(zip(header, r)) for r in rows]}, indent=2))
    return out_dir / f"{name}.md"
