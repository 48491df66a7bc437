"""The command line shared by ``inference_concatenation.py`` and ``inference_multiplication.py``.

Both scripts are this parser and :func:`main` with a different ``fusion``; nothing else differs.
The flags map one to one onto :class:`ScoreConfig` and :class:`ScoringRun` fields (their
defaults are the dataclasses'); the work is :func:`scoring.pipeline.runner.score_categories`.
"""

from __future__ import annotations

import argparse
import shlex
import sys

import models
from augment import parse_augs
from common import cli
from common.distributed import SCORING_TIMEOUT, cleanup, init_distributed, stop_on_sigterm
from common.errors import UserError
from common.recipes import RECIPES
from common.runtime import PRECISIONS, resolve_device
from data import resolve_categories

from ..config import BACKENDS, FUSIONS, IMAGE_VIEWS, MAP_SOURCES, UPSAMPLINGS, ScoreConfig
from .runner import score_categories
from .runs import ScoringRun
from .synthetic_check import CHECK_AUGS, HELD_OUT_KINDS

DEFAULT = ScoreConfig.default  # every scoring default comes from the dataclass: one definition per setting


def parse_layers(text: str) -> list[int]:
    try:
        layers = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma list of stage numbers, e.g. 2,3") from None
    if not layers or any(not 1 <= layer <= 4 for layer in layers) or len(set(layers)) != len(layers):
        raise argparse.ArgumentTypeError(f"'{text}': stages are numbered 1 to 4, each at most once (e.g. 2,3)")
    return sorted(layers)


def get_args_parser(fusion: str) -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(
        description=f"Score test images with the {fusion} fusion of multi-level features (stage 2).",
        formatter_class=cli.DefaultsHelpFormatter)
    data = parser.add_argument_group("Data")
    data.add_argument("--c", "--category", dest="category", default="all",
                      help="category under --data-root, a comma list, or 'all'")
    data.add_argument("--data-root", default=ScoringRun.data_root, help="MVTec-layout data root")
    data.add_argument("--size", type=int, default=DEFAULT("size"),
                      help="the network's training side (default: the checkpoint's, else 256); images are "
                           "resized to the frame (--frame), which is size x size only for a square frame")
    data.add_argument("--frame", default=DEFAULT("frame"),
                      help="what images are resized to: square (size x size), auto (the training images' "
                           "aspect ratio and size, up to 4x the area) or HxW (default: the checkpoint's)")
    data.add_argument("--antialias", action="store_true",
                      help="antialiased resize (as the training run, if it used it)")
    data.add_argument("--images", default=None,
                      help="score this folder of unlabeled images instead of the test set (scores.csv + heatmaps)")
    model = parser.add_argument_group("Model")
    model.add_argument("--p", "--checkpoint", dest="checkpoint", default=None,
                       help="checkpoint: sub-folder of --ckpt-dir holding model.pt or e1600_model.pt, or a file "
                            "(default: <category>-<arch>; '{category}' in it is replaced)")
    model.add_argument("--ckpt-dir", default=ScoringRun.ckpt_dir, help="where checkpoints live")
    model.add_argument("--arch", default=None, choices=models.list_models(),
                       help="expected arch (default: whatever the checkpoint holds; wave50 for the default --p)")
    model.add_argument("--wavelet", default=None,
                       help="wavelet for checkpoints that do not record one (the paper's: bior2.2)")
    scoring = parser.add_argument_group("Scoring")
    scoring.add_argument("--layers", type=parse_layers, default=DEFAULT("layers"),
                         help="stages whose features are scored")
    scoring.add_argument("--upsample", default=DEFAULT("upsample"), choices=UPSAMPLINGS,
                         help="concatenation: how the coarser stages reach the finest stage's grid, nearest (the "
                              "paper's) or bilinear (PatchCore's; --recipe best)")
    scoring.add_argument("--balance", action=argparse.BooleanOptionalAction, default=DEFAULT("balance"),
                         help="concatenation: scale each stage's features to vary as much over the training "
                              "patches as the coarsest stage's, so the distance weighs them alike (--recipe best; "
                              "--no-balance: the paper's, unscaled)")
    scoring.add_argument("--k", type=int, default=DEFAULT("k"),
                         help="nearest neighbours averaged per patch (the paper: 1)")
    scoring.add_argument("--coreset", type=float, default=DEFAULT("coreset"),
                         help="fraction of the memory bank kept by greedy k-center (1.0 = whole bank, the paper)")
    scoring.add_argument("--coreset-dim", type=int, default=DEFAULT("coreset_dim"),
                         help="random-projection dimension used while selecting the coreset")
    scoring.add_argument("--refine", type=int, default=DEFAULT("refine"),
                         help="with --coreset < 1: patches re-searched in the whole bank per round (doubling each "
                              "round) until every image score is certified equal to the exact bank's")
    scoring.add_argument("--cells", type=int, default=DEFAULT("cells"), metavar="N",
                         help="with --coreset < 1 and --k 1: read N rows of each patch's coreset cell, so that the "
                              "maps come within ~0.1 pixel AUROC of the whole bank's (0 = off; --recipe best: 64)")
    scoring.add_argument("--image-view", dest="image_view", default=DEFAULT("image_view"), choices=IMAGE_VIEWS,
                         help="where image scores come from: frame (the map's maximum), square (the image remade "
                              "at the training size, the paper's view; maps stay the frame's) or auto (the view "
                              "whose cross-fitted training scores spread less; --recipe best)")
    scoring.add_argument("--uncertified", dest="certify", action="store_false",
                         help="with --coreset < 1: re-search only each image's --refine highest patches, once "
                              "(faster; image scores may lie above the exact bank's); with --refine 0 none "
                              "(the coreset alone)")
    scoring.add_argument("--smooth", type=float, default=DEFAULT("smooth"),
                         help="Gaussian sigma (px) applied to the maps (0 = the paper; PatchCore uses 4)")
    scoring.add_argument("--floor", type=float, default=DEFAULT("floor"), metavar="SHARE",
                         help="take this share of each k-NN map's own minimum off it, after --smooth (0 = the paper; "
                              "--recipe best: 0.5); evens out maps whose normal part sits higher; image scores "
                              "are taken before it")
    scoring.add_argument("--map", "--map-source", dest="map_source", default=DEFAULT("map_source"), choices=MAP_SOURCES,
                         help="anomaly map: knn (the paper's); for a network trained with --dense also head (its "
                              "segmentation head) or fused (both, each normalised on training images)")
    scoring.add_argument("--knn", default=DEFAULT("knn"), choices=BACKENDS,
                         help="nearest-neighbour backend of banks under 256 dimensions (auto = faiss when installed, "
                              "else torch); wider banks are scanned in their projection; same distances")
    scoring.add_argument("--knn-precision", default=DEFAULT("knn_precision"), choices=PRECISIONS,
                         help="torch k-NN shortlist products (banks under 256 dimensions): fp32, or bf16 (queries its "
                              "rounding bound cannot certify "
                              "are searched again in fp32); auto: bf16 on CUDA and CPUs with AMX. Returned distances "
                              "are exact float32 ones either way")
    scoring.add_argument("--precision", default=DEFAULT("precision"), choices=["fp32", "bf16"],
                         help="feature extraction precision")
    scoring.add_argument("--threshold", type=float, default=DEFAULT("threshold"),
                         help="anomaly score threshold for verdicts and predicted regions (default: calibrated "
                              "on training images for --images, image F1-max for the test set)")
    scoring.add_argument("--calib-percentile", type=float, default=DEFAULT("calib_percentile"),
                         help="percentile of cross-fitted training scores used as the calibrated threshold")
    scoring.add_argument("--seed", type=int, default=DEFAULT("seed"),
                         help="seed of the coreset and the calibration split")
    scoring.add_argument("--recipe", default=DEFAULT("recipe"), choices=list(RECIPES),
                         help="named set of scoring defaults (paper = the paper's protocol); flags you give win")
    scoring.add_argument("--rebuild-bank", action="store_true", help="ignore a cached memory bank")
    scoring.add_argument("--synthetic-check", action="store_true",
                         help="also score a held-out fifth of the training images with synthetic anomalies "
                              "(bank from the rest): a label-free signal for choosing options "
                              "(results.json 'synthetic_check')")
    scoring.add_argument("--check-kinds", default=None, metavar="KINDS",
                         help="the synthetic check's anomaly kinds, a comma list of --augs names (implies "
                              f"--synthetic-check; default {','.join(CHECK_AUGS)}); "
                              f"{','.join(HELD_OUT_KINDS)} are kinds no recipe trains on")
    out = parser.add_argument_group("Output")
    out.add_argument("--out", default=None,
                     help=f"output folder (default: results/<p>/{fusion}/v<N>, or results/<p>/{fusion}-images/v<N>, "
                          "a new version per checkpoint and settings, 'latest' linking the newest)")
    out.add_argument("--overwrite", action="store_true",
                     help="let --out replace results of another checkpoint or other settings (the default "
                          "folders never need it: they keep one version per checkpoint and settings)")
    out.add_argument("--save-detector", nargs="?", const="", default=None, metavar="PATH",
                     help="also write the detector (network, banks, calibrated threshold, settings) as one file, "
                          "for scoring.Detector.load and export.py (default path: ckpt/<p>/detector-<fusion>.pt)")
    out.add_argument("--save-maps", action="store_true", help="also write maps.npz (maps, masks, labels, scores)")
    out.add_argument("--no-pictures", action="store_true", help="skip the heatmap PNGs and the ROC plot")
    out.add_argument("--shard-bank", action="store_true",
                     help="under torchrun: each process holds 1/N of the memory bank and every process searches "
                          "its part for every image (a bank N times larger than one process's memory; needs "
                          "--threshold for --images); without it the processes split the images")
    runtime = parser.add_argument_group("Batching")
    runtime.add_argument("--batch-size", type=int, default=DEFAULT("batch_size"),
                         help="images per feature-extraction batch")
    cli.add_common_flags(parser)
    parser.set_defaults(fusion=fusion)
    return parser


def validate(args: argparse.Namespace) -> None:
    """What only the command line knows; every scoring setting is checked by :class:`ScoreConfig` itself."""
    if args.wavelet is not None:
        from models.dwt import lowpass_filter

        lowpass_filter(args.wavelet)
    cli.check_workers(args.workers)


def config_from_args(args: argparse.Namespace) -> ScoreConfig:
    """The scoring settings of the parsed flags (the only place that maps flags to settings)."""
    return ScoreConfig(**{name: tuple(args.layers) if name == "layers" else getattr(args, name)
                          for name in ScoreConfig.names()})


def check_kinds_from_args(args: argparse.Namespace) -> tuple[str, ...]:
    """The synthetic check's anomaly kinds of ``--check-kinds`` (checked names; default ``CHECK_AUGS``)."""
    if args.check_kinds is None:
        return CHECK_AUGS
    return tuple(parse_augs(args.check_kinds, setting="check_kinds"))


def run_from_args(args: argparse.Namespace) -> ScoringRun:
    """Paths and outputs of the parsed flags."""
    return ScoringRun(data_root=args.data_root, ckpt_dir=args.ckpt_dir, checkpoint=args.checkpoint, arch=args.arch,
                      wavelet=args.wavelet, images=args.images, out=args.out, overwrite=args.overwrite,
                      save_maps=args.save_maps, pictures=not args.no_pictures,
                      synthetic_check=args.synthetic_check or args.check_kinds is not None,
                      check_kinds=check_kinds_from_args(args),
                      rebuild_bank=args.rebuild_bank, save_detector=args.save_detector, shard_bank=args.shard_bank,
                      command=shlex.join(sys.argv))


def main(args: argparse.Namespace) -> list[dict]:
    validate(args)
    config, run = config_from_args(args), run_from_args(args)
    device = resolve_device(args.device)
    categories = resolve_categories(args.data_root, args.category)
    if args.images is not None and len(categories) != 1:
        raise UserError("--images scores new images against one category's bank: pass --c <category>")
    if args.save_detector and len(categories) != 1:
        raise UserError("--save-detector PATH writes one category's detector: pass --c <category>, or give "
                        "--save-detector without a path (each goes to ckpt/<p>/detector-<fusion>.pt)")
    shards = init_distributed(device.type, backend="gloo", timeout=SCORING_TIMEOUT)
    device = resolve_device(args.device, shards.local_rank)  # under torchrun: each process its own GPU
    stop_on_sigterm(shards)
    try:
        return score_categories(config, run, categories, device, shards=shards)
    finally:
        cleanup(shards)


def parse_args(fusion: str, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse ``argv``; a ``--recipe`` other than ``paper`` changes the defaults (given flags win)."""
    parser = get_args_parser(fusion)
    args = parser.parse_args(argv)
    if args.recipe != "paper":
        parser.set_defaults(**RECIPES[args.recipe]["score"])
        args = parser.parse_args(argv)
    return args


def run(fusion: str) -> None:
    assert fusion in FUSIONS
    cli.run(main, parse_args(fusion))


if __name__ == "__main__":
    raise SystemExit("run inference_concatenation.py or inference_multiplication.py")
