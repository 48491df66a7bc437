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
import re
import shlex
from pathlib import Path
from urllib.parse import quote

from .report import json_ready, write_text_atomic
from .writing import METRIC_COLUMNS, format_metric, metric_means

WEB = Path(__file__).with_name("web")
PAGE_FILE = "index.html"
SCRIPTS = ("inference_concatenation.py", "inference_multiplication.py")
# Flags of the recorded command that a re-run at another threshold leaves out: its own output
# folder (that one holds this run) and threshold; --save-detector takes an optional path.
DROPPED = {"--out": True, "--overwrite": False, "--threshold": True, "--save-detector": None}
CATEGORY_FLAGS = ("--c", "--category")  # replaced by the page's own category (one of --c all's)


# Content-Security-Policy of the two pages: nothing from outside the page's folder; the summary
# page has no pictures and no script.
PAGE_POLICY = "default-src 'none'; img-src 'self' file: data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"
SUMMARY_POLICY = "default-src 'none'; style-src 'unsafe-inline'"


def asset(name: str) -> str:
    return (WEB / name).read_text(encoding="utf-8")


def html_page(title: str, policy: str, body: str) -> str:
    """The page shell (``web/shell.html``) around ``body``, with the shared style. One pass over the
    shell: what is put in (the script, the data) is never searched for placeholders itself."""
    values = {"__TITLE__": html.escape(title), "__POLICY__": html.escape(policy, quote=True),
              "__STYLE__": asset("page.css"), "__BODY__": body}
    return re.sub("|".join(values), lambda match: values[match.group(0)], asset("shell.html"))


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


def rerun_command(record: dict) -> str:
    """The scoring command that gives this run's verdicts at another threshold, without the
    ``--threshold`` the page appends: the run's own inference command (this category only, a new
    output folder), or one made from the record (``main.py --eval`` takes no ``--threshold``)."""
    try:
        words = shlex.split(record.get("command") or "")
    except ValueError:  # a command recorded before it was quoted
        words = []
    if words and Path(words[0]).name in SCRIPTS:
        out, i = ["python", words[0]], 1
        while i < len(words):
            flag, has_value, _ = words[i].partition("=")
            i += 1
            if flag not in DROPPED and flag not in CATEGORY_FLAGS:
                out.append(words[i - 1])
                continue
            takes = DROPPED.get(flag, True)  # True: a value, False: none, None: an optional one
            if not has_value and takes is not False and i < len(words) and (takes or not words[i].startswith("-")):
                i += 1
            if flag in CATEGORY_FLAGS:
                out += ["--c", record["category"]]
        return shlex.join(out)
    settings = record.get("settings", {})
    out = ["python", f"inference_{record['fusion']}.py", "--p", record.get("checkpoint", {}).get("path", "CHECKPOINT")]
    if record.get("data", {}).get("root"):
        out += ["--data-root", record["data"]["root"]]
    out += ["--c", record["category"]]
    if settings.get("recipe", "paper") != "paper":
        out += ["--recipe", settings["recipe"]]
    if "images" in record:
        out += ["--images", record["images"]["folder"]]
    return shlex.join(out)


def page_title(record: dict) -> str:
    what = "new images" if "images" in record else "test set"
    return f"{record['category']} ({record['fusion']}, {what})"


def write_page(out_dir: Path, record: dict) -> Path:
    """Write ``out_dir/index.html`` for the run whose ``results.json`` record is ``record``
    (after its CSV and panels are written); returns its path."""
    data = {"record": record, "rows": image_rows(out_dir, record),
            "threshold": (record.get("threshold") or {}).get("value"), "rerun": rerun_command(record)}
    title = page_title(record)
    body = asset("page.html").replace("__HEADING__", html.escape(title), 1)
    body += f'<script id="run-data" type="application/json">{script_json(data)}</script>\n'
    body += f"<script>\n{asset('page.js')}</script>\n"
    text = html_page(title, PAGE_POLICY, body)
    path = out_dir / PAGE_FILE
    write_text_atomic(path, text)
    return path


def summary_row(record: dict, base: Path) -> str:
    page = record.get("files", {}).get("page")
    name = html.escape(record["category"])
    if page:
        link = html.escape(quote(Path(os.path.relpath(page, base.parent)).as_posix()), quote=True)
        name = f'<a href="{link}">{name}</a>'
    cells = [format_metric(record["metrics"].get(key)) for key, _ in METRIC_COLUMNS]
    cells.append(f"{record['timings']['s_per_test_image'] * 1000:.0f}")
    return f"<tr><td>{name}</td>" + "".join(f'<td class="num">{c}</td>' for c in cells) + "</tr>"


def write_summary_page(path: Path, records: list[dict], fusion: str) -> Path:
    """``path`` (``summary-<fusion>.html``): one row per category with its metrics, linking its page."""
    header = "".join(f"<th>{html.escape(name)}</th>" for name in
                     ["category", *(name for _, name in METRIC_COLUMNS), "ms / test image"])
    rows = "\n".join(summary_row(record, path) for record in records)
    means = [format_metric(value) for value in metric_means(records).values()]
    means.append(f"{sum(r['timings']['s_per_test_image'] for r in records) / len(records) * 1000:.0f}")
    rows += "\n<tr><th>mean</th>" + "".join(f'<th class="num">{m}</th>' for m in means) + "</tr>"
    body = (f"<h1>Scoring summary ({html.escape(fusion)})</h1>\n"
            f"<p>{len(records)} categories; each name opens its run's page.</p>\n"
            f'<table class="summary"><thead><tr>{header}</tr></thead><tbody>\n{rows}\n</tbody></table>')
    text = html_page(f"Scoring summary ({fusion})", SUMMARY_POLICY, body)
    write_text_atomic(path, text)
    return path
