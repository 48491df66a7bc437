"""How much an exact search prunes on trained features: the projected scan that runs, and inverted lists.

**The projected scan** (``scoring.engine.knn.BankSearch._scan``, what every search of a bank of
256+ dimensions runs): per test patch, the share of the bank's rows it re-ranks exactly (the rows
its projection cannot rule out), for the coreset and for the whole bank (the 2% farthest patches
are the ones the certified coreset re-searches there), and the milliseconds per 1,000 patches
against the brute-force search of the same bank (the shortlist over every row, what ran before).

**Inverted lists**, measured only:

The whole bank of a detector file (``--save-detector``; beside a coreset its ``full`` bank) is split
into ``--lists`` lists by k-means (a few Lloyd rounds on a sample, every row to its nearest
centroid), each list with its radius (its farthest row). A row of list ``c`` is at least
``||q - c|| - r_c`` from a patch ``q``, so given a distance ``reach`` at least the patch's nearest
distance, only the lists with ``||q - c|| - r_c <= reach`` can hold its nearest row. For test
patches (random ones of the test images, and the 2% farthest of those: the anomalous ones the
certification re-searches), the table gives the share of the bank's rows in such lists:

- ``reach = true``: the patch's exact nearest distance (the best an exact search could do once it
  has found it, e.g. visiting lists nearest first);
- ``reach = coreset``: the patch's nearest coreset distance (known before any whole-bank search,
  as in the certified coreset's re-searches);
- ``union``: the rows of the lists any patch of a batch of ``--batch`` needs (one pass for all).

    python -m benchmarks.pruning --detector runs/toothbrush.detector.pt \\
        --data-root ../shared/datasets/toothbrush --c toothbrush
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys

import torch

from benchmarks.common import markdown_table, system_info, write_results
from benchmarks.latency_child import timed
from scoring import Detector
from scoring.engine.knn import BankSearch
from scoring.engine.model import to_patches
from scoring.pipeline.evaluation import category_test_set

LLOYD_ROUNDS = 4
SAMPLE_PER_LIST = 32


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--detector", required=True, help="a detector file (--save-detector)")
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--c", dest="category", required=True)
    parser.add_argument("--lists", default="auto,1024", help="list counts; auto: ~sqrt(bank rows)")
    parser.add_argument("--images", type=int, default=40, help="test images sampled (defective first)")
    parser.add_argument("--patches", type=int, default=4000, help="test patches sampled from them")
    parser.add_argument("--batch", type=int, default=64, help="patches per batch of the union column")
    parser.add_argument("--out", default="results/benchmarks")
    return parser


def ball_lists(rows: torch.Tensor, lists: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(B, D)`` -> centroids ``(L, D)`` float64, radii ``(L,)`` float64, rows per list ``(L,)``."""
    gen = torch.Generator().manual_seed(seed)
    sample = rows[torch.randperm(rows.shape[0], generator=gen)[:SAMPLE_PER_LIST * lists]]
    centroids = sample[torch.randperm(sample.shape[0], generator=gen)[:lists]].clone()
    for _ in range(LLOYD_ROUNDS):
        owner = nearest_centroid(sample, centroids)
        sums = torch.zeros_like(centroids).index_add_(0, owner, sample)
        sizes = torch.bincount(owner, minlength=lists)
        centroids[sizes > 0] = sums[sizes > 0] / sizes[sizes > 0, None].float()
    owner = nearest_centroid(rows, centroids)
    centroids = centroids.double()
    radius = torch.zeros(lists, dtype=torch.float64)
    for start in range(0, rows.shape[0], 16384):
        part, own = rows[start:start + 16384].double(), owner[start:start + 16384]
        radius.scatter_reduce_(0, own, (part - centroids[own]).pow(2).sum(1).sqrt(), "amax")
    return centroids, radius, torch.bincount(owner, minlength=lists)


def nearest_centroid(rows: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    c_sq = (centroids * centroids).sum(1)
    return torch.cat([torch.addmm(c_sq[None], rows[s:s + 16384], centroids.t(), alpha=-2).argmin(1)
                      for s in range(0, rows.shape[0], 16384)])


def needed(queries: torch.Tensor, reach: torch.Tensor, centroids: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """``(m, L)`` bool: the lists whose ball bound does not rule them out for each query."""
    q = queries.double()
    to_centroid = torch.cdist(q, centroids)
    return to_centroid - radius[None, :] <= reach.double()[:, None]


def test_patches(detector: Detector, data_root: str, category: str, images: int, count: int) -> torch.Tensor:
    """``(count, D)`` patches of the first bank's grid from ``images`` test images (defective first)."""
    dataset = category_test_set(data_root, category, detector.config)  # the detector's own way in
    order = sorted(range(len(dataset)), key=lambda i: -dataset.samples[i].label)[:images]
    batch = torch.stack([dataset[i]["image"] for i in order])
    feats = [torch.cat(parts) for parts in zip(*(detector.features(batch[s:s + 8]) for s in range(0, len(batch), 8)))]
    # the scorer's own fusion: a balanced detector's layer scales too
    patches = to_patches(detector.model.scorer.fusion_rule.grids(feats[:len(detector.config.layers)])[0]).float()
    pick = torch.randperm(patches.shape[0], generator=torch.Generator().manual_seed(0))[:count]
    return patches[pick]


def scan_share(search: BankSearch, queries: torch.Tensor, k: int) -> torch.Tensor:
    """``(m,)``: the share of ``search``'s rows its scan re-ranks exactly for each query."""
    counts = torch.zeros(queries.shape[0], dtype=torch.long)
    original = search._pair_distances

    def counting(q, query_index, row_index, tracing):
        counts.index_add_(0, query_index.cpu(), torch.ones_like(query_index.cpu()))
        return original(q, query_index, row_index, tracing)

    search._pair_distances = counting
    try:
        for start in range(0, queries.shape[0], 1024):  # as a test image's patches come
            search(queries[start:start + 1024], k)
    finally:
        del search._pair_distances
    return counts.double() / search.size


def brute_force_ms(search: BankSearch, queries: torch.Tensor, k: int) -> float:
    """Milliseconds per 1,000 queries of the same bank searched without its projection."""
    search._projects = lambda: False
    try:
        return 1000 * statistics.median(timed(lambda: search(queries, k), 3, 60.0, warmup=1)) / queries.shape[0]
    finally:
        del search._projects


def projection_rows(name: str, search: BankSearch, queries: torch.Tensor, k: int, top: torch.Tensor) -> list[list]:
    """Table rows of :func:`main`'s projection table for one search (random and 2% farthest patches)."""
    share = scan_share(search, queries, k)
    scan = 1000 * statistics.median(timed(lambda: search(queries, k), 3, 60.0, warmup=1)) / queries.shape[0]
    brute = brute_force_ms(search, queries, k)
    return [[name, search.size, which, f"{share[index].mean():.5f}", f"{share[index].quantile(0.9):.5f}",
             f"{share[index].max():.4f}", f"{scan:.1f}" if which == "random" else "",
             f"{brute:.1f}" if which == "random" else ""]
            for which, index in (("random", slice(None)), ("2% farthest", top))]


@torch.no_grad()  # not set_grad_enabled(False): a caller in the same process keeps its gradients
def main(args: argparse.Namespace) -> None:
    detector = Detector.load(args.detector, device="cpu")
    bank = detector.model.scorer.banks[0]
    whole = bank.whole if bank.whole is not None else bank.search
    rows = whole.rows
    queries = test_patches(detector, args.data_root, args.category, args.images, args.patches)
    k = detector.config.k
    true_reach = whole(queries, k)[:, -1]
    reaches = {"true": true_reach}
    if bank.whole is not None:
        reaches["coreset"] = bank.search(queries, k)[:, -1]
    top = true_reach.topk(max(1, math.ceil(0.02 * len(queries)))).indices
    info = {**system_info(torch.device("cpu")), "detector": args.detector, "k": k, "command": " ".join(sys.argv)}
    scans = ([("coreset", bank.search)] if bank.whole is not None else []) + [("whole bank", whole)]
    header = ["search", "bank rows", "patches", "re-ranked: mean share", "p90", "max", "scan ms / 1,000",
              "brute force ms / 1,000"]
    table = [row for name, search in scans for row in projection_rows(name, search, queries, k, top)]
    print(markdown_table(header, table))
    print("written:", write_results(args.out, f"projection_{args.category}", header, table, info))
    header = ["data set", "bank rows", "lists", "reach", "patches", "mean share", "median", "p90",
              f"union of {args.batch}"]
    table = []
    for lists_text in args.lists.split(","):
        lists = round(math.sqrt(rows.shape[0])) if lists_text == "auto" else int(lists_text)
        centroids, radius, sizes = ball_lists(rows, lists)
        for name, reach in reaches.items():
            need = needed(queries, reach * (1 + 1e-4), centroids, radius)
            share = (need.double() @ sizes.double()) / rows.shape[0]
            union = torch.stack([(need[s:s + args.batch].any(0).double() @ sizes.double()) / rows.shape[0]
                                 for s in range(0, len(queries), args.batch)])
            for which, index in (("random", slice(None)), ("2% farthest", top)):
                part = share[index]
                table.append([args.category, rows.shape[0], lists, name, which, f"{part.mean():.4f}",
                              f"{part.median():.4f}", f"{part.quantile(0.9):.4f}",
                              f"{union.mean():.3f}" if which == "random" else ""])
                print(markdown_table(header, table[-1:]).splitlines()[-1], flush=True)
    print(markdown_table(header, table))
    print("written:", write_results(args.out, f"pruning_{args.category}", header, table, info))


if __name__ == "__main__":
    main(get_args_parser().parse_args())
