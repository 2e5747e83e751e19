"""A one-line progress bar with images/s and ETA on a terminal; silent when stderr is not a TTY."""
from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """Call update(n) as images finish; close() ends the line."""

    def __init__(self, total: int, stream: TextIO | None = None, enabled: bool | None = None, every: float = 0.2):
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.total, self.done, self.every = total, 0, every
        self.start = time.perf_counter()
        self._last = 0.0

    def update(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if self.enabled and (now - self._last >= self.every or self.done >= self.total):
            self._last = now
            self.stream.write("\r" + self.line(now - self.start))
            self.stream.flush()

    def line(self, elapsed: float) -> str:
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        width = 30
        filled = int(width * self.done / self.total) if self.total else width
        eta_text = f"{int(eta // 60):d}:{int(eta % 60):02d}" if eta != float("inf") else "--:--"
        return f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {rate:7.1f} img/s ETA {eta_text}"

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()
