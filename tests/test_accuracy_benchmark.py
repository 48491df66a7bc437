"""benchmarks/accuracy.py on the tiny data set: baseline row, shared trainings, reuse."""

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import accuracy  # noqa: E402


def test_accuracy_table_with_shared_training_and_reuse(tiny_root, tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    argv = ["--data-root", str(tiny_root), "--c", "widget", "--arch", "wave18", "--size", "32", "--e", "1",
            "--b", "4", "--seeds", "0", "--fusions", "multiplication", "--work-dir", str(work), "--out", str(out),
            "--variants", "slow=--lr 0.01|", "slow-k2=--lr 0.01|--k 2", "fast=--lr 0.05|", "--synthetic-check"]
    accuracy.main(accuracy.get_args_parser().parse_args(argv))
    table = (out / "accuracy.md").read_text()
    for name in ("untrained", "slow", "slow-k2", "fast"):
        assert f"| {name} | multiplication |" in table
    assert "synthetic check pixel AUROC" in table
    # slow-k2 trains like slow: scored from slow's checkpoint, with its own results.
    assert (work / "slow" / "seed0" / "widget-wave18" / "model.pt").is_file()
    assert (work / "fast" / "seed0" / "widget-wave18" / "model.pt").is_file()
    assert not (work / "slow-k2" / "seed0" / "widget-wave18").exists()
    k2 = json.loads((work / "slow-k2" / "seed0" / "results" / "multiplication" / "results.json").read_text())
    assert k2["settings"]["k"] == 2 and k2["checkpoint"]["path"].startswith(str(work / "slow"))
    runs = json.loads((out / "accuracy.json").read_text())["runs"]
    assert len(runs) == 4 and all(0 <= r["synthetic_pixel_auroc"] <= 1 for r in runs)
    # --reuse: nothing is trained or scored again, and the table is the same.
    stamp = (work / "slow" / "seed0" / "widget-wave18" / "model.pt").stat().st_mtime_ns
    accuracy.main(accuracy.get_args_parser().parse_args(argv + ["--reuse"]))
    assert (work / "slow" / "seed0" / "widget-wave18" / "model.pt").stat().st_mtime_ns == stamp
    # train_s of a reused run is the sum of its logged epochs (none for 0 epochs), not the wall time.
    again = json.loads((out / "accuracy.json").read_text())["runs"]
    assert [{k: v for k, v in r.items() if k != "train_s"} for r in again] == \
        [{k: v for k, v in r.items() if k != "train_s"} for r in runs]


def test_recipe_variant_prefix_expands_to_its_flags():
    name, train, score = accuracy.parse_variant("best-k3=best --rotflip|--k 3")
    best_train, best_score = accuracy.recipe_flags("best")
    assert name == "best-k3" and train == best_train + ["--rotflip"] and score == best_score + ["--k", "3"]
