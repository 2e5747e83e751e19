"""Graceful stop: the first SIGINT or SIGTERM asks a run to stop taking inputs and commit what is in flight; a second
one leaves at once (the command line exits the process; a library caller, say a notebook, gets KeyboardInterrupt
instead of losing its interpreter).

Handlers are installed only while a run is going, and only from the main thread (Python delivers signals there);
elsewhere a run simply has no graceful stop.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from types import FrameType
from typing import Any, Callable

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class RunInterrupted(Exception):
    """A run stopped by a signal after committing what was in flight; exit code 128 + the signal's number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class GracefulStop:
    """Context manager: `requested` becomes the first stop signal's number; the second calls `on_abort` (which
    must be quick), then exits the process at once with 128 + its number (exit_at_once) or raises
    KeyboardInterrupt."""

    def __init__(self, exit_at_once: bool = False, prog: str = "gradcam run"):
        self.exit_at_once = exit_at_once
        self.prog = prog
        self.requested: int | None = None
        self.on_abort: Callable[[int], None] | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested is None:
            self.requested = signum
            return
        if not self.exit_at_once:
            if self.on_abort is not None:
                self.on_abort(signum)
            raise KeyboardInterrupt
        try:
            if self.on_abort is not None:
                self.on_abort(signum)
        finally:
            sys.stderr.write(f"{self.prog}: stopped at once by a second {signal_name(signum)}; rows not yet "
                             "committed are lost, rerun the same command to resume\n")
            sys.stderr.flush()
            os._exit(128 + signum)
