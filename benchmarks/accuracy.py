"""Accuracy benchmark: train + score with both fusions over seeds, one table with mean +- std.

Every run includes the untrained network (0 epochs, same seeds) as a baseline row. Variants
are ``NAME=TRAIN FLAGS|SCORE FLAGS`` (flags of main.py | of the inference scripts); TRAIN FLAGS
may start with a recipe name (``"best-l123=best|--layers 1,2,3"``). Variants with the same
training flags share one training per seed (the first such variant's folder), so a scoring
option costs only scoring:

    python benchmarks/accuracy.py --data-root ../shared/datasets --c magnetic_tile \\
        --arch wave18 --size 128 --e 20 --seeds 0,1,2 --variants paper best

Writes ``accuracy.md``, ``accuracy.csv`` and ``accuracy.json`` (every run's metrics) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import main as train_main  # noqa: E402
from recipes import RECIPES, recipe_flags  # noqa: E402
from scoring import cli as score_cli  # noqa: E402
from scoring.report import write_json, write_table  # noqa: E402

FUSIONS = ("concatenation", "multiplication")
METRICS = ("image_auroc", "pixel_auroc", "aupro", "pixel_auroc_paper_masks")
CHECK_METRICS = ("image_auroc", "pixel_auroc")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data-root", default="../shared/datasets")
    parser.add_argument("--c", dest="category", default="magnetic_tile")
    parser.add_argument("--arch", default="wave18")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--e", dest="epochs", type=int, default=20)
    parser.add_argument("--b", dest="batch_size", type=int, default=32)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--variants", nargs="*", default=["paper"],
                        help="recipe names (" + ", ".join(RECIPES) + ") or NAME=TRAIN FLAGS|SCORE FLAGS")
    parser.add_argument("--no-baseline", action="store_true", help="skip the untrained row")
    parser.add_argument("--fusions", default=",".join(FUSIONS))
    parser.add_argument("--work-dir", default="runs/accuracy", help="checkpoints and per-run results")
    parser.add_argument("--out", default="results/benchmarks", help="folder for accuracy.md/csv/json")
    parser.add_argument("--synthetic-check", action="store_true",
                        help="also report the label-free synthetic check (held-out training images with synthetic "
                             "anomalies) of every run: the signal to choose options by, not the test labels")
    parser.add_argument("--reuse", action="store_true",
                        help="keep a finished run already in --work-dir (its checkpoint at the asked epochs, "
                             "its results.json) instead of training and scoring it again")
    return parser


def parse_variant(text: str) -> tuple[str, list[str], list[str]]:
    if "=" not in text:
        train, score = recipe_flags(text)
        return text, train, score
    name, flags = text.split("=", 1)
    train, _, score = flags.partition("|")
    train, score = shlex.split(train), shlex.split(score)
    if train and train[0] in RECIPES:
        recipe_train, recipe_score = recipe_flags(train[0])
        train, score = recipe_train + train[1:], recipe_score + score
    return name, train, score


def run_one(args, name: str, train_name: str, train_flags: list[str], score_flags: list[str], seed: int,
            epochs: int) -> list[dict]:
    """Train (in ``train_name``'s folder, unless reused) and score one variant and seed."""
    ckpt_dir = Path(args.work_dir) / train_name / f"seed{seed}"
    results_dir = Path(args.work_dir) / name / f"seed{seed}" / "results"
    train_argv = ["--c", args.category, "--data-root", args.data_root, "--arch", args.arch, "--size",
                  str(args.size), "--e", str(epochs), "--b", str(args.batch_size), "--seed", str(seed),
                  "--ckpt-dir", str(ckpt_dir), "--no-tensorboard", "--save-every", "0", *train_flags]
    run_dir = ckpt_dir / f"{args.category}-{args.arch}"
    train_s = finished_training_seconds(run_dir, epochs, seed) if args.reuse else None
    if train_s is None:
        start = time.perf_counter()
        train_main.main(train_main.parse_args(train_argv))
        train_s = time.perf_counter() - start
    rows = []
    for fusion in args.fusions.split(","):
        done = results_dir / fusion / "results.json"
        if args.reuse and done.is_file():
            record = json.loads(done.read_text())
            if not args.synthetic_check or "synthetic_check" in record:
                rows.append(result_row(name, seed, fusion, epochs, train_s, record))
                continue
        score_args = score_cli.parse_args(fusion, [
            "--c", args.category, "--data-root", args.data_root, "--ckpt-dir", str(ckpt_dir),
            "--p", f"{args.category}-{args.arch}", "--out", str(results_dir / fusion),
            "--no-pictures", "--seed", str(seed), *(["--synthetic-check"] if args.synthetic_check else []),
            *score_flags])
        [record] = score_cli.main(score_args)
        rows.append(result_row(name, seed, fusion, epochs, train_s, record))
    return rows


def result_row(name: str, seed: int, fusion: str, epochs: int, train_s: float, record: dict) -> dict:
    check = record.get("synthetic_check", {})
    return {"variant": name, "seed": seed, "fusion": fusion, "epochs": epochs, "train_s": train_s,
            "score_s_per_image": record["timings"]["s_per_test_image"],
            **{k: record["metrics"][k] for k in METRICS},
            **{f"synthetic_{k}": check[k] for k in CHECK_METRICS if k in check}}


def finished_training_seconds(run_dir: Path, epochs: int, seed: int) -> float | None:
    """Training seconds of a finished run in ``run_dir`` (sum of its logged epochs), else ``None``."""
    ckpt_path = run_dir / "model.pt"
    if not ckpt_path.is_file():
        return None
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    if ckpt.get("epoch") != epochs or ckpt.get("seed") != seed:
        return None
    log = run_dir / "log.jsonl"
    lines = log.read_text().splitlines() if log.is_file() else []
    return sum(json.loads(line)["seconds"] for line in lines)


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def main(args: argparse.Namespace) -> None:
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = [parse_variant(v) for v in args.variants]
    plan = ([] if args.no_baseline else [("untrained", [], [], 0)]) + [(n, t, s, args.epochs) for n, t, s in variants]
    train_names: dict[tuple, str] = {}
    for name, train_flags, _, epochs in plan:
        train_names.setdefault((tuple(train_flags), epochs), name)
    runs = []
    for name, train_flags, score_flags, epochs in plan:
        train_name = train_names[(tuple(train_flags), epochs)]
        for seed in seeds:
            runs += run_one(args, name, train_name, train_flags, score_flags, seed, epochs)
            write_json(Path(args.out) / "accuracy.json", {"settings": vars(args), "runs": runs})
    header = ["variant", "fusion", "image AUROC", "pixel AUROC", "AUPRO", "pixel AUROC (paper's masks)", "train s",
              "score s/img"]
    if args.synthetic_check:
        header += ["synthetic check image AUROC", "synthetic check pixel AUROC"]
    rows = []
    for name, _, _, _ in plan:
        for fusion in args.fusions.split(","):
            sel = [r for r in runs if r["variant"] == name and r["fusion"] == fusion]
            rows.append([name, fusion] + [mean_std([r[m] for r in sel]) for m in METRICS]
                        + [f"{statistics.mean(r['train_s'] for r in sel):.0f}",
                           f"{statistics.mean(r['score_s_per_image'] for r in sel):.3f}"]
                        + ([mean_std([r[f"synthetic_{m}"] for r in sel]) for m in CHECK_METRICS]
                           if args.synthetic_check else []))
    write_table(Path(args.out) / "accuracy", header, rows)
    print((Path(args.out) / "accuracy.md").read_text())
    print(json.dumps({"seeds": seeds, "command": " ".join(sys.argv)}))


if __name__ == "__main__":
    main(get_args_parser().parse_args())
