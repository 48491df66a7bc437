"""The code base passes its own linter configuration (pyproject.toml [tool.ruff])."""

import shutil
import subprocess
from pathlib import Path

import pytest


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff not installed")
def test_ruff_clean():
    out = subprocess.run(["ruff", "check", "."], cwd=Path(__file__).resolve().parent.parent,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:]
