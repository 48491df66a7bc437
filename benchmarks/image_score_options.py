"""Image-score options on saved maps: how well does each way of turning a map into one score detect?

Reads the ``maps.npz`` of scoring runs (``--save-maps``; the accuracy benchmark's folders
``<work-dir>/<category>/<variant>/seed<N>/results/<fusion>/``) and prints, per data set and seed,
the image AUROC of:

- ``max``: the maximum of the map (what scoring does; the run's own image AUROC);
- ``poolW``: the maximum of the map averaged over W x W pixel windows (stride W/4): a defect must
  raise a region, not one patch, so a frame's many small patches raise the normal images' maxima less;
- ``topP``: the mean of the map's highest P fraction of pixels;
- ``REF``: the image scores of a second variant (``--reference``, e.g. the same networks at the
  paper's square frame), for comparison on the same networks.

    python -m benchmarks.image_score_options --work-dir runs/acc --datasets toothbrush kolektorsdd \\
        --variant best-exact --reference best-sq --seeds 0,1,2

The maps are the runs' own: with a certified coreset they are upper bounds outside the patches
re-searched, so ``pool`` / ``top`` on them are approximations of the exact bank's (``max`` is exact).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from scoring.outputs.report import markdown_table

POOLS = (8, 16, 24, 32)
TOPS = (0.001, 0.01)


def options(maps: np.ndarray) -> dict[str, np.ndarray]:
    """``maps`` ``(N, H, W)`` -> ``{option: (N,) image scores}``."""
    flat = maps.reshape(len(maps), -1)
    out = {"max": flat.max(1)}
    tensor = torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float32))[:, None]
    for window in POOLS:
        if window <= min(maps.shape[1:]):
            pooled = F.avg_pool2d(tensor, window, stride=max(1, window // 4))
            out[f"pool{window}"] = pooled.flatten(1).amax(1).numpy()
    ordered = -np.sort(-flat, axis=1)
    for fraction in TOPS:
        out[f"top{fraction:g}"] = ordered[:, :max(1, int(fraction * flat.shape[1]))].mean(1)
    return out


def run_maps(work_dir: Path, dataset: str, variant: str, seed: int, fusion: str) -> dict:
    return dict(np.load(work_dir / dataset / variant / f"seed{seed}" / "results" / fusion / "maps.npz"))


def main(args: argparse.Namespace) -> None:
    seeds = [int(s) for s in args.seeds.split(",")]
    header, rows = None, []
    for dataset in args.datasets:
        per_option: dict[str, list[float]] = {}
        for seed in seeds:
            try:
                saved = run_maps(Path(args.work_dir), dataset, args.variant, seed, args.fusion)
            except FileNotFoundError:
                continue
            labels = saved["labels"]
            scores = options(saved["maps"])
            if args.reference:
                reference = run_maps(Path(args.work_dir), dataset, args.reference, seed, args.fusion)
                assert list(reference["paths"]) == list(saved["paths"]), "the two runs scored other images"
                scores["REF"] = reference["scores"]
            for name, values in scores.items():
                per_option.setdefault(name, []).append(roc_auc_score(labels, values))
        if not per_option:
            continue
        names = list(per_option)
        header = header or ["data set", "seeds", *names]
        runs = len(per_option["max"])
        rows.append([dataset, runs, *(f"{statistics.mean(v):.3f} +-{statistics.pstdev(v):.3f}" if runs > 1
                                       else f"{v[0]:.3f}" for v in per_option.values())])
        print(dataset, {name: [round(v, 3) for v in values] for name, values in per_option.items()}, flush=True)
    if header:
        print(markdown_table(header, rows))


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", default="runs/accuracy")
    parser.add_argument("--datasets", nargs="+", required=True, help="category folders under --work-dir")
    parser.add_argument("--variant", required=True, help="the variant whose maps are read (scored with --save-maps)")
    parser.add_argument("--reference", help="a variant whose image scores are shown beside (REF)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--fusion", default="concatenation")
    return parser


if __name__ == "__main__":
    main(get_args_parser().parse_args())
