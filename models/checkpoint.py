"""Checkpoint files: atomic saving, safe loading, and loading weights into a network.

Two formats are read:

- the paper's: ``{"epoch": int, "netD_state_dict": state_dict}`` (``ckpt/<class>-wave50/
  e1600_model.pt``);
- ours: the same two keys plus ``format_version``, ``arch``, ``wavelet``, ``size``, ``augs``,
  ``args``, ``optimizer`` ... (see ``training/``), so the paper's code can read ours too.

A bare state dict, and state dicts whose keys carry ``module.`` (DistributedDataParallel) or
``_orig_mod.`` (``torch.compile``) prefixes, are accepted as well. Files are opened with
``torch.load(weights_only=True)``: a checkpoint can never run code.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import torch
from torch import nn

from common.errors import UserError
from common.fileio import atomic_write, no_space

STATE_KEY = "netD_state_dict"
# The segmentation head of dense self-supervision, beside (not inside) the network's state dict.
HEAD_KEY = "seg_head_state_dict"
HEAD_PREFIX = "seg_head."
PREFIXES = ("module.", "_orig_mod.")
# What torch.load raises for a file that is not a (whole) PyTorch file: a text file named .pt is a
# KeyError of its first byte, a truncated one an EOFError or a zip error, a foreign pickle others.
UNREADABLE = (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError, KeyError,
              IndexError, TypeError, AttributeError, UnicodeDecodeError)


def save_atomic(obj: object, path: str | os.PathLike) -> None:
    """``torch.save`` through :func:`fileio.atomic_write` (temporary file, fsync, ``os.replace``).

    A crash, a full disk or a kill at any moment leaves either the old file or the new one,
    never a half-written one. ``torch.save`` reports a failed write (a full disk) as a
    ``RuntimeError`` from its zip writer, not an ``OSError``; it is turned into one naming
    ``path`` here, so callers handle it like any other write failure (``cli.run``: one line,
    exit 4; the bank cache: a warning).
    """
    try:
        atomic_write(path, lambda handle: torch.save(obj, handle))
    except RuntimeError as exc:
        message = str(exc)
        if not any(sign in message for sign in TORCH_WRITE_FAILED):
            raise
        # "[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing file data/0: file
        # write failed": keep the part after the C++ location.
        detail = message.splitlines()[0].split("] . ", 1)[-1].strip()[:160]
        raise no_space(path, f"torch.save: {detail}") from None


# How torch.save's zip writer words a failed write (PyTorch 2.x).
TORCH_WRITE_FAILED = ("PytorchStreamWriter failed writing", "file write failed", "unexpected pos")


def read_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint file safely; a missing, truncated or foreign file is a ``UserError``."""
    path = Path(path)
    if not path.is_file():
        folder = path.parent
        # Two levels at most (a run folder's model.pt, a ckpt folder's runs): never a walk of a whole disk.
        found = sorted(str(p.relative_to(folder)) for pattern in ("*.pt", "*/*.pt")
                       for p in folder.glob(pattern)) if folder.is_dir() else []
        hint = f"checkpoints in {folder}/: {', '.join(found[:20])}" if found else \
            f"no .pt files in {folder}/" if folder.is_dir() else f"{folder}/ does not exist"
        raise UserError(f"checkpoint {path} not found ({hint}); train first with main.py, or pass --p (a "
                        f"checkpoint file or run folder) and --ckpt-dir (the folder of run folders, relative to "
                        f"{Path.cwd()})")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except UNREADABLE as exc:
        raise UserError(
            f"checkpoint {path} cannot be read ({type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:120]}); "
            "it is truncated or not a PyTorch checkpoint: re-copy it or retrain"
        ) from None
    if not isinstance(obj, dict):
        raise UserError(f"checkpoint {path} holds a {type(obj).__name__}, not a checkpoint dict")
    return obj


def extract_state_dict(checkpoint: dict, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The network weights of a checkpoint dict, with ``module.``/``_orig_mod.`` prefixes removed."""
    for key in (STATE_KEY, "state_dict", "model"):
        if isinstance(checkpoint.get(key), dict):
            state = checkpoint[key]
            break
    else:
        state = checkpoint
    if not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{source} has no network weights (expected a '{STATE_KEY}' entry)")
    cleaned = {}
    for key, value in state.items():
        for prefix in PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix):]
        cleaned[key] = value
    return cleaned


def split_head_state(state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """A network's full state dict -> ``(the paper network's keys, the segmentation head's keys)``;
    the head's keys lose their ``seg_head.`` prefix (empty without a head)."""
    if not any(k.startswith(HEAD_PREFIX) for k in state):
        return state, {}  # as it is (an OrderedDict keeps its version records)
    net = {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIX)}
    head = {k[len(HEAD_PREFIX):]: v for k, v in state.items() if k.startswith(HEAD_PREFIX)}
    return net, head


def network_state(checkpoint: dict, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The state dict of the whole network a checkpoint holds: the paper network's weights, plus
    the segmentation head's (``seg_head.`` keys) when it has one."""
    state = extract_state_dict(checkpoint, source)
    head = checkpoint.get(HEAD_KEY) or {}
    return {**state, **{HEAD_PREFIX + k: v for k, v in head.items()}}


def infer_arch(state_dict: dict[str, torch.Tensor]) -> str | None:
    """Guess the registry name (``wave18`` ...) from a state dict's keys, or ``None``."""
    from . import ARCHS  # late import: the registry imports this module's siblings

    bottleneck = "layer1.0.conv3.weight" in state_dict
    depths = []
    for stage in range(1, 5):
        blocks = {k.split(".")[1] for k in state_dict if k.startswith(f"layer{stage}.")}
        depths.append(len(blocks))
    for name, (block, arch_depths) in ARCHS.items():
        if tuple(depths) == arch_depths and (block.expansion == 4) == bottleneck:
            return name
    return None


def load_weights(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str = "checkpoint",
                 arch: str | None = None) -> None:
    """``model.load_state_dict(state_dict, strict=True)`` with a readable error on mismatch."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong_shape = [k for k in expected if k in state_dict and state_dict[k].shape != expected[k].shape]
    if missing or unexpected or wrong_shape:
        looks_like = infer_arch(state_dict)
        what = f"it looks like {looks_like}" if looks_like else "it matches no known arch"
        details = []
        if missing:
            details.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            details.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong_shape:
            k = wrong_shape[0]
            details.append(f"{len(wrong_shape)} of another shape (e.g. {k}: "
                           f"{tuple(state_dict[k].shape)} vs {tuple(expected[k].shape)})")
        asked = f" for {arch}" if arch else ""
        hint = f"; pass --arch {looks_like}" if looks_like and looks_like != arch else ""
        raise UserError(f"{source} does not fit the network{asked}: {what}; keys "
                        f"{', '.join(details)}{hint}")
    bad = [k for k, v in state_dict.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise UserError(f"{source} holds NaN or infinite weights ({len(bad)} tensors, e.g. {bad[0]}): its training "
                        "diverged; retrain with a lower --lr, or use an earlier checkpoint")
    model.load_state_dict(state_dict, strict=True)


def empty_network(arch: str, wavelet: str, num_classes: int, dense: bool) -> nn.Module:
    """A network of the given shape whose weights are not drawn (``torch.empty``), to be filled by
    :func:`load_weights` at once: drawing a wave18's random weights costs ~0.1 s per load, wave50's
    ~0.2 s, for values thrown away. Non-persistent buffers (the wavelet filters) are rebuilt."""
    from . import create_model  # late import: the registry imports this module's siblings

    with torch.device("meta"):
        network = create_model(arch, wavelet=wavelet, num_classes=num_classes, dense=dense)
    # torch.empty per tensor, not Module.to_empty: its first empty_like from "meta" costs 0.3 s.
    for module in network.modules():
        for name, value in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            empty = torch.empty(value.shape, dtype=value.dtype)
            is_parameter = isinstance(value, nn.Parameter)
            setattr(module, name, nn.Parameter(empty, value.requires_grad) if is_parameter else empty)
        if hasattr(module, "reset_buffers"):
            module.reset_buffers()
    return network


def build_from_checkpoint(checkpoint: dict, source: str, arch: str | None = None,
                          wavelet: str | None = None) -> tuple[nn.Module, dict]:
    """A network with the checkpoint's weights, and what is known about it.

    The arch comes from the checkpoint (ours record it), else from its keys (the paper's do not),
    else from ``arch``; asking for another arch than the file holds is a ``UserError``.

    Returns:
        ``(model, info)`` with ``info`` = arch, wavelet, num_classes, dense (has a segmentation head),
        size (or None), epoch, recipe, augs.
    """

    state = network_state(checkpoint, source)
    dense = any(k.startswith(HEAD_PREFIX) for k in state)
    found = checkpoint.get("arch") or infer_arch(state)
    if found is None:
        raise UserError(f"{source} matches no known arch (wave18/34/50/101); is it a WaveCNet checkpoint?")
    if arch is not None and arch != found:
        raise UserError(f"{source} holds a {found} network, not {arch}; pass --arch {found} or another --p")
    wavelet = checkpoint.get("wavelet") or wavelet or "bior2.2"
    num_classes = int(state["out.weight"].shape[0]) if "out.weight" in state else 3
    model = empty_network(found, wavelet, num_classes, dense)
    load_weights(model, state, source, found)  # strict: every weight and persistent buffer is set
    info = {"arch": found, "wavelet": wavelet, "num_classes": num_classes, "dense": dense,
            "size": checkpoint.get("size"),
            "frame": checkpoint.get("frame"),  # [H, W] the images were resized to (None: size x size)
            "epoch": checkpoint.get("epoch"), "recipe": checkpoint.get("recipe", "paper"),
            "augs": checkpoint.get("augs")}
    return model, info
