"""Stage 1 end to end on the tiny data set: checkpoints, logs, resume equality, torchrun."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cli
import main as train_main
import models
from models.checkpoint import extract_state_dict, load_weights, read_checkpoint

REPO = Path(__file__).resolve().parent.parent


def train_args(root, ckpt_dir, *extra):
    return train_main.get_args_parser().parse_args(
        ["--c", "widget", "--data-root", str(root), "--arch", "wave18", "--size", "32", "--b", "4",
         "--ckpt-dir", str(ckpt_dir), "--no-tensorboard", "--precision", "fp32", *extra])


def test_one_epoch_writes_loadable_checkpoint(tiny_root, tmp_path):
    [path] = train_main.main(train_args(tiny_root, tmp_path, "--e", "1"))
    assert path == tmp_path / "widget-wave18" / "model.pt"
    ckpt = read_checkpoint(path)
    for key in ("epoch", "netD_state_dict", "optimizer", "arch", "wavelet", "size", "augs", "args",
                "format_version"):
        assert key in ckpt, key
    assert ckpt["epoch"] == 1 and ckpt["arch"] == "wave18" and ckpt["augs"] == ["cutpaste", "perlin"]
    net = models.create_model(ckpt["arch"], ckpt["wavelet"], ckpt["num_classes"])
    load_weights(net, extract_state_dict(ckpt))
    log = [json.loads(line) for line in (path.parent / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1]
    assert {"loss", "acc_normal", "acc_cutpaste", "acc_perlin", "lr", "images_per_s", "seconds"} <= set(log[0])
    assert (path.parent / "anomaly_preview.png").stat().st_size > 0


def test_resume_equals_uninterrupted(tiny_root, tmp_path):
    straight = train_main.main(train_args(tiny_root, tmp_path / "a", "--e", "3"))[0]
    train_main.main(train_args(tiny_root, tmp_path / "b", "--e", "1"))
    resumed = train_main.main(train_args(tiny_root, tmp_path / "b", "--e", "3", "--resume"))[0]
    a, b = read_checkpoint(straight), read_checkpoint(resumed)
    assert a["epoch"] == b["epoch"] == 3
    for key, value in a["netD_state_dict"].items():
        assert torch.equal(value, b["netD_state_dict"][key]), key
    lines = (resumed.parent / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]


def test_resume_after_a_kill_mid_log_line(tiny_root, tmp_path):
    """A run killed while appending to log.jsonl leaves a cut last line: the resume drops it."""
    train_main.main(train_args(tiny_root, tmp_path, "--e", "1"))
    log = tmp_path / "widget-wave18" / "log.jsonl"
    with log.open("a") as handle:
        handle.write('{"epoch": 2, "lo')
    train_main.main(train_args(tiny_root, tmp_path, "--e", "2", "--resume"))
    assert [json.loads(line)["epoch"] for line in log.read_text().splitlines()] == [1, 2]


def test_resume_with_other_settings_says_which_changed(tiny_root, tmp_path, capsys):
    train_main.main(train_args(tiny_root, tmp_path, "--e", "1"))
    capsys.readouterr()
    train_main.main(train_args(tiny_root, tmp_path, "--e", "2", "--resume", "--lr", "0.01"))
    err = capsys.readouterr()
    assert "lr 0.03 -> 0.01" in err.out + err.err
    # The same flags (more epochs only) continue without a warning.
    train_main.main(train_args(tiny_root, tmp_path, "--e", "3", "--resume", "--lr", "0.01"))
    err = capsys.readouterr()
    assert "continuing with" not in err.out + err.err


def test_same_seed_same_weights_different_seed_differs(tiny_root, tmp_path):
    a = read_checkpoint(train_main.main(train_args(tiny_root, tmp_path / "a", "--e", "1"))[0])
    b = read_checkpoint(train_main.main(train_args(tiny_root, tmp_path / "b", "--e", "1", "--workers", "2"))[0])
    c = read_checkpoint(train_main.main(train_args(tiny_root, tmp_path / "c", "--e", "1", "--seed", "1"))[0])
    key = "layer1.0.conv1.weight"
    assert torch.equal(a["netD_state_dict"][key], b["netD_state_dict"][key])
    assert not torch.equal(a["netD_state_dict"][key], c["netD_state_dict"][key])


def test_dwt_impl_is_a_speed_choice_only(tiny_root, tmp_path, monkeypatch):
    """The flag reaches the layer (the matrix form is used only when asked for, in float32), and
    both forms compute the same first-step loss. (Weights are not compared: at 32 px and batch 24
    this tiny network amplifies float32 rounding about 100x per step.)"""
    used = []
    for name in ("matrices", "kernel"):
        original = getattr(models.WaveletDownsample, name)
        monkeypatch.setattr(models.WaveletDownsample, name,
                            lambda self, *a, _f=original, _n=name, **k: used.append(_n) or _f(self, *a, **k))
    losses = {}
    for impl in ("conv", "matmul"):
        used.clear()
        [path] = train_main.main(train_args(tiny_root, tmp_path / impl, "--e", "1", "--b", "8", "--dwt-impl", impl))
        assert set(used) == {"kernel" if impl == "conv" else "matrices"}
        assert read_checkpoint(path)["args"]["dwt_impl"] == impl
        losses[impl] = json.loads((path.parent / "log.jsonl").read_text().splitlines()[0])["loss"]
    assert losses["conv"] == pytest.approx(losses["matmul"], abs=1e-5)


def test_scar_as_third_class(tiny_root, tmp_path):
    [path] = train_main.main(train_args(tiny_root, tmp_path, "--e", "1", "--augs", "cutpaste,perlin,scar"))
    ckpt = read_checkpoint(path)
    assert ckpt["num_classes"] == 4 and ckpt["netD_state_dict"]["out.weight"].shape[0] == 4


def test_anomalies_made_on_the_device_path_train(tiny_root, tmp_path):
    # The GPU data path (batched anomalies on the training device), run on the CPU here.
    [path] = train_main.main(train_args(tiny_root, tmp_path, "--e", "2", "--anomalies-on", "device", "--rotflip",
                                        "--augs", "cutpaste,perlin,scar"))
    log = [json.loads(line) for line in (path.parent / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2] and all(math.isfinite(r["loss"]) for r in log)
    assert {"acc_normal", "acc_cutpaste", "acc_perlin", "acc_scar"} <= set(log[0])
    again_dir = tmp_path / "again"
    [again] = train_main.main(train_args(tiny_root, again_dir, "--e", "2", "--anomalies-on", "device", "--rotflip",
                                         "--augs", "cutpaste,perlin,scar"))
    a, b = extract_state_dict(read_checkpoint(path)), extract_state_dict(read_checkpoint(again))
    assert all(torch.equal(a[key], b[key]) for key in a), "same seed, same weights on the device path"


def test_loader_workers_see_every_epoch(tiny_root, tmp_path):
    # Workers hold their own copy of the data set: the epoch (which seeds the anomalies) must still
    # reach them, so 2 epochs with a worker end with the weights of 2 epochs without one.
    paths = [train_main.main(train_args(tiny_root, tmp_path / str(n), "--e", "2", "--workers", str(n)))[0]
             for n in (0, 1)]
    a, b = (extract_state_dict(read_checkpoint(p)) for p in paths)
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_workers_flag_accepts_auto():
    assert cli.parse_workers("auto") is None and cli.parse_workers("3") == 3
    assert cli.resolve_workers(None, torch.device("cpu")) == 0
    assert cli.resolve_workers(None, torch.device("cuda")) >= 1
    assert cli.resolve_workers(2, torch.device("cuda")) == 2


def test_cli_help_shows_defaults():
    out = subprocess.run([sys.executable, "main.py", "--help"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0
    for text in ("--c", "--e", "--b", "--lr", "--wd", "--m", "default: 1600", "default: 0.03",
                 "default: wave50", "default: bior2.2", "default: cutpaste,perlin"):
        assert text in out.stdout, text


def test_torchrun_two_processes_gloo(tiny_root, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           # torchrun's own parser takes abbreviations, so --e/--m/--b/--c must be spelled out
           "main.py", "--category", "widget", "--data-root", str(tiny_root), "--arch", "wave18",
           "--size", "32", "--batch-size", "2", "--epochs", "1", "--device", "cpu",
           "--ckpt-dir", str(tmp_path), "--no-tensorboard", "--precision", "fp32"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    ckpt = read_checkpoint(tmp_path / "widget-wave18" / "model.pt")
    load_weights(models.create_model("wave18"), extract_state_dict(ckpt))
    assert len((tmp_path / "widget-wave18" / "log.jsonl").read_text().splitlines()) == 1


@pytest.mark.parametrize("flags,message", [
    (["--size", "16"], "--size 16"),
    (["--wavelet", "nope"], "unknown wavelet 'nope'"),
    (["--augs", "cutpaste,blur"], "--augs"),
    (["--b", "100"], "--b 100 is larger than the 8 training images"),
    (["--c", "nope"], "no category nope"),
])
def test_bad_flags_one_line(tiny_root, tmp_path, flags, message):
    cmd = [sys.executable, "main.py", "--c", "widget", "--data-root", str(tiny_root), "--arch", "wave18",
           "--size", "32", "--e", "1", "--ckpt-dir", str(tmp_path), "--b", "4", *flags]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert message in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
