"""A one-line progress bar on a terminal (bytes, rate, ETA); silent on pipes."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from nbdnats import _core
from nbdnats.units import human


class ProgressBar:
    def __init__(self, stream: TextIO | None = None, enabled: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self._drawn = False
        self._last = 0.0

    def __call__(self, stats: _core.Stats) -> None:
        if not self.enabled or stats.size == 0 or stats.state == "waiting":
            return
        now = time.monotonic()
        if now - self._last < 0.2 and stats.state == "running":
            return
        self._last = now
        done, size = stats.done_bytes, stats.size
        pct = 100.0 * done / size
        rate = done / stats.seconds if stats.seconds > 0 else 0.0
        eta = (size - done) / rate if rate > 0 else 0.0
        width = 24
        filled = int(width * done / size)
        bar = "#" * filled + "-" * (width - filled)
        line = (
            f"\r[{bar}] {pct:5.1f}%  {human(done)} / {human(size)}  "
            f"{human(rate)}/s  ETA {int(eta) // 60}:{int(eta) % 60:02d} "
        )
        self.stream.write(line)
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False
