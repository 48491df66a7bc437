"""A frame per image, scoring only: does keeping each image's own shape win back image detection?

A detector scores every image at its one frame (``--frame auto``: the training images' median
shape). On a data set of mixed shapes that stretches some images and shrinks others. Here the
same detector's network scores every training and test image at a frame of its own: its own
aspect ratio at the area of the detector's frame (sides multiples of 32, each at least the
training size). One bank holds every training image's patches (the detector's coreset fraction,
certified, so every image score is the exact bank's); each test image's score is the maximum of
its own patch map. Prints image AUROC overall and per defect for both ways; nothing is changed in
the detector.

    python -m benchmarks.own_frames --detector runs/magnetic_tile.detector.pt \\
        --data-root ../shared/datasets --c magnetic_tile

(``DET`` from ``inference_concatenation.py --recipe best ... --save-detector DET``; concatenation.)
A prototype for issue 36's "frame per image": the training was at the one frame, and only the
image score is measured (maps at different shapes are not compared).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from tqdm import tqdm

from benchmarks.common import defect_groups, markdown_table
from data import train_images
from data.frames import frame_at_area
from data.images import network_input, read_rgb
from scoring import Detector, metrics
from scoring.engine.coreset import GreedyCoresetSampler
from scoring.engine.model import AnomalyScorer, to_patches
from scoring.pipeline.evaluation import category_test_set


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--detector", required=True, help="a detector file (--save-detector), concatenation")
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--c", dest="category", required=True)
    return parser


def own_features(detector: Detector, path, area: float) -> list[torch.Tensor]:
    """One image at its own aspect ratio and ``area`` -> per layer ``(1, C_l, h_l, w_l)`` features."""
    raw = read_rgb(path, None)
    height, width = raw.shape[-2:]
    frame = frame_at_area(height / width, area, detector.size)
    return detector.features(network_input(raw[None], frame))


def bank_rows(detector: Detector, feats: list[torch.Tensor]) -> torch.Tensor:
    """One image's features -> its ``(h w, D)`` rows of the (concatenation's one) bank (the detector's
    layer scales where it balances them)."""
    return to_patches(detector.model.scorer.fusion_rule.grids(feats[:len(detector.config.layers)])[0])


@torch.no_grad()  # not set_grad_enabled(False): a caller in the same process keeps its gradients
def main(args: argparse.Namespace) -> None:
    detector = Detector.load(args.detector, device="cpu")
    config = detector.config
    if config.fusion != "concatenation":
        raise SystemExit(f"error: --detector {args.detector}: a concatenation detector is needed")
    area = float(detector.frame[0] * detector.frame[1])
    test_set = category_test_set(args.data_root, args.category, config)
    train_paths = train_images(args.data_root, args.category)
    rows = torch.cat([bank_rows(detector, own_features(detector, p, area))
                      for p in tqdm(train_paths, desc="training images, own frames")]).float().contiguous()
    keep = GreedyCoresetSampler(config.coreset, config.coreset_dim, config.seed).select(rows)
    state = {"rows": rows[keep].contiguous(), "full": rows if config.coreset < 1 else None,
             "coreset": config.coreset, "coreset_dim": config.coreset_dim, "seed": config.seed,
             "scales": detector.model.scorer.banks[0].scales}
    scorer = AnomalyScorer.from_states(config, [state])
    own_scores, certified = [], 0
    for sample in tqdm(test_set.samples, desc="test images, own frames"):
        # The scorer's own search and certification; the image score is the patch map's maximum.
        patch_maps, image_certified, _ = scorer.knn_maps(own_features(detector, sample.path, area))
        certified += int(image_certified[0])
        own_scores.append(float(patch_maps[0].max()))
    one_scores = detector.score_features(
        [torch.cat(parts) for parts in zip(*(detector.features(test_set[i]["image"][None])
                                             for i in tqdm(range(len(test_set)), desc="test images, one frame")))])[0]
    labels = np.array([s.label for s in test_set.samples])
    table = []
    for name, keep_mask in defect_groups([s.defect for s in test_set.samples]):
        table.append([name, int(keep_mask.sum()),
                      f"{metrics.image_auroc(labels[keep_mask], one_scores.numpy()[keep_mask]):.4f}",
                      f"{metrics.image_auroc(labels[keep_mask], np.array(own_scores)[keep_mask]):.4f}"])
    print(f"bank {rows.shape[0]} rows at own frames (area {area:.0f} px), {state['rows'].shape[0]} searched; "
          f"{certified} of {len(labels)} image scores certified exact")
    print(markdown_table(["test images", "count", f"one frame {detector.frame[0]}x{detector.frame[1]}",
                          "own frames"], table))


if __name__ == "__main__":
    main(get_args_parser().parse_args())
