"""Does the label-free synthetic check choose between trainings as the test labels would?

Reads ``accuracy.json`` files of ``benchmarks.accuracy --synthetic-check`` runs and, for every data
set, fusion and seed, compares every pair of variants with different trainings (different
checkpoints; scoring-only variants of one training are left out): the pair *agrees* when the
check's metric and the test's metric order the two the same way. Pairs whose test metrics differ
by less than ``--min-gap`` AUROC points are counted apart (a tie on the test cannot be got wrong).
Also reported: how often choosing the check's best training per data set, fusion and seed gives
the test's best, and how many test points that choice loses on average against the test's best::

    python -m benchmarks.check_agreement results/acc-tb2/accuracy.json results/acc-mt/accuracy.json

Writes ``check_agreement.md`` / ``.csv`` / ``.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import itertools
import json
from collections import defaultdict
from pathlib import Path

from common import cli
from common.errors import UserError
from scoring.outputs.report import write_json, write_table

METRICS = ("image_auroc", "pixel_auroc")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("files", nargs="+", help="accuracy.json files of runs with --synthetic-check")
    parser.add_argument("--min-gap", type=float, default=0.5,
                        help="test AUROC points below which a pair counts as a tie (left out of the agreement)")
    parser.add_argument("--exclude", default="untrained", help="comma list of variants left out")
    parser.add_argument("--out", default="results/benchmarks", help="folder for check_agreement.md/csv/json")
    return parser


def load_runs(files: list[str], exclude: set[str]) -> list[dict]:
    """Every run with both check and test metrics, one per (data set, variant, fusion, seed)."""
    runs = {}
    for name in files:
        path = Path(name)
        if not path.is_file():
            raise UserError(f"{path}: no such file; give accuracy.json files of benchmarks.accuracy")
        for run in json.loads(path.read_text())["runs"]:
            if run["variant"] in exclude or not all(f"synthetic_{m}" in run for m in METRICS):
                continue
            key = (run.get("dataset", "?"), run["variant"], run["fusion"], run["seed"])
            runs[key] = run
    if not runs:
        raise UserError("no run with synthetic check metrics in these files; run benchmarks.accuracy "
                        "--synthetic-check")
    return list(runs.values())


def distinct_trainings(runs: list[dict]) -> list[dict]:
    """One run per training: of the variants scoring one checkpoint, the first listed is kept."""
    seen, kept = set(), []
    for run in runs:
        key = (run.get("dataset"), run["fusion"], run["seed"], run.get("checkpoint_sha256", run["variant"]))
        if key not in seen:
            seen.add(key)
            kept.append(run)
    return kept


def pair_counts(runs: list[dict], min_gap: float) -> dict:
    """Per (data set, metric): agreeing pairs, disagreeing pairs, test ties."""
    groups = defaultdict(list)
    for run in runs:
        groups[run.get("dataset"), run["fusion"], run["seed"]].append(run)
    counts = defaultdict(lambda: {"agree": 0, "disagree": 0, "ties": 0})
    for (dataset, _, _), group in groups.items():
        for a, b in itertools.combinations(group, 2):
            for metric in METRICS:
                test = (a[metric] - b[metric]) * 100
                check = a[f"synthetic_{metric}"] - b[f"synthetic_{metric}"]
                tally = counts[dataset, metric]
                if abs(test) < min_gap:
                    tally["ties"] += 1
                else:
                    tally["agree" if test * check > 0 else "disagree"] += 1
    return counts


def choice_counts(runs: list[dict]) -> dict:
    """Per (data set, metric): how often the check's best training is the test's best, and the test
    points it loses against the test's best (mean over data set, fusion and seed groups)."""
    groups = defaultdict(list)
    for run in runs:
        groups[run.get("dataset"), run["fusion"], run["seed"]].append(run)
    out = defaultdict(lambda: {"groups": 0, "same": 0, "loss": 0.0})
    for (dataset, _, _), group in groups.items():
        if len(group) < 2:
            continue
        for metric in METRICS:
            chosen = max(group, key=lambda r: r[f"synthetic_{metric}"])
            best = max(group, key=lambda r: r[metric])
            tally = out[dataset, metric]
            tally["groups"] += 1
            tally["same"] += chosen is best
            tally["loss"] += (best[metric] - chosen[metric]) * 100
    return out


def main(args: argparse.Namespace) -> None:
    runs = distinct_trainings(load_runs(args.files, set(filter(None, args.exclude.split(",")))))
    pairs, choices = pair_counts(runs, args.min_gap), choice_counts(runs)
    header = ["data set", "metric", "pairs agreeing", "pairs disagreeing", "test ties", "agreement",
              "check's choice = test's best", "test points lost by the check's choice"]
    rows, records = [], []
    for dataset, metric in sorted(pairs):
        p, c = pairs[dataset, metric], choices[dataset, metric]
        decided = p["agree"] + p["disagree"]
        rate = p["agree"] / decided if decided else float("nan")
        loss = c["loss"] / c["groups"] if c["groups"] else float("nan")
        rows.append([dataset, metric, p["agree"], p["disagree"], p["ties"], f"{rate:.2f}",
                     f"{c['same']} of {c['groups']}", f"{loss:.2f}"])
        records.append({"dataset": dataset, "metric": metric, **p, "agreement": rate, "choice_groups": c["groups"],
                        "choice_same": c["same"], "choice_loss_points": loss})
    out = Path(args.out)
    write_table(out / "check_agreement", header, rows)
    write_json(out / "check_agreement.json", {"files": args.files, "min_gap": args.min_gap, "rows": records})
    print((out / "check_agreement.md").read_text())


if __name__ == "__main__":
    cli.run(main, get_args_parser().parse_args())
