"""A stand-in for the paper code's training epoch, so that training speed is compared side by side.

The paper's own code cannot run on these machines (it needs OpenCV and imgaug, and imgaug does
not import under NumPy 2), so this script does the same work per step the way that code does it,
with our building blocks (written from the description of its behaviour, not copied):

- data: every sample decodes its image and two other random training images from disk and
  resizes them (no in-memory cache), makes one CutPaste and one Perlin anomaly from them, and
  converts to float, in ``DataLoader`` workers (the paper code asks for 24);
- network: the same WaveCNet ResNet in float32, default memory format, with the wavelet layer
  rebuilt on every call (``paper_style_dwt.PaperStyleDownsample``);
- step: SGD with momentum, then ``loss.item()`` and a scikit-learn confusion matrix on every
  step (a host synchronisation per step, as there).

It prints images/s per epoch (every normal and synthetic image counted) and the median of the
epochs after the first, and writes ``paper_style_train.{md,json}``:

    python -m benchmarks.paper_style_train --arch wave18 --size 128 --b 32 --epochs 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from sklearn.metrics import confusion_matrix
from torch.nn import functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

import models
from benchmarks.common import markdown_table, write_results
from benchmarks.paper_style_dwt import PaperStyleDownsample
from data.mvtec import TrainSet

REPO = Path(__file__).resolve().parent.parent
PAPER_WORKERS = 24


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data-root", default=str(REPO.parent / "shared" / "datasets"))
    parser.add_argument("--c", dest="category", default="magnetic_tile")
    parser.add_argument("--arch", default="wave18", choices=models.list_models())
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--b", dest="batch_size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs; one warm-up epoch runs first")
    parser.add_argument("--workers", type=int, default=PAPER_WORKERS,
                        help="DataLoader workers (the paper code uses 24)")
    parser.add_argument("--lr", type=float, default=0.03)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/benchmarks")
    return parser


def run_epoch(loader: DataLoader, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[int, float]:
    """One epoch, the paper code's way; returns (images seen, seconds)."""
    model.train()
    seen = 0
    start = time.perf_counter()
    for normal, anomalies in tqdm(loader, desc="paper-style epoch", leave=False, unit="batch"):
        images = torch.cat([normal, *anomalies.unbind(1)])
        labels = torch.arange(1 + anomalies.shape[1]).repeat_interleave(normal.shape[0])
        optimizer.zero_grad()
        logits, _ = model(images)
        loss = F.cross_entropy(logits, labels)
        loss.backward()
        optimizer.step()
        # Per-step host-side bookkeeping, as there.
        _ = loss.detach().item() * normal.shape[0]
        predicted = logits.detach().argmax(1)
        confusion_matrix(labels.numpy(), predicted.numpy(), normalize="true").diagonal()
        seen += images.shape[0]
    return seen, time.perf_counter() - start


def main(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    dataset = TrainSet(args.data_root, args.category, args.size, ["cutpaste", "perlin"], seed=args.seed,
                       cache=False)
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.workers)
    model = models.create_model(args.arch, downsample_layer=PaperStyleDownsample)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=3e-5)
    rates = []
    for epoch in tqdm(range(args.epochs + 1), desc=f"paper-style {args.arch}@{args.size}", unit="epoch"):
        dataset.set_epoch(epoch)
        seen, seconds = run_epoch(loader, model, optimizer)
        rates.append(seen / seconds)
        tqdm.write(f"epoch {epoch + 1}{' (warm-up)' if epoch == 0 else ''}: {seen / seconds:.1f} images/s")
    timed = rates[1:] or rates
    median = statistics.median(timed)
    print(f"paper-style {args.arch}@{args.size} batch {args.batch_size}, {args.workers} workers: "
          f"{median:.1f} images/s (median of {len(timed)} epochs after the warm-up)")
    header = ["config", "workers", "batch", "train img/s (median)", "epochs img/s"]
    rows = [[f"{args.arch}@{args.size}", args.workers, args.batch_size, f"{median:.1f}",
             " ".join(f"{r:.1f}" for r in rates)]]
    info = {"command": " ".join(sys.argv), "threads": torch.get_num_threads(), "category": args.category}
    print(markdown_table(header, rows))
    print("written:", write_results(args.out, "paper_style_train", header, rows, info))
    return {"images_per_s": median, "epochs": rates}


if __name__ == "__main__":
    main(get_args_parser().parse_args())
