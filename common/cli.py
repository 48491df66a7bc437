"""What every command-line entry point shares: the parser, common flags and one-line error handling.

``run(main, args)`` calls ``main(args)``; a :class:`errors.UserError` is printed as one line
on stderr with exit status 2 (``--debug`` shows the traceback), Ctrl-C exits with 130.

Only command-line things live here; what the library needs of the machine (device, bfloat16,
workers, precision) is :mod:`runtime`. Library code
(``models/``, ``data/``, ``augment/``, ``training/``, ``scoring/``) never imports this module.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

import torch

from common import fileio
from common.errors import SettingError, UserError


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: ``error: argument --k: ... (see --help)``, exit status 2.

    The parsed namespace also carries ``flag_names`` (``{dest: flag}``), with which :func:`run`
    words a library's :class:`errors.SettingError` (``k=0: ...``) as the flag (``--k 0: ...``).
    """

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")

    def parse_known_args(self, args=None, namespace=None):
        parsed, rest = super().parse_known_args(args, namespace)
        parsed.flag_names = flag_names(self)
        return parsed, rest


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` with each option's default, except for switches and for options whose help says
    their default in words: a switch's stored default says nothing a user can read (``--uncertified
    (default: True)`` meant "certified unless given"), nor does ``None`` after "(default: the
    checkpoint's)"."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.nargs == 0 or (action.default is None and "default" in (action.help or "")):
            return action.help or ""
        return super()._get_help_string(action)


def flag_names(parser: argparse.ArgumentParser) -> dict[str, str]:
    """``{dest: the flag's first long option}`` of every option of ``parser``, and for switches
    ``{"dest=value": flag}`` (``{"certify=False": "--uncertified"}``)."""
    names = {}
    for action in parser._actions:  # argparse offers no public list of its options
        options = [o for o in action.option_strings if o.startswith("--")]
        if options:
            names.setdefault(action.dest, options[0])
            if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
                names.setdefault(f"{action.dest}={action.const}", options[0])
    return names


def setting_message(exc: SettingError, names: dict[str, str]) -> str:
    """A library's setting error in the command line's words (the flag, where the setting has one)."""
    return exc.worded_as(names) if exc.name in names else str(exc)


# Write failures a user can fix by freeing space or choosing another folder.
WRITE_ERRNOS = fileio.WRITE_ERRNOS


def add_common_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Runtime")
    group.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                       help="auto = CUDA when available, else CPU")
    group.add_argument("--workers", type=parse_workers, default=None, metavar="N|auto",
                       help="data loader worker processes (0 = load in the main process); auto = 0 on the "
                            "CPU (the network already uses every core), min(8, cores) with CUDA")
    group.add_argument("--debug", action="store_true", help="show full tracebacks on errors")


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
        message = setting_message(exc, getattr(args, "flag_names", {})) if isinstance(exc, SettingError) else exc
        print(f"error: {message}", file=sys.stderr)
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
