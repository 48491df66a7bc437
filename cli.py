"""What every command-line entry point shares: device choice and the one-line error handling.

``run(main, args)`` calls ``main(args)``; a :class:`errors.UserError` is printed as one line
on stderr with exit status 2 (``--debug`` shows the traceback), Ctrl-C exits with 130.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

import torch

from errors import UserError


def add_common_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Runtime")
    group.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                       help="auto = CUDA when available, else CPU")
    group.add_argument("--workers", type=int, default=0,
                       help="data loader worker processes (0 = load in the main process)")
    group.add_argument("--debug", action="store_true", help="show full tracebacks on errors")


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA GPU is visible to PyTorch; use --device cpu "
                            "(or install a CUDA build of PyTorch and check nvidia-smi)")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def check_workers(workers: int) -> None:
    cores = os.cpu_count() or 1
    if workers < 0 or workers > cores:
        raise UserError(f"--workers {workers}: this machine has {cores} cores; use 0..{cores}")


def run(main: Callable[[argparse.Namespace], object], args: argparse.Namespace) -> None:
    try:
        main(args)
    except UserError as exc:
        if getattr(args, "debug", False):
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        if getattr(args, "debug", False):
            raise
        print("interrupted", file=sys.stderr)
        sys.exit(130)
