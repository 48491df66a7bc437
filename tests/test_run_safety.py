"""Issue 15: a run folder's contents are never lost or half-written, whatever the user re-runs.

Re-running into a finished run, two trainings in one folder, resuming with fewer epochs, file
permissions, temporaries of killed saves, and a full disk inside ``torch.save``.
"""

import errno
import multiprocessing
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import main as train_main
from common import cli, fileio
from data import demo
from models.checkpoint import read_checkpoint, save_atomic
from scoring.outputs.report import write_json
from training.rundir import LOCK_NAME, RunLock

TRAIN = ["--arch", "wave18", "--size", "32", "--b", "4", "--no-tensorboard", "--precision", "fp32"]


def run_train(argv, capsys):
    """main.py in-process as the command line runs it; returns (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        cli.run(train_main.main, train_main.parse_args(argv), batch_flag="--b")
        raise SystemExit(0)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip() and "%|" not in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative name -> bytes)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def base(root, ckpt_dir, category="widget"):
    return ["--c", category, "--data-root", str(root), "--ckpt-dir", str(ckpt_dir), *TRAIN]


@pytest.fixture()
def umask():
    """``umask(mask)`` sets the process's umask for one test; the previous one is put back after."""
    previous = os.umask(0o022)
    yield os.umask
    os.umask(previous)


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# --- 1. a finished run is not replaced without being asked ------------------------------------------

def test_rerun_without_resume_refuses_and_touches_nothing(tiny_root, trained_once, capsys):
    tmp_path = trained_once  # holds a finished run of base(tiny_root, tmp_path) + ["--e", "1"]
    run = tmp_path / "widget-wave18"
    before = snapshot(run)
    capsys.readouterr()
    code, out, err = run_train(base(tiny_root, tmp_path) + ["--e", "1"], capsys)
    line = one_line(err)
    assert out.strip() == ""  # the refusal is the only line: no "training ..." banner before it
    assert code == 2 and f"{run} already holds a run (log.jsonl, model.pt)" in line
    assert "--resume" in line and "--overwrite" in line and "--ckpt-dir" in line
    assert snapshot(run) == before  # log.jsonl not emptied, model.pt not replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["widget-wave18"]


def test_all_categories_are_checked_before_the_first_trains(tiny_root, trained, copy_run, tmp_path, capsys):
    # gizmo holds a run: widget, listed (and so trained) first, must not be trained or even created.
    copy_run(trained, "gizmo-wave18", tmp_path)  # a finished run of base(tiny_root, tmp_path, "gizmo")
    before = snapshot(tmp_path)
    code, _, err = run_train(base(tiny_root, tmp_path, "widget,gizmo") + ["--e", "1"], capsys)
    assert code == 2 and "gizmo-wave18 already holds a run" in one_line(err)
    assert not (tmp_path / "widget-wave18").exists()
    assert snapshot(tmp_path) == before


def test_overwrite_moves_the_old_run_aside(tiny_root, trained_once, capsys):
    tmp_path = trained_once  # holds a finished run of base(tiny_root, tmp_path) + ["--e", "1"]
    run = tmp_path / "widget-wave18"
    before = snapshot(run)
    code, out, err = run_train(base(tiny_root, tmp_path) + ["--e", "2", "--overwrite"], capsys)
    assert code == 0, err
    [aside] = [p for p in tmp_path.iterdir() if p.name.startswith("widget-wave18.old-")]
    assert f"moved the previous run {run} aside to {aside}" in out + err
    assert snapshot(aside) == before  # the old run, whole
    assert read_checkpoint(run / "model.pt")["epoch"] == 2
    assert len((run / "log.jsonl").read_text().splitlines()) == 2  # a new log, not the old one continued
    assert not (run / LOCK_NAME).exists() and not (aside / LOCK_NAME).exists()


def test_resume_and_overwrite_together_is_one_line(tiny_root, tmp_path, capsys):
    code, _, err = run_train(base(tiny_root, tmp_path) + ["--e", "1", "--resume", "--overwrite"], capsys)
    assert code == 2 and "choose one" in one_line(err)
    code, _, err = run_train(base(tiny_root, tmp_path) + ["--e", "1", "--resume", str(tmp_path / "no.pt")], capsys)
    assert code == 2 and "no.pt: no such checkpoint" in one_line(err)
    assert list(tmp_path.iterdir()) == []


def test_demo_twice_moves_the_first_run_aside(tiny_root, trained_once, capsys, monkeypatch):
    """`python main.py --demo` is run again by users: the second run trains afresh, says where the
    first went, and does not fail. (The data set and the scoring are stubbed: tiny data, no eval.
    The first run is a copy of conftest's run of these flags; a first --demo, into an empty
    folder, is test_demo's.)"""
    tmp_path = trained_once
    monkeypatch.setattr(demo, "demo_exists", lambda root: True)
    monkeypatch.setattr(train_main, "evaluate", lambda args, categories: [])
    argv = ["--demo", "--c", "widget", "--data-root", str(tiny_root), "--ckpt-dir", str(tmp_path), "--e", "1", *TRAIN]
    first = (tmp_path / "widget-wave18" / "model.pt").read_bytes()
    code, out, err = run_train(argv, capsys)
    assert code == 0, err
    [aside] = [p for p in tmp_path.iterdir() if ".old-" in p.name]
    assert f"--demo: moved the previous run {tmp_path / 'widget-wave18'} aside to {aside}" in out + err
    assert (aside / "model.pt").read_bytes() == first


# --- 2. one training per run folder --------------------------------------------------------------

def hold_lock(run: Path, ready) -> None:
    """Another training's part: hold ``run``'s lock until killed."""
    RunLock(run).acquire()
    ready.send("locked")
    time.sleep(600)


def test_second_training_in_a_busy_folder_stops_and_a_killed_holder_does_not_block(tiny_root, tmp_path, capsys):
    run = tmp_path / "widget-wave18"
    # Another process (forked: no interpreter start) takes the lock as a training would.
    context = multiprocessing.get_context("fork")
    ready, child_end = context.Pipe()
    holder = context.Process(target=hold_lock, args=(run, child_end), daemon=True)
    holder.start()
    try:
        assert ready.poll(60) and ready.recv() == "locked"
        code, _, err = run_train(base(tiny_root, tmp_path) + ["--e", "1"], capsys)
        line = one_line(err)
        assert code == 2 and f"{run} is in use by another training (pid {holder.pid} " in line
        assert "another --ckpt-dir" in line
        assert sorted(p.name for p in run.iterdir()) == [LOCK_NAME]  # nothing written next to it
    finally:
        holder.kill()  # SIGKILL
        holder.join()
    # The kernel dropped the dead holder's lock; its lock file is still there, and is taken over.
    assert (run / LOCK_NAME).read_text().startswith(f"pid {holder.pid} ")
    code, _, err = run_train(base(tiny_root, tmp_path) + ["--e", "1"], capsys)
    assert code == 0, err
    assert read_checkpoint(run / "model.pt")["epoch"] == 1
    assert not (run / LOCK_NAME).exists()  # released at the end


def test_lock_is_released_when_training_fails(tiny_root, tmp_path, capsys):
    code, _, err = run_train(base(tiny_root, tmp_path) + ["--e", "1", "--b", "64"], capsys)
    assert code == 2 and "--b 64" in one_line(err)
    assert not (tmp_path / "widget-wave18").exists()  # made only for the lock, and removed with it
    code, _, err = run_train(base(tiny_root, tmp_path) + ["--e", "1"], capsys)
    assert code == 0, err


# --- 3. resuming a finished run -----------------------------------------------------------------

def test_resume_with_fewer_or_equal_epochs_changes_nothing(tiny_root, trained, copy_run, tmp_path, capsys):
    # conftest's trained widget run: base(tiny_root, tmp_path) + ["--e", "2"] (--c all trains it as --c widget)
    run = copy_run(trained, "widget-wave18", tmp_path)
    before = snapshot(run)
    code, _, err = run_train(base(tiny_root, tmp_path) + ["--e", "1", "--resume"], capsys)
    line = one_line(err)
    assert code == 2 and "--e 1" in line and "already holds 2 epochs" in line and "--e 2" in line
    assert snapshot(run) == before
    # Nothing left to train: said so, exit 0, and not even the recorded lr changes.
    code, out, err = run_train(base(tiny_root, tmp_path) + ["--e", "2", "--resume", "--lr", "0.05"], capsys)
    assert code == 0, err
    assert "already holds all 2 epochs: nothing to train" in out and "lr 0.03 -> 0.05" in out
    assert snapshot(run) == before
    assert read_checkpoint(run / "model.pt")["args"]["lr"] == 0.03


# --- 7. permissions follow the umask --------------------------------------------------------------

@pytest.mark.parametrize("mask", [0o022, 0o007])
def test_written_files_follow_the_umask(tmp_path, umask, mask):
    umask(mask)
    save_atomic({"epoch": 1}, tmp_path / "model.pt")
    write_json(tmp_path / "results.json", {"a": 1})
    fileio.write_text_atomic(tmp_path / "sub" / "table.md", "| a |\n")
    for name in ("model.pt", "results.json", "sub/table.md"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~mask, name


def test_training_outputs_follow_the_umask(tiny_root, tmp_path, umask):
    umask(0o022)
    train_main.main(train_main.parse_args(base(tiny_root, tmp_path) + ["--e", "1"]))
    run = tmp_path / "widget-wave18"
    for name in ("model.pt", "log.jsonl", "anomaly_preview.png"):
        assert (run / name).stat().st_mode & 0o777 == 0o644, name


# --- 8. temporaries of killed saves are cleaned up ----------------------------------------------------

def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    host = fileio.temp_name("x").split(".")[3]
    dead = tmp_path / f".model.pt.{dead_pid()}.{host}.0badc0de.tmp"
    alive = tmp_path / f".model.pt.{os.getppid()}.{host}.00c0ffee.tmp"
    elsewhere = tmp_path / f".model.pt.{dead_pid()}.another-host.0000beef.tmp"
    other_file = tmp_path / f".results.json.{dead_pid()}.{host}.0000feed.tmp"
    for temp in (dead, alive, elsewhere, other_file):
        temp.write_bytes(b"half a checkpoint")
    save_atomic({"epoch": 1}, tmp_path / "model.pt")
    assert not dead.exists()  # its writer is gone
    assert alive.exists() and elsewhere.exists()  # a live writer here, or one we cannot check
    assert other_file.exists()  # only the temporaries of the file being saved
    assert sorted(p.name for p in tmp_path.glob(".model.pt.*.tmp")) == sorted([alive.name, elsewhere.name])


def test_temp_names_record_the_writer():
    name = fileio.temp_name("model.pt")
    host = socket.gethostname().split(".")[0]
    assert name.startswith(f".model.pt.{os.getpid()}.") and name.endswith(".tmp")
    assert name.split(".")[4] == "".join(c if c.isalnum() or c in "_-" else "_" for c in host)[:32]


# --- 10. a full disk inside torch.save -------------------------------------------------------------------

DISK_FULL = ("[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing file data/0: "
             "file write failed")


def test_torch_save_write_failure_becomes_oserror(tmp_path, monkeypatch):
    def failing_save(obj, f, *a, **k):
        f.write(b"PK\x03\x04 some bytes")
        raise RuntimeError(DISK_FULL)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError) as info:
        save_atomic({"epoch": 1}, tmp_path / "model.pt")
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(tmp_path / "model.pt")
    assert list(tmp_path.iterdir()) == []
    # Any other RuntimeError is a bug and stays one.
    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("something else")))
    with pytest.raises(RuntimeError, match="something else"):
        save_atomic({"epoch": 1}, tmp_path / "model.pt")
    assert list(tmp_path.iterdir()) == []


def test_disk_full_in_torch_save_is_one_line_and_keeps_the_checkpoint(tiny_root, trained_once, capsys, monkeypatch):
    tmp_path = trained_once  # holds a finished run of base(tiny_root, tmp_path) + ["--e", "1"]
    ckpt = tmp_path / "widget-wave18" / "model.pt"
    before = ckpt.read_bytes()
    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        real_save({"some": torch.zeros(1000)}, f)  # part of a file, then the writer fails
        raise RuntimeError(DISK_FULL)

    monkeypatch.setattr(torch, "save", full_disk)
    code, _, err = run_train(base(tiny_root, tmp_path) + ["--e", "2", "--resume"], capsys)
    line = one_line(err)
    assert code == 4 and f"cannot write {ckpt}" in line and "free disk space" in line
    assert ckpt.read_bytes() == before
    assert list(ckpt.parent.glob(".*.tmp")) == [] and not (ckpt.parent / LOCK_NAME).exists()


# --- 10/11. optimiser flags are checked before any work ----------------------------------------------------

@pytest.mark.parametrize("argv,expected", [
    (["--m", "-5"], "--m -5.0: momentum must be in [0, 1)"),
    (["--m", "1"], "--m 1.0: momentum must be in [0, 1)"),
    (["--m", "nan"], "--m nan"),
    (["--wd", "-1"], "--wd -1.0: weight decay must be"),
    (["--wd", "inf"], "--wd inf"),
    (["--lr", "nan"], "--lr nan: must be a positive finite number"),
    (["--lr", "inf"], "--lr inf: must be a positive finite number"),
    (["--lr", "0"], "--lr 0.0"),
])
def test_bad_optimiser_flags_are_one_line_before_any_work(tiny_root, tmp_path, capsys, argv, expected):
    code, _, err = run_train(base(tiny_root, tmp_path) + ["--e", "1", *argv], capsys)
    assert code == 2 and expected in one_line(err)
    assert list(tmp_path.iterdir()) == []  # refused before a run folder was made, let alone an epoch run
