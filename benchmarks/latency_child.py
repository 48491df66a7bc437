"""One timing of ``benchmarks/latency.py``, in a process of its own so that its peak RSS is its own.

    python -m benchmarks.latency_child FORM FILE --size S --repeats R --budget-s B --batch N

Imports only what ``FORM`` needs (``onnx``: onnxruntime and NumPy, as a deployment would) and
prints one JSON line: p50 / p95 ms at batch 1, images/s at batch N, peak RSS (and for ``predict``
the milliseconds of the network features and of the k-NN search + fusion, timed in turn with
``predict`` itself).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
import warnings
from pathlib import Path

import numpy as np


def synthetic_images(count: int, size: int, seed: int) -> np.ndarray:
    """Smooth random uint8 RGB images ``(count, size, size, 3)``: texture-like, cheap to make."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (count, 12, 12, 3))
    rows = np.linspace(0, 11, size)
    lo, frac = np.floor(rows).astype(int), rows - np.floor(rows)
    hi = np.minimum(lo + 1, 11)
    along_y = coarse[:, lo] * (1 - frac)[None, :, None, None] + coarse[:, hi] * frac[None, :, None, None]
    fine = along_y[:, :, lo] * (1 - frac)[None, None, :, None] + along_y[:, :, hi] * frac[None, None, :, None]
    return np.clip(np.rint(fine + rng.normal(0, 8, fine.shape)), 0, 255).astype(np.uint8)


# Calls before timing. TorchScript's profiling executor runs a file's first two calls unoptimised
# while it records shapes (~1.4 s each for the wave18 detector) and optimises on the third; ONNX
# Runtime and ``predict`` need one. Every form gets the same warm-up.
WARMUP_CALLS = 3


def timed(fn, repeats: int, budget_s: float, warmup: int = WARMUP_CALLS) -> list[float]:
    """Milliseconds of ``fn()`` calls after ``warmup`` untimed ones, up to ``repeats`` or ``budget_s``
    (at least 3)."""
    return timed_in_turn([fn], repeats, budget_s, warmup)[0]


def timed_in_turn(fns: list, repeats: int, budget_s: float, warmup: int = WARMUP_CALLS) -> list[list[float]]:
    """:func:`timed` of several functions called in turn, one call each per repeat, so that a
    shared host's drift falls on all of them alike (their ratios are of the same moments)."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    start = time.perf_counter()
    while len(times[0]) < repeats and (len(times[0]) < 3 or time.perf_counter() - start < budget_s):
        for fn, spent in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            spent.append((time.perf_counter() - t0) * 1000)
    return times


def runners(form: str, path: Path, one: np.ndarray, batch: np.ndarray) -> tuple[dict, object]:
    """``({name: run batch 1}, run batch N)`` for one form: ``p50`` the form itself, and for ``predict``
    also its two parts (``features``: the network; ``knn``: the k-NN search + fusion), timed in turn."""
    warnings.simplefilter("ignore")
    if form == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return {"p50": lambda: session.run(None, {"images": one})}, lambda: session.run(None, {"images": batch})
    import torch

    torch.set_grad_enabled(False)
    if form == "torchscript":
        module = torch.jit.load(str(path))
        return {"p50": lambda: module(torch.from_numpy(one))}, lambda: module(torch.from_numpy(batch))
    from scoring import Detector

    detector = Detector.load(path, device="cpu")
    x = torch.from_numpy(one).permute(0, 3, 1, 2).float() / 255
    feats = detector.features(x)
    return ({"p50": lambda: detector.predict(one), "features": lambda: detector.features(x),
             "knn": lambda: detector.score_features(feats)}, lambda: detector.predict(batch))


def peak_rss_mb() -> float:
    """This process's peak resident memory. Linux keeps ``ru_maxrss`` across ``execve`` (a child
    would report its parent's peak), so the kernel's per-process high-water mark is read instead."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("form", choices=["predict", "torchscript", "onnx"])
    parser.add_argument("file", type=Path)
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--budget-s", type=float, default=30.0)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    one = synthetic_images(1, args.size, seed=2)
    batch = synthetic_images(args.batch, args.size, seed=3)
    run_one, run_batch = runners(args.form, args.file, one, batch)
    samples = dict(zip(run_one, timed_in_turn(list(run_one.values()), args.repeats, args.budget_s)))
    times = samples.pop("p50")
    batch_ms = timed(run_batch, 3, args.budget_s / 2)
    parts = {f"{name}_ms": statistics.median(spent) for name, spent in samples.items()}
    print(json.dumps({**parts, "p50_ms": statistics.median(times), "p95_ms": float(np.percentile(times, 95)),
                      "calls": len(times), "batch_images_per_s": args.batch / (statistics.median(batch_ms) / 1000),
                      "peak_rss_mb": peak_rss_mb()}))


if __name__ == "__main__":
    main()
