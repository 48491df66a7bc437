"""Layers point one way, and functions stay short, checked on the source (AST).

- ``training/`` never imports ``scoring`` (scoring may use training's outputs, not the reverse);
- library code (``models/``, ``data/``, ``augment/``, ``training/``, ``scoring/``) never imports
  the command line (``common.cli``, ``main``) nor the recipes (``common.recipes``, which sit above
  both stages): what both stages need of the machine is ``common.runtime``, provenance is
  ``common.provenance``;
- ``scoring/engine/`` (the tensor engine) imports nothing of the run pipeline, its outputs or the
  API around it (``scoring.pipeline``, ``scoring.outputs``, ``scoring.detector``, ``building``, ``export``);
- the modules both stages share (``common/``: ``runtime``, ``provenance``, ``fileio``, ``errors``,
  ``settings``) import neither stage nor the command line;
- no function is longer than 60 lines, argument-parser builders excepted.
"""

from __future__ import annotations

import ast
import functools
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LIBRARY = ("models", "data", "augment", "training", "scoring")
# Below both stages: what training and scoring share (they import neither stage nor the command line).
SHARED = ("common/runtime.py", "common/provenance.py", "common/fileio.py", "common/errors.py", "common/settings.py")
COMMAND_LINE = ("common.cli", "main")
# Above both stages: the command line, and the recipes (they combine both stages' settings).
ABOVE_STAGES = (*COMMAND_LINE, "common.recipes")
# Command-line modules that live inside a library package: they are the edge, and may.
COMMAND_LINE_INSIDE = {"scoring/pipeline/cli.py"}
MAX_LINES = 60
# Functions allowed to be longer: argument-parser builders (one add_argument after another)...
LONG_PARSERS = {"main.py::get_args_parser", "scoring/pipeline/cli.py::get_args_parser"}
# ...and functions still to be split, each with its issue (remove the entry when done). None now.
LONG_TO_SPLIT: set[str] = set()


def is_one_of(module: str, names: tuple[str, ...]) -> bool:
    """Whether ``module`` is one of ``names`` or inside one (``common.cli.run`` is inside ``common.cli``)."""
    return any(module == name or module.startswith(name + ".") for name in names)


def project_files() -> list[Path]:
    skip = {".venv", "ckpt", "results", "runs", "demo_data", ".git"}
    return sorted(p for p in REPO.rglob("*.py") if not skip & set(p.relative_to(REPO).parts))


@functools.cache
def parsed(path: Path) -> ast.Module:
    """``path``'s syntax tree, read once for every check of this module."""
    return ast.parse(path.read_text(), str(path))


def imported_modules(path: Path) -> set[str]:
    """Absolute module names ``path`` imports (anywhere in the file, lazy imports included)."""
    names = set()
    for node in ast.walk(parsed(path)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def in_package(path: Path, *packages: str) -> bool:
    return path.relative_to(REPO).parts[0] in packages and len(path.relative_to(REPO).parts) > 1


def test_training_does_not_import_scoring():
    offenders = {rel(p): sorted(m for m in imported_modules(p) if m == "scoring" or m.startswith("scoring."))
                 for p in project_files() if in_package(p, "training")}
    assert not {k: v for k, v in offenders.items() if v}


def test_library_does_not_import_the_command_line():
    offenders = {}
    for path in project_files():
        if not in_package(path, *LIBRARY) or rel(path) in COMMAND_LINE_INSIDE:
            continue
        found = sorted(m for m in imported_modules(path) if is_one_of(m, ABOVE_STAGES))
        if found:
            offenders[rel(path)] = found
    assert not offenders, "library code imports the command line; use common.runtime / common.provenance instead"


def absolute_imports(path: Path) -> set[str]:
    """:func:`imported_modules`, with relative imports resolved against ``path``'s package."""
    package = path.relative_to(REPO).with_suffix("").parts[:-1]
    names = set(imported_modules(path))
    for node in ast.walk(parsed(path)):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            base = ".".join(package[:len(package) - node.level + 1] + ((node.module,) if node.module else ()))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def test_the_scoring_engine_stands_apart():
    around = ("scoring.pipeline", "scoring.outputs", "scoring.detector", "scoring.building", "scoring.export")
    engine = [p for p in project_files() if rel(p).startswith("scoring/engine/")]
    assert len(engine) >= 5
    offenders = {rel(p): sorted(m for m in absolute_imports(p) if is_one_of(m, around)) for p in engine}
    assert not {k: v for k, v in offenders.items() if v}


def test_shared_modules_sit_below_both_stages():
    above = ("training", "scoring", *ABOVE_STAGES)
    offenders = {name: sorted(m for m in imported_modules(REPO / name) if is_one_of(m, above))
                 for name in SHARED}
    assert not {k: v for k, v in offenders.items() if v}


def long_functions() -> dict[str, int]:
    found = {}
    for path in project_files():
        for node in ast.walk(parsed(path)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_LINES:
                    found[f"{rel(path)}::{node.name}"] = length
    return found


def test_no_function_over_60_lines():
    too_long = {k: v for k, v in long_functions().items() if k not in LONG_PARSERS | LONG_TO_SPLIT}
    assert not too_long, f"split these into functions of at most {MAX_LINES} lines: {too_long}"


@pytest.mark.parametrize("source,expected", [
    ("import scoring.report\n", {"scoring.report"}),
    ("from scoring.report import git_commit\n", {"scoring.report", "scoring.report.git_commit"}),
    ("def f():\n    from cli import run\n", {"cli", "cli.run"}),
    ("from . import loop\n", set()),
])
def test_the_import_scan_sees_every_form(tmp_path, source, expected):
    path = tmp_path / "m.py"
    path.write_text(source)
    assert imported_modules(path) == expected


def test_the_length_check_counts_lines(tmp_path, monkeypatch):
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_LINES))
    (tmp_path / "m.py").write_text(f"def long():\n{body}\ndef short():\n    pass\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    assert long_functions() == {"m.py::long": MAX_LINES + 1}
