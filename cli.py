"""What every command-line entry point shares: the parser, common flags and one-line error handling.

``run(main, args)`` calls ``main(args)``; a :class:`errors.UserError` is printed as one line
on stderr with exit status 2 (``--debug`` shows the traceback), Ctrl-C exits with 130.

Only command-line things live here; what the library needs of the machine (device, bfloat16,
workers, precision) is :mod:`runtime`, re-exported below for older callers. Library code
(``models/``, ``data/``, ``augment/``, ``training/``, ``scoring/``) never imports this module.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from collections.abc import Callable

import torch

import runtime
from errors import UserError
from runtime import bf16_available, resolve_workers  # noqa: F401  (re-exported)


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
    """``--device`` value -> ``torch.device`` (:func:`runtime.resolve_device`, with the flag's wording)."""
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is visible to PyTorch; use --device cpu "
                        "(or install a CUDA build of PyTorch and check nvidia-smi)")
    return runtime.resolve_device(name, local_rank)


def parse_workers(text: str) -> int | None:
    """``--workers`` value: ``auto`` -> ``None`` (see :func:`runtime.resolve_workers`), else an int."""
    if text == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number or 'auto'") from None


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
