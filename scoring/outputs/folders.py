"""Where a scoring run writes its files, without ever replacing another run's results.

A run's *identity* is what its numbers and pictures depend on: the checkpoint's content
(sha256), the category, the fusion, the data it scored (test set, or an ``--images`` folder by
its files' contents) and the scoring settings. It is written as ``.identity.json`` into the
output folder before anything else, so even a run that was killed half-way can be recognised.

- Default folder ``results/<p>/<fusion>``: versioned as anomalib does, ``v0``, ``v1``, ... with
  a ``latest`` link to the newest. A run with the identity of an existing version writes into
  that version (the files it writes again are replaced, the others, e.g. heatmaps of an earlier
  run with pictures, are kept and its tables still name them: they are the same run's); any other
  identity gets the next version, so results of another checkpoint, other settings or other images
  are never replaced.
- ``--out DIR``: exactly that folder, the same way; results of another run there are only
  replaced with ``--overwrite``, which moves them to ``DIR.old-<date>-<time>`` first (as
  training's ``--overwrite`` does): nothing is deleted.
- A folder whose run was killed before ``results.json`` (``.identity.json`` and no results) is
  unfinished: the next run of that identity clears it first, so no partial file stays beside it.
- :func:`run_folder` publishes a run only when it succeeds: ``latest`` moves then, and a run that
  fails leaves no new version behind (and ``latest`` where it was).

Clearing and moving aside touch only the files a scoring run writes (:data:`RUN_FILES`), never anything else.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

from common import fileio
from common.errors import SettingError, UserError

from .report import write_json

IDENTITY_FILE = ".identity.json"
LOCK_FILE = ".scoring.lock"  # held while a run writes (not a result: never cleared or moved)
LATEST = "latest"
# Everything a scoring run may write into its folder (files and folders).
RUN_FILES = ("results.json", "results.md", "results.csv", "image_scores.csv", "scores.csv", "maps.npz",
             "roc.png", "heatmaps", "index.html", "summary.md", "summary.csv", "summary.json", "summary.html",
             "eval.md", "eval.csv", IDENTITY_FILE)
_VERSION = re.compile(r"^v(\d+)$")


def _read_identity(folder: Path) -> dict | None:
    try:
        return json.loads((folder / IDENTITY_FILE).read_text())
    except (OSError, ValueError):
        return None


def holds_results(folder: Path) -> bool:
    """Whether ``folder`` holds files a scoring run writes (this version's or an older layout's)."""
    return folder.is_dir() and any((folder / name).exists() for name in RUN_FILES)


def clear_run_files(folder: Path) -> None:
    """Remove what a scoring run wrote into ``folder`` (and only that)."""
    for name in RUN_FILES:
        target = folder / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()


def _make(folder: Path) -> None:
    """``folder`` and its parents; a place that can hold no folder is a :class:`SettingError`."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        if exc.errno in fileio.WRITE_ERRNOS:  # a full disk, no permission: the command line's "cannot write"
            raise
        # e.g. under /proc: no such place can hold files
        raise SettingError("out", str(folder), f"cannot be made ({exc.strerror}); choose a folder you can "
                                               "write") from None


def _claim(folder: Path, identity: dict) -> Path:
    """Write this run's identity into ``folder`` first (made if need be)."""
    if folder.exists() and not folder.is_dir():
        raise SettingError("out", str(folder), "is a file, not a folder; give a folder for the results")
    _make(folder)
    write_json(folder / IDENTITY_FILE, identity)
    return folder


def versions(base: Path) -> list[tuple[int, Path]]:
    """``[(n, base/vn), ...]`` sorted by n."""
    if not base.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in base.iterdir() if p.is_dir() and (m := _VERSION.match(p.name))]
    return sorted(found)


def point_latest(base: Path, target: Path) -> None:
    """``base/latest`` -> ``target`` (a relative link, replaced atomically)."""
    link = base / LATEST
    tmp = base / f".{LATEST}.{os.getpid()}.tmp"
    try:
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(target.name, target_is_directory=True)
        os.replace(tmp, link)
    except OSError:  # e.g. a file system without links: the versions are still there
        tmp.unlink(missing_ok=True)


def chosen_version(base: Path, identity: dict) -> Path:
    """The version of ``base`` that holds ``identity``'s results, or the next new one (not made yet)."""
    existing = versions(base)
    for _, folder in existing:
        if _read_identity(folder) == identity:
            return folder
    return base / f"v{existing[-1][0] + 1 if existing else 0}"


def versioned_dir(base: Path, identity: dict) -> Path:
    """The version of ``base`` that holds ``identity``'s results, or a new one; ``latest`` points to it."""
    chosen = _claim(chosen_version(base, identity), identity)
    point_latest(base, chosen)
    return chosen


def move_run_files_aside(folder: Path) -> Path:
    """Move what a scoring run wrote into ``folder`` (and only that) to ``<folder>.old-<date>-<time>``,
    as training's ``--overwrite`` does with a run folder: nothing is deleted."""
    aside = fileio.aside_path(folder)
    aside.mkdir()
    for name in RUN_FILES:
        target = folder / name
        if target.exists() or target.is_symlink():
            os.replace(target, aside / name)
    return aside


def unfinished(folder: Path) -> bool:
    """A folder a run claimed and never finished (killed before ``results.json``): its files are
    partial, whatever they are."""
    return (folder / IDENTITY_FILE).exists() and not (folder / "results.json").exists()


def explicit_dir(folder: Path, identity: dict, overwrite: bool, flag: str = "--out") -> Path:
    """``--out DIR``: reused by a re-run of the same identity (an unfinished one's files cleared first);
    another run's results need ``--overwrite``, and are then moved to ``DIR.old-<date>-<time>``."""
    if holds_results(folder) and _read_identity(folder) != identity:
        if not overwrite:
            if (folder / IDENTITY_FILE).exists():
                what = "results of another checkpoint or other settings"
            else:
                held = [name for name in RUN_FILES if (folder / name).exists()]
                what = f"files a scoring run writes ({', '.join(held[:3])}) of no run it knows"
            raise UserError(f"{flag} {folder} holds {what}; pass "
                            f"--overwrite to move them aside (to {folder.name}.old-<date>-<time>), or choose "
                            f"another {flag}")
        aside = move_run_files_aside(folder)
        print(f"{flag} {folder}: the earlier results moved to {aside}", file=sys.stderr)
    elif unfinished(folder):
        clear_run_files(folder)
    return _claim(folder, identity)


@contextlib.contextmanager
def run_folder(base: Path, identity: dict, explicit: bool, overwrite: bool) -> Iterator[Path]:
    """The folder a scoring run writes into (:func:`explicit_dir` for a folder the user named, else the
    version :func:`chosen_version` picks), published only if the run succeeds: then ``latest``
    points to it. If the run fails, a folder it made is removed again (in a folder that held no
    results, what it wrote), so no empty or half-written version is left, and ``latest`` stays."""
    target = base if explicit else chosen_version(base, identity)
    made = not target.exists()
    with writing_lock(target):  # made here when new: a refusal or a failure below removes it again
        if not explicit and unfinished(target):  # a run of this identity killed half-way: start it clean
            clear_run_files(target)
        held = holds_results(target)
        try:
            folder = explicit_dir(base, identity, overwrite) if explicit else _claim(target, identity)
            yield folder
        except BaseException:
            if made:
                shutil.rmtree(target, ignore_errors=True)
            elif not held:  # a folder of the user's own files: only what this run wrote goes
                clear_run_files(target)
            raise
    if not explicit:
        point_latest(base, folder)


@contextlib.contextmanager
def writing_lock(folder: Path) -> Iterator[None]:
    """Hold ``folder/.scoring.lock`` (made with the folder if need be) while a run writes there: a
    second run of the same identity is refused instead of clearing a live run's files as unfinished.
    The lock goes with its process, so a killed run's folder is free for the next one."""
    if folder.exists() and not folder.is_dir():
        raise SettingError("out", str(folder), "is a file, not a folder; give a folder for the results")
    _make(folder)
    handle = (folder / LOCK_FILE).open("a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise UserError(f"{folder} is being written by another scoring run of the same checkpoint and settings "
                        "right now; wait for it to finish (its results will be there)") from None
    try:
        yield
    finally:
        handle.close()  # closing releases the lock
