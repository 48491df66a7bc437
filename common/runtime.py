"""What both stages ask of the machine: the device, bfloat16 support, loader workers, precision.

Library code below the command lines (``training/``, ``scoring/``) and the command lines
themselves (``common/cli.py``, ``main.py``, ``scoring/cli.py``) use these; errors are
:class:`common.errors.SettingError` naming the setting (the command lines word them with their flags).
"""

from __future__ import annotations

import functools
import os

import torch

from common.errors import SETTING, SettingError

PRECISIONS = ("auto", "fp32", "bf16")


def resolve_device(device: str | torch.device, local_rank: int = 0) -> torch.device:
    """``auto`` / ``cpu`` / ``cuda`` / ``cuda:N`` or a ``torch.device`` -> a ``torch.device`` (``auto``:
    CUDA when available, else the CPU; plain ``cuda`` is ``cuda:<local_rank>``)."""
    if isinstance(device, torch.device):
        return device
    name = device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise SettingError("device", device, f"no CUDA GPU is visible to PyTorch; use {SETTING}cpu (or install a "
                                                 "CUDA build of PyTorch and check nvidia-smi)")
        return torch.device("cuda", local_rank) if name == "cuda" else torch.device(name)
    if name != "cpu":
        raise SettingError("device", device, "choose auto, cpu or cuda")
    return torch.device("cpu")


def bf16_available(device: torch.device) -> bool:
    """bfloat16 autocast pays on CUDA and on CPUs with native bf16 (AVX512-BF16 / AMX)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@functools.cache
def bf16_matmul_pays(device_type: str) -> bool:
    """Whether bfloat16 matrix products beat float32 ones by enough to pay for a float32 check of
    part of them (the k-NN shortlist): on CUDA and on CPUs with AMX tiles; not on AVX512-BF16 alone,
    where they were slower than float32 here (AMD EPYC, 2026-12-04: 0.73 s against 0.44 s)."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    try:
        with open("/proc/cpuinfo") as handle:
            return any(line.startswith("flags") and "amx_bf16" in line.split() for line in handle)
    except OSError:
        return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` where ``device`` supports it natively, else ``fp32``; ``bf16`` must be supported."""
    if precision not in PRECISIONS:
        raise SettingError("precision", precision, f"choose one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if bf16_available(device) else "fp32"
    if precision == "bf16" and not bf16_available(device):
        raise SettingError("precision", precision, f"this {device.type.upper()} has no native bfloat16; use "
                                                   f"{SETTING}fp32")
    return precision


def resolve_workers(workers: int | None, device: torch.device) -> int:
    """Loader workers: the given number, or for ``None`` (auto) none on the CPU and up to 8 feeding a GPU."""
    if workers is not None:
        return workers
    return 0 if device.type == "cpu" else min(8, os.cpu_count() or 1)
