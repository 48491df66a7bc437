"""The results page: ``index.html`` beside a scoring run's ``results.json``, and a summary page.

One self-contained HTML file per run (its style and script inline, the data as JSON in the page,
the heatmap panels referenced relatively), so it opens from the file system, offline, with no
server: a table of every image (sortable, filterable), the selected image's panel large
(keyboard: next / previous), a threshold slider that re-decides every verdict live with the
counts, precision / recall / F1 and the ``--threshold`` to reuse, the image ROC curve with the
operating point, the metrics, the settings and the provenance. The per-image data is read back
from the run's own ``image_scores.csv`` / ``scores.csv``, so the page shows what those files say.

``--c all`` adds ``summary-<fusion>.html``: the categories' metrics, each linking its run's page.
The script and style are files of their own in ``web/`` (plain JavaScript and CSS, no framework).
"""

from __future__ import annotations

import csv
import html
import json
import os
from pathlib import Path

from .report import json_ready, write_text_atomic
from .writing import METRIC_COLUMNS, format_metric

WEB = Path(__file__).with_name("web")
PAGE_FILE = "index.html"


def asset(name: str) -> str:
    return (WEB / name).read_text(encoding="utf-8")


def script_json(value) -> str:
    """``value`` as JSON that is safe inside a ``<script>`` element (no ``</script>`` or ``<!--``)."""
    text = json.dumps(json_ready(value), separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def image_rows(out_dir: Path, record: dict) -> list[dict]:
    """Per image, from the run's CSV: ``file`` (as shown), ``defect`` and ``label`` (test sets; else
    ``None``), ``score`` (the CSV's value), ``heatmap`` (the panel's path relative to the page)."""
    labelled = "images" not in record
    with (out_dir / ("image_scores.csv" if labelled else "scores.csv")).open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    folder = None if labelled else Path(record["images"]["folder"])
    out = []
    for row in rows:
        path = Path(row["path"])
        if labelled:
            shown = f"{row['defect']}/{path.name}"
        else:
            shown = path.relative_to(folder).as_posix() if path.is_relative_to(folder) else str(path)
        out.append({"file": shown, "defect": row.get("defect") if labelled else None,
                    "label": int(row["label"]) if labelled else None, "score": float(row["score"]),
                    "heatmap": row.get("heatmap") or None})
    return out


def page_title(record: dict) -> str:
    what = "new images" if "images" in record else "test set"
    return f"{record['category']} ({record['fusion']}, {what})"


def write_page(out_dir: Path, record: dict) -> Path:
    """Write ``out_dir/index.html`` for the run whose ``results.json`` record is ``record``
    (after its CSV and panels are written); returns its path."""
    data = {"record": record, "rows": image_rows(out_dir, record),
            "threshold": (record.get("threshold") or {}).get("value")}
    text = (asset("page.html")
            .replace("/*STYLE*/", asset("page.css"))
            .replace("/*SCRIPT*/", asset("page.js"))
            .replace("__TITLE__", html.escape(page_title(record)))
            .replace("__DATA__", script_json(data)))
    path = out_dir / PAGE_FILE
    write_text_atomic(path, text)
    return path


def summary_row(record: dict, base: Path) -> str:
    page = record.get("files", {}).get("page")
    name = html.escape(record["category"])
    if page:
        link = html.escape(Path(os.path.relpath(page, base.parent)).as_posix(), quote=True)
        name = f'<a href="{link}">{name}</a>'
    cells = [format_metric(record["metrics"].get(key)) for key, _ in METRIC_COLUMNS]
    cells.append(f"{record['timings']['s_per_test_image'] * 1000:.0f}")
    return f"<tr><td>{name}</td>" + "".join(f'<td class="num">{c}</td>' for c in cells) + "</tr>"


def write_summary_page(path: Path, records: list[dict], fusion: str) -> Path:
    """``path`` (``summary-<fusion>.html``): one row per category with its metrics, linking its page."""
    header = "".join(f"<th>{html.escape(name)}</th>" for name in
                     ["category", *(name for _, name in METRIC_COLUMNS), "ms / test image"])
    rows = "\n".join(summary_row(record, path) for record in records)
    body = (f"<h1>Scoring summary ({html.escape(fusion)})</h1>\n"
            f"<p>{len(records)} categories; each name opens its run's page.</p>\n"
            f'<table class="summary"><thead><tr>{header}</tr></thead><tbody>\n{rows}\n</tbody></table>')
    text = (asset("summary.html").replace("/*STYLE*/", asset("page.css"))
            .replace("__TITLE__", html.escape(f"Scoring summary ({fusion})")).replace("__BODY__", body))
    write_text_atomic(path, text)
    return path
