"""Where a frame detects worse: image AUROC by how far each test image's shape is from the frame's.

Reads the ``image_scores.csv`` and ``results.json`` of scoring runs (the accuracy benchmark's
folders ``<work-dir>/<category>/<variant>/seed<N>/results/<fusion>/``) and opens each test image
only for its size. Every defective image is put in a bin twice:

- ``aspect``: ``|log(a / a_frame)|``, how much resizing to the frame stretches one side against
  the other (``a`` = height / width);
- ``scale``: ``sqrt(frame area / image area)``, below 1 where the frame shrinks the image;

and each bin's defective images are ranked against *all* the normal test images (image AUROC),
so the bins share one reference and differ only in which defects they hold. Mean and spread over
the seeds. A data set whose images all have one shape has one bin of each.

    python -m benchmarks.shape_bins --work-dir runs36/acc --dataset magnetic_tile \\
        --variants best best-sq --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
from pathlib import Path

from PIL import Image
from sklearn.metrics import roc_auc_score

from scoring.outputs.report import markdown_table

ASPECT_EDGES = (0.0, 0.25, 0.6, math.inf)
SCALE_EDGES = (0.0, 0.8, 1.2, math.inf)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, required=True)
    parser.add_argument("--dataset", required=True, help="the category folder name under --work-dir")
    parser.add_argument("--variants", nargs="+", required=True)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--fusion", default="concatenation")
    parser.add_argument("--reference-frame", default=None,
                        help="HxW the bins are measured against (default: the first variant's frame, so that "
                             "every variant, a square scoring too, is binned the same way)")
    return parser


def frame_of(settings: dict) -> tuple[int, int]:
    """A run's frame ``(H, W)`` from its results.json settings."""
    frame = str(settings.get("frame") or "square")
    if "x" in frame:
        height, width = frame.split("x")
        return int(height), int(width)
    return int(settings["size"]), int(settings["size"])


def image_bins(width: int, height: int, frame: tuple[int, int]) -> list[str]:
    """The ``aspect`` and ``scale`` bins of an image of ``width`` x ``height`` px against ``frame`` ``(H, W)``."""
    aspect = abs(math.log((height / width) / (frame[0] / frame[1])))
    scale = math.sqrt(frame[0] * frame[1] / (height * width))
    names = []
    for name, value, edges in (("aspect", aspect, ASPECT_EDGES), ("scale", scale, SCALE_EDGES)):
        i = next(i for i in range(len(edges) - 1) if edges[i] <= value < edges[i + 1])
        names.append(f"{name} {edges[i]:g}-{edges[i + 1]:g}")
    return names


def bin_aurocs(run: Path, frame: tuple[int, int], sizes: dict[str, tuple[int, int]]) -> dict[str, float]:
    """``{bin name: AUROC of all normal images against that bin's defective ones}`` for one run, its
    images binned against ``frame`` ``(H, W)``."""
    with open(run / "image_scores.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    normal = [float(r["score"]) for r in rows if int(r["label"]) == 0]
    bins: dict[str, list[float]] = {}
    for r in rows:
        if int(r["label"]) == 0:
            continue
        if r["path"] not in sizes:
            with Image.open(r["path"]) as image:
                sizes[r["path"]] = image.size
        for name in image_bins(*sizes[r["path"]], frame):
            bins.setdefault(name, []).append(float(r["score"]))
    return {name: float(roc_auc_score([0] * len(normal) + [1] * len(scores), normal + scores))
            for name, scores in sorted(bins.items()) if normal}


def main(args: argparse.Namespace) -> None:
    first = next((args.work_dir / args.dataset).glob(f"{args.variants[0]}/seed*/results/{args.fusion}/results.json"),
                 None)
    if first is None:
        raise SystemExit(f"error: no {args.variants[0]}/seed*/results/{args.fusion}/results.json under "
                         f"{args.work_dir / args.dataset}: check --work-dir, --dataset and --variants")
    frame = (tuple(int(v) for v in args.reference_frame.split("x")) if args.reference_frame
             else frame_of(json.loads(first.read_text())["settings"]))
    sizes: dict[str, tuple[int, int]] = {}
    header, rows = ["variant", "bin", "defective images", "image AUROC (mean ± std over seeds)"], []
    for variant in args.variants:
        per_seed = [bin_aurocs(args.work_dir / args.dataset / variant / f"seed{seed}" / "results" / args.fusion,
                               frame, sizes) for seed in (int(s) for s in args.seeds.split(","))]
        for name in per_seed[0]:
            values = [s[name] for s in per_seed if name in s]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            rows.append([variant, name, "", f"{statistics.mean(values):.3f} ± {spread:.3f}"])
    counts: dict[str, int] = {}
    for width, height in sizes.values():
        for name in image_bins(width, height, frame):
            counts[name] = counts.get(name, 0) + 1
    for row in rows:
        row[2] = str(counts.get(row[1], ""))
    print(f"bins against the frame {frame[0]}x{frame[1]} (H x W)")
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main(get_args_parser().parse_args())
