"""benchmarks/throughput.py and its paper-style stand-in on the tiny data set."""

import json
import sys
from pathlib import Path

import pytest
import torch

import main as train_main
from benchmarks import paper_style_train, throughput
from benchmarks.paper_style_dwt import PaperStyleDownsample
from models.dwt import WaveletDownsample
from scoring.pipeline import cli as score_cli


@pytest.fixture(scope="module")
def stand_in(tiny_root, tmp_path_factory):
    """The paper-style stand-in run once on the tiny set, for both tests that need it: (its
    arguments, its result, its results row)."""
    argv = ["--data-root", str(tiny_root), "--c", "widget", "--size", "32", "--b", "4", "--epochs", "1",
            "--workers", "0", "--out", str(tmp_path_factory.mktemp("paper_style"))]
    args = paper_style_train.get_args_parser().parse_args(argv)
    result = paper_style_train.main(args)
    return args, result, json.loads((Path(args.out) / "paper_style_train.json").read_text())["rows"][0]


def test_paper_style_stand_in_matches_our_layer_and_times_epochs(stand_in):
    """The stand-in's wavelet layer computes our LL band (only the cost differs), and its
    epochs count every normal and synthetic image."""
    x = torch.rand(2, 4, 16, 12, dtype=torch.float64)
    assert (PaperStyleDownsample()(x.float()) - WaveletDownsample()(x).float()).abs().max() < 1e-5
    _, result, row = stand_in
    assert len(result["epochs"]) == 2 and result["images_per_s"] > 0
    assert row["config"] == "wave18@32" and float(row["train img/s (median)"]) == round(result["images_per_s"], 1)


def test_commands_run_from_the_repository_root_and_failures_stop_the_benchmark(capsys):
    throughput.run([sys.executable, "-c", f"import os, sys; sys.exit(os.getcwd() != {str(throughput.REPO)!r})"])
    assert capsys.readouterr().out.startswith(f"$ {sys.executable} -c")  # the command is printed
    with pytest.raises(SystemExit, match=r"failed \(1\): \['boom'\]"):  # its exit code and last error line
        throughput.run([sys.executable, "-c", "import sys; print('a line'); sys.exit('boom')"])


def test_throughput_table_side_by_side(tiny_root, tmp_path, monkeypatch, stand_in):
    # In-process here (no interpreter start): the main.py and inference_concatenation.py commands
    # (`run` is tested just above, and test_demo runs both scripts as commands); the paper-style
    # stand-in's run is the fixture's (its own test is the first above).
    def in_process(cmd):
        script, argv = Path(cmd[1]).name, cmd[2:]
        if script == "main.py":
            train_main.main(train_main.parse_args(argv))
        else:
            assert script == "inference_concatenation.py", cmd
            score_cli.main(score_cli.parse_args("concatenation", argv))

    ran, _, row = stand_in

    def paper_style_throughput(args, arch, size):
        # The stand-in run this benchmark asks for is the one the fixture made: its result.
        wanted = paper_style_train.get_args_parser().parse_args(
            ["--data-root", args.data_root, "--c", args.category, "--arch", arch, "--size", str(size), "--b",
             str(args.batch_size), "--epochs", str(args.epochs), "--workers", str(args.baseline_workers),
             "--out", ran.out])
        assert vars(wanted) == vars(ran)
        return float(row["train img/s (median)"])

    monkeypatch.setattr(throughput, "paper_style_throughput", paper_style_throughput)
    monkeypatch.setattr(throughput, "run", in_process)
    argv = ["--data-root", str(tiny_root), "--c", "widget", "--configs", "wave18@32", "--device", "cpu",
            "--b", "4", "--epochs", "1", "--scoring", "torch", "--paper-baseline", "--baseline-workers", "0",
            "--work-dir", str(tmp_path / "work"), "--out", str(tmp_path / "out")]
    throughput.main(throughput.get_args_parser().parse_args(argv))
    rows = json.loads((tmp_path / "out" / "throughput_cpu.json").read_text())["rows"]
    assert len(rows) == 1 and rows[0]["scoring"] == "torch"
    ours, paper = float(rows[0]["train img/s"]), float(rows[0]["paper-style train img/s"])
    assert rows[0]["train speed-up"] == f"{ours / paper:.2f}x"
    assert 0 <= float(rows[0]["image AUROC"]) <= 1
