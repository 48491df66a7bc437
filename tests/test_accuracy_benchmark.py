"""benchmarks/accuracy.py on the tiny data sets: baseline row, shared trainings, reuse (also of the
single-data-set layout), two data sets with their mean and verdicts, and the table logic on made-up runs."""

import csv
import json
from pathlib import Path

import pytest

import main as train_main
from benchmarks import accuracy
from common import cli
from common.errors import UserError
from common.recipes import RECIPES
from scoring import ScoreConfig
from scoring.pipeline import cli as score_cli
from training import WEIGHT_SETTINGS


def test_two_data_sets_with_shared_training_and_reuse(tiny_root, tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    argv = ["--datasets", str(tiny_root / "widget"), str(tiny_root / "gizmo"), "--arch", "wave18", "--size", "32",
            "--e", "1", "--b", "4", "--seeds", "0", "--fusions", "multiplication", "--work-dir", str(work),
            "--out", str(out), "--variants", "slow=--lr 0.01|", "slow-k2=--lr 0.01|--k 2",
            "slow-held=--lr 0.01|--check-kinds texture,scratch", "--reference", "slow", "--synthetic-check"]
    accuracy.main(accuracy.get_args_parser().parse_args(argv))
    table = (out / "accuracy.md").read_text()
    for section in ("## widget", "## gizmo", "## Mean over data sets", "## Difference to slow"):
        assert f"\n{section}\n" in table
    for name in ("untrained", "slow", "slow-k2", "slow-held"):
        assert table.count(f"| {name} | multiplication |") == 3 + (name != "slow")  # 2 data sets, mean, difference
    assert "synthetic check pixel AUROC" in table and "verdict (pixel AUROC)" in table
    # Each data set in its own folder; slow-k2 trains like slow: scored from slow's checkpoint, with its own results.
    for category in ("widget", "gizmo"):
        assert (work / category / "slow" / "seed0" / f"{category}-wave18" / "model.pt").is_file()
        assert (work / category / "untrained" / "seed0" / f"{category}-wave18" / "model.pt").is_file()
        assert not (work / category / "slow-k2" / "seed0" / f"{category}-wave18").exists()
    k2 = json.loads((work / "gizmo" / "slow-k2" / "seed0" / "results" / "multiplication" / "results.json").read_text())
    assert k2["settings"]["k"] == 2 and k2["checkpoint"]["path"].startswith(str(work / "gizmo" / "slow"))
    assert k2["synthetic_check"]["kinds"] == ["cutpaste", "perlin", "scar"]
    # The check's kinds are a scoring-time choice: same checkpoint and test metrics, another check.
    slow, held = (json.loads((work / "gizmo" / name / "seed0" / "results" / "multiplication" / "results.json")
                             .read_text()) for name in ("slow", "slow-held"))
    assert held["synthetic_check"]["kinds"] == ["texture", "scratch"] and held["metrics"] == slow["metrics"]
    assert held["checkpoint"]["sha256"] == slow["checkpoint"]["sha256"]
    runs = json.loads((out / "accuracy.json").read_text())["runs"]
    assert [(r["dataset"], r["variant"]) for r in runs] == [
        (d, v) for d in ("widget", "gizmo") for v in ("untrained", "slow", "slow-k2", "slow-held")]
    assert all(0 <= r["synthetic_pixel_auroc"] <= 1 for r in runs)
    rows = list(csv.DictReader((out / "accuracy.csv").open()))
    assert [(r["dataset"], r["variant"]) for r in rows] == [
        (d, v) for v in ("untrained", "slow", "slow-k2", "slow-held") for d in ("widget", "gizmo", "mean")]
    mean = {r["variant"]: r for r in rows if r["dataset"] == "mean"}
    assert mean["slow"]["image_auroc_verdict"] == "reference"
    assert float(mean["slow-k2"]["image_auroc_mean"]) == pytest.approx(
        sum(float(r["image_auroc_mean"]) for r in rows if r["variant"] == "slow-k2" and r["dataset"] != "mean") / 2)
    # --reuse: nothing is trained or scored again, and the metrics are the same.
    stamp = (work / "gizmo" / "slow" / "seed0" / "gizmo-wave18" / "model.pt").stat().st_mtime_ns
    accuracy.main(accuracy.get_args_parser().parse_args(argv + ["--reuse"]))
    assert (work / "gizmo" / "slow" / "seed0" / "gizmo-wave18" / "model.pt").stat().st_mtime_ns == stamp
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
    args = accuracy.get_args_parser().parse_args(["--data-root", "data", "--c", "widget"])
    explicit = accuracy.training_settings(accuracy.train_argv(args, ["--lr", "0.030", "--b", "32"], 0, 20, Path(".")))
    default = accuracy.training_settings(accuracy.train_argv(args, ["--recipe", "paper"], 0, 20, Path(".")))
    assert explicit == default
    best = accuracy.training_settings(accuracy.train_argv(args, ["--recipe", "best"], 0, 20, Path(".")))
    assert best["batch_size"] == RECIPES["best"]["train"].get("batch_size", 32) and best["sched"] == "cosine"
    args.batch_size = 8
    assert accuracy.training_settings(accuracy.train_argv(args, ["--recipe", "best"], 0, 20, Path(".")))[
        "batch_size"] == 8


def single_data_set_run(tiny_root: Path, work_dir: Path, train_flags: list[str]) -> None:
    """Variant ``v``, seed 0 on ``widget`` as the single-data-set version ran it with ``--work-dir
    work_dir`` (the same main.py and scoring calls, in ``work_dir/v/seed0``)."""
    ckpt_dir = work_dir / "v" / "seed0"
    train_main.main(train_main.parse_args(
        ["--c", "widget", "--data-root", str(tiny_root), "--arch", "wave18", "--size", "32", "--e", "1", "--b", "4",
         "--seed", "0", "--ckpt-dir", str(ckpt_dir), "--no-tensorboard", "--save-every", "0", *train_flags,
         "--overwrite"]))
    score_cli.main(score_cli.parse_args("multiplication", [
        "--c", "widget", "--data-root", str(tiny_root), "--ckpt-dir", str(ckpt_dir), "--p", "widget-wave18",
        "--out", str(ckpt_dir / "results" / "multiplication"), "--overwrite", "--no-pictures", "--seed", "0"]))


def test_reuse_of_the_single_data_set_layout_and_again_when_settings_changed(tiny_root, tmp_path, capsys):
    """A run made with ``--work-dir W/widget`` by the single-data-set version is reused by ``--work-dir W
    --datasets .../widget``; changed settings train / score again."""
    work, out = tmp_path / "work", tmp_path / "out"
    single_data_set_run(tiny_root, work / "widget", ["--lr", "0.01"])
    base = ["--datasets", str(tiny_root / "widget"), "--arch", "wave18", "--size", "32", "--e", "1", "--b", "4",
            "--seeds", "0", "--fusions", "multiplication", "--work-dir", str(work), "--out", str(out),
            "--no-baseline", "--reuse"]
    ckpt = work / "widget" / "v" / "seed0" / "widget-wave18" / "model.pt"
    results = work / "widget" / "v" / "seed0" / "results" / "multiplication" / "results.json"
    assert accuracy.run_folders(work, "widget", "v", "v", 0) == (ckpt.parent.parent, results.parent.parent)
    stamps = ckpt.stat().st_mtime_ns, results.stat().st_mtime_ns
    accuracy.main(accuracy.get_args_parser().parse_args(base + ["--variants", "v=--lr 0.01|"]))
    assert (ckpt.stat().st_mtime_ns, results.stat().st_mtime_ns) == stamps  # neither trained nor scored again
    first_sha = json.loads(results.read_text())["checkpoint"]["sha256"]
    # Same training, other scoring: the checkpoint is kept, the results are made again with k = 2.
    accuracy.main(accuracy.get_args_parser().parse_args(base + ["--variants", "v=--lr 0.01|--k 2"]))
    assert ckpt.stat().st_mtime_ns == stamps[0] and json.loads(results.read_text())["settings"]["k"] == 2
    # Other training under the same name: trained again (said so), and scored from the new weights.
    accuracy.main(accuracy.get_args_parser().parse_args(base + ["--variants", "v=--lr 0.05|--k 2"]))
    assert "was trained with other settings (lr: 0.01 -> 0.05)" in capsys.readouterr().out
    assert json.loads(results.read_text())["checkpoint"]["sha256"] != first_sha


def test_run_folders_of_a_data_set_are_the_single_data_set_work_dir():
    """``--work-dir runs/acc --datasets .../toothbrush/toothbrush`` finds what ``--work-dir runs/acc/toothbrush``
    made: checkpoints of the shared training's variant, results of the variant's own."""
    ckpt_dir, results_dir = accuracy.run_folders("runs/acc", "toothbrush", "paper-k2", "paper", 1)
    assert ckpt_dir == Path("runs/acc/toothbrush/paper/seed1")
    assert results_dir == Path("runs/acc/toothbrush/paper-k2/seed1/results")


def test_datasets_are_category_folders_checked_before_anything_trains(tiny_root, tmp_path, capsys):
    def parse(*argv):
        return accuracy.get_args_parser().parse_args(["--work-dir", str(tmp_path / "work"), *argv])

    assert accuracy.parse_datasets(parse("--datasets", f"{tiny_root / 'widget'}/", str(tiny_root / "gizmo"))) == \
        [(str(tiny_root), "widget"), (str(tiny_root), "gizmo")]
    assert accuracy.parse_datasets(parse("--data-root", str(tiny_root), "--c", "gizmo")) == [(str(tiny_root), "gizmo")]
    missing = tmp_path / "nope" / "widget"
    with pytest.raises(SystemExit) as exit_info:
        cli.run(accuracy.main, parse("--datasets", str(tiny_root / "widget"), str(missing), "--out", str(tmp_path)))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err == f"error: --datasets {missing}: no such folder\n"
    assert not (tmp_path / "work").exists()
    for argv, message in [(("--datasets", str(tiny_root)), "has no train/ and test/ folders"),
                          (("--datasets", str(tiny_root / "widget"), "--c", "widget"), "without --c / --data-root"),
                          (("--datasets", str(tiny_root / "widget"), f"{tiny_root}/../{tiny_root.name}/widget"),
                           "two data sets named widget"),
                          (("--data-root", str(tiny_root), "--c", "gadget"), "--c gadget: no such folder")]:
        with pytest.raises(UserError, match=message):
            accuracy.main(parse(*argv))
    with pytest.raises(UserError, match="--reference best: not a variant of this run"):
        accuracy.main(parse("--datasets", str(tiny_root / "widget"), "--reference", "best"))


def fake_run(dataset: str, variant: str, seed: int, image: float, pixel: float) -> dict:
    return {"dataset": dataset, "variant": variant, "seed": seed, "fusion": "multiplication", "epochs": 1,
            "train_s": 1.0, "score_s_per_image": 0.01, "image_auroc": image, "pixel_auroc": pixel, "aupro": 0.5,
            "pixel_auroc_paper_masks": pixel}


def test_verdict_needs_a_better_mean_and_no_data_set_worse_than_its_seed_spread():
    """Reference ``paper``: image AUROC a 0.90/0.92 (std 1.41 points), b 0.80/0.80 (std 0)."""
    values = {"paper": ([0.90, 0.92], [0.80, 0.80]),
              "worse-on-b": ([0.99, 0.99], [0.75, 0.75]),  # mean +1.5, but b -5 with spread 0
              "within": ([0.95, 0.95], [0.79, 0.80]),  # b -0.5 within spread 0.71: holds
              "lower": ([0.90, 0.92], [0.80, 0.79])}  # mean -0.25
    runs = [fake_run(d, name, seed, image, 0.9 + 0.01 * (name != "paper"))
            for name, per_data_set in values.items() for d, images in zip("ab", per_data_set)
            for seed, image in enumerate(images)]
    markdown, header, rows = accuracy.report(runs, "paper", synthetic_check=False)
    mean = {row[1]: dict(zip(header, row)) for row in rows if row[0] == "mean"}
    assert {name: row["image_auroc_verdict"] for name, row in mean.items()} == {
        "paper": "reference", "worse-on-b": "does not hold", "within": "holds", "lower": "does not hold"}
    assert all(mean[n]["pixel_auroc_verdict"] == "holds" for n in values if n != "paper")  # +1 point everywhere
    assert mean["worse-on-b"]["image_auroc_mean"] == pytest.approx(0.87)
    assert mean["worse-on-b"]["image_auroc_vs_reference"] == pytest.approx(1.5)
    assert "| worse-on-b | multiplication | +8.00 / +1.00 | **-5.00** / +1.00 | +1.50 / +1.00 | " \
           "does not hold: worse on b (-5.00, spread 0.00) | holds |" in markdown
    assert "| lower | multiplication | +0.00 / +1.00 | -0.50 / +1.00 | -0.25 / +1.00 | does not hold: mean -0.25" \
           in markdown
    assert "| worse-on-b | multiplication | 0.870 | 0.910 | 0.500 |" in markdown  # mean over data sets


def test_verdict_with_one_seed_and_the_default_reference():
    none = {"a": 0.0, "b": 0.0}
    assert accuracy.verdict({"a": 2.0, "b": -0.01}, none) == (False, "does not hold: worse on b (-0.01, spread 0.00)")
    assert accuracy.verdict({"a": 0.5, "b": 0.0}, none) == (True, "holds")  # a tie is not worse
    assert accuracy.verdict({"a": 0.0, "b": 0.0}, none) == (False, "does not hold: mean +0.00")  # nor better
    assert accuracy.pick_reference(None, ["untrained", "best", "paper"], ["best", "paper"]) == "paper"
    assert accuracy.pick_reference(None, ["untrained", "best"], ["best"]) == "best"
    assert accuracy.pick_reference("untrained", ["untrained", "best"], ["best"]) == "untrained"


def test_compared_settings_derive_from_the_configs():
    args = accuracy.get_args_parser().parse_args(["--data-root", "data", "--c", "widget"])
    assert tuple(accuracy.training_settings(accuracy.train_argv(args, [], 0, 20, Path(".")))) == WEIGHT_SETTINGS
    assert ScoreConfig.names("bank", "score") == accuracy.RESULT_SETTINGS
    wanted = accuracy.result_settings(score_cli.parse_args("concatenation", ["--k", "2"]), 128)
    # The frame left to the checkpoint is decided by the checkpoint's digest; a square one is compared.
    assert set(wanted) == set(ScoreConfig.names("bank", "score")) - {"frame"}
    assert accuracy.result_settings(score_cli.parse_args("concatenation", ["--frame", "square"]), 128)["frame"] \
        == "128x128"
    assert wanted["size"] == 128 and wanted["refine"] == 0 and wanted["k"] == 2 and wanted["layers"] == [2, 3]
    assert accuracy.result_settings(score_cli.parse_args("concatenation", ["--coreset", "0.1"]), 128)["refine"] == 16


def test_check_agreement_counts_pairs_and_choices(tmp_path):
    """Made-up runs: the check orders a/b as the test does, b/c the other way, a/d is a test tie."""
    from benchmarks import check_agreement

    def run(variant, sha, test, check, seed=0):
        return {"dataset": "widget", "variant": variant, "fusion": "concatenation", "seed": seed,
                "checkpoint_sha256": sha, "image_auroc": test, "pixel_auroc": test,
                "synthetic_image_auroc": check, "synthetic_pixel_auroc": check}

    runs = [run("a", "1", 0.90, 0.80), run("b", "2", 0.80, 0.70), run("c", "3", 0.85, 0.60),
            run("d", "4", 0.902, 0.50), run("a-k2", "1", 0.10, 0.10), run("untrained", "0", 0.5, 0.9)]
    path = tmp_path / "accuracy.json"
    path.write_text(json.dumps({"runs": runs}))
    check_agreement.main(check_agreement.get_args_parser().parse_args([str(path), "--out", str(tmp_path)]))
    [image, _] = json.loads((tmp_path / "check_agreement.json").read_text())["rows"]
    # Trainings a, b, c, d (a-k2 scores a's checkpoint, untrained is excluded): 6 pairs, 1 a tie (a/d).
    # a>b agree, a>c agree, b<c disagree (check says b), b/d: test d, check b: disagree; c/d: test d, check c: no.
    assert (image["agree"], image["disagree"], image["ties"]) == (2, 3, 1)
    # The check picks a (0.80), the test's best is d (0.902): not the same, 0.2 points lost.
    assert image["choice_same"] == 0 and image["choice_loss_points"] == pytest.approx(0.2)
    assert (tmp_path / "check_agreement.md").read_text().count("widget") == 2


def test_reuse_needs_the_check_with_the_asked_kinds():
    def args(*flags):
        return score_cli.parse_args("concatenation", ["--c", "widget", *flags])

    default = {"synthetic_check": {"kinds": ["cutpaste", "perlin", "scar"]}}
    assert accuracy.check_matches({}, args())  # no check asked: any record will do
    assert not accuracy.check_matches({}, args("--synthetic-check"))
    assert accuracy.check_matches(default, args("--synthetic-check"))
    assert not accuracy.check_matches(default, args("--check-kinds", "texture"))
    assert accuracy.check_matches({"synthetic_check": {"kinds": ["texture"]}}, args("--check-kinds", "texture"))
