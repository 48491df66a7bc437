"""WaveCNet family: registry, state-dict layout of the paper, shapes, gradients, checkpoints."""

from pathlib import Path

import pytest
import torch

import models
from common.errors import UserError
from models.checkpoint import extract_state_dict, infer_arch, load_weights, read_checkpoint, save_atomic

SPEC_DIR = Path(__file__).parent / "data"


def read_spec(name):
    spec = {}
    for line in (SPEC_DIR / f"{name}_state_dict.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, shape = line.split(" ", 1)
            spec[key] = list(eval(shape))
    return spec


@pytest.mark.parametrize("name,count", [("wave18", 145), ("wave50", 343)])
def test_state_dict_matches_paper_spec(name, count):
    state = models.create_model(name).state_dict()
    spec = read_spec(name)
    assert len(spec) == count
    assert list(state) == list(spec)
    assert {k: list(v.shape) for k, v in state.items()} == spec


def test_registry_unknown_name_lists_known():
    with pytest.raises(UserError, match="wave18, wave34, wave50, wave101"):
        models.create_model("resnet50")


@pytest.mark.parametrize("name", ["wave18", "wave34", "wave50", "wave101"])
def test_infer_arch(name):
    assert infer_arch(models.create_model(name).state_dict()) == name


@pytest.mark.parametrize("name,channels", [("wave18", [64, 128, 256, 512]),
                                           ("wave50", [256, 512, 1024, 2048])])
def test_feature_shapes_at_256(name, channels):
    net = models.create_model(name).eval()
    with torch.no_grad():
        logits, feats = net(torch.rand(1, 3, 256, 256))
    assert logits.shape == (1, 3)
    assert [tuple(f.shape[1:]) for f in feats] == [(c, s, s) for c, s in zip(channels, [64, 32, 16, 8])]
    assert net.feature_channels == channels
    assert [f.shape for f in net.forward_features(torch.rand(1, 3, 256, 256))] == [f.shape for f in feats]


@pytest.mark.parametrize("name", ["wave18", "wave34", "wave50", "wave101"])
@pytest.mark.parametrize("wavelet", ["bior2.2", "haar"])
def test_every_parameter_gets_a_gradient(name, wavelet):
    torch.manual_seed(0)
    net = models.create_model(name, wavelet=wavelet)
    logits, feats = net(torch.rand(2, 3, 64, 64))
    assert torch.isfinite(logits).all() and all(torch.isfinite(f).all() for f in feats)
    (logits.sum() + sum(f.mean() for f in feats)).backward()
    for key, param in net.named_parameters():
        if key.startswith("fc."):  # the paper's unused layer, kept for state-dict compatibility
            assert param.grad is None
            continue
        assert param.grad is not None and torch.isfinite(param.grad).all(), key
        assert param.grad.abs().sum() > 0, key


def test_odd_input_size_runs():
    net = models.create_model("wave18").eval()
    with torch.no_grad():
        _, feats = net(torch.rand(1, 3, 100, 75))
    assert [tuple(f.shape[-2:]) for f in feats] == [(25, 19), (12, 9), (6, 4), (3, 2)]


def test_paper_format_checkpoint_roundtrip(tmp_path):
    torch.manual_seed(0)
    net = models.create_model("wave18").eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        ref_logits, ref_feats = net(x)
    path = tmp_path / "ckpt" / "e1600_model.pt"
    save_atomic({"epoch": 1600, "netD_state_dict": net.state_dict()}, path)
    assert [p.name for p in path.parent.iterdir()] == ["e1600_model.pt"]  # no temp file left
    ckpt = read_checkpoint(path)
    assert ckpt["epoch"] == 1600
    fresh = models.create_model("wave18").eval()
    load_weights(fresh, extract_state_dict(ckpt))
    with torch.no_grad():
        logits, feats = fresh(x)
    assert torch.equal(logits, ref_logits)
    assert all(torch.equal(a, b) for a, b in zip(feats, ref_feats))


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_prefixed_keys_load(prefix):
    net = models.create_model("wave18")
    state = {prefix + k: v for k, v in net.state_dict().items()}
    load_weights(models.create_model("wave18"), extract_state_dict({"netD_state_dict": state}))


def test_wrong_arch_says_which(tmp_path):
    state = models.create_model("wave18").state_dict()
    with pytest.raises(UserError, match="looks like wave18.*--arch wave18"):
        load_weights(models.create_model("wave50"), state, arch="wave50")


def test_bad_files_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        read_checkpoint(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(UserError, match="cannot be read"):
        read_checkpoint(junk)
    good = tmp_path / "good.pt"
    save_atomic({"epoch": 1, "netD_state_dict": models.create_model("wave18").state_dict()}, good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(UserError, match="cannot be read"):
        read_checkpoint(truncated)
    with pytest.raises(UserError, match="no network weights"):
        extract_state_dict({"epoch": 3})


@pytest.mark.parametrize("arch, dense", [("wave18", False), ("wave50", True)])
def test_a_network_built_to_be_loaded_scores_as_one_built_and_initialised(arch, dense):
    """models.checkpoint.empty_network draws no weights (they are loaded at once); with the same
    weights loaded it is the same network: wavelet filters rebuilt, every tensor on the CPU."""
    from models.checkpoint import empty_network, load_weights

    torch.manual_seed(0)
    reference = models.create_model(arch, dense=dense).eval()
    empty = empty_network(arch, "bior2.2", 3, dense)
    assert not any(t.is_meta for t in [*empty.parameters(), *empty.buffers()])
    load_weights(empty, reference.state_dict())
    empty.eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(reference.forward_features(x), empty.forward_features(x)):
            assert torch.equal(a, b)
    assert [p.requires_grad for p in empty.parameters()] == [p.requires_grad for p in reference.parameters()]
