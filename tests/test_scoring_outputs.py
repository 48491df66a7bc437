"""Scoring results are never silently replaced, mislabelled or written where a user did not expect.

Runs the inference command line in-process (as ``inference_*.py`` does) in a temporary working
directory, so the default ``results/`` folder is the test's own.
"""

import csv
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from common import cli
from common.errors import SettingError
from scoring.outputs.folders import IDENTITY_FILE, explicit_dir, run_folder, versioned_dir
from scoring.pipeline import cli as score_cli

FAST = ["--batch-size", "4", "--no-pictures"]


def score(argv, capsys, fusion="concatenation"):
    """Run an inference script in-process; returns (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        cli.run(score_cli.main, score_cli.parse_args(fusion, argv))
        raise SystemExit(0)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip() and "%|" not in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture()
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def results_of(folder: Path) -> dict:
    return json.loads((folder / "results.json").read_text())


# --- the folder logic itself ----------------------------------------------------------------

def test_versions_keep_other_runs_and_a_rerun_keeps_its_own(tmp_path):
    base = tmp_path / "results" / "zipper-wave50" / "concatenation"
    first = versioned_dir(base, {"k": 1})
    (first / "heatmaps").mkdir()
    (first / "heatmaps" / "old.png").write_bytes(b"x")
    (first / "results.json").write_text("{}")
    (first / "my_notes.txt").write_text("mine")  # not a file a run writes: never removed
    second = versioned_dir(base, {"k": 2})
    assert (first.name, second.name) == ("v0", "v1")
    assert (base / "latest").resolve() == second.resolve()
    assert (first / "heatmaps" / "old.png").exists()  # another run's results stay
    again = versioned_dir(base, {"k": 1})
    assert again == first and (base / "latest").resolve() == first.resolve()
    # The same run again writes into its own version; what it does not write again stays (its heatmaps).
    assert (first / "heatmaps" / "old.png").exists() and (first / "results.json").exists()
    assert (first / "my_notes.txt").read_text() == "mine"
    assert json.loads((first / IDENTITY_FILE).read_text()) == {"k": 1}


def test_explicit_out_refuses_other_results_unless_overwrite(tmp_path):
    folder = explicit_dir(tmp_path / "out", {"k": 1}, overwrite=False)
    (folder / "results.json").write_text("{}")
    assert explicit_dir(folder, {"k": 1}, overwrite=False) == folder  # its own: reused, kept
    assert (folder / "results.json").exists()
    with pytest.raises(Exception, match="holds results of another checkpoint or other settings; pass --overwrite"):
        explicit_dir(folder, {"k": 2}, overwrite=False)
    assert (folder / "results.json").exists()
    explicit_dir(folder, {"k": 2}, overwrite=True)
    assert not (folder / "results.json").exists()  # another run's results: cleared with --overwrite
    # A folder of the user's own files (no results) is simply used.
    own = tmp_path / "own"
    own.mkdir()
    (own / "photo.png").write_bytes(b"x")
    explicit_dir(own, {"k": 3}, overwrite=False)
    assert (own / "photo.png").exists()
    # One whose files only share a run's names (no record of a run): refused, and said so.
    named = tmp_path / "named"
    named.mkdir()
    (named / "scores.csv").write_text("mine")
    with pytest.raises(Exception, match=r"holds files a scoring run writes \(scores.csv\) of no run it knows"):
        explicit_dir(named, {"k": 3}, overwrite=False)
    assert (named / "scores.csv").read_text() == "mine"


def test_a_failed_run_leaves_no_version_and_latest_where_it_was(tmp_path):
    base = tmp_path / "results" / "r" / "concatenation"
    with run_folder(base, {"k": 1}, explicit=False, overwrite=False) as first:
        (first / "results.json").write_text("{}")
    with pytest.raises(RuntimeError), run_folder(base, {"k": 2}, explicit=False, overwrite=False) as second:
        assert second.name == "v1" and (second / IDENTITY_FILE).exists()
        raise RuntimeError("the run failed half-way")
    assert [p.name for p in sorted(base.iterdir())] == ["latest", "v0"]
    assert (base / "latest").resolve() == first.resolve()
    # A failure in a version that existed (same identity) keeps it and everything in it.
    with pytest.raises(RuntimeError), run_folder(base, {"k": 1}, explicit=False, overwrite=False):
        raise RuntimeError("failed again")
    assert (first / "results.json").exists() and (base / "latest").resolve() == first.resolve()


def test_out_naming_a_file_says_so(tmp_path):
    afile = tmp_path / "taken.txt"
    afile.write_text("x")
    with pytest.raises(SettingError, match="taken.txt'?: is a file, not a folder"):
        explicit_dir(afile, {"k": 1}, overwrite=False)
    assert afile.read_text() == "x"


# --- the inference command line -------------------------------------------------------------

def test_default_folder_versions_per_checkpoint_and_settings(tiny_root, trained, workdir, capsys, tmp_path, widget_run,
                                                             copy_run):
    base = ["--c", "widget", "--data-root", str(tiny_root), "--ckpt-dir", str(trained), *FAST]
    assert score(base, capsys)[0] == 0
    runs = workdir / "results" / "widget-wave18" / "concatenation"
    first = results_of(runs / "v0")
    assert score([*base, "--k", "2"], capsys)[0] == 0
    assert results_of(runs / "v0") == first and results_of(runs / "v1")["settings"]["k"] == 2
    assert (runs / "latest").resolve() == (runs / "v1").resolve()
    # Another checkpoint of the same name in another --ckpt-dir: a third version, the others kept.
    other = tmp_path / "other_ckpt"  # a copy of conftest's run of --e 1 --seed 1 (the other flags as trained's)
    copy_run(widget_run("--e", "1", "--seed", "1"), "widget-wave18", other)
    assert score(["--c", "widget", "--data-root", str(tiny_root), "--ckpt-dir", str(other), *FAST], capsys)[0] == 0
    assert results_of(runs / "v2")["checkpoint"]["sha256"] != first["checkpoint"]["sha256"]
    assert results_of(runs / "v0") == first
    # The same run again replaces only its own version.
    assert score(base, capsys)[0] == 0
    assert sorted(p.name for p in runs.iterdir()) == ["latest", "v0", "v1", "v2"]
    assert (runs / "latest").resolve() == (runs / "v0").resolve()


def test_checkpoint_file_path_names_results_after_its_folder(tiny_root, trained, workdir, capsys):
    for p in (str(trained / "widget-wave18" / "model.pt"),
              os.path.relpath(trained / "widget-wave18" / "model.pt", workdir)):
        code, _, err = score(["--c", "widget", "--data-root", str(tiny_root), "--p", p, *FAST], capsys)
        assert code == 0, err
    assert (workdir / "results" / "widget-wave18" / "concatenation" / "v0" / "results.json").is_file()
    assert not list(workdir.rglob("model.pt"))  # nothing written into a folder named after the file


def test_without_p_the_one_trained_run_of_the_category_is_used(tiny_root, trained, workdir, capsys, tmp_path):
    code, out, err = score(["--c", "widget", "--data-root", str(tiny_root), "--ckpt-dir", str(trained), *FAST],
                           capsys)
    assert code == 0, err
    assert (workdir / "results" / "widget-wave18").is_dir()
    two = tmp_path / "two"
    shutil.copytree(trained, two)
    shutil.copytree(two / "widget-wave18", two / "widget-wave34")
    code, _, err = score(["--c", "widget", "--data-root", str(tiny_root), "--ckpt-dir", str(two), *FAST], capsys)
    assert code == 2 and "widget-wave18, widget-wave34" in error_line(err) and "--p" in err
    code, _, err = score(["--c", "widget", "--data-root", str(tiny_root), "--ckpt-dir", str(tmp_path / "none"),
                          *FAST], capsys)
    assert code == 2 and "train first" in error_line(err)


def test_images_csv_names_extensions_and_normalised_scores(tiny_root, trained, workdir, capsys, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    source = sorted((tiny_root / "widget" / "test" / "good").glob("*.png"))
    shutil.copy(source[0], folder / "a.png")
    Image.open(source[1]).convert("RGB").save(folder / "a.jpg")
    shutil.copy(source[2], folder / "part 7, left.png")
    argv = ["--c", "widget", "--data-root", str(tiny_root), "--ckpt-dir", str(trained), "--images", str(folder),
            "--batch-size", "4"]
    code, _, err = score(argv, capsys)
    assert code == 0, err
    out = workdir / "results" / "widget-wave18" / "concatenation-images" / "v0"
    with (out / "scores.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(Path(r["path"]).name for r in rows) == ["a.jpg", "a.png", "part 7, left.png"]
    threshold = results_of(out)["threshold"]["value"]
    for row in rows:
        assert float(row["normalized_score"]) == pytest.approx(float(row["score"]) / threshold, rel=1e-4)
        assert row["verdict"] == ("anomalous" if float(row["score"]) > threshold else "normal")  # the one rule
    # One extension; a.png and a.jpg share a stem, so each keeps its extension in the name.
    assert sorted(p.name for p in (out / "heatmaps").glob("*.png")) == ["a_jpg.png", "a_png.png", "part 7, left.png"]
    assert {Path(r["path"]).name: r["heatmap"] for r in rows} == {
        "a.jpg": "heatmaps/a_jpg.png", "a.png": "heatmaps/a_png.png", "part 7, left.png": "heatmaps/part 7, left.png"}
    # Tomorrow's images in the same folder (one gone, a broken link added) are another run: a new
    # version; today's scores.csv and pictures stay as they were.
    before = (out / "scores.csv").read_text()
    (folder / "a.jpg").unlink()
    (folder / "gone.png").symlink_to(folder / "nowhere.png")
    assert score(argv, capsys)[0] == 0
    tomorrow = out.parent / "v1"
    assert sorted(p.name for p in (tomorrow / "heatmaps").glob("*.png")) == ["a.png", "part 7, left.png"]
    assert (out / "scores.csv").read_text() == before and len(list((out / "heatmaps").glob("*.png"))) == 3
    skipped = results_of(tomorrow)["images"]["skipped"]
    assert [Path(s["path"]).name for s in skipped] == ["gone.png"] and "broken link" in skipped[0]["reason"]


def test_bank_cache_is_keyed_by_file_content(tiny_root, trained, workdir, capsys, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(tiny_root, root)
    # BMP: an image of the same size always has the same number of bytes.
    for png in (root / "widget" / "train" / "good").glob("*.png"):
        Image.open(png).save(png.with_suffix(".bmp"))
        png.unlink()
    argv = ["--c", "widget", "--data-root", str(root), "--ckpt-dir", str(trained), *FAST, "--out", "o"]
    assert score(argv, capsys)[0] == 0
    assert score(argv, capsys)[0] == 0 and results_of(workdir / "o")["bank"]["cached"] is True
    # Replace a training image by another picture of the same byte size and time stamp.
    first, second = sorted((root / "widget" / "train" / "good").glob("*.bmp"))[:2]
    stat = first.stat()
    before = first.read_bytes()
    shutil.copyfile(second, first)
    os.utime(first, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert first.stat().st_size == stat.st_size and first.stat().st_mtime_ns == stat.st_mtime_ns
    assert first.read_bytes() != before
    # Other training images make another bank, so another run: its results do not silently replace these.
    assert score(argv, capsys)[0] == 2
    assert score(argv + ["--overwrite"], capsys)[0] == 0 and results_of(workdir / "o")["bank"]["cached"] is False


def test_bank_cache_disk_full_warns_and_scores(tiny_root, trained, workdir, capsys, monkeypatch):
    def full_disk(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:659] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")

    monkeypatch.setattr(torch, "save", full_disk)
    code, out, err = score(["--c", "widget", "--data-root", str(tiny_root), "--ckpt-dir", str(trained),
                            "--rebuild-bank", "--k", "3", *FAST], capsys)
    assert code == 0, err
    assert "warning: cannot cache the memory bank" in err and "Traceback" not in err
    assert "image AUROC" in out
    assert not list((trained / "widget-wave18" / "banks").glob("*.tmp"))


def test_metrics_that_cannot_be_computed_say_why(tiny_root, trained, workdir, capsys, tmp_path, recwarn):
    root = tmp_path / "data"
    shutil.copytree(tiny_root, root)
    shutil.rmtree(root / "widget" / "test" / "scratch")  # only good test images left
    code, out, err = score(["--c", "widget", "--data-root", str(root), "--ckpt-dir", str(trained), "--batch-size",
                            "4", "--out", "o"], capsys)
    assert code == 0, err
    assert "image AUROC n/a" in out and "nan" not in out.lower()
    assert "only good images" in err
    assert not [w for w in recwarn if "legend" in str(w.message)]  # pictures too: no empty ROC legend
    record = results_of(workdir / "o")
    assert record["metrics"]["image_auroc"] is None and record["metrics"]["pixel_auroc"] is None
    assert "only good images" in record["unavailable_metrics"]["image_auroc"]
    assert "n/a" in (workdir / "o" / "results.md").read_text()


def test_failed_runs_leave_no_version_and_reruns_keep_their_pictures(tiny_root, trained, workdir, capsys, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(tiny_root, root)
    argv = ["--c", "widget", "--data-root", str(root), "--ckpt-dir", str(trained), "--batch-size", "4"]
    assert score(argv, capsys)[0] == 0  # with pictures
    base = workdir / "results" / "widget-wave18" / "concatenation"
    pictures = sorted((base / "v0" / "heatmaps").rglob("*.png"))
    assert pictures
    # The same run without pictures: its own version, whose pictures stay, and its tables still name them.
    assert score(argv + ["--no-pictures"], capsys)[0] == 0
    assert sorted((base / "v0" / "heatmaps").rglob("*.png")) == pictures
    with open(base / "v0" / "image_scores.csv") as table:
        named = sorted(base / "v0" / row["heatmap"] for row in csv.DictReader(table))
    assert named == pictures
    kept = json.loads((base / "v0" / "results.json").read_text())["files"]["heatmaps"]
    assert kept is not None and (workdir / kept).resolve() == (base / "v0" / "heatmaps").resolve()
    # A run that fails after it started (another setting: a new version; then a mask of the wrong
    # size) leaves no version behind, and latest where it was.
    mask = next((root / "widget" / "ground_truth").rglob("*_mask.png"))
    Image.open(mask).resize((7, 5)).save(mask)
    code, _, err = score(argv + ["--k", "2"], capsys)
    assert code == 2 and "is 5x7" in error_line(err)  # height x width
    assert sorted(p.name for p in base.iterdir()) == ["latest", "v0"] and (base / "latest").resolve().name == "v0"


def test_save_detector_replaces_only_the_same_detector(tiny_root, trained, workdir, capsys, tmp_path):
    target = tmp_path / "widget.detector.pt"
    argv = ["--c", "widget", "--data-root", str(tiny_root), "--ckpt-dir", str(trained), *FAST,
            "--save-detector", str(target)]
    assert score(argv, capsys)[0] == 0
    first = target.read_bytes()
    assert score(argv, capsys)[0] == 0  # the same detector again: replaced without asking
    code, _, err = score(argv + ["--k", "2"], capsys)  # another detector: refused, the file kept
    assert code == 2 and "holds a detector of another checkpoint, training images or settings; add --overwrite" \
        in error_line(err)
    assert torch.load(target, weights_only=True)["config"]["k"] == 1 and len(target.read_bytes()) == len(first)
    assert score(argv + ["--k", "2", "--overwrite"], capsys)[0] == 0
    assert torch.load(target, weights_only=True)["config"]["k"] == 2
