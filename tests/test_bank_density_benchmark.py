"""benchmarks/bank_density.py: its certified maxima are the brute-force maxima of the divided
distances, and on the tiny data set its alpha-0 row is the scorer's own certified image score (with
gradients left on for its caller)."""

import json

import numpy as np
import pytest
import torch

from benchmarks import bank_density
from data import train_images
from scoring import ScoreConfig, metrics
from scoring.building import features_of, load_network, resolve_config
from scoring.engine.features import ImageFiles
from scoring.engine.model import AnomalyScorer, PatchBank
from scoring.pipeline.evaluation import category_test_set


def test_certified_maxima_equal_the_brute_force_maxima():
    torch.manual_seed(0)
    full = torch.randn(400, 8)
    state = {"rows": full[::4].contiguous(), "full": full, "coreset": 0.25, "coreset_dim": 8, "seed": 0}
    bank = PatchBank(state, refine=1)
    patches = torch.randn(50, 8) * 1.5
    upper, nearest = (found[:, 0] for found in bank.search.nearest(patches, 1))
    spread = bank_density.spacing(bank, 3)
    assert spread.shape == (100,) and bool((spread > 0).all())
    scales = {alpha: spread[nearest] ** alpha for alpha in (0.0, 0.5, 1.0)}
    best, searched = bank_density.certified_maxima(bank, patches, upper, scales, step=4)
    exact = torch.cdist(patches, full).min(1).values
    for alpha, scale in scales.items():
        assert abs(best[alpha] - float((exact / scale).max())) < 1e-4
    assert 0 < searched <= 50
    # The division changes which patch wins (else the benchmark would measure nothing).
    assert int((exact / scales[1.0]).argmax()) != int(exact.argmax())


def test_alpha_zero_is_the_scorers_own_certified_score(one_epoch, tiny_root, tmp_path):
    checkpoint = one_epoch / "widget-wave18" / "model.pt"
    argv = ["--checkpoint", str(checkpoint), "--data-root", str(tiny_root), "--c", "widget", "--frame", "64x32",
            "--coreset", "0.5", "--alphas", "0,1", "--neighbours", "2", "--out", str(tmp_path)]
    bank_density.main(bank_density.get_args_parser().parse_args(argv))
    assert torch.is_grad_enabled()  # its no_grad is its own: a caller's training keeps its gradients
    result = json.loads((tmp_path / "bank_density_widget.json").read_text())
    zero, one = result["rows"]
    assert (zero["alpha"], one["alpha"]) == ("0", "1") and result["info"]["frame"] == "64x32"
    network, info = load_network(checkpoint, torch.device("cpu"))
    paths = train_images(tiny_root, "widget")
    config = resolve_config(ScoreConfig(frame="64x32", coreset=0.5), info, paths)
    train, _ = features_of(network, ImageFiles(paths, config.preprocessing), config, torch.device("cpu"), "train")
    test, extras = features_of(network, category_test_set(tiny_root, "widget", config), config,
                               torch.device("cpu"), "test")
    scores = AnomalyScorer.fit(config, train).score(test)[0].numpy()
    labels = np.concatenate([np.asarray(e["label"]) for e in extras])
    assert zero["image AUROC all"] == f"{metrics.image_auroc(labels, scores):.4f}"


def test_bad_powers_and_neighbours_are_one_argparse_line(capsys):
    for flag, value in (("--alphas", "0,x"), ("--alphas", "-1"), ("--neighbours", "0")):
        with pytest.raises(SystemExit):
            bank_density.get_args_parser().parse_args(["--checkpoint", "x.pt", "--data-root", ".", "--c", "w",
                                                       flag, value])
        assert f"argument {flag}: invalid" in capsys.readouterr().err
