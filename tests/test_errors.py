"""No surprises: every user mistake or fault ends in one line, a non-zero exit, nothing damaged."""

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import main as train_main
from common import cli
from common.errors import UserError
from models.checkpoint import read_checkpoint
from scoring.pipeline import cli as score_cli
from training.interrupt import StopRequest

REPO = Path(__file__).resolve().parent.parent
TRAIN = ["--arch", "wave18", "--size", "32", "--b", "4", "--no-tensorboard", "--precision", "fp32"]


def run_train(argv, capsys):
    """Run main.py in-process as the CLI does; returns (exit code, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        cli.run(train_main.main, train_main.parse_args(argv), batch_flag="--b")
        raise SystemExit(0)
    return exit_info.value.code, capsys.readouterr().err


def run_score(argv, capsys, fusion="concatenation"):
    with pytest.raises(SystemExit) as exit_info:
        cli.run(score_cli.main, score_cli.get_args_parser(fusion).parse_args(argv))
        raise SystemExit(0)
    return exit_info.value.code, capsys.readouterr().err


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip() and "%|" not in line]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture()
def root(tiny_root, tmp_path):
    """A private copy of the tiny data set that a test may damage."""
    shutil.copytree(tiny_root, tmp_path / "data")
    return tmp_path / "data"


@pytest.fixture(scope="module")
def ckpt_dir(one_epoch, copy_run, tmp_path_factory):
    """A copy of conftest's 1-epoch widget run (``--e 1`` and the flags of ``TRAIN``)."""
    out = tmp_path_factory.mktemp("ckpt")
    copy_run(one_epoch, "widget-wave18", out)
    return out


def test_data_root_missing(tmp_path, capsys):
    code, err = run_train(["--data-root", str(tmp_path / "nowhere"), "--e", "1", *TRAIN], capsys)
    assert code == 2 and "nowhere does not exist" in one_line(err) and "mvtec" in err.lower()


def test_category_missing_lists_found(root, capsys):
    code, err = run_train(["--data-root", str(root), "--c", "bottle", *TRAIN], capsys)
    assert code == 2 and "found: gizmo, widget" in one_line(err)


def test_empty_train_folder(root, capsys):
    for p in (root / "widget" / "train" / "good").iterdir():
        p.unlink()
    code, err = run_train(["--data-root", str(root), "--c", "widget", "--e", "1", *TRAIN], capsys)
    assert code == 2 and "train/good holds no images" in one_line(err)


@pytest.mark.parametrize("content", [b"", b"\x89PNG\r\n\x1a\n truncated", b"hello, I am text"],
                         ids=["zero-byte", "truncated", "not-an-image"])
def test_bad_training_image_is_named(root, tmp_path, capsys, content):
    bad = root / "widget" / "train" / "good" / "bad.png"
    bad.write_bytes(content)
    code, err = run_train(["--data-root", str(root), "--c", "widget", "--e", "1", "--ckpt-dir", str(tmp_path / "c"),
                           *TRAIN], capsys)
    assert code == 2 and f"cannot read image {bad}" in one_line(err)


def test_truncated_jpeg_is_named(root, tmp_path, capsys):
    good = root / "widget" / "train" / "good" / "000.png"
    jpeg = root / "widget" / "train" / "good" / "zz.jpg"
    Image.open(good).save(jpeg, quality=90)
    jpeg.write_bytes(jpeg.read_bytes()[: jpeg.stat().st_size // 2])
    code, err = run_train(["--data-root", str(root), "--c", "widget", "--e", "1", "--ckpt-dir", str(tmp_path / "c"),
                           *TRAIN], capsys)
    assert code == 2 and "zz.jpg" in one_line(err)


def test_small_and_huge_images_train(root, tmp_path):
    Image.fromarray(np.full((20, 24, 3), 120, np.uint8)).save(root / "widget" / "train" / "good" / "tiny.png")
    Image.new("L", (8000, 6000), 90).save(root / "widget" / "train" / "good" / "huge.png")
    [path] = train_main.main(train_main.parse_args(["--data-root", str(root), "--c", "widget", "--e", "1",
                                                    "--ckpt-dir", str(tmp_path), *TRAIN]))
    assert read_checkpoint(path)["epoch"] == 1


@pytest.mark.parametrize("argv,expected", [
    (["--size", "20"], "--size 20"),
    (["--wavelet", "wat"], "unknown wavelet 'wat'"),
    (["--augs", "cutpaste,blur"], "--augs"),
    (["--b", "64"], "--b 64: is larger than the 8 training images"),
    (["--workers", "999"], "--workers 999"),
    (["--e", "-1"], "--e -1"),
    (["--arch", "wave9"], "argument --arch: invalid choice: 'wave9'"),
])
def test_bad_training_flags(root, tmp_path, capsys, argv, expected):
    base = ["--data-root", str(root), "--c", "widget", "--e", "1", "--ckpt-dir", str(tmp_path), *TRAIN]
    if argv[0] == "--arch":
        with pytest.raises(SystemExit) as info:
            train_main.parse_args(base + argv)
        code, err = info.value.code, capsys.readouterr().err
    else:
        code, err = run_train(base + argv, capsys)
    assert code == 2 and expected in one_line(err)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present")
def test_cuda_absent(root, capsys):
    code, err = run_train(["--data-root", str(root), "--c", "widget", "--device", "cuda", *TRAIN], capsys)
    assert code == 2 and "--device cuda" in one_line(err) and "--device cpu" in err


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_root, trained_once, capsys):
    base = ["--data-root", str(tiny_root), "--c", "widget", "--ckpt-dir", str(trained_once), *TRAIN]
    tmp_path = trained_once  # holds a finished run: base + ["--e", "1"]
    ckpt = tmp_path / "widget-wave18" / "model.pt"
    before = ckpt.read_bytes()
    code, err = run_train(base + ["--e", "5", "--resume", "--lr", "1e30"], capsys)
    line = one_line(err)
    assert code == 2 and "loss became" in line and "epoch 1" in line and "lower --lr" in line
    assert ckpt.read_bytes() == before


def test_disk_full_keeps_previous_checkpoint(tiny_root, trained_once, capsys, monkeypatch):
    base = ["--data-root", str(tiny_root), "--c", "widget", "--ckpt-dir", str(trained_once), *TRAIN]
    tmp_path = trained_once  # holds a finished run: base + ["--e", "1"]
    ckpt = tmp_path / "widget-wave18" / "model.pt"
    before = ckpt.read_bytes()
    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    code, err = run_train(base + ["--e", "2", "--resume"], capsys)
    line = one_line(err)
    assert code == 4 and str(ckpt) in line and "No space left" in line
    assert ckpt.read_bytes() == before
    assert [p.name for p in ckpt.parent.glob(".*tmp")] == []  # no temporary left behind


@pytest.mark.parametrize("argv,expected", [
    (["--p", "nothing-here"], "not found"),
    (["--p", "widget-wave18", "--arch", "wave50"], "holds a wave18 network, not wave50"),
    (["--p", "widget-wave18", "--layers", "2,5"], "argument --layers"),
    (["--p", "widget-wave18", "--coreset", "1.5"], "--coreset 1.5"),
    (["--p", "widget-wave18", "--coreset", "0"], "--coreset 0.0"),
    (["--p", "widget-wave18", "--size", "8"], "--size 8"),
    (["--p", "widget-wave18", "--k", "0"], "--k 0"),
    (["--p", "widget-wave18", "--smooth", "nan"], "--smooth nan: must be a number"),
    (["--p", "widget-wave18", "--threshold", "nan"], "--threshold nan: must be a positive number"),
    (["--p", "widget-wave18", "--threshold", "-1"], "--threshold -1.0: must be a positive number"),
    (["--p", "widget-wave18", "--coreset", "nan"], "--coreset nan: must be in (0, 1]"),
    (["--p", "widget-wave18", "--check-kinds", "poison"], "--check-kinds poison: unknown anomaly maker poison"),
])
def test_bad_scoring_flags(tiny_root, ckpt_dir, tmp_path, capsys, argv, expected):
    base = ["--c", "widget", "--data-root", str(tiny_root), "--ckpt-dir", str(ckpt_dir), "--out", str(tmp_path)]
    if "--layers" in argv:
        with pytest.raises(SystemExit) as info:
            score_cli.get_args_parser("concatenation").parse_args(base + argv)
        code, err = info.value.code, capsys.readouterr().err
    else:
        code, err = run_score(base + argv, capsys)
    assert code == 2 and expected in one_line(err)


def test_unwritable_output_folder(tiny_root, ckpt_dir, tmp_path, capsys):
    blocker = tmp_path / "taken"
    blocker.write_text("a file where the output folder should go")
    code, err = run_score(["--c", "widget", "--data-root", str(tiny_root), "--ckpt-dir", str(ckpt_dir),
                           "--p", "widget-wave18", "--out", str(blocker / "sub")], capsys)
    line = one_line(err)
    assert code == 4 and "cannot write" in line and "taken" in line
    assert blocker.read_text().startswith("a file")


def test_missing_checkpoint_lists_folder(tiny_root, ckpt_dir, tmp_path, capsys):
    code, err = run_score(["--c", "widget", "--data-root", str(tiny_root), "--ckpt-dir", str(ckpt_dir),
                           "--p", "widget-wave50"], capsys)
    assert code == 2 and "widget-wave50" in one_line(err)


def test_a_missing_checkpoint_file_is_named_as_given(tiny_root, tmp_path, capsys):
    missing = tmp_path / "nope" / "model.pt"
    code, err = run_score(["--c", "widget", "--data-root", str(tiny_root), "--p", str(missing)], capsys)
    line = one_line(err)
    assert code == 2 and f"checkpoint {missing} not found" in line and "model.pt/model.pt" not in line


@pytest.mark.parametrize("content", [b"", b"garbage", None], ids=["empty", "garbage", "truncated"])
def test_broken_checkpoint(tiny_root, ckpt_dir, tmp_path, capsys, content):
    good = ckpt_dir / "widget-wave18" / "model.pt"
    bad = tmp_path / "broken.pt"
    bad.write_bytes(good.read_bytes()[:1000] if content is None else content)
    code, err = run_score(["--c", "widget", "--data-root", str(tiny_root), "--p", str(bad), "--out",
                           str(tmp_path / "o")], capsys)
    assert code == 2 and "broken.pt cannot be read" in one_line(err)


def test_not_a_checkpoint_dict(tiny_root, tmp_path, capsys):
    path = tmp_path / "weights.pt"
    torch.save({"epoch": 3, "notes": "no weights"}, path)
    code, err = run_score(["--c", "widget", "--data-root", str(tiny_root), "--p", str(path)], capsys)
    assert code == 2 and "has no network weights" in one_line(err)


def test_scoring_mask_problems(root, ckpt_dir, tmp_path, capsys):
    mask = root / "widget" / "ground_truth" / "scratch" / "001_mask.png"
    Image.open(mask).resize((40, 10)).save(mask)
    code, err = run_score(["--c", "widget", "--data-root", str(root), "--ckpt-dir", str(ckpt_dir),
                           "--p", "widget-wave18", "--out", str(tmp_path / "a")], capsys)
    assert code == 2 and "001_mask.png is 10x40" in one_line(err)  # height x width
    mask.unlink()
    code, err = run_score(["--c", "widget", "--data-root", str(root), "--ckpt-dir", str(ckpt_dir),
                           "--p", "widget-wave18", "--out", str(tmp_path / "b")], capsys)
    assert code == 2 and "001.png has no mask" in one_line(err)


def test_debug_shows_traceback(tmp_path):
    """With --debug the error is raised (Python prints its traceback) instead of one line."""
    with pytest.raises(UserError, match="does not exist"):
        cli.run(train_main.main, train_main.parse_args(["--data-root", str(tmp_path / "x"), "--debug"]))


def _checkpoint_epoch(path: Path) -> int:
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["epoch"])
    except Exception:
        return -1


def _train_cmd(root, ckpt_dir, epochs, *extra):
    return [sys.executable, "main.py", "--c", "widget", "--data-root", str(root), "--ckpt-dir", str(ckpt_dir),
            "--e", str(epochs), "--save-every", "1", *TRAIN, *extra]


def _wait_for_checkpoint(proc, path, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if path.exists() and _checkpoint_epoch(path) >= 1:
            return True
        time.sleep(0.05)
    return False


def test_ctrl_c_in_a_terminal_with_loader_workers_saves_and_exits_130(tiny_root, tmp_path):
    # A terminal sends SIGINT to the whole process group, DataLoader workers included.
    ckpt = tmp_path / "widget-wave18" / "model.pt"
    proc = subprocess.Popen(_train_cmd(tiny_root, tmp_path, 400, "--workers", "2"), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    assert _wait_for_checkpoint(proc, ckpt)
    time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "--resume" in out + err and "Traceback" not in err  # says how to continue
    assert 1 <= _checkpoint_epoch(ckpt) < 400
    assert not (ckpt.parent / ".lock").exists()  # the run folder's lock is released on Ctrl-C too


def test_stop_request_defers_the_first_ctrl_c_and_not_the_second():
    previous = signal.getsignal(signal.SIGINT)
    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # the handler runs at the next bytecode boundary of the main thread
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):
            stop.check()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
    assert signal.getsignal(signal.SIGINT) is previous


def test_sigkill_then_resume_equals_uninterrupted(tiny_root, tmp_path):
    epochs = 4
    straight = tmp_path / "straight"
    train_main.main(train_main.parse_args(_train_cmd(tiny_root, straight, epochs)[2:]))  # in-process: same code
    killed = tmp_path / "killed"
    ckpt = killed / "widget-wave18" / "model.pt"
    proc = subprocess.Popen(_train_cmd(tiny_root, killed, epochs), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    assert _wait_for_checkpoint(proc, ckpt)
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 1 <= _checkpoint_epoch(ckpt) <= epochs  # still loadable
    assert (ckpt.parent / ".lock").is_file()  # the killed run's lock file stays; its lock died with it
    # The resume runs in-process (the same code as main.py's; one interpreter start less): the
    # killed process's lock file must not stop it.
    train_main.main(train_main.parse_args(_train_cmd(tiny_root, killed, epochs, "--resume")[2:]))
    assert not (ckpt.parent / ".lock").exists()
    a = read_checkpoint(straight / "widget-wave18" / "model.pt")["netD_state_dict"]
    b = read_checkpoint(ckpt)["netD_state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
