"""Ctrl-C during training: stop at the next safe point instead of wherever the signal lands.

Python raises ``KeyboardInterrupt`` at an arbitrary bytecode. Landing inside ``torch.save``
corrupts the zip writer (a ``RuntimeError`` with a traceback instead of a clean stop), and
once in CI a Ctrl-C right after a checkpoint was lost and the run went on to exit 0 (probably
swallowed in a ``__del__``, where Python ignores exceptions). :class:`StopRequest` turns the first Ctrl-C
into a flag that the loop checks after each step and after each save; a second Ctrl-C
interrupts at once, for a user who does not want to wait for the step.
"""

from __future__ import annotations

import signal
import threading

from tqdm import tqdm


class StopRequest:
    """Context manager: while active, the first SIGINT sets :attr:`requested` instead of raising."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def install(self) -> StopRequest:
        # Signal handlers can only be installed from the main thread (tests may train elsewhere).
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def restore(self) -> None:
        """Put back the SIGINT handler that was there before :meth:`install`."""
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def __enter__(self) -> StopRequest:
        return self.install()

    def __exit__(self, *exc_info) -> None:
        self.restore()

    def _on_sigint(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        tqdm.write("Ctrl-C: stopping after this step and saving (press Ctrl-C again to stop at once)")

    def check(self) -> None:
        """Raise ``KeyboardInterrupt`` here, at a safe point, if a stop was requested."""
        if self.requested:
            raise KeyboardInterrupt


def ignore_sigint_in_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: a terminal's Ctrl-C reaches the whole process group, and
    a worker that dies of it makes the main process fail with "worker exited unexpectedly"
    instead of saving; the main process shuts the workers down itself."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
