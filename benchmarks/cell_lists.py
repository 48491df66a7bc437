"""What reading the coreset's cell lists costs per test image, ranked by projection or every row measured.

One trained network scored as ``--recipe best`` scores it: at its frame, a certified coreset
(``--coreset``), each test patch's value tightened by ``--cells`` rows of its coreset row's cell
(:func:`scoring.engine.cells.tightened`). Two ways to choose the row whose distance is the value:

- ``ranked`` (the default since 2026-12-06): the rows ranked by their first-pass projection (34
  floats each), the lowest :data:`scoring.engine.knn.WINDOW_EXACT_ROWS` measured exactly;
- ``every row``: every row's product with the patch (384 floats each), the lowest measured exactly.

Both are timed in turn, ``--repeats`` rounds in one process (a shared host's drift falls on both
alike), on the test set's patches, the coreset's own search (the same for both) not counted:
milliseconds per test image, medians. Per way also the whole scorer's pixel AUROC and AUPRO, and
how often its patch values equal the other way's.

    python -m benchmarks.cell_lists --checkpoint runs/kolektorsdd-wave18/model.pt \\
        --data-root ../shared/datasets/kolektorsdd --c kolektorsdd
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from tqdm import tqdm

from benchmarks.common import checkpoint_parser, markdown_table, system_info, write_results
from benchmarks.frame_cost import RECIPE_CELLS, features
from data import train_images
from scoring import ScoreConfig, metrics
from scoring.building import load_network, resolve_config
from scoring.engine.model import AnomalyScorer, bank_grids, to_patches

QUERY_BLOCK = 16384  # patches searched at once (as the scorer's batches of 16 frame-sized images)


def get_args_parser() -> argparse.ArgumentParser:
    parser = checkpoint_parser(__doc__)
    parser.add_argument("--coreset", type=float, default=0.1)
    parser.add_argument("--cells", type=int, default=RECIPE_CELLS, help="rows read per patch")
    parser.add_argument("--repeats", type=int, default=5, help="timing rounds (each way once a round)")
    parser.add_argument("--out", default="results/benchmarks")
    return parser


def main(args: argparse.Namespace) -> None:
    if args.repeats < 1 or args.cells < 1:
        raise SystemExit("cell_lists: --repeats and --cells must be 1 or more")
    device = torch.device("cpu")
    network, info = load_network(args.checkpoint, device)
    paths = train_images(args.data_root, args.category)
    config = resolve_config(ScoreConfig(batch_size=16, fusion="concatenation", coreset=args.coreset,
                                        cells=args.cells), info, paths)
    train_feats, test_feats, labels, masks, _ = features(network, config, paths, args.data_root, args.category,
                                                         device)
    scorer = AnomalyScorer.fit(config, train_feats)
    bank = scorer.banks[0]
    patches = torch.cat([to_patches(grid) for grid in bank_grids(config, test_feats[:len(config.layers)])])
    nearest = torch.cat([bank.search.nearest(patches[start:start + QUERY_BLOCK], 1)[1][:, 0]
                         for start in range(0, patches.shape[0], QUERY_BLOCK)])
    rows = (bank.cell_starts[nearest][:, None] + torch.arange(args.cells)).clamp_max(bank.whole.size - 1)

    def values() -> torch.Tensor:
        return torch.cat([bank.whole.nearest_among(patches[start:start + QUERY_BLOCK], rows[start:start + QUERY_BLOCK],
                                                   args.cells) for start in range(0, patches.shape[0], QUERY_BLOCK)])

    ways = {"ranked": True, "every row": False}
    times = {way: [] for way in ways}
    found = {}
    for _ in tqdm(range(args.repeats + 1), desc="timing rounds", unit="round", dynamic_ncols=True):
        for way, ranked in ways.items():
            bank.whole.ranks_windows = ranked
            start = time.perf_counter()
            found[way] = values()
            times[way].append((time.perf_counter() - start) * 1000 / len(labels))
    table = []
    for way, ranked in ways.items():
        bank.whole.ranks_windows = ranked
        scores, maps = scorer.score(test_feats, desc=f"k-NN search ({way})")  # (scores: certified, either way)
        same = (found[way] == found["every row"]).float().mean()
        every = found["every row"]  # (a patch equal to a bank row is 0 away: no relative difference)
        worst = ((found[way] - every).abs() / every.clamp_min(torch.finfo(every.dtype).tiny)).max()
        rounds = times[way][1:]  # the first round warms up
        table.append([way, f"{statistics.median(rounds):.1f}", " / ".join(f"{t:.1f}" for t in rounds),
                      f"{100 * float(same):.2f}%", f"{float(worst):.2e}",
                      f"{metrics.pixel_auroc(masks, maps.numpy()):.4f}", f"{metrics.aupro(masks, maps.numpy()):.4f}"])
    print(markdown_table(HEADER, table))
    meta = {**system_info(device), "checkpoint": args.checkpoint, "category": args.category, "frame": config.frame,
            "test_images": len(labels), "patches": int(patches.shape[0]), "whole_bank_rows": bank.whole.size,
            "cells": args.cells, "coreset": args.coreset, "repeats": args.repeats,
            "image_auroc": float(metrics.image_auroc(labels, scores.numpy()))}
    print("written:", write_results(args.out, f"cell_lists_{args.category}", HEADER, table, meta))


HEADER = ["cell rows", "ms / test image (median)", "rounds", "values equal to every row's",
          "largest relative difference", "pixel AUROC", "AUPRO"]

if __name__ == "__main__":
    main(get_args_parser().parse_args())
