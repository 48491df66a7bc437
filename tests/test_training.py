"""Stage 1 end to end on the tiny data set: checkpoints, logs, resume equality, torchrun."""

import json
import math
from pathlib import Path

import pytest
import torch

import main as train_main
import models
import training.loop
from common import cli, runtime
from models.checkpoint import extract_state_dict, load_weights, read_checkpoint
from training import RESUME_WARN_SETTINGS, WEIGHT_SETTINGS, TrainConfig, TrainRun
from training.checkpoints import CheckpointSaver, copy_tensors
from training.config import DWT_IMPLS
from training.interrupt import StopRequest

REPO = Path(__file__).resolve().parent.parent


def train_args(root, ckpt_dir, *extra):
    return train_main.get_args_parser().parse_args(
        ["--c", "widget", "--data-root", str(root), "--arch", "wave18", "--size", "32", "--b", "4",
         "--ckpt-dir", str(ckpt_dir), "--no-tensorboard", "--precision", "fp32", *extra])


def test_one_epoch_writes_loadable_checkpoint(one_epoch):
    # conftest's one_epoch is main.main(train_args(tiny_root, one_epoch, "--e", "1")), trained once
    # (the fixture checks that main returned this path).
    path = one_epoch / "widget-wave18" / "model.pt"
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


def test_resume_after_a_kill_mid_log_line(tiny_root, trained_once):
    """A run killed while appending to log.jsonl leaves a cut last line: the resume drops it."""
    tmp_path = trained_once  # a finished 1-epoch run in tmp_path
    log = tmp_path / "widget-wave18" / "log.jsonl"
    with log.open("a") as handle:
        handle.write('{"epoch": 2, "lo')
    train_main.main(train_args(tiny_root, tmp_path, "--e", "2", "--resume"))
    assert [json.loads(line)["epoch"] for line in log.read_text().splitlines()] == [1, 2]


def test_resume_with_other_settings_says_which_changed(tiny_root, trained_once, capsys):
    tmp_path = trained_once  # a finished 1-epoch run in tmp_path
    train_main.main(train_args(tiny_root, tmp_path, "--e", "2", "--resume", "--lr", "0.01"))
    err = capsys.readouterr()
    assert "lr 0.03 -> 0.01" in err.out + err.err
    # The same flags (more epochs only) continue without a warning.
    train_main.main(train_args(tiny_root, tmp_path, "--e", "3", "--resume", "--lr", "0.01"))
    err = capsys.readouterr()
    assert "continuing with" not in err.out + err.err


def test_same_seed_same_weights_different_seed_differs(tiny_root, tmp_path, widget_run):
    # conftest's widget_run(*flags) is main.main(train_args(tiny_root, <its folder>, *flags)), trained once.
    a = read_checkpoint(widget_run("--e", "1") / "widget-wave18" / "model.pt")
    b = read_checkpoint(train_main.main(train_args(tiny_root, tmp_path / "b", "--e", "1", "--workers", "2"))[0])
    c = read_checkpoint(widget_run("--e", "1", "--seed", "1") / "widget-wave18" / "model.pt")
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


def test_loader_workers_see_every_epoch(tiny_root, tmp_path, straight):
    # Workers hold their own copy of the data set: the epoch (which seeds the anomalies) must still
    # reach them, so 2 epochs with a worker end with the weights of 2 epochs without one.
    epochs = read_checkpoint(straight)["epoch"]
    assert epochs >= 2
    path = train_main.main(train_args(tiny_root, tmp_path, "--e", str(epochs), "--workers", "1"))[0]
    a, b = (extract_state_dict(read_checkpoint(p)) for p in (straight, path))
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_workers_flag_accepts_auto():
    assert cli.parse_workers("auto") is None and cli.parse_workers("3") == 3
    assert runtime.resolve_workers(None, torch.device("cpu")) == 0
    assert runtime.resolve_workers(None, torch.device("cuda")) >= 1
    assert runtime.resolve_workers(2, torch.device("cuda")) == 2


def test_cli_help_shows_defaults():
    text = " ".join(train_main.get_args_parser().format_help().split())  # argparse wraps lines
    for expected in ("--c", "--e", "--b", "--lr", "--wd", "--m", "default: 1600", "default: 0.03",
                     "default: wave50", "default: bior2.2", "default: cutpaste,perlin"):
        assert expected in text, expected


def test_torchrun_two_processes_gloo(tiny_root, tmp_path, torchrun_launch):
    argv = ["--standalone", "--nproc_per_node=2",
            # torchrun's own parser takes abbreviations, so --e/--m/--b/--c must be spelled out
            "main.py", "--category", "widget", "--data-root", str(tiny_root), "--arch", "wave18",
            "--size", "32", "--batch-size", "2", "--epochs", "1", "--device", "cpu",
            "--ckpt-dir", str(tmp_path), "--no-tensorboard", "--precision", "fp32"]
    # The launcher is a forked process (an interpreter start less); its two workers are fresh
    # interpreters running main.py, as under the torchrun command. Their output is the test's.
    assert torchrun_launch(argv) == 0, "torchrun failed: see the captured output"
    ckpt = read_checkpoint(tmp_path / "widget-wave18" / "model.pt")
    load_weights(models.create_model("wave18"), extract_state_dict(ckpt))
    assert len((tmp_path / "widget-wave18" / "log.jsonl").read_text().splitlines()) == 1


# --- the settings as a dataclass -----------------------------------------------------------------

def test_every_setting_is_a_flag_with_the_configs_default():
    args = train_main.parse_args([])
    config = TrainConfig()
    for name in TrainConfig.names():
        value = getattr(args, name)
        assert (tuple(value.split(",")) if name == "augs" else value) == getattr(config, name), name
    assert config.wavelet == models.DEFAULT_WAVELET and DWT_IMPLS == models.WaveletDownsample.IMPLS
    # What is not a setting is a path, an output or a command-line switch.
    run_flags = {"data_root", "ckpt_dir", "resume", "overwrite", "save_every", "no_tensorboard"}
    assert set(vars(args)) - set(TrainConfig.names()) == run_flags | {"category", "eval", "demo", "device", "debug",
                                                                      "flag_names"}
    assert set(TrainRun().to_dict()) == run_flags - {"no_tensorboard"} | {"tensorboard"}


def test_setting_lists_follow_the_roles():
    assert WEIGHT_SETTINGS == ("arch", "wavelet", "size", "frame", "whole_share", "antialias", "augs", "rotflip",
                               "dense", "dense_weight", "epochs", "batch_size", "lr", "weight_decay", "momentum",
                               "sched", "warmup", "seed", "precision", "anomalies_on")
    assert RESUME_WARN_SETTINGS == ("frame", "whole_share", "antialias", "rotflip", "dense_weight", "batch_size", "lr",
                                    "weight_decay", "momentum", "sched", "warmup", "seed", "precision", "anomalies_on")
    assert set(TrainConfig.names("speed")) == {"workers", "pin_memory", "channels_last", "cudnn_benchmark", "compile",
                                               "dwt_impl"}
    with pytest.raises(ValueError, match="sched=.linear.: choose one of constant, cosine"):
        TrainConfig(sched="linear")
    assert TrainConfig(augs=["cutpaste"]).augs == ("cutpaste",) and TrainConfig(augs=["cutpaste"]).num_classes == 2


def test_checkpoint_records_every_setting(tiny_root, tmp_path):
    [path] = train_main.main(train_args(tiny_root, tmp_path, "--e", "1", "--recipe", "best", "--b", "4"))
    ckpt = read_checkpoint(path)
    config = TrainConfig.from_dict(ckpt["args"])
    assert config == train_main.config_from_args(train_args(tiny_root, tmp_path, "--e", "1", "--recipe", "best",
                                                            "--b", "4"))
    assert ckpt["recipe"] == "best" and ckpt["args"]["category"] == "widget" and ckpt["num_classes"] == 3
    assert ckpt["args"]["data_root"] == str(tiny_root) and ckpt["args"]["augs"] == ["cutpaste", "perlin"]


def test_train_category_takes_configs(tiny_root, tmp_path, one_epoch):
    """The library call, no command line: the same weights as main.py with the same settings."""
    from training import DistInfo, train_category

    config = TrainConfig(arch="wave18", size=32, batch_size=4, epochs=1, precision="fp32")
    path, trained = train_category(config, TrainRun(data_root=str(tiny_root), ckpt_dir=str(tmp_path / "lib"),
                                                    tensorboard=False), "widget", torch.device("cpu"), DistInfo())
    assert trained and path == tmp_path / "lib" / "widget-wave18" / "model.pt"
    cli_path = one_epoch / "widget-wave18" / "model.pt"  # main.main(train_args(..., "--e", "1"))
    a, b = extract_state_dict(read_checkpoint(path)), extract_state_dict(read_checkpoint(cli_path))
    assert all(torch.equal(a[key], b[key]) for key in a)


# --- Ctrl-C saves the last completed epoch, from kept tensors --------------------------------------

def test_kept_copy_is_the_completed_epoch_and_reuses_its_buffers(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    saver = CheckpointSaver(tmp_path / "model.pt", model, optimizer, TrainConfig(epochs=5), TrainRun(save_every=0),
                            "widget", main_rank=True, saved_epoch=0)
    saver.epoch_done(1)
    completed = copy_tensors(model.state_dict())
    with torch.no_grad():
        model[0].weight.add_(1.0)  # Ctrl-C lands partway into epoch 2
    saver.save_interrupted()
    saved = read_checkpoint(tmp_path / "model.pt")
    assert saved["epoch"] == 1 and saver.saved_epoch == 1
    assert all(torch.equal(saved["netD_state_dict"][k], v) for k, v in completed.items())
    assert not torch.equal(saved["netD_state_dict"]["0.weight"], model[0].weight)
    assert saved["netD_state_dict"]._metadata == model.state_dict()._metadata  # as torch.save of a state dict
    momentum = optimizer.state[model[0].weight]["momentum_buffer"]
    assert torch.equal(saved["optimizer"]["state"][0]["momentum_buffer"], momentum)
    kept = saver.kept[0]["0.weight"]
    saver.epoch_done(2)
    assert saver.kept[0]["0.weight"] is kept and torch.equal(kept, model[0].weight)  # copied into, not allocated


class StopOnCall(StopRequest):
    """A Ctrl-C seen at the ``n``-th safe point (the loop checks after every step and every epoch)."""

    calls = 0
    at = 0

    def check(self) -> None:
        StopOnCall.calls += 1
        if StopOnCall.calls == StopOnCall.at:
            self.requested = True
        super().check()


@pytest.fixture(scope="module")
def straight(trained):
    """An uninterrupted 2-epoch run of train_args: conftest's widget run (``--c all`` trains widget
    as ``--c widget`` would)."""
    return trained / "widget-wave18" / "model.pt"


@pytest.mark.parametrize("at,saved_epoch", [(4, 1), (3, 1)])
def test_ctrl_c_mid_epoch_saves_the_last_completed_one_and_resume_is_exact(tiny_root, tmp_path, monkeypatch, straight,
                                                                             at, saved_epoch):
    """8 images, batch 4: safe points 1-2 are epoch 1's steps, 3 its end, 4 epoch 2's first step, ..."""
    epochs = str(read_checkpoint(straight)["epoch"])
    monkeypatch.setattr(training.loop, "StopRequest", StopOnCall)
    StopOnCall.calls, StopOnCall.at = 0, at
    with pytest.raises(KeyboardInterrupt):
        train_main.main(train_args(tiny_root, tmp_path / "b", "--e", epochs))
    ckpt = tmp_path / "b" / "widget-wave18" / "model.pt"
    assert read_checkpoint(ckpt)["epoch"] == saved_epoch
    monkeypatch.setattr(training.loop, "StopRequest", StopRequest)
    resumed = train_main.main(train_args(tiny_root, tmp_path / "b", "--e", epochs, "--resume"))[0]
    a, b = read_checkpoint(straight), read_checkpoint(resumed)
    assert all(torch.equal(value, b["netD_state_dict"][key]) for key, value in a["netD_state_dict"].items())
    assert all(torch.equal(a["optimizer"]["state"][i]["momentum_buffer"], b["optimizer"]["state"][i]["momentum_buffer"])
               for i in a["optimizer"]["state"])
