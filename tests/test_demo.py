"""The built-in demo data and the newcomer's first command, end to end as subprocesses."""

import csv
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import browser
import numpy as np
import pytest
from PIL import Image
from test_results_page import check_clean, open_page

import export as export_cli
from data import demo

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("category,defect", [(c, d) for c, ds in demo.DEFECTS.items() for d in ds])
def test_defect_pixels_are_inside_the_mask(category, defect):
    rng = np.random.default_rng(3)
    normal, inside = demo._normal(rng, category)
    broken, mask = demo.add_defect(rng, category, defect, normal, inside)
    changed = np.abs(broken - normal).max(axis=2) > 1e-9
    assert mask.sum() >= 10
    assert not (changed & ~mask).any()  # nothing outside the mask changed
    assert changed[mask].mean() > 0.9  # and the mask is really the defect


def digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.png")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def test_demo_is_deterministic_small_and_complete(tmp_path):
    a, b = demo.write_demo(tmp_path / "a", seed=0), demo.write_demo(tmp_path / "b", seed=0)
    assert digest(a) == digest(b)
    assert digest(demo.write_demo(tmp_path / "c", seed=1)) != digest(a)
    assert demo.demo_exists(a)
    size = sum(p.stat().st_size for p in a.rglob("*"))
    assert size < 10 * 2**20
    for category, defects in demo.DEFECTS.items():
        assert len(list((a / category / "train" / "good").glob("*.png"))) == demo.TRAIN
        for defect in defects:
            for image in (a / category / "test" / defect).glob("*.png"):
                mask = np.array(Image.open(a / category / "ground_truth" / defect / f"{image.stem}_mask.png"))
                assert mask.max() == 255 and set(np.unique(mask)) <= {0, 255}


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """``python main.py --demo`` (1 epoch at 32 px) in a fresh working directory: (folder, process)."""
    folder = tmp_path_factory.mktemp("newcomer")
    run = subprocess.run([sys.executable, str(REPO / "main.py"), "--demo", "--e", "1", "--size", "32",
                          "--no-tensorboard"], cwd=folder, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    return folder, run


def test_demo_command_and_both_inference_scripts(demo_run):
    tmp_path, run = demo_run
    assert "writing the demo data set to demo_data/" in run.stdout
    printed = [line.split() for line in run.stdout.splitlines()]
    for category in demo.DEFECTS:
        for fusion in ("concatenation", "multiplication"):
            row = [cells for cells in printed if cells[:2] == [category, fusion]]
            run_dir = tmp_path / "results" / f"{category}-wave18" / fusion / "latest"
            record = json.loads((run_dir / "results.json").read_text())
            # The table prints that run's image AUROC (3 decimals).
            assert len(row) == 1 and float(row[0][2]) == pytest.approx(record["metrics"]["image_auroc"], abs=5e-4)
            heatmaps = run_dir / "heatmaps"
            assert len(list(heatmaps.rglob("*.png"))) == demo.TEST_GOOD + 3 * demo.TEST_PER_DEFECT
            page = tmp_path / record["files"]["page"]  # relative to where the command ran
            assert page.is_file() and page.samefile(run_dir / "index.html")
    table = (tmp_path / "results" / "eval-wave18" / "latest" / "eval.md").read_text()
    assert table.count("| concatenation |") == 2 and table.count("| multiplication |") == 2
    # Both scripts at once: most of each one's time is its interpreter start (importing torch).
    scripts = ("inference_concatenation.py", "inference_multiplication.py")
    procs = [subprocess.Popen([sys.executable, str(REPO / script), "--c", "pill", "--data-root", "demo_data",
                               "--p", "pill-wave18", "--out", f"again-{script}", "--no-pictures"],
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for script in scripts]
    # Beside them, a benchmark runs as a module from the repository root (no sys.path edits).
    module = subprocess.Popen([sys.executable, "-m", "benchmarks.accuracy", "--help"], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for script, proc in zip(scripts, procs):
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-2000:]
        assert (tmp_path / f"again-{script}" / "results.json").is_file()
        assert not (tmp_path / f"again-{script}" / "index.html").exists()  # --no-pictures: no page either
    out, err = module.communicate(timeout=600)
    assert module.returncode == 0 and "--variants" in out, err[-2000:]


def readme_blocks(section: str, language: str) -> list[str]:
    """The ``language`` code blocks of a README section (``## section`` up to the next ``## ``)."""
    text = (REPO / "README.md").read_text()
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return [block.split("\n", 1)[1] for block in body.split("```")[1::2] if block.startswith(language + "\n")]


def test_readme_quick_start_commands_are_the_ones_tested():
    text = (REPO / "README.md").read_text()
    install_demo, install_tests = readme_blocks("Quick start", "bash")
    assert install_demo.strip().endswith("python main.py --demo")  # what demo_run runs (faster flags)
    assert install_tests.strip() == (REPO / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert text.count("\n") < 250


def test_readme_api_and_export_snippets_run_as_written(demo_run, monkeypatch, capsys):
    """The Python API and export snippets, run as a user would after the quick start (in-process,
    except the deployment snippet, which must run without this project)."""
    folder, _ = demo_run
    monkeypatch.chdir(folder)
    for code in readme_blocks("Python API", "python"):
        exec(compile(code, "README.md", "exec"), {})
        assert "[" in capsys.readouterr().out  # scores were printed
    assert (folder / "pill.detector.pt").is_file()
    for command in readme_blocks("Export and deployment", "bash")[0].splitlines():
        command = command.split("#")[0].split()
        if command[:2] == ["python", "export.py"]:
            export_cli.main(export_cli.get_args_parser().parse_args(command[2:]))
            assert "scores within" in capsys.readouterr().out
    standalone = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for code in readme_blocks("Export and deployment", "python"):
        run = subprocess.run([sys.executable, "-c", code], cwd=folder, env=standalone, capture_output=True,
                             text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        assert run.stdout.split()[0] in ("True", "False")


@pytest.mark.skipif(browser.unavailable() is not None, reason=f"browser test: {browser.unavailable()}")
def test_the_demo_pages_open_in_a_browser_and_count_what_the_csv_says(demo_run):
    folder, _ = demo_run
    for category in demo.DEFECTS:
        run_dir = folder / "results" / f"{category}-wave18" / "concatenation" / "latest"
        with (run_dir / "image_scores.csv").open(newline="") as handle:
            scores = np.array([float(row["score"]) for row in csv.DictReader(handle)])
        with browser.chromium() as page:
            seen = open_page(page, run_dir / "index.html")
            assert page.locator("#images tbody tr").count() == len(scores)
            for value in (float(np.median(scores)), float(scores.min())):
                page.fill("#threshold-value", repr(value))
                assert int(page.inner_text("#count-above")) == (scores > value).sum()
            page.wait_for_function("() => document.getElementById('viewer-img').naturalWidth > 0")
        check_clean(seen, run_dir)
