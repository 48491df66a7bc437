"""Accuracy benchmark: train + score with both fusions over seeds, one table with mean +- std.

Every run includes the untrained network (0 epochs, same seeds) as a baseline row. Variants
are recipe names or ``NAME=TRAIN FLAGS|SCORE FLAGS`` (flags of main.py | of the inference
scripts); TRAIN FLAGS may start with a recipe name (``"best-l123=best|--layers 1,2,3"``), which
becomes ``--recipe NAME`` on both sides, so checkpoints and results record the recipe. Variants
whose training settings resolve to the same values share one training per seed (the first such
variant's folder), so a scoring option costs only scoring. ``--reuse`` keeps a finished run only
if its checkpoint was trained with the settings asked now and its results scored that checkpoint
with the scoring settings asked now; anything else is trained / scored again:

    python -m benchmarks.accuracy --data-root ../shared/datasets --c magnetic_tile \\
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

import cli
import main as train_main
from errors import UserError
from recipes import RECIPES
from scoring import ScoreConfig
from scoring import cli as score_cli
from scoring.core import settings_record
from scoring.detector import file_sha256
from scoring.report import write_json, write_table

FUSIONS = ("concatenation", "multiplication")
METRICS = ("image_auroc", "pixel_auroc", "aupro", "pixel_auroc_paper_masks")
CHECK_METRICS = ("image_auroc", "pixel_auroc")
# Scoring settings a reused results.json must have been made with (as recorded in its "settings"):
# all but the speed ones.
RESULT_SETTINGS = ScoreConfig.names("bank", "score")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data-root", default="../shared/datasets")
    parser.add_argument("--c", dest="category", default="magnetic_tile")
    parser.add_argument("--arch", default="wave18")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--e", dest="epochs", type=int, default=20)
    parser.add_argument("--b", dest="batch_size", type=int, default=None,
                        help="batch size for every variant (default: main.py's 32, or the recipe's)")
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
    """``"NAME=TRAIN FLAGS|SCORE FLAGS"`` or a recipe name -> ``(name, train flags, score flags)``."""
    if "=" not in text:
        if text not in RECIPES:
            raise UserError(f"--variants {text}: not a recipe ({', '.join(RECIPES)}); "
                            "write NAME=TRAIN FLAGS|SCORE FLAGS")
        return text, ["--recipe", text], ["--recipe", text]
    name, flags = text.split("=", 1)
    train, _, score = flags.partition("|")
    train, score = shlex.split(train), shlex.split(score)
    if train and train[0] in RECIPES:
        train, score = ["--recipe", train[0], *train[1:]], ["--recipe", train[0], *score]
    return name, train, score


def train_argv(args: argparse.Namespace, train_flags: list[str], seed: int, epochs: int, ckpt_dir: Path) -> list[str]:
    return ["--c", args.category, "--data-root", args.data_root, "--arch", args.arch, "--size", str(args.size),
            "--e", str(epochs), *(["--b", str(args.batch_size)] if args.batch_size else []), "--seed", str(seed),
            "--ckpt-dir", str(ckpt_dir), "--no-tensorboard", "--save-every", "0", *train_flags]


def training_settings(argv: list[str]) -> dict:
    """The settings of ``main.py argv`` that decide the trained weights (``TrainConfig``'s ``weights``
    fields: paths, labels and speed settings left out)."""
    return train_main.config_from_args(train_main.parse_args(argv)).subset("weights")


def result_settings(score_args: argparse.Namespace, train_size: int) -> dict:
    """The scoring settings ``results.json`` records for ``score_args`` (as ``scoring.core`` writes them:
    the size resolved to the checkpoint's, no refinement without a coreset), speed settings left out."""
    config = score_cli.config_from_args(score_args)
    config = config.replace(size=config.size or train_size)
    return {k: v for k, v in settings_record(config, "").items() if k in RESULT_SETTINGS}


def settings_mismatch(recorded: dict, wanted: dict) -> list[str]:
    """``key: recorded -> wanted`` for every key both have and that differs (older files lack some keys)."""
    return [f"{k}: {recorded[k]} -> {v}" for k, v in wanted.items() if k in recorded and recorded[k] != v]


# Run folders trained by this process (finished_training_seconds still checks their settings).
TRAINED_HERE: set[Path] = set()


def run_one(args, name: str, train_name: str, train_flags: list[str], score_flags: list[str], seed: int,
            epochs: int) -> list[dict]:
    """Train (in ``train_name``'s folder, unless reused) and score one variant and seed."""
    ckpt_dir = Path(args.work_dir) / train_name / f"seed{seed}"
    results_dir = Path(args.work_dir) / name / f"seed{seed}" / "results"
    argv = train_argv(args, train_flags, seed, epochs, ckpt_dir)
    run_dir = ckpt_dir / f"{args.category}-{args.arch}"
    # A variant sharing another's training uses the run this command already made for it.
    reuse = args.reuse or run_dir.resolve() in TRAINED_HERE
    wanted_training = training_settings(argv)
    train_s = finished_training_seconds(run_dir, wanted_training) if reuse else None
    if train_s is None:
        start = time.perf_counter()
        # A run already in the folder (other settings, or no --reuse) is retrained from scratch:
        # --overwrite moves it aside (printed), it is not deleted.
        train_main.main(train_main.parse_args([*argv, "--overwrite"]))
        train_s = time.perf_counter() - start
        TRAINED_HERE.add(run_dir.resolve())
    ckpt_sha = file_sha256(run_dir / "model.pt")
    rows = []
    for fusion in args.fusions.split(","):
        score_args = score_cli.parse_args(fusion, [
            "--c", args.category, "--data-root", args.data_root, "--ckpt-dir", str(ckpt_dir),
            "--p", f"{args.category}-{args.arch}", "--out", str(results_dir / fusion), "--overwrite",
            "--no-pictures", "--seed", str(seed), *(["--synthetic-check"] if args.synthetic_check else []),
            *score_flags])
        done = results_dir / fusion / "results.json"
        if args.reuse and done.is_file():
            record = json.loads(done.read_text())
            wanted = result_settings(score_args, wanted_training["size"])
            if (record["checkpoint"]["sha256"] == ckpt_sha and not settings_mismatch(record["settings"], wanted)
                    and (not args.synthetic_check or "synthetic_check" in record)):
                rows.append(result_row(name, seed, fusion, epochs, train_s, record))
                continue
        [record] = score_cli.main(score_args)
        rows.append(result_row(name, seed, fusion, epochs, train_s, record))
    return rows


def result_row(name: str, seed: int, fusion: str, epochs: int, train_s: float, record: dict) -> dict:
    check = record.get("synthetic_check", {})
    return {"variant": name, "seed": seed, "fusion": fusion, "epochs": epochs, "train_s": train_s,
            "score_s_per_image": record["timings"]["s_per_test_image"],
            **{k: record["metrics"][k] for k in METRICS},
            **{f"synthetic_{k}": check[k] for k in CHECK_METRICS if k in check}}


def finished_training_seconds(run_dir: Path, wanted: dict) -> float | None:
    """Training seconds of a run in ``run_dir`` finished with the ``wanted`` settings (sum of its
    logged epochs), else ``None`` (then it is trained again)."""
    ckpt_path = run_dir / "model.pt"
    if not ckpt_path.is_file():
        return None
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    if ckpt.get("epoch") != wanted["epochs"] or ckpt.get("seed") != wanted["seed"]:
        return None
    changed = settings_mismatch(ckpt.get("args", {}), wanted)
    if changed:
        print(f"--reuse: {ckpt_path} was trained with other settings ({'; '.join(changed)}); training again")
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
    first_with_settings: dict[str, str] = {}
    train_names: dict[str, str] = {}
    for name, train_flags, _, epochs in plan:
        key = json.dumps(training_settings(train_argv(args, train_flags, 0, epochs, Path("."))), sort_keys=True)
        train_names[name] = first_with_settings.setdefault(key, name)
    runs = []
    for name, train_flags, score_flags, epochs in plan:
        train_name = train_names[name]
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
    print(json.dumps({"seeds": seeds, "command": shlex.join(sys.argv)}))


if __name__ == "__main__":
    cli.run(main, get_args_parser().parse_args(), batch_flag="--b")
