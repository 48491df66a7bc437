"""Nearest-neighbour search per test image, side by side: the paper-style per-image ``cdist``
against our chunked torch search, faiss, and a 10% coreset bank.

Uses a real memory bank when given one (``ckpt/<p>/banks/*.pt`` written by the inference
scripts), else a random bank of the Magnetic Tile wave18@128 size (195,072 x 384).

    python -m benchmarks.knn --bank ckpt/magnetic_tile-wave18/banks/concatenation-*.pt
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import markdown_table, median_seconds, system_info, write_results
from scoring.engine.coreset import greedy_coreset
from scoring.engine.knn import BankSearch, faiss_available


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--bank", default=None, help="cached bank file (.pt); default: random bank")
    parser.add_argument("--rows", type=int, default=195_072)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--patches", type=int, default=256, help="query patches per test image (16 x 16)")
    parser.add_argument("--images", type=int, default=3, help="timed repeats (median reported)")
    parser.add_argument("--batch-images", type=int, default=64,
                        help="test images searched per call by our backends (the scoring scripts batch 64)")
    parser.add_argument("--coreset-dim", type=int, default=32)
    parser.add_argument("--out", default="results/benchmarks")
    return parser


def paper_style(bank: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """What the paper's inference does per test image: full distance matrix, then the minimum."""
    return torch.cdist(queries, bank).min(dim=1).values


def main(args: argparse.Namespace) -> None:
    if args.bank:
        entry = torch.load(args.bank, map_location="cpu", weights_only=True)
        first = entry["banks"][0]  # a bank state (scoring.engine.model.bank_states)
        bank = first["full"] if first.get("full") is not None else first["rows"]  # the whole bank, also of coresets
    else:
        bank = torch.randn(args.rows, args.dim, generator=torch.Generator().manual_seed(0)).abs()
    gen = torch.Generator().manual_seed(1)
    count = args.patches * args.batch_images
    picks = torch.randint(0, bank.shape[0], (count,), generator=gen)
    queries = bank[picks] + 0.1 * torch.randn(count, bank.shape[1], generator=gen)
    one_image = queries[: args.patches]
    rows = []
    # The paper's way: one test image at a time, full distance matrix.
    reference = paper_style(bank, one_image)
    paper_s = median_seconds(lambda: paper_style(bank, one_image), args.images, warmup=1)
    rows.append(["paper-style cdist, per image", bank.shape[0], f"{paper_s * 1e3:.0f}", "1.0x", "0"])
    backends = ["torch"] + (["faiss"] if faiss_available() else [])
    per = args.batch_images
    for backend in backends:
        index = BankSearch(bank, backend)
        err = float((index(one_image, 1)[:, 0] - reference).abs().max())
        t = median_seconds(lambda index=index: index(queries, 1), args.images, warmup=1) / per
        rows.append([f"{backend} exact, {per} images per call", bank.shape[0], f"{t * 1e3:.0f}",
                     f"{paper_s / t:.1f}x", f"{err:.1e}"])
    small = bank[greedy_coreset(bank, 0.1, proj_dim=args.coreset_dim, progress=False)]
    index = BankSearch(small, backends[-1])
    t = median_seconds(lambda: index(queries, 1), args.images, warmup=1) / per
    rows.append([f"{backends[-1]} coreset 0.1, {per} images per call", small.shape[0], f"{t * 1e3:.0f}",
                 f"{paper_s / t:.1f}x", "-"])
    header = ["search", "bank rows", "ms / image", "speed-up", "max |d - d_paper|"]
    print(markdown_table(header, rows))
    info = {**system_info(torch.device("cpu")), "patches": args.patches, "dim": int(bank.shape[1]),
            "bank": args.bank or "random"}
    print("written:", write_results(args.out, "knn_cpu", header, rows, info))


if __name__ == "__main__":
    main(get_args_parser().parse_args())
