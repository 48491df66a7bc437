"""The bank's density around a patch, scoring only: image scores divided by how spread out normal patches are there.

A detector's image score is the largest distance of a test patch to its nearest normal patch. On a
grainy texture (Magnetic Tile, MVTec 3D-AD's tire) normal patches are spread out, so a normal
image's rarest patch is far from the bank too, and the maximum rises on normal images as much as
on defective ones. Here each patch's distance ``d`` (the whole bank's, exact) is divided by
``r ** alpha``, ``r`` the mean distance from the patch's nearest coreset row to that row's
``--neighbours`` nearest other coreset rows (the greedy coreset covers the bank evenly, so its
spacing says how dense normal patches are there); ``alpha = 0`` is the detector's own score. Every
image score is certified as the scorer certifies its own: a patch's coreset distance is an upper
bound of ``d``, divided by the same ``r ** alpha``. Prints image AUROC overall and per defect
for each ``alpha``; nothing is changed in the detector or its maps.

    python -m benchmarks.bank_density --checkpoint runs/magnetic_tile-wave18/model.pt \\
        --data-root ../shared/datasets --c magnetic_tile

The recipe's scoring (``--recipe best``: the checkpoint's frame, coreset 0.1; concatenation).
Issue 36's "an image score that is not only the maximum of the finest map", measured.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from tqdm import tqdm

from benchmarks.common import checkpoint_parser, defect_groups, markdown_table, system_info, write_results
from common.recipes import RECIPES
from data import train_images
from scoring import ScoreConfig, metrics
from scoring.building import features_of, load_network, resolve_config
from scoring.engine.features import ImageFiles
from scoring.engine.model import AnomalyScorer, PatchBank, bank_grids, to_patches
from scoring.pipeline.evaluation import category_test_set


def powers(text: str) -> list[float]:
    """``--alphas``: a comma list of non-negative numbers (argparse turns a ValueError into one line)."""
    values = [float(part) for part in text.split(",")]
    if any(not value >= 0 for value in values):
        raise ValueError(text)
    return values


def positive(text: str) -> int:
    if int(text) < 1:
        raise ValueError(text)
    return int(text)


def get_args_parser() -> argparse.ArgumentParser:
    parser = checkpoint_parser(__doc__)
    parser.add_argument("--alphas", type=powers, default="0,0.25,0.5,0.75,1",
                        help="comma list of the density's powers, each 0 or more (0: the detector's own score)")
    parser.add_argument("--neighbours", type=positive, default=5,
                        help="coreset rows (1 or more) a row's spacing is measured to")
    parser.add_argument("--coreset", type=float, default=RECIPES["best"]["score"]["coreset"])
    parser.add_argument("--frame", default=None, help="default: the checkpoint's")
    parser.add_argument("--out", default="results/benchmarks")
    return parser


def spacing(bank: PatchBank, neighbours: int) -> torch.Tensor:
    """Per coreset row ``(R,)``: its mean distance to its ``neighbours`` nearest other coreset rows."""
    rows = bank.search.rows
    distances = torch.cat([bank.search(part, neighbours + 1) for part in rows.split(4096)])
    return distances[:, 1:].mean(1)  # column 0: the row itself


def certified_maxima(bank: PatchBank, patches: torch.Tensor, upper: torch.Tensor,
                     scales: dict[float, torch.Tensor], step: int = 64) -> tuple[dict[float, float], int]:
    """One image's ``(P, D)`` patches and their ``(P,)`` coreset distances (upper bounds of the whole
    bank's) -> per alpha the exact ``max_p d(p) / scale(p)`` (``scales``: per alpha ``(P,)``), and how
    many patches were searched in the whole bank. Highest bound first, until no bound left is above
    the best exact value (each patch searched at most once)."""
    known = torch.full_like(upper, float("nan"))
    best = {}
    for alpha, scale in scales.items():
        bound = upper / scale
        order = bound.argsort(descending=True)
        top, pos = float("-inf"), 0
        while pos < len(order) and top < float(bound[order[pos]]):
            picked = order[pos:pos + step]
            todo = picked[known[picked].isnan()]
            if len(todo):
                known[todo] = bank.exact(patches[todo], 1)
            top = max(top, float((known[picked] / scale[picked]).max()))
            pos += step
        best[alpha] = top
    return best, int((~known.isnan()).sum())


@torch.no_grad()  # not torch.set_grad_enabled(False): a caller's (a test's) training must keep its gradients
def main(args: argparse.Namespace) -> None:
    alphas = args.alphas
    device = torch.device("cpu")
    network, info = load_network(args.checkpoint, device)
    paths = train_images(args.data_root, args.category)
    config = resolve_config(ScoreConfig(batch_size=16, frame=args.frame, coreset=args.coreset, cells=0,
                                        refine=1), info, paths)
    train_feats, _ = features_of(network, ImageFiles(paths, config.preprocessing), config, device, "train features")
    test_set = category_test_set(args.data_root, args.category, config)
    test_feats, extras = features_of(network, test_set, config, device, "test features")
    bank = AnomalyScorer.fit(config, train_feats).banks[0]
    spread = spacing(bank, args.neighbours)
    grids = bank_grids(config, test_feats[:len(config.layers)])
    scores, searched = {a: [] for a in alphas}, 0
    for grid in tqdm(grids[0].split(1), desc="certified image scores"):
        patches = to_patches(grid).float()
        upper, nearest = (found[:, 0] for found in bank.search.nearest(patches, 1))
        best, count = certified_maxima(bank, patches, upper, {a: spread[nearest] ** a for a in alphas})
        searched += count
        for alpha in alphas:
            scores[alpha].append(best[alpha])
    labels = np.concatenate([np.asarray(e["label"]) for e in extras])
    groups = defect_groups([s.defect for s in test_set.samples])
    header = ["alpha"] + [f"image AUROC {name}" for name, _ in groups]
    table = [[f"{alpha:g}"] + [f"{metrics.image_auroc(labels[keep], np.array(scores[alpha])[keep]):.4f}"
                               for _, keep in groups] for alpha in alphas]
    print(markdown_table(header, table))
    meta = {**system_info(device), "checkpoint": args.checkpoint, "category": args.category,
            "frame": config.frame, "coreset": config.coreset, "coreset_rows": int(bank.search.size),
            "neighbours": args.neighbours, "test_images": len(labels),
            "re_searched_per_image": round(searched / len(labels), 1)}
    print("written:", write_results(args.out, f"bank_density_{args.category}", header, table, meta))


if __name__ == "__main__":
    main(get_args_parser().parse_args())
