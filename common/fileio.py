"""The one way this project replaces a file: atomically, with ordinary permissions, no litter.

Checkpoints, memory banks and result files are all written by :func:`atomic_write`: the bytes go
to a temporary file in the same folder (so the final ``os.replace`` is a rename on one file
system), are fsynced, and only then replace the target. A crash, a full disk or a kill at any
moment leaves either the old file or the new one, never half of one.

Why not ``tempfile.mkstemp``: it creates the file with mode 0600 whatever the umask, so
checkpoints and results could not be read by a colleague or a service. The temporary
file is created here with mode ``0o666`` and the kernel applies the umask (or the folder's
default ACL), exactly as for a file made with ``open(path, "w")``.

A process killed mid-write leaves its temporary file. The name records who wrote it,
``.<name>.<pid>.<host>.<random>.tmp``, so the next write of ``<name>`` removes the temporaries of
processes on this host that are no longer alive (another host's pid says nothing here, so those
are left alone; so are unnamed temporaries younger than a day, as written by older versions).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

# Write failures a user can fix by freeing space or choosing another folder.
WRITE_ERRNOS = {errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EDQUOT, errno.EPERM, errno.ENOTDIR, errno.EEXIST,
                errno.EISDIR}

# Unnamed temporaries (``tempfile.mkstemp`` of earlier versions) carry no pid: removed once
# older than this, when no save can still be writing them.
UNNAMED_TEMP_MAX_AGE_S = 24 * 3600


def _host() -> str:
    """This machine's name as it goes into temporary names: no dots, at most 32 characters."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname().split(".")[0])[:32] or "host"


def temp_name(name: str) -> str:
    """``.<name>.<pid>.<host>.<random>.tmp``: hidden, and tells who wrote it."""
    return f".{name}.{os.getpid()}.{_host()}.{secrets.token_hex(4)}.tmp"


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this machine (another user's counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Remove the temporaries of ``path`` left by dead processes of this host; returns those removed."""
    path = Path(path)
    ours = re.compile(rf"^\.{re.escape(path.name)}\.(\d+)\.([A-Za-z0-9_-]+)\.[0-9a-f]+\.tmp$")
    unnamed = re.compile(rf"^\.{re.escape(path.name)}\.[A-Za-z0-9_]{{8}}\.tmp$")
    removed = []
    try:
        candidates = list(path.parent.glob(f".{glob_escape(path.name)}.*.tmp"))
    except OSError:
        return removed
    host, now = _host(), time.time()
    for temp in candidates:
        match = ours.match(temp.name)
        try:
            if match:
                pid, writer_host = int(match.group(1)), match.group(2)
                stale = writer_host == host and pid != os.getpid() and not pid_alive(pid)
            else:
                stale = bool(unnamed.match(temp.name)) and now - temp.lstat().st_mtime > UNNAMED_TEMP_MAX_AGE_S
            if stale:
                temp.unlink()
                removed.append(temp)
        except OSError:  # gone already, or not ours to remove: cleaning up must never fail a save
            continue
    return removed


def glob_escape(name: str) -> str:
    """``name`` with glob metacharacters bracketed, so that it matches only itself."""
    return re.sub(r"([*?\[])", r"[\1]", name)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(handle)`` on a temporary file next to ``path``, fsync it, then replace ``path``.

    The file gets the permissions of any new file (``0o666`` less the umask). On any failure the
    temporary file is removed and ``path`` is untouched; an ``OSError`` names ``path`` (not the
    temporary), so the one-line message says which output could not be written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    tmp = path.parent / temp_name(path.name)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(path)) from None
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OSError(exc.errno, exc.strerror, str(path)) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (best effort: some file systems refuse to open a folder)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    atomic_write(path, lambda handle: handle.write(data))


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """UTF-8 text, atomically (see :func:`atomic_write`)."""
    write_bytes_atomic(path, text.encode("utf-8"))


def no_space(path: str | os.PathLike, detail: str) -> OSError:
    """The ``OSError`` a failed write becomes when the writer hid the cause (``torch.save`` does)."""
    return OSError(errno.ENOSPC, f"write failed, the disk is probably full: {detail}", str(path))


def aside_path(run_dir: Path) -> Path:
    """``<name>.old-<date>-<time>`` next to ``run_dir`` (``-2``, ``-3`` ... when taken): where a run's
    files are moved aside instead of being deleted (training and scoring ``--overwrite``)."""
    run_dir = Path(run_dir).resolve()  # "." and "/" have no name to extend
    base = run_dir.with_name(f"{run_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
    candidate, n = base, 1
    while candidate.exists() or candidate.is_symlink():
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate
