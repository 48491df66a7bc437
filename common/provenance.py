"""Where a result came from: the code version (git commit) and the versions of the packages."""

from __future__ import annotations

import functools
import platform
import subprocess
from importlib import metadata
from pathlib import Path

PACKAGES = ("torch", "torchvision", "numpy", "scipy", "scikit-learn", "pillow", "pywavelets", "faiss-cpu")


@functools.cache
def git_commit() -> str | None:
    """``git rev-parse HEAD`` of this code, or ``None`` outside a git checkout (or without git)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def versions() -> dict:
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def environment(seed: int | None, command: str) -> dict:
    """Provenance of a result: seed, code version, package versions, the command line."""
    return {"seed": seed, "git_commit": git_commit(), "versions": versions(), "command": command}
