"""What every command-line entry point shares: device choice and the one-line error handling.

``run(main, args)`` calls ``main(args)``; a :class:`errors.UserError` is printed as one line
on stderr with exit status 2 (``--debug`` shows the traceback), Ctrl-C exits with 130.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from collections.abc import Callable

import torch

from errors import UserError


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: ``error: argument --k: ... (see --help)``, exit status 2."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


# Write failures a user can fix by freeing space or choosing another folder.
WRITE_ERRNOS = {errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EDQUOT, errno.EPERM, errno.ENOTDIR, errno.EEXIST,
                errno.EISDIR}


def add_common_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Runtime")
    group.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                       help="auto = CUDA when available, else CPU")
    group.add_argument("--workers", type=parse_workers, default=None, metavar="N|auto",
                       help="data loader worker processes (0 = load in the main process); auto = 0 on the "
                            "CPU (the network already uses every core), min(8, cores) with CUDA")
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


def bf16_available(device: torch.device) -> bool:
    """bfloat16 autocast pays on CUDA and on CPUs with native bf16 (AVX512-BF16 / AMX)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def parse_workers(text: str) -> int | None:
    """``--workers`` value: ``auto`` -> ``None`` (see :func:`resolve_workers`), else an int."""
    if text == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number or 'auto'") from None


def resolve_workers(workers: int | None, device: torch.device) -> int:
    """Loader workers: the given number, or for ``auto`` none on the CPU and up to 8 feeding a GPU."""
    if workers is not None:
        return workers
    return 0 if device.type == "cpu" else min(8, os.cpu_count() or 1)


def check_workers(workers: int | None) -> None:
    cores = os.cpu_count() or 1
    if workers is not None and (workers < 0 or workers > cores):
        raise UserError(f"--workers {workers}: this machine has {cores} cores; use 0..{cores}")


def run(main: Callable[[argparse.Namespace], object], args: argparse.Namespace,
        batch_flag: str = "--batch-size") -> None:
    """Call ``main(args)``; user-fixable failures end as one line on stderr and a non-zero exit."""
    debug = getattr(args, "debug", False)
    try:
        main(args)
    except UserError as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except torch.OutOfMemoryError:
        if debug:
            raise
        print(f"error: out of GPU memory; lower {batch_flag} (now {getattr(args, 'batch_size', '?')}) or --size, "
              "or use --precision bf16", file=sys.stderr)
        sys.exit(3)
    except OSError as exc:
        if debug or exc.errno not in WRITE_ERRNOS:
            raise
        print(f"error: cannot write {exc.filename or 'an output file'} ({exc.strerror}); free disk space or "
              "choose a writable folder (--ckpt-dir / --out); files written before are intact", file=sys.stderr)
        sys.exit(4)
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted", file=sys.stderr)
        sys.exit(130)
