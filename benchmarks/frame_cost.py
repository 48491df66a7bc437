"""What scoring at a larger frame costs per test image, against the paper's protocol, on a real test set.

One trained network, three ways of scoring its test set:

- ``paper``: the images squashed to the training size (``--frame square``), the exact bank;
- ``frame, exact``: the checkpoint's (or ``--frame``'s) frame, the exact bank (``--exact``; slow
  on a CPU for large banks);
- ``frame, coreset C``: the same frame with a certified coreset of each ``--coresets`` fraction
  (image scores equal to the exact bank's), reading each patch's ``--cells`` rows of its coreset
  row's cell (the recipe's 64 by default; ``--cells 0,64`` gives both rows); with ``--layers``,
  these rows once for each set of stages (``--layers 2,3 2``), each with features of its own;
  with ``--square-view`` each coreset row again with the image scores at the square view
  (``image_view`` square, :mod:`scoring.engine.views`: its features and search counted too).

Per row: milliseconds per test image for the features and for the k-NN search with fusion (medians
of ``--repeats`` rounds, every row timed once a round, so that a shared host's drift falls on all
rows alike), their sum against the paper row's (the cost ratio the recipe must keep at or below
3; and its lowest and highest over the rounds), the certified
images, the patches re-searched per image and the image / pixel AUROC and AUPRO at that row's
frame. Bank building (once per category) is not counted.

    python -m benchmarks.frame_cost --checkpoint runs/frames/kolektorsdd/tiles/seed0/kolektorsdd-wave18/model.pt \\
        --data-root ../shared/datasets/kolektorsdd --c kolektorsdd --coresets 0.1,0.05
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from tqdm import tqdm

from benchmarks.common import checkpoint_parser, markdown_table, system_info, write_results
from common.recipes import RECIPES
from data import train_images
from scoring import ScoreConfig, metrics
from scoring.building import features_of, load_network, resolve_config
from scoring.engine.features import ImageFiles
from scoring.engine.model import AnomalyScorer
from scoring.pipeline.cli import parse_layers
from scoring.pipeline.evaluation import category_test_set

RECIPE_CELLS = RECIPES["best"]["score"]["cells"]


def get_args_parser() -> argparse.ArgumentParser:
    parser = checkpoint_parser(__doc__)
    parser.add_argument("--frame", default=None, help="the larger frame (default: the checkpoint's)")
    parser.add_argument("--coresets", default="0.1", help="comma list of coreset fractions (certified)")
    parser.add_argument("--cells", default=f"{RECIPE_CELLS}",
                        help="comma list of the coreset rows' cells read per patch (scoring.engine.cells), one row "
                             f"each per coreset (default: --recipe best's {RECIPE_CELLS}; 0: off)")
    parser.add_argument("--exact", action="store_true", help="also the exact bank at the frame")
    parser.add_argument("--square-view", action="store_true",
                        help="also each coreset row with the image scores at the square view (--image-view square)")
    parser.add_argument("--layers", nargs="+", type=parse_layers, default=[list(ScoreConfig.default("layers"))],
                        help="stages the frame's rows score, one or more sets (e.g. 2,3 2); the paper row keeps 2,3")
    parser.add_argument("--fusion", default="concatenation")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timing rounds (every row timed once a round; medians are reported)")
    parser.add_argument("--out", default="results/benchmarks")
    return parser


def features(network, config: ScoreConfig, paths, data_root: str, category: str, device):
    """Training and test features at ``config``'s frame, the test labels and masks, and a function that
    times the test features again (milliseconds per test image)."""
    train_feats, _ = features_of(network, ImageFiles(paths, config.preprocessing), config, device,
                                 f"train features {config.frame}")
    test_set = category_test_set(data_root, category, config)
    test_feats, extras = features_of(network, test_set, config, device, f"test features {config.frame}")
    labels = np.concatenate([np.asarray(e["label"]) for e in extras])
    masks = torch.cat([e["mask"] for e in extras]).numpy()

    def timed() -> float:
        start = time.perf_counter()
        features_of(network, test_set, config, device, f"timing test features {config.frame}")
        return (time.perf_counter() - start) * 1000 / len(labels)

    return train_feats, test_feats, labels, masks, timed


class Row:
    """One way of scoring: its scorer, fitted once, the scores of its last search, and its timings."""

    def __init__(self, name: str, config: ScoreConfig, train_feats, test_feats, labels, masks, timed_features):
        self.name, self.config, self.test_feats = name, config, test_feats
        self.labels, self.masks, self.timed_features = labels, masks, timed_features
        self.scorer = AnomalyScorer.fit(config, train_feats)
        self.feature_ms, self.search_ms = [], []

    def time_once(self) -> None:
        self.feature_ms.append(self.timed_features())
        start = time.perf_counter()
        self.scores, self.maps = self.scorer.score(self.test_feats)
        self.search_ms.append((time.perf_counter() - start) * 1000 / len(self.labels))

    def total(self) -> float:
        return float(np.median(self.feature_ms) + np.median(self.search_ms))

    def round_ratios(self, paper: Row) -> str:
        """The cost against ``paper``'s in each round (the same stretch of time): lowest-highest."""
        ratios = [(f + s) / (pf + ps) for f, s, pf, ps in
                  zip(self.feature_ms, self.search_ms, paper.feature_ms, paper.search_ms)]
        return f"{min(ratios):.2f}-{max(ratios):.2f}"

    def cells(self, paper: Row) -> list[str]:
        stats = self.scorer.search_stats
        coreset = self.config.coreset < 1
        searched = f"{stats['re_searched_per_image_mean']:.0f}" if coreset else "-"
        certified = f"{stats['certified_images']}/{stats['images']}" if coreset else "-"
        maps = self.maps.numpy()
        return [self.name, self.config.frame, str(self.scorer.banks[0].search.size),
                f"{np.median(self.feature_ms):.1f}", f"{np.median(self.search_ms):.1f}", f"{self.total():.1f}",
                f"{self.total() / paper.total():.2f}", self.round_ratios(paper), certified, searched,
                f"{metrics.image_auroc(self.labels, self.scores.numpy()):.4f}",
                f"{metrics.pixel_auroc(self.masks, maps):.4f}", f"{metrics.aupro(self.masks, maps):.4f}"]


def main(args: argparse.Namespace) -> None:
    if args.repeats < 1:
        raise SystemExit(f"frame_cost: --repeats {args.repeats}: give 1 or more timing rounds")
    device = torch.device("cpu")
    network, info = load_network(args.checkpoint, device)
    paths = train_images(args.data_root, args.category)
    paper = resolve_config(ScoreConfig(batch_size=16, fusion=args.fusion, frame="square"), info, paths)
    frame = resolve_config(ScoreConfig(batch_size=16, fusion=args.fusion, frame=args.frame), info, paths)
    rows = [Row("paper (training size, exact)", paper,
                *features(network, paper, paths, args.data_root, args.category, device))]
    for layers in args.layers:
        at_layers = frame.replace(layers=tuple(layers))
        # Each set of stages its own features: a network run only up to its last stage costs less.
        at_frame = features(network, at_layers, paths, args.data_root, args.category, device)
        named = "" if at_layers.layers == paper.layers else f", layers {','.join(map(str, layers))}"
        variants = [(f"frame, exact{named}", at_layers)] if args.exact else []
        variants += [(f"frame, coreset {c} certified" + (f", cells {n}" if int(n) else "") + named,
                      at_layers.replace(coreset=float(c), cells=int(n)))
                     for c in args.coresets.split(",") for n in args.cells.split(",")]
        rows += [Row(name, config, *at_frame) for name, config in variants]
        if args.square_view:  # the same rows with the square view's features and banks added
            viewed = features(network, at_layers.replace(image_view="square"), paths, args.data_root,
                              args.category, device)
            rows += [Row(f"{name}, square view", config.replace(image_view="square"), *viewed)
                     for name, config in variants if config.coreset < 1]
    # Rows timed in turn, --repeats rounds: a shared host's speed drifts, so each row's median is
    # taken over the same stretch of time as the paper row's it is divided by.
    for _ in tqdm(range(args.repeats), desc="timing rounds", unit="round", dynamic_ncols=True):
        for row in rows:
            row.time_once()
    table = [row.cells(rows[0]) for row in rows]
    print(markdown_table(HEADER, table))
    meta = {**system_info(device), "checkpoint": args.checkpoint, "category": args.category,
            "test_images": len(rows[0].labels), "train_images": len(paths), "size": paper.size,
            "repeats": args.repeats}
    print("written:", write_results(args.out, f"frame_cost_{args.category}", HEADER, table, meta))


HEADER = ["scoring", "frame", "bank rows searched", "features ms / img", "k-NN ms / img", "total ms / img",
          "x paper", "x paper by round", "certified", "re-searched / img", "image AUROC", "pixel AUROC", "AUPRO"]

if __name__ == "__main__":
    main(get_args_parser().parse_args())
