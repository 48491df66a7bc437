"""benchmarks/accuracy.py on the tiny data set: baseline row, shared trainings, reuse."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import accuracy
from errors import UserError
from recipes import RECIPES
from scoring import ScoreConfig
from scoring import cli as score_cli
from training import WEIGHT_SETTINGS

REPO = Path(__file__).resolve().parent.parent


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


def test_recipe_variant_prefix_becomes_recipe_flag():
    name, train, score = accuracy.parse_variant("best-k3=best --rotflip|--k 3")
    assert name == "best-k3" and train == ["--recipe", "best", "--rotflip"]
    assert score == ["--recipe", "best", "--k", "3"]
    assert accuracy.parse_variant("best") == ("best", ["--recipe", "best"], ["--recipe", "best"])
    with pytest.raises(UserError, match="--variants bset: not a recipe"):
        accuracy.parse_variant("bset")


def test_variants_share_training_by_resolved_settings():
    """Flags spelled differently but meaning the same training share it; a recipe's flag wins over
    accuracy.py's default batch, and an explicit --b wins over the recipe."""
    args = accuracy.get_args_parser().parse_args(["--c", "widget"])
    explicit = accuracy.training_settings(accuracy.train_argv(args, ["--lr", "0.030", "--b", "32"], 0, 20, Path(".")))
    default = accuracy.training_settings(accuracy.train_argv(args, ["--recipe", "paper"], 0, 20, Path(".")))
    assert explicit == default
    best = accuracy.training_settings(accuracy.train_argv(args, ["--recipe", "best"], 0, 20, Path(".")))
    assert best["batch_size"] == RECIPES["best"]["train"].get("batch_size", 32) and best["sched"] == "cosine"
    args.batch_size = 8
    assert accuracy.training_settings(accuracy.train_argv(args, ["--recipe", "best"], 0, 20, Path(".")))[
        "batch_size"] == 8


def test_reuse_trains_and_scores_again_when_settings_changed(tiny_root, tmp_path, capsys):
    work, out = tmp_path / "work", tmp_path / "out"
    base = ["--data-root", str(tiny_root), "--c", "widget", "--arch", "wave18", "--size", "32", "--e", "1",
            "--b", "4", "--seeds", "0", "--fusions", "multiplication", "--work-dir", str(work), "--out", str(out),
            "--no-baseline", "--reuse"]
    ckpt = work / "v" / "seed0" / "widget-wave18" / "model.pt"
    results = work / "v" / "seed0" / "results" / "multiplication" / "results.json"
    accuracy.main(accuracy.get_args_parser().parse_args(base + ["--variants", "v=--lr 0.01|"]))
    first_sha = json.loads(results.read_text())["checkpoint"]["sha256"]
    # Same training, other scoring: the checkpoint is kept, the results are made again with k = 2.
    stamp = ckpt.stat().st_mtime_ns
    accuracy.main(accuracy.get_args_parser().parse_args(base + ["--variants", "v=--lr 0.01|--k 2"]))
    assert ckpt.stat().st_mtime_ns == stamp and json.loads(results.read_text())["settings"]["k"] == 2
    # Other training under the same name: trained again (said so), and scored from the new weights.
    accuracy.main(accuracy.get_args_parser().parse_args(base + ["--variants", "v=--lr 0.05|--k 2"]))
    assert "was trained with other settings (lr: 0.01 -> 0.05)" in capsys.readouterr().out
    assert json.loads(results.read_text())["checkpoint"]["sha256"] != first_sha


def test_compared_settings_derive_from_the_configs():
    args = accuracy.get_args_parser().parse_args(["--c", "widget"])
    assert tuple(accuracy.training_settings(accuracy.train_argv(args, [], 0, 20, Path(".")))) == WEIGHT_SETTINGS
    assert ScoreConfig.names("bank", "score") == accuracy.RESULT_SETTINGS
    wanted = accuracy.result_settings(score_cli.parse_args("concatenation", ["--k", "2"]), 128)
    assert set(wanted) == set(ScoreConfig.names("bank", "score"))
    assert wanted["size"] == 128 and wanted["refine"] == 0 and wanted["k"] == 2 and wanted["layers"] == [2, 3]
    assert accuracy.result_settings(score_cli.parse_args("concatenation", ["--coreset", "0.1"]), 128)["refine"] == 16


def test_benchmarks_run_as_modules_from_the_repository_root():
    out = subprocess.run([sys.executable, "-m", "benchmarks.accuracy", "--help"], cwd=REPO, capture_output=True,
                         text=True)
    assert out.returncode == 0 and "--variants" in out.stdout, out.stderr[-2000:]
