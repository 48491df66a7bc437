"""Accuracy benchmark: train + score data sets over seeds with both fusions; a table per data set with
mean +- std, the mean over data sets, and each variant's difference to a reference variant.

Every run includes the untrained network (0 epochs, same seeds) as a baseline row. Variants
are recipe names or ``NAME=TRAIN FLAGS|SCORE FLAGS`` (flags of main.py | of the inference
scripts); TRAIN FLAGS may start with a recipe name (``"best-l123=best|--layers 1,2,3"``), which
becomes ``--recipe NAME`` on both sides, so checkpoints and results record the recipe. Variants
whose training settings resolve to the same values share one training per seed (the first such
variant's folder), so a scoring option costs only scoring. ``--reuse`` keeps a finished run only
if its checkpoint was trained with the settings asked now and its results scored that checkpoint
with the scoring settings asked now; anything else is trained / scored again:

    python -m benchmarks.accuracy --datasets ../shared/datasets/magnetic_tile \\
        ../shared/datasets/toothbrush/toothbrush --arch wave18 --size 128 --e 20 --seeds 0,1,2 \\
        --variants paper best --work-dir runs/acc --out results/acc

Each ``--datasets`` folder is one category in the MVTec layout (the folder holding ``train/``,
``test/``, ``ground_truth/``): its parent is the data root, its name the category. Without
``--datasets``, ``--data-root`` + ``--c`` name a single data set, as before. Checkpoints go to
``<work-dir>/<category>/<variant>/seed<N>`` and results to ``.../seed<N>/results/<fusion>``, so data
sets never collide; a work dir an earlier version filled for one category (``--work-dir
runs/acc/toothbrush``) is the category folder of ``--work-dir runs/acc`` and is reused from there.

Writes to ``--out``: ``accuracy.md`` (a table per data set; per variant and fusion the mean over data
sets of each data set's seed mean; each variant's difference to ``--reference`` per data set in AUROC
points with a verdict per fusion, for image and pixel AUROC separately: the variant *holds* when it
beats the reference on the mean over data sets and on no data set is worse than the reference by more
than that data set's seed spread, the larger of the two std's over seeds, 0 with one seed),
``accuracy.csv`` (one row per data set, variant and fusion with means and stds, plus the rows of data
set ``mean``) and ``accuracy.json`` (every run's metrics, each with its ``dataset``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

import main as train_main
from augment import parse_augs
from common import cli
from common.errors import UserError
from common.recipes import RECIPES
from common.runtime import resolve_device
from data.frames import parse_frame
from scoring import ScoreConfig, score_categories
from scoring.building import file_sha256
from scoring.outputs.report import markdown_table, write_csv, write_json, write_text_atomic
from scoring.pipeline import cli as score_cli
from scoring.pipeline.runs import settings_record
from training import train_categories

FUSIONS = ("concatenation", "multiplication")
METRICS = ("image_auroc", "pixel_auroc", "aupro", "pixel_auroc_paper_masks")
CHECK_METRICS = ("image_auroc", "pixel_auroc")
# The metrics of the mean over data sets, and those compared with the reference (with a verdict).
MEAN_METRICS = ("image_auroc", "pixel_auroc", "aupro")
COMPARED = ("image_auroc", "pixel_auroc")
LABELS = {"image_auroc": "image AUROC", "pixel_auroc": "pixel AUROC", "aupro": "AUPRO",
          "pixel_auroc_paper_masks": "pixel AUROC (paper's masks)", "train_s": "train s",
          "score_s_per_image": "score s/img", "synthetic_image_auroc": "synthetic check image AUROC",
          "synthetic_pixel_auroc": "synthetic check pixel AUROC"}
# Scoring settings a reused results.json must have been made with (as recorded in its "settings"):
# all but the speed ones.
RESULT_SETTINGS = ScoreConfig.names("bank", "score")
DEFAULT_ROOT, DEFAULT_CATEGORY = "../shared/datasets", "magnetic_tile"
# Differences (AUROC points) within this of 0 are ties: rounding noise of equal means.
TIE = 1e-9


def get_args_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--datasets", nargs="+", metavar="PATH",
                        help="category folders in the MVTec layout (each holding train/ test/ ground_truth/); "
                             "the data root is a folder's parent, the category its name")
    parser.add_argument("--data-root", help=f"without --datasets: the data root of one data set ({DEFAULT_ROOT})")
    parser.add_argument("--c", dest="category", help=f"without --datasets: its category ({DEFAULT_CATEGORY})")
    parser.add_argument("--arch", default="wave18")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--e", dest="epochs", type=int, default=20)
    parser.add_argument("--b", dest="batch_size", type=int, default=None,
                        help="batch size for every variant (default: main.py's 32, or the recipe's)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--variants", nargs="*", default=["paper"],
                        help="recipe names (" + ", ".join(RECIPES) + ") or NAME=TRAIN FLAGS|SCORE FLAGS")
    parser.add_argument("--reference", help="the variant the others are compared with (default: paper when it "
                                            "is a variant, else the first variant)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the untrained row")
    parser.add_argument("--fusions", default=",".join(FUSIONS))
    parser.add_argument("--work-dir", default="runs/accuracy",
                        help="checkpoints and per-run results, in <work-dir>/<category>/<variant>/seed<N>")
    parser.add_argument("--out", default="results/benchmarks", help="folder for accuracy.md/csv/json")
    parser.add_argument("--synthetic-check", action="store_true",
                        help="also report the label-free synthetic check (held-out training images with synthetic "
                             "anomalies) of every run: the signal to choose options by, not the test labels")
    parser.add_argument("--check-kinds", default=None, metavar="KINDS",
                        help="the synthetic check's anomaly kinds for every variant (implies --synthetic-check; "
                             "a variant's own --check-kinds wins); e.g. poisson,scratch,texture, which no "
                             "recipe trains on")
    parser.add_argument("--reuse", action="store_true",
                        help="keep a finished run already in --work-dir (its checkpoint at the asked epochs, "
                             "its results.json) instead of training and scoring it again")
    return parser


def parse_datasets(args: argparse.Namespace) -> list[tuple[str, str]]:
    """``(data root, category)`` of every data set asked for, each checked to be a category folder
    (with ``train/`` and ``test/``) before anything trains; categories must differ (they name the
    data sets' folders in ``--work-dir``)."""
    if args.datasets and (args.category is not None or args.data_root is not None):
        raise UserError("--datasets names each data set's folder: give it without --c / --data-root "
                        "(they name a single data set)")
    if args.datasets:
        folders = [(Path(text), f"--datasets {text}") for text in args.datasets]
    else:
        root, category = args.data_root or DEFAULT_ROOT, args.category or DEFAULT_CATEGORY
        folders = [(Path(root) / category, f"--data-root {root} --c {category}")]
    datasets: list[tuple[str, str]] = []
    seen: dict[str, str] = {}
    for folder, flag in folders:
        if not folder.is_dir():
            raise UserError(f"{flag}: no such folder" + ("" if args.datasets else f" {folder}"))
        if not ((folder / "train").is_dir() and (folder / "test").is_dir()):
            raise UserError(f"{flag}: {folder} has no train/ and test/ folders; give a category folder in the "
                            "MVTec layout (train/ test/ ground_truth/)")
        folder = folder.resolve() if folder.name in ("", "..") else folder
        if folder.name in seen:
            raise UserError(f"{seen[folder.name]} and {flag}: two data sets named {folder.name} (their runs would "
                            f"share {Path(args.work_dir) / folder.name}); give each data set once")
        seen[folder.name] = flag
        datasets.append((str(folder.parent), folder.name))
    return datasets


def for_dataset(args: argparse.Namespace, dataset: tuple[str, str]) -> argparse.Namespace:
    """``args`` for one data set: its ``data_root`` and ``category``."""
    return argparse.Namespace(**{**vars(args), "data_root": dataset[0], "category": dataset[1]})


def run_folders(work_dir: str | Path, category: str, name: str, train_name: str, seed: int) -> tuple[Path, Path]:
    """The checkpoint folder (``train_name``'s, whose training variant ``name`` shares) and the results
    folder of one run: ``<work-dir>/<category>/<variant>/seed<N>`` and ``.../seed<N>/results``. An
    earlier version ran one data set with ``--work-dir <work-dir>/<category>``: the same folders."""
    base = Path(work_dir) / category
    return base / train_name / f"seed{seed}", base / name / f"seed{seed}" / "results"


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


def train_variant(argv: list[str]) -> None:
    """Train the run ``main.py argv`` describes, in Python (a run already in its folder is moved aside)."""
    train_args = train_main.parse_args(argv)
    train_main.validate(train_args)
    run = dataclasses.replace(train_main.run_from_args(train_args), overwrite=True)
    train_categories(train_main.config_from_args(train_args), run, [train_args.category], train_args.device,
                     why_overwrite="--overwrite")


def result_settings(score_args: argparse.Namespace, train_size: int) -> dict:
    """The scoring settings ``results.json`` records for ``score_args`` (as ``scoring.pipeline.runner`` writes them:
    the size resolved to the checkpoint's, no refinement without a coreset), speed settings left out."""
    config = score_cli.config_from_args(score_args)
    config = config.replace(size=config.size or train_size)
    wanted = {k: v for k, v in settings_record(config, "").items() if k in RESULT_SETTINGS}
    if config.frame == "square":
        wanted["frame"] = f"{config.size}x{config.size}"
    elif parse_frame(config.frame or "") is None:
        del wanted["frame"]  # the checkpoint's or the training images' frame: the checkpoint digest decides
    return wanted


def settings_mismatch(recorded: dict, wanted: dict) -> list[str]:
    """``key: recorded -> wanted`` for every key both have and that differs (older files lack some keys)."""
    return [f"{k}: {recorded[k]} -> {v}" for k, v in wanted.items() if k in recorded and recorded[k] != v]


# Run folders trained by this process (finished_training_seconds still checks their settings).
TRAINED_HERE: set[Path] = set()


def run_one(args, name: str, train_name: str, train_flags: list[str], score_flags: list[str], seed: int,
            epochs: int) -> list[dict]:
    """Train (in ``train_name``'s folder, unless reused) and score one variant and seed on the data set
    of ``args`` (see :func:`for_dataset`)."""
    ckpt_dir, results_dir = run_folders(args.work_dir, args.category, name, train_name, seed)
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
        train_variant(argv)
        train_s = time.perf_counter() - start
        TRAINED_HERE.add(run_dir.resolve())
    ckpt_sha = file_sha256(run_dir / "model.pt")
    rows = []
    for fusion in args.fusions.split(","):
        score_args = score_cli.parse_args(fusion, [
            "--c", args.category, "--data-root", args.data_root, "--ckpt-dir", str(ckpt_dir),
            "--p", f"{args.category}-{args.arch}", "--out", str(results_dir / fusion), "--overwrite",
            "--no-pictures", "--seed", str(seed), *(["--synthetic-check"] if args.synthetic_check else []),
            *(["--check-kinds", args.check_kinds] if args.check_kinds else []),
            *score_flags])
        done = results_dir / fusion / "results.json"
        if args.reuse and done.is_file():
            record = json.loads(done.read_text())
            # A setting asked as "auto" is resolved by scoring from the checkpoint (compared by its sha256).
            wanted = {k: v for k, v in result_settings(score_args, wanted_training["size"]).items() if v != "auto"}
            if (record["checkpoint"]["sha256"] == ckpt_sha and not settings_mismatch(record["settings"], wanted)
                    and check_matches(record, score_args)):
                rows.append(result_row(args.category, name, seed, fusion, epochs, train_s, record))
                continue
        [record] = score_categories(score_cli.config_from_args(score_args), score_cli.run_from_args(score_args),
                                    [args.category], resolve_device(score_args.device))
        rows.append(result_row(args.category, name, seed, fusion, epochs, train_s, record))
    return rows


def check_matches(record: dict, score_args: argparse.Namespace) -> bool:
    """Whether a finished ``results.json`` holds the synthetic check ``score_args`` ask for (if any),
    made with the same anomaly kinds (as the scoring run of ``score_args`` resolves them)."""
    run = score_cli.run_from_args(score_args)
    if not run.synthetic_check:
        return True
    return record.get("synthetic_check", {}).get("kinds") == list(run.check_kinds)


def result_row(dataset: str, name: str, seed: int, fusion: str, epochs: int, train_s: float, record: dict) -> dict:
    check = record.get("synthetic_check", {})
    return {"dataset": dataset, "variant": name, "seed": seed, "fusion": fusion, "epochs": epochs, "train_s": train_s,
            "checkpoint_sha256": record["checkpoint"]["sha256"],
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


def std(values: list[float]) -> float:
    """The standard deviation over seeds (0 for one seed)."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def unique(values) -> list:
    return list(dict.fromkeys(values))


Groups = dict[tuple[str, str, str], dict[str, list[float]]]


def seed_values(runs: list[dict]) -> Groups:
    """``(dataset, variant, fusion)`` -> ``{column: its values over seeds}`` for the numeric columns."""
    groups: Groups = {}
    for run in runs:
        group = groups.setdefault((run["dataset"], run["variant"], run["fusion"]), {})
        for key, value in run.items():
            if key not in ("dataset", "variant", "fusion", "seed", "epochs"):
                group.setdefault(key, []).append(value)
    return groups


def table_columns(synthetic_check: bool) -> list[str]:
    return [*METRICS, "train_s", "score_s_per_image",
            *([f"synthetic_{m}" for m in CHECK_METRICS] if synthetic_check else [])]


def dataset_table(groups: Groups, dataset: str, variants: list[str], fusions: list[str],
                  synthetic_check: bool) -> str:
    """One data set's table: a row per variant and fusion, mean ± std over seeds."""
    columns = table_columns(synthetic_check)
    rows = []
    for name in variants:
        for fusion in fusions:
            group = groups[(dataset, name, fusion)]
            rows.append([name, fusion] + [f"{statistics.mean(group[c]):.0f}" if c == "train_s" else
                                          f"{statistics.mean(group[c]):.3f}" if c == "score_s_per_image" else
                                          mean_std(group[c]) for c in columns])
    return markdown_table(["variant", "fusion", *(LABELS[c] for c in columns)], rows)


def dataset_mean(groups: Groups, datasets: list[str], name: str, fusion: str, column: str) -> float:
    """The mean over data sets of each data set's mean over seeds."""
    return statistics.mean(statistics.mean(groups[(d, name, fusion)][column]) for d in datasets)


def differences(groups: Groups, datasets: list[str], name: str, reference: str, fusion: str,
                metric: str) -> tuple[dict[str, float], dict[str, float]]:
    """Per data set, ``name``'s seed mean minus ``reference``'s, and the seed spread (the larger of the
    two std's over seeds), both in points (x 100)."""
    deltas, spreads = {}, {}
    for dataset in datasets:
        mine, theirs = groups[(dataset, name, fusion)][metric], groups[(dataset, reference, fusion)][metric]
        deltas[dataset] = 100 * (statistics.mean(mine) - statistics.mean(theirs))
        spreads[dataset] = 100 * max(std(mine), std(theirs))
    return deltas, spreads


def worse(delta: float, spread: float) -> bool:
    """Worse than the reference by more than the seed spread (points; float noise of equal means is not)."""
    return delta < -spread - TIE


def verdict(deltas: dict[str, float], spreads: dict[str, float]) -> tuple[bool, str]:
    """Whether a variant holds against the reference: it beats it on the mean over data sets (the
    mean of ``deltas``) and on no data set is it worse by more than that data set's ``spreads``."""
    mean = statistics.mean(deltas.values())
    losses = [f"worse on {d} ({delta:+.2f}, spread {spreads[d]:.2f})" for d, delta in deltas.items()
              if worse(delta, spreads[d])]
    if mean > TIE and not losses:
        return True, "holds"
    return False, "does not hold: " + "; ".join(([] if mean > TIE else [f"mean {mean:+.2f}"]) + losses)


def difference_table(groups: Groups, datasets: list[str], variants: list[str], fusions: list[str],
                     reference: str) -> str:
    """Each variant's difference to ``reference`` per data set and on the mean (image / pixel AUROC
    points; bold: worse by more than the seed spread) with the verdicts."""
    header = ["variant", "fusion", *(f"{d}: image / pixel" for d in datasets), "mean: image / pixel",
              *(f"verdict ({LABELS[m]})" for m in COMPARED)]
    rows = []
    for name in (v for v in variants if v != reference):
        for fusion in fusions:
            compared = [differences(groups, datasets, name, reference, fusion, m) for m in COMPARED]
            cells = [" / ".join(f"**{deltas[d]:+.2f}**" if worse(deltas[d], spreads[d]) else f"{deltas[d]:+.2f}"
                                for deltas, spreads in compared) for d in datasets]
            means = " / ".join(f"{statistics.mean(deltas.values()):+.2f}" for deltas, _ in compared)
            rows.append([name, fusion, *cells, means, *(verdict(*pair)[1] for pair in compared)])
    return markdown_table(header, rows)


def num(value: float) -> float:
    return round(value, 6)


def csv_table(groups: Groups, datasets: list[str], variants: list[str], fusions: list[str], reference: str,
              synthetic_check: bool) -> tuple[list[str], list[list]]:
    """``accuracy.csv``: a row per data set, variant and fusion (mean and std over seeds, difference to
    the reference in points), then that variant and fusion's row of data set ``mean`` (the mean over
    data sets of the seed means, no std; the mean difference and the verdicts)."""
    columns = table_columns(synthetic_check)
    header = ["dataset", "variant", "fusion", "seeds", *(f"{c}_{s}" for c in columns for s in ("mean", "std")),
              *(f"{m}_vs_reference" for m in COMPARED), *(f"{m}_verdict" for m in COMPARED)]
    rows = []
    for name in variants:
        for fusion in fusions:
            compared = [differences(groups, datasets, name, reference, fusion, m) for m in COMPARED]
            for d in datasets:
                group = groups[(d, name, fusion)]
                rows.append([d, name, fusion, len(group["image_auroc"]),
                             *(x for c in columns for x in (num(statistics.mean(group[c])), num(std(group[c])))),
                             *(num(deltas[d]) for deltas, _ in compared), *([""] * len(COMPARED))])
            verdicts = ["reference"] * len(COMPARED) if name == reference else \
                ["holds" if verdict(*pair)[0] else "does not hold" for pair in compared]
            rows.append(["mean", name, fusion, len(groups[(datasets[0], name, fusion)]["image_auroc"]),
                         *(x for c in columns for x in (num(dataset_mean(groups, datasets, name, fusion, c)), "")),
                         *(num(statistics.mean(deltas.values())) for deltas, _ in compared), *verdicts])
    return header, rows


def report(runs: list[dict], reference: str, synthetic_check: bool) -> tuple[str, list[str], list[list]]:
    """``accuracy.md``'s text and ``accuracy.csv``'s header and rows for ``runs`` (rows of
    :func:`result_row`, every variant and fusion on every data set)."""
    groups = seed_values(runs)
    datasets, variants, fusions, seeds = (unique(r[k] for r in runs) for k in ("dataset", "variant", "fusion", "seed"))
    parts = ["# Accuracy", f"Data sets {', '.join(datasets)}; seeds {', '.join(map(str, seeds))}; mean ± std over "
             "seeds (the value alone with one seed)."]
    for dataset in datasets:
        parts += [f"## {dataset}", dataset_table(groups, dataset, variants, fusions, synthetic_check)]
    columns = [*MEAN_METRICS, *([f"synthetic_{m}" for m in CHECK_METRICS] if synthetic_check else [])]
    means = [[name, fusion, *(f"{dataset_mean(groups, datasets, name, fusion, c):.3f}" for c in columns)]
             for name in variants for fusion in fusions]
    parts += ["## Mean over data sets",
              f"Per variant and fusion, the mean over the {len(datasets)} data sets of each data set's mean "
              "over seeds.",
              markdown_table(["variant", "fusion", *(LABELS[c] for c in columns)], means),
              f"## Difference to {reference}",
              f"Variant minus {reference}, in AUROC points (image / pixel), per data set and on the mean over data "
              "sets; **bold**: worse than the reference by more than that data set's seed spread (the larger of the "
              "two std's over seeds; 0 with one seed). Verdict, per fusion and for image and pixel AUROC separately: "
              "a variant *holds* when it beats the reference on the mean over data sets and on no data set is it "
              "worse by more than the seed spread.",
              difference_table(groups, datasets, variants, fusions, reference)]
    return "\n\n".join(parts) + "\n", *csv_table(groups, datasets, variants, fusions, reference, synthetic_check)


def pick_reference(requested: str | None, names: list[str], variant_names: list[str]) -> str:
    """``--reference``, checked; by default ``paper`` when it is a variant, else the first variant."""
    if not names:
        raise UserError("nothing to run: give --variants, or drop --no-baseline")
    if requested is not None and requested not in names:
        raise UserError(f"--reference {requested}: not a variant of this run ({', '.join(names)})")
    return requested or ("paper" if "paper" in variant_names else (variant_names or names)[0])


def shared_trainings(args: argparse.Namespace, plan: list[tuple]) -> dict[str, str]:
    """Variant -> the variant whose training it uses: the first with the same resolved training settings."""
    first_with_settings: dict[str, str] = {}
    train_names: dict[str, str] = {}
    for name, train_flags, _, epochs in plan:
        key = json.dumps(training_settings(train_argv(args, train_flags, 0, epochs, Path("."))), sort_keys=True)
        train_names[name] = first_with_settings.setdefault(key, name)
    return train_names


def run_dataset(args: argparse.Namespace, plan: list[tuple], seeds: list[int], runs: list[dict],
                settings: dict) -> None:
    """Train and score every variant and seed of ``plan`` on the data set of ``args``, adding the rows
    to ``runs``; ``accuracy.json`` is written after each run."""
    train_names = shared_trainings(args, plan)
    for name, train_flags, score_flags, epochs in plan:
        for seed in seeds:
            runs.extend(run_one(args, name, train_names[name], train_flags, score_flags, seed, epochs))
            write_json(Path(args.out) / "accuracy.json", {"settings": settings, "runs": runs})


def main(args: argparse.Namespace) -> None:
    datasets = parse_datasets(args)
    if args.check_kinds:
        parse_augs(args.check_kinds, setting="check_kinds")  # a typo fails before any training
        args.synthetic_check = True
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = [parse_variant(v) for v in args.variants]
    plan = ([] if args.no_baseline else [("untrained", [], [], 0)]) + [(n, t, s, args.epochs) for n, t, s in variants]
    reference = pick_reference(args.reference, [name for name, *_ in plan], [name for name, _, _ in variants])
    settings = {**vars(args), "datasets": [str(Path(root) / category) for root, category in datasets]}
    runs: list[dict] = []
    for dataset in datasets:
        run_dataset(for_dataset(args, dataset), plan, seeds, runs, settings)
    # A variant's own --check-kinds makes the check columns appear too.
    with_check = args.synthetic_check or any("synthetic_image_auroc" in run for run in runs)
    markdown, header, rows = report(runs, reference, with_check)
    write_text_atomic(Path(args.out) / "accuracy.md", markdown)
    write_csv(Path(args.out) / "accuracy.csv", header, rows)
    print(markdown)
    print(json.dumps({"seeds": seeds, "datasets": settings["datasets"], "reference": reference,
                      "command": shlex.join(sys.argv)}))


if __name__ == "__main__":
    cli.run(main, get_args_parser().parse_args(), batch_flag="--b")
