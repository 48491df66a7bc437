"""Claiming run folders: one training per folder, and a finished run is never replaced unasked.

A run folder (``<ckpt-dir>/<category>-<arch>/``) that already holds a run (``model.pt``, another
``*.pt`` or ``log.jsonl``) is only written to when the user says how: ``--resume`` continues it,
``--overwrite`` first renames it to ``<run>.old-<date>-<time>`` (nothing is deleted) and starts a
new one. Without either the training stops before touching anything (a second
``python main.py`` used to empty log.jsonl and replace model.pt).

Two trainings writing the same folder would interleave their checkpoints and log lines, so
each run holds ``<run>/.lock`` for its whole life: an exclusive ``flock`` and the holder's pid in
the file. The kernel drops a ``flock`` when its process dies, however it dies (SIGKILL, power
loss aside), so a stale lock file from a killed run needs no clean-up: the next run just takes
it. On a file system without locks (some NFS setups) the run goes on with a warning.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import time
from pathlib import Path

from tqdm import tqdm

from common import fileio
from common.errors import UserError
from models.checkpoint import read_checkpoint

from .checkpoints import CHECKPOINT_NAME, check_not_fewer_epochs

LOCK_NAME = ".lock"
# What makes a folder hold a run: a checkpoint (ours, or e.g. the paper's e1600_model.pt) or a log.
LOG_NAME = "log.jsonl"
NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS}


def run_files(run_dir: Path) -> list[str]:
    """The files that make ``run_dir`` hold a run (checkpoints at its top and ``log.jsonl``), sorted."""
    if not run_dir.is_dir():
        return []
    return sorted(p.name for p in run_dir.iterdir()
                  if (p.suffix == ".pt" or p.name == LOG_NAME) and not p.name.startswith("."))


def lock_holder(run_dir: Path) -> str:
    """What the lock file says about its holder ("pid 123 on host since ..."), or "unknown"."""
    try:
        text = (run_dir / LOCK_NAME).read_text().strip()
    except OSError:
        text = ""
    return text.splitlines()[0] if text else "pid unknown"


def busy_message(run_dir: Path) -> str:
    return (f"{run_dir} is in use by another training ({lock_holder(run_dir)}; lock {run_dir / LOCK_NAME}); "
            "wait for it to end, or train into another --ckpt-dir")


def is_locked(run_dir: Path) -> bool:
    """Whether a live process holds ``run_dir``'s lock; looks only (creates nothing)."""
    try:
        fd = os.open(run_dir / LOCK_NAME, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # also drops the shared lock just taken
    return False


class RunLock:
    """The exclusive lock of one run folder, held from :meth:`acquire` to :meth:`release`."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.fd: int | None = None
        self.created_dir = False

    def acquire(self) -> RunLock:
        """Take the lock (creating the folder if needed); a live holder is a one-line ``UserError``."""
        if not self.run_dir.is_dir():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.created_dir = True
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise UserError(busy_message(self.run_dir)) from None
            except OSError as exc:
                if exc.errno not in NO_LOCKS:
                    os.close(fd)
                    raise
                tqdm.write(f"warning: cannot lock {self.path} (the file system has no locks); make sure no "
                           "other training writes to this folder")
            # The previous holder removes the file when it ends: a lock on its unlinked file
            # guards nothing, so take the lock again on the file now at the path.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.fd = fd
        stamp = f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
        os.ftruncate(fd, 0)
        os.pwrite(fd, stamp.encode(), 0)
        return self

    def release(self) -> None:
        """Remove the lock file and drop the lock; the folder goes too when this run made it and left it empty."""
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            if os.path.samestat(os.fstat(self.fd), os.stat(self.path)):
                self.path.unlink()
        os.close(self.fd)
        self.fd = None
        if self.created_dir:
            with contextlib.suppress(OSError):
                self.run_dir.rmdir()  # only succeeds when empty

    def start_over(self) -> Path:
        """Rename the (locked) run folder to ``<run>.old-<time>`` and lock a new, empty one; returns the old one's path.

        One ``rename`` of the whole folder, so the old run is never split between two folders.
        """
        aside = fileio.aside_path(self.run_dir)
        try:
            os.rename(self.run_dir, aside)
        except OSError as exc:
            raise UserError(f"--overwrite: cannot move {self.run_dir} aside to {aside} ({exc.strerror}); move "
                            "or delete it yourself, or choose another --ckpt-dir") from None
        old_fd, self.fd = self.fd, None
        try:
            self.acquire()
        finally:
            with contextlib.suppress(OSError):
                (aside / LOCK_NAME).unlink()
            if old_fd is not None:
                os.close(old_fd)
        return aside


def continues_run(resume: str | None, run_dir: Path) -> bool:
    """Whether ``--resume`` continues the run in ``run_dir`` (its own model.pt, or any file inside it)."""
    if not resume:
        return False
    if resume == "auto":
        return True
    return Path(os.path.abspath(run_dir)) in Path(os.path.abspath(resume)).parents


def resume_file(resume: str, run_dir: Path) -> Path:
    """The checkpoint ``--resume`` continues from in ``run_dir``."""
    return run_dir / CHECKPOINT_NAME if resume == "auto" else Path(resume)


def check_resume_epochs(path: Path, epochs: int) -> int:
    """Fewer epochs than ``path`` already holds is a ``SettingError``; returns those epochs (0: no file)."""
    if not path.is_file():
        return 0
    done = int(read_checkpoint(path).get("epoch", 0))
    check_not_fewer_epochs(epochs, done, path)
    return done


class RunClaim:
    """Every run folder of one ``main.py`` command, checked, locked and (``--overwrite``) moved aside.

    Everything is checked for all categories before the first one trains, and a refusal touches
    nothing. Use as a context manager: the locks are released on every way out (normal end,
    error, Ctrl-C).
    """

    def __init__(self, run_dirs: list[Path], resume: str | None, overwrite: bool, epochs: int | None = None,
                 why_overwrite: str = "--overwrite"):
        self.run_dirs = [Path(d) for d in run_dirs]
        self.resume, self.overwrite, self.epochs, self.why_overwrite = resume, overwrite, epochs, why_overwrite
        self.locks: list[RunLock] = []
        self.moved: dict[Path, Path] = {}

    def check(self) -> list[Path]:
        """The read-only checks; returns the folders ``--overwrite`` will move aside."""
        busy = [d for d in self.run_dirs if is_locked(d)]
        if busy:
            raise UserError(busy_message(busy[0]))
        held = {d: run_files(d) for d in self.run_dirs}
        held = {d: files for d, files in held.items() if files}
        if self.overwrite and self.resume:
            inside = [d for d in self.run_dirs if continues_run(self.resume, d)]
            if inside:
                raise UserError(f"--resume {self.resume} and --overwrite: choose one (--resume continues the run in "
                                f"{inside[0]}, --overwrite moves it aside and starts over)")
        refused = [d for d in held if not continues_run(self.resume, d)]
        if refused and not self.overwrite:
            files = ", ".join(sorted({f for d in refused for f in held[d]}))
            if len(refused) == 1:
                where, moved = f"{refused[0]} already holds a run ({files})", f"{refused[0]}.old-<date>-<time>"
            else:
                where = f"{', '.join(str(d) for d in refused)} already hold runs ({files})"
                moved = "<run>.old-<date>-<time>"
            if self.resume and self.resume != "auto":  # --resume FILE names another run's checkpoint
                raise UserError(f"{where}; --resume {self.resume} is not that run's checkpoint (it continues "
                                f"training from another file): give --resume without a file (or "
                                f"{refused[0] / CHECKPOINT_NAME}) to continue this run, --overwrite to move it aside "
                                f"to {moved} and start from {self.resume}, or choose another --ckpt-dir")
            raise UserError(f"{where}; add --resume to continue, --overwrite to start over (the old run is moved "
                            f"to {moved}, nothing is deleted), or choose another --ckpt-dir")
        if self.epochs is not None:
            for run_dir in self.run_dirs:
                if continues_run(self.resume, run_dir):
                    check_resume_epochs(resume_file(self.resume, run_dir), self.epochs)
        return refused

    def __enter__(self) -> RunClaim:
        self.check()
        try:
            for run_dir in self.run_dirs:
                self.locks.append(RunLock(run_dir).acquire())
            # Checked again under the locks: another command may have written in between.
            again = self.check_locked()
            for lock in self.locks:
                if lock.run_dir in again:
                    self.moved[lock.run_dir] = lock.start_over()
                    tqdm.write(f"{self.why_overwrite}: moved the previous run {lock.run_dir} aside to "
                               f"{self.moved[lock.run_dir]}")
                fileio.remove_stale_temps(lock.run_dir / CHECKPOINT_NAME)
        except BaseException:
            self.release()
            raise
        return self

    def check_locked(self) -> list[Path]:
        refused = [lock.run_dir for lock in self.locks
                   if run_files(lock.run_dir) and not continues_run(self.resume, lock.run_dir)]
        if refused and not self.overwrite:
            raise UserError(f"{refused[0]} now holds a run written by another command; add --resume to continue "
                            "it, --overwrite to start over, or choose another --ckpt-dir")
        return refused

    def release(self) -> None:
        while self.locks:
            self.locks.pop().release()

    def __exit__(self, *exc_info) -> None:
        self.release()
