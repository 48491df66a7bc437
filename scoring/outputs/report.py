"""Result files: JSON written atomically, tables as Markdown + CSV, and the run's environment.

The environment (git commit, package versions) lives in :mod:`provenance`, shared with training;
it is re-exported here for the scoring code.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from common import fileio
from common.provenance import PACKAGES, environment, git_commit, versions

__all__ = ["PACKAGES", "environment", "git_commit", "json_ready", "markdown_table", "versions", "write_csv",
           "write_json", "write_table", "write_text_atomic"]


def json_ready(value):
    """``value`` with NaN/inf replaced by None (in dicts and lists), so the JSON stays standard."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value


def write_text_atomic(path: Path, text: str) -> None:
    """UTF-8 text via :func:`fileio.write_text_atomic`: readers never see half a file, and the file
    has the permissions of any new file (umask), not ``mkstemp``'s 0600."""
    fileio.write_text_atomic(path, text)


def write_json(path: Path, record: dict) -> None:
    write_text_atomic(path, json.dumps(json_ready(record), indent=2) + "\n")


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_table(base: Path, header: list[str], rows: list[list[object]]) -> None:
    """``base.md`` (Markdown table) and ``base.csv``."""
    write_text_atomic(base.with_suffix(".md"), markdown_table(header, rows) + "\n")
    write_csv(base.with_suffix(".csv"), header, [[str(c).replace("**", "") for c in row] for row in rows])


def write_csv(path: Path, header: list[str], rows: list[list[object]]) -> None:
    """A CSV file (quoted where a cell holds a comma, quote or newline), written atomically."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    write_text_atomic(path, buffer.getvalue())
