"""What scoring at a larger frame costs per test image, against the paper's protocol, on a real test set.

One trained network, three ways of scoring its test set:

- ``paper``: the images squashed to the training size (``--frame square``), the exact bank;
- ``frame, exact``: the checkpoint's (or ``--frame``'s) frame, the exact bank (``--exact``; slow
  on a CPU for large banks);
- ``frame, coreset C``: the same frame with a certified coreset of each ``--coresets`` fraction
  (image scores equal to the exact bank's).

Per row: milliseconds per test image for the features and for the k-NN search with fusion, their
sum against the paper row's (the cost ratio the recipe must keep at or below 3), the certified
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

from benchmarks.common import checkpoint_parser, markdown_table, system_info, write_results
from data import train_images
from scoring import ScoreConfig, metrics
from scoring.building import features_of, load_network, resolve_config
from scoring.engine.features import ImageFiles
from scoring.engine.model import AnomalyScorer
from scoring.pipeline.evaluation import category_test_set


def get_args_parser() -> argparse.ArgumentParser:
    parser = checkpoint_parser(__doc__)
    parser.add_argument("--frame", default=None, help="the larger frame (default: the checkpoint's)")
    parser.add_argument("--coresets", default="0.1", help="comma list of coreset fractions (certified)")
    parser.add_argument("--exact", action="store_true", help="also the exact bank at the frame")
    parser.add_argument("--fusion", default="concatenation")
    parser.add_argument("--out", default="results/benchmarks")
    return parser


def features(network, config: ScoreConfig, paths, data_root: str, category: str, device):
    """Training and test features at ``config``'s frame, the test labels and masks, and the
    milliseconds per test image of the test features."""
    train_feats, _ = features_of(network, ImageFiles(paths, config.preprocessing), config, device,
                                 f"train features {config.frame}")
    start = time.perf_counter()
    test_feats, extras = features_of(network, category_test_set(data_root, category, config), config,
                                     device, f"test features {config.frame}")
    labels = np.concatenate([np.asarray(e["label"]) for e in extras])
    masks = torch.cat([e["mask"] for e in extras]).numpy()
    return train_feats, test_feats, labels, masks, (time.perf_counter() - start) * 1000 / len(labels)


def scored_row(name: str, config: ScoreConfig, train_feats, test_feats, labels, masks, feature_ms: float,
               paper_ms: float | None) -> tuple[list[str], float]:
    scorer = AnomalyScorer.fit(config, train_feats)
    start = time.perf_counter()
    scores, maps = scorer.score(test_feats)
    search_ms = (time.perf_counter() - start) * 1000 / len(labels)
    total = feature_ms + search_ms
    stats = scorer.search_stats
    searched = f"{stats['re_searched_per_image_mean']:.0f}" if config.coreset < 1 else "-"
    certified = f"{stats['certified_images']}/{stats['images']}" if config.coreset < 1 else "-"
    scores_np, maps_np = scores.numpy(), maps.numpy()
    return [name, config.frame, str(scorer.banks[0].search.size), f"{feature_ms:.1f}", f"{search_ms:.1f}",
            f"{total:.1f}", f"{total / (paper_ms or total):.2f}", certified, searched,
            f"{metrics.image_auroc(labels, scores_np):.4f}", f"{metrics.pixel_auroc(masks, maps_np):.4f}",
            f"{metrics.aupro(masks, maps_np):.4f}"], total


def main(args: argparse.Namespace) -> None:
    device = torch.device("cpu")
    network, info = load_network(args.checkpoint, device)
    paths = train_images(args.data_root, args.category)
    paper = resolve_config(ScoreConfig(batch_size=16, fusion=args.fusion, frame="square"), info, paths)
    frame = resolve_config(ScoreConfig(batch_size=16, fusion=args.fusion, frame=args.frame), info, paths)
    rows = []
    paper_row, paper_ms = scored_row("paper (training size, exact)", paper,
                                     *features(network, paper, paths, args.data_root, args.category, device), None)
    rows.append(paper_row)
    print(markdown_table(HEADER, rows), flush=True)
    at_frame = features(network, frame, paths, args.data_root, args.category, device)
    variants = [("frame, exact", frame)] if args.exact else []
    variants += [(f"frame, coreset {c} certified", frame.replace(coreset=float(c))) for c in args.coresets.split(",")]
    for name, config in variants:
        rows.append(scored_row(name, config, *at_frame, paper_ms)[0])
        print(markdown_table(HEADER, rows[-1:]).split("\n", 2)[2], flush=True)
    print(markdown_table(HEADER, rows))
    meta = {**system_info(device), "checkpoint": args.checkpoint, "category": args.category,
            "test_images": len(at_frame[2]), "train_images": len(paths), "size": paper.size}
    print("written:", write_results(args.out, f"frame_cost_{args.category}", HEADER, rows, meta))


HEADER = ["scoring", "frame", "bank rows searched", "features ms / img", "k-NN ms / img", "total ms / img",
          "x paper", "certified", "re-searched / img", "image AUROC", "pixel AUROC", "AUPRO"]

if __name__ == "__main__":
    main(get_args_parser().parse_args())
