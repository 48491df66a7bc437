"""Stage 1: self-supervised training on normal images and their synthetic anomalies.

    python main.py --c zipper                                   # the paper's run on MVTec AD
    python main.py --c magnetic_tile --data-root ../shared/datasets --arch wave18 --size 128 --e 20
    torchrun --nproc_per_node=2 main.py --c zipper              # several GPUs (or CPU processes)

Writes ``<ckpt-dir>/<category>-<arch>/model.pt`` (checkpoint), ``log.jsonl`` (one JSON line per
epoch), ``anomaly_preview.png`` (what the network learns from) and ``tensorboard/``. A run folder
that already holds a run is refused unless ``--resume`` (continue it) or ``--overwrite`` (rename
it to ``<run>.old-<date>-<time>`` and start over) says what to do; a folder another training is
writing (its ``.lock``) is refused as well (``training/rundir.py``).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch

import models
from augment import parse_augs
from common import cli, runtime
from common.errors import UserError
from common.recipes import RECIPES, score_overrides, train_overrides
from data import resolve_categories
from models.dwt import lowpass_filter
from training import TrainConfig, TrainRun, init_distributed, train_categories
from training.config import ANOMALY_SITES, DWT_IMPLS, SCHEDULES

DEFAULT = TrainConfig.default  # every training default comes from the dataclass: one definition per setting


def get_args_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(
        description="Train a WaveCNet to tell normal images from synthetic anomalies (stage 1).",
        formatter_class=cli.DefaultsHelpFormatter)
    data = parser.add_argument_group("Data")
    data.add_argument("--c", "--category", dest="category", default="all",
                      help="category folder under --data-root, a comma list, or 'all'")
    data.add_argument("--data-root", default=TrainRun.data_root,
                      help="folder with <category>/train/good, test/<type>, ground_truth/<type>")
    data.add_argument("--size", type=int, default=DEFAULT("size"),
                      help="the network's input: images (or tiles of them, see --frame) are size x size")
    data.add_argument("--frame", default=DEFAULT("frame"),
                      help="what images are resized to: square (size x size, the paper), auto (the training "
                           "images' aspect ratio and size, up to 4x the area; trains on size x size tiles) or HxW")
    data.add_argument("--whole-share", type=float, default=DEFAULT("whole_share"),
                      help="with a frame larger than the size: the share of training samples that are the whole "
                           "image resized to size x size (the paper's view) instead of a tile; 0: tiles only")
    data.add_argument("--antialias", action="store_true",
                      help="antialiased resize (the paper's checkpoints were trained without)")
    model = parser.add_argument_group("Model")
    model.add_argument("--arch", default=DEFAULT("arch"), choices=models.list_models(), help="backbone")
    model.add_argument("--wavelet", default=DEFAULT("wavelet"), help="any PyWavelets wavelet name")
    aug = parser.add_argument_group("Augmentation")
    aug.add_argument("--augs", default=",".join(DEFAULT("augs")),
                     help="anomaly makers, one class each: cutpaste, perlin, scar, poisson, scratch, texture, shapes")
    aug.add_argument("--rotflip", action="store_true",
                     help="rotate (90 degree steps) and mirror normal images at random (texture-like data)")
    aug.add_argument("--dense", action="store_true",
                     help="dense self-supervision: also train a segmentation head to find each synthetic anomaly's "
                          "mask (focal + soft Dice loss); its gradient shapes the features the k-NN map scores "
                          "(scoring can also use the head's own map: --map head or fused)")
    aug.add_argument("--dense-weight", type=float,
                     default=DEFAULT("dense_weight"),
                     help="weight of the segmentation loss beside the classification loss (with --dense)")
    opt = parser.add_argument_group("Optimisation")
    opt.add_argument("--e", "--epochs", dest="epochs", type=int, default=DEFAULT("epochs"),
                     help="epochs (the paper: 1600)")
    opt.add_argument("--b", "--batch-size", dest="batch_size", type=int, default=DEFAULT("batch_size"),
                     help="normal images per batch (each brings one anomaly per generator)")
    opt.add_argument("--lr", type=float, default=DEFAULT("lr"), help="SGD learning rate")
    opt.add_argument("--wd", "--weight-decay", dest="weight_decay", type=float,
                     default=DEFAULT("weight_decay"),
                     help="weight decay")
    opt.add_argument("--m", "--momentum", dest="momentum", type=float, default=DEFAULT("momentum"), help="SGD momentum")
    opt.add_argument("--sched", default=DEFAULT("sched"), choices=SCHEDULES,
                     help="learning-rate schedule: constant (the paper) or warm-up then cosine decay")
    opt.add_argument("--warmup", type=int, default=DEFAULT("warmup"), help="warm-up epochs of the cosine schedule")
    opt.add_argument("--seed", type=int, default=DEFAULT("seed"),
                     help="same seed -> same anomalies, batches and weights")
    speed = parser.add_argument_group("Speed")
    speed.add_argument("--precision", default=DEFAULT("precision"),
                       choices=runtime.PRECISIONS,
                       help="auto = bfloat16 autocast where the CPU/GPU supports it natively")
    speed.add_argument("--no-channels-last", dest="channels_last", action="store_false",
                       help="keep NCHW memory format (channels_last is faster with oneDNN and cuDNN)")
    speed.add_argument("--no-pin-memory", dest="pin_memory", action="store_false",
                       help="do not pin host memory of batches (CUDA only)")
    speed.add_argument("--no-cudnn-benchmark", dest="cudnn_benchmark", action="store_false",
                       help="turn off cudnn.benchmark autotuning")
    speed.add_argument("--anomalies-on", default=DEFAULT("anomalies_on"), choices=ANOMALY_SITES,
                       help="where synthetic anomalies are made: device = whole batches on the training device "
                            "(GPU), loader = one image at a time in the data loader; auto = device on CUDA")
    speed.add_argument("--compile", action="store_true",
                       help="torch.compile the network (first epoch slower while it compiles)")
    speed.add_argument("--dwt-impl", default=DEFAULT("dwt_impl"), choices=DWT_IMPLS,
                       help="form of the wavelet layer in training: conv = depthwise convolution, matmul = "
                            "banded matrix products; auto = matmul under CPU bfloat16, else conv (measured)")
    out = parser.add_argument_group("Output")
    out.add_argument("--ckpt-dir", default=TrainRun.ckpt_dir, help="checkpoints go to <ckpt-dir>/<category>-<arch>/")
    out.add_argument("--resume", nargs="?", const="auto", default=None,
                     help="continue from <ckpt-dir>/<category>-<arch>/model.pt, or from the given file")
    out.add_argument("--overwrite", action="store_true",
                     help="start over in a run folder that already holds a run: the old folder is renamed to "
                          "<category>-<arch>.old-<date>-<time> (nothing is deleted); without it (or --resume) "
                          "such a folder is refused")
    out.add_argument("--save-every", type=int, default=TrainRun.save_every,
                     help="also save every N epochs (0 = end only)")
    out.add_argument("--no-tensorboard", action="store_true", help="do not write TensorBoard logs")
    out.add_argument("--eval", action="store_true",
                     help="after training, score each category with both fusions and print one table")
    out.add_argument("--recipe", default=DEFAULT("recipe"), choices=list(RECIPES),
                     help="named set of defaults: paper (the paper's protocol), best (the recommended recipe), "
                          "dense (paper + dense self-supervision); see README Results; flags you give still win")
    demo = parser.add_argument_group("Demo")
    demo.add_argument("--demo", action="store_true",
                      help="write the built-in demo data (if absent), train and evaluate on it; defaults become "
                           + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in DEMO_DEFAULTS.items()
                                      if not isinstance(v, bool)) + " --eval (flags you give still win); a "
                           "previous demo run is moved aside as with --overwrite unless you add --resume")
    cli.add_common_flags(parser)
    return parser


# A configuration that trains and scores the demo data in well under 3 minutes on 2 CPU cores.
DEMO_DEFAULTS = {"data_root": "demo_data", "category": "all", "arch": "wave18", "size": 96, "epochs": 15,
                 "batch_size": 20, "save_every": 0, "eval": True}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse ``argv``; with ``--demo`` the demo defaults replace the normal ones (given flags still win)."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.demo or args.recipe != "paper":
        # The recipe's settings win over the demo's where both set one (e.g. the batch size).
        parser.set_defaults(**{**(DEMO_DEFAULTS if args.demo else {}), **train_overrides(args.recipe)})
        args = parser.parse_args(argv)
    if args.frame == "square" and args.whole_share:
        parser.set_defaults(whole_share=None)
        if parser.parse_args(argv).whole_share is None:
            # The recipe's share, not one asked for: at a square frame every tile is the whole image already.
            args.whole_share = 0.0
    return args


def validate(args: argparse.Namespace) -> None:
    """Check what only the command line knows before any work starts (every training setting is
    checked by :class:`TrainConfig` itself); every problem is a one-line ``UserError``."""
    if args.resume == "auto" and args.overwrite:
        raise UserError("--resume and --overwrite: choose one (--resume continues the run in the run folder, "
                        "--overwrite moves it aside and starts over)")
    if args.resume not in (None, "auto") and not Path(args.resume).is_file():
        raise UserError(f"--resume {args.resume}: no such checkpoint file (give a .pt file, or --resume alone for "
                        f"{args.ckpt_dir}/<category>-{args.arch}/model.pt)")
    if args.save_every < 0:
        raise UserError(f"--save-every {args.save_every}: must be 0 or more")
    lowpass_filter(args.wavelet)
    cli.check_workers(args.workers)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The training settings of the parsed flags (the only place that maps flags to settings)."""
    return TrainConfig(**{name: tuple(parse_augs(args.augs)) if name == "augs" else getattr(args, name)
                          for name in TrainConfig.names()})


def run_from_args(args: argparse.Namespace) -> TrainRun:
    """Folders and outputs of the parsed flags."""
    return TrainRun(data_root=str(args.data_root), ckpt_dir=str(args.ckpt_dir), resume=args.resume,
                    overwrite=args.overwrite, save_every=args.save_every, tensorboard=not args.no_tensorboard)


def summary(config: TrainConfig, run: TrainRun, categories: list[str], device: torch.device, precision: str) -> str:
    frame = "" if config.frame == "square" else f", {config.frame} frame in tiles"
    return (f"training {', '.join(categories)} | {config.arch} ({config.wavelet}) at {config.size} px{frame} | "
            f"augs {'+'.join(config.augs)} | {config.epochs} epochs, batch {config.batch_size} x "
            f"{config.num_classes}, SGD lr {config.lr} momentum {config.momentum} wd {config.weight_decay} | "
            f"seed {config.seed} | {device} {precision}{' channels_last' if config.channels_last else ''} | "
            f"-> {run.ckpt_dir}/<category>-{config.arch}/")


def main(args: argparse.Namespace) -> list:
    args.overwrite = getattr(args, "overwrite", False)
    if args.demo and not args.resume:
        # The quick start is run more than once: a second `python main.py --demo` trains again,
        # the previous demo run moved aside (printed), instead of failing on its own output.
        args.overwrite = True
    validate(args)
    config, run = config_from_args(args), run_from_args(args)
    if args.demo:
        from data.demo import demo_exists, write_demo

        if not demo_exists(run.data_root):
            print(f"writing the demo data set to {run.data_root}/ ...", flush=True)
            write_demo(run.data_root)
    categories = resolve_categories(run.data_root, args.category)
    dist_info = init_distributed(runtime.resolve_device(args.device).type)
    device = runtime.resolve_device(args.device, dist_info.local_rank)
    precision = runtime.resolve_precision(config.precision, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = config.cudnn_benchmark
    banner = summary(config, run, categories, device, precision) if dist_info.is_main else ""
    paths = train_categories(config, run, categories, device, dist_info, "--demo" if args.demo else "--overwrite",
                             banner)
    if dist_info.is_main:
        for path, did_train in paths:
            print(f"saved {path}" if did_train else f"unchanged {path}")
        if args.eval:
            evaluate(args, categories)
    return [path for path, _ in paths]


def evaluate(args: argparse.Namespace, categories: list[str]) -> list[dict]:
    """Score every trained category with both fusions (the paper's two inference scripts), in Python."""
    from scoring import ScoreConfig, ScoringRun, score_categories
    from scoring.outputs.folders import versioned_dir
    from scoring.outputs.report import write_table
    from scoring.outputs.writing import format_metric

    run = ScoringRun(data_root=str(args.data_root), ckpt_dir=str(args.ckpt_dir), checkpoint=f"{{category}}-{args.arch}",
                     command=shlex.join(sys.argv))
    device = runtime.resolve_device(args.device)
    records = []
    for fusion in ("concatenation", "multiplication"):
        config = ScoreConfig(fusion=fusion, workers=args.workers, recipe=args.recipe, **score_overrides(args.recipe))
        records += score_categories(config, run, categories, device)
    header = ["category", "fusion", "image AUROC", "pixel AUROC", "AUPRO", "heatmaps"]
    rows = [[r["category"], r["fusion"], *(format_metric(r["metrics"][k], 3) for k in ("image_auroc", "pixel_auroc",
                                                                                      "aupro")),
             r["files"]["heatmaps"]] for r in records]
    # One version per data set, checkpoints and settings: evaluating another data set keeps this table.
    folder = versioned_dir(Path("results") / f"eval-{args.arch}", {"runs": [r["identity"] for r in records]})
    table = folder / "eval"
    write_table(table, header, rows)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    print()
    for line in [header, *rows]:
        print("  ".join(str(x).ljust(w) for x, w in zip(line, widths)))
    print(f"table: {table}.md / .csv; per-run results.json and heatmaps in the folders above")
    return records


if __name__ == "__main__":
    cli.run(main, parse_args(), batch_flag="--b")
