"""Shared fixtures: a tiny MVTec-layout data set written once per test session."""

from __future__ import annotations

import multiprocessing
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def texture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A smooth random grayscale texture, uint8 (H, W)."""
    yy, xx = np.mgrid[0:height, 0:width]
    phase = rng.uniform(0, 2 * np.pi, 2)
    base = 110 + 40 * np.sin(xx / 3.0 + phase[0]) * np.cos(yy / 4.0 + phase[1])
    return np.clip(base + rng.normal(0, 6, (height, width)), 0, 255).astype(np.uint8)


def write_category(root: Path, name: str, seed: int, n_train: int = 8, size=(48, 40)) -> None:
    """``root/name`` in the MVTec layout: RGB PNG train/good, test/good, test/scratch + soft masks."""
    rng = np.random.default_rng(seed)
    height, width = size
    (root / name / "train" / "good").mkdir(parents=True)
    (root / name / "test" / "good").mkdir(parents=True)
    (root / name / "test" / "scratch").mkdir(parents=True)
    (root / name / "ground_truth" / "scratch").mkdir(parents=True)
    for i in range(n_train):
        gray = texture(rng, height, width)
        Image.fromarray(np.stack([gray] * 3, -1)).save(root / name / "train" / "good" / f"{i:03d}.png")
    for i in range(3):
        gray = texture(rng, height, width)
        Image.fromarray(np.stack([gray] * 3, -1)).save(root / name / "test" / "good" / f"{i:03d}.png")
    for i in range(3):
        gray = texture(rng, height, width)
        mask = np.zeros((height, width), np.uint8)
        r, c = rng.integers(8, height - 16), rng.integers(4, width - 16)
        gray[r:r + 3, c:c + 12] = 250  # a bright scratch
        # Soft mask: JPEG-like values around the 128 threshold, as in Magnetic Tile.
        mask[r:r + 3, c:c + 12] = 200
        mask[r + 3, c:c + 12] = 100
        Image.fromarray(np.stack([gray] * 3, -1)).save(root / name / "test" / "scratch" / f"{i:03d}.png")
        Image.fromarray(mask).save(root / name / "ground_truth" / "scratch" / f"{i:03d}_mask.png")


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    """Two categories, ``widget`` and ``gizmo``: 8 train, 3 good + 3 defect test images each."""
    root = tmp_path_factory.mktemp("mvtec")
    write_category(root, "widget", seed=1)
    write_category(root, "gizmo", seed=2, size=(40, 40))
    return root


@pytest.fixture(scope="session")
def trained(tiny_root, tmp_path_factory) -> Path:
    """A checkpoint folder with ``widget-wave18`` and ``gizmo-wave18`` (32 px, 2 epochs). ``--c all``
    trains each category as ``--c widget`` alone would: tests compare other runs with its widget run."""
    import main as train_main

    ckpt_dir = tmp_path_factory.mktemp("ckpt")
    train_main.main(train_main.parse_args(
        ["--c", "all", "--data-root", str(tiny_root), "--arch", "wave18", "--size", "32", "--b", "4",
         "--e", "2", "--ckpt-dir", str(ckpt_dir), "--no-tensorboard", "--precision", "fp32"]))
    return ckpt_dir


# The flags of the small widget trainings the tests run (run folder: <ckpt dir>/widget-wave18).
TRAIN_FLAGS = ["--arch", "wave18", "--size", "32", "--b", "4", "--no-tensorboard", "--precision", "fp32"]


@pytest.fixture(scope="session")
def widget_run(tiny_root, tmp_path_factory):
    """``widget_run(*flags)``: a checkpoint folder with a finished ``widget-wave18`` run of
    ``TRAIN_FLAGS`` + ``flags``, trained once per ``flags`` for the many tests that need such a run.
    Read-only: copy it (``copy_run``) to change it."""
    import main as train_main

    runs = {}

    def run(*flags: str) -> Path:
        if flags not in runs:
            ckpt_dir = tmp_path_factory.mktemp("widget_run")
            paths = train_main.main(train_main.parse_args(["--c", "widget", "--data-root", str(tiny_root),
                                                           "--ckpt-dir", str(ckpt_dir), *TRAIN_FLAGS, *flags]))
            assert paths == [ckpt_dir / "widget-wave18" / "model.pt"]  # main returns the checkpoint's path
            runs[flags] = ckpt_dir
        return runs[flags]

    return run


@pytest.fixture(scope="session")
def one_epoch(widget_run) -> Path:
    """``widget_run("--e", "1")``: the finished 1-epoch widget run."""
    return widget_run("--e", "1")


def _copy_run(ckpt_dir: Path, run: str, dest: Path) -> Path:
    shutil.copytree(ckpt_dir / run, dest / run, ignore=shutil.ignore_patterns("banks"))
    return dest / run


@pytest.fixture(scope="session")
def copy_run():
    """``copy_run(ckpt_dir, run, dest)`` copies the finished run folder ``ckpt_dir/run`` into the
    checkpoint folder ``dest`` as if it had been trained there (scoring's bank cache, ``banks/``,
    stays behind) and returns the copy."""
    return _copy_run


@pytest.fixture()
def trained_once(one_epoch, tmp_path) -> Path:
    """``tmp_path`` as a checkpoint folder holding a private copy of ``one_epoch``'s run: a test
    may resume, re-run or damage it."""
    _copy_run(one_epoch, "widget-wave18", tmp_path)
    return tmp_path


REPO = Path(__file__).resolve().parent.parent


def _torchrun(argv: list[str]) -> None:
    """``OMP_NUM_THREADS=1 python -m torch.distributed.run *argv`` run from the repository root, as
    the target of a forked copy of this process (which has torch imported already)."""
    os.environ["OMP_NUM_THREADS"] = "1"
    os.chdir(REPO)
    from torch.distributed.run import main

    main(argv)


@pytest.fixture(scope="session")
def torchrun_launch():
    """``torchrun_launch(argv)``: ``torchrun *argv`` in a forked launcher process; its exit code.
    The launcher is forked (an interpreter start less); its workers are fresh interpreters, as
    under the torchrun command. Their output is the test's."""
    def launch(argv: list[str]) -> int | None:
        launcher = multiprocessing.get_context("fork").Process(target=_torchrun, args=(argv,))
        launcher.start()
        launcher.join(300)
        if launcher.is_alive():
            launcher.kill()
        return launcher.exitcode

    return launch
