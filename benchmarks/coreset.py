"""Coreset scoring against the exact bank on a real test set: are the image scores the same, and at what cost?

For each fusion and ``k``, the test images' features are scored three ways with the same
network: the exact bank, a greedy coreset with certified image scores (the default), and the
same coreset with the fixed, uncertified re-search of each image's ``--refine`` highest patches
(the behaviour before certification). Per row: the largest relative difference of an image
score to the exact bank's, how many image scores differ by more than 1e-5, how many are
certified, the patches re-searched per image (mean / max), the k-NN milliseconds per image and
the image / pixel AUROC.

    python -m benchmarks.coreset --checkpoint ckpt/toothbrush-wave18/model.pt \\
        --data-root ../shared/datasets/toothbrush --c toothbrush --coreset 0.1
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
from scoring.engine.model import AnomalyScorer, bank_states
from scoring.pipeline.evaluation import category_test_set


def get_args_parser() -> argparse.ArgumentParser:
    parser = checkpoint_parser(__doc__)
    parser.add_argument("--coreset", type=float, default=0.1)
    parser.add_argument("--refine", type=int, default=ScoreConfig.default("refine"))
    parser.add_argument("--ks", default="1,2")
    parser.add_argument("--fusions", default="concatenation,multiplication")
    parser.add_argument("--out", default="results/benchmarks")
    return parser


def timed_score(scorer: AnomalyScorer, feats: list[torch.Tensor]) -> tuple[np.ndarray, np.ndarray, float]:
    """Scores ``(N,)``, maps ``(N, S, S)`` and the milliseconds per image of the k-NN search and fusion."""
    start = time.perf_counter()
    scores, maps = scorer.score(feats)
    return scores.numpy(), maps.numpy(), (time.perf_counter() - start) * 1000 / len(scores)


def rows_for(config: ScoreConfig, coreset: ScoreConfig, train_feats, test_feats, labels, masks) -> list[list[str]]:
    """The three rows (exact ``config``, certified and uncertified ``coreset``) of one fusion and ``k``."""
    exact_scores, exact_maps, exact_ms = timed_score(AnomalyScorer.fit(config, train_feats), test_feats)
    states = bank_states(coreset, train_feats)  # one coreset, re-searched two ways
    rows = [row(config, "exact", exact_scores, exact_scores, exact_maps, exact_ms, None, labels, masks)]
    for name, kind in (("certified", coreset), (f"uncertified (fixed {coreset.refine})",
                                                coreset.replace(certify=False))):
        scorer = AnomalyScorer.from_states(kind, states)
        scores, maps, ms = timed_score(scorer, test_feats)
        rows.append(row(config, name, scores, exact_scores, maps, ms, scorer.search_stats, labels, masks))
    return rows


def row(config: ScoreConfig, name: str, scores: np.ndarray, exact: np.ndarray, maps: np.ndarray, ms: float,
        search: dict | None, labels: np.ndarray, masks: np.ndarray) -> list[str]:
    relative = np.abs(scores - exact) / np.abs(exact)
    searched = "-" if search is None else \
        f"{search['re_searched_per_image_mean']:.0f} / {search['re_searched_per_image_max']}"
    certified = "-" if search is None else f"{search['certified_images']}/{search['images']}"
    return [config.fusion, str(config.k), name, f"{relative.max():.1e}",
            f"{int((relative > 1e-5).sum())}/{len(scores)}", certified, searched, f"{ms:.1f}",
            f"{metrics.image_auroc(labels, scores):.4f}", f"{metrics.pixel_auroc(masks, maps):.4f}"]


def main(args: argparse.Namespace) -> None:
    device = torch.device("cpu")
    network, info = load_network(args.checkpoint, device)
    base = resolve_config(ScoreConfig(batch_size=16), info)
    train = ImageFiles(train_images(args.data_root, args.category), base.preprocessing)
    train_feats, _ = features_of(network, train, base, device, "train features")
    test_feats, extras = features_of(network, category_test_set(args.data_root, args.category, base), base,
                                     device, "test features")
    labels = np.concatenate([np.asarray(e["label"]) for e in extras])
    masks = torch.cat([e["mask"] for e in extras]).numpy()
    rows = []
    for fusion in args.fusions.split(","):
        for k in (int(k) for k in args.ks.split(",")):
            config = base.replace(fusion=fusion, k=k)
            coreset = config.replace(coreset=args.coreset, refine=args.refine)
            rows += rows_for(config, coreset, train_feats, test_feats, labels, masks)
            print(markdown_table(HEADER, rows[-3:]).split("\n", 2)[2], flush=True)
    print(markdown_table(HEADER, rows))
    meta = {**system_info(device), "checkpoint": args.checkpoint, "category": args.category,
            "test_images": len(labels), "train_images": len(train), "size": base.size, "coreset": args.coreset}
    print("written:", write_results(args.out, "coreset", HEADER, rows, meta))


HEADER = ["fusion", "k", "bank", "max rel. diff to exact", "images off > 1e-5", "certified", "re-searched mean / max",
          "k-NN ms / image", "image AUROC", "pixel AUROC"]

if __name__ == "__main__":
    main(get_args_parser().parse_args())
