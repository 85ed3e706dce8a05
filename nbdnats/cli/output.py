"""What commands print: progress on a terminal line, results as JSON lines or summaries.

Results go to stdout only as JSON (``--json``) or ids a script reads; the summaries people
read go to stderr, so stdout stays free for data (``recv -`` writes the image there).
Sizes are written by ``nbdnats.units.human``.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, TextIO, TypeVar

import msgspec

from nbdnats import _core
from nbdnats.schemas import TransferEvent
from nbdnats.units import human

T = TypeVar("T")


def print_json(obj: Any, out: TextIO | None = None) -> None:
    """``obj`` as one JSON line (what every ``--json`` prints), flushed for a reader that
    follows the lines as they come."""
    out = out or sys.stdout
    out.write(msgspec.json.encode(obj).decode() + "\n")
    out.flush()


def reader_gone() -> NoReturn:
    """stdout's reader went away (``... | head -5``): end quietly, as coreutils and the nats
    CLI do, with the status of a death by SIGPIPE (141). stdout now goes nowhere, so the
    interpreter's last flush has nothing to complain about."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    raise SystemExit(128 + signal.SIGPIPE)


def print_rows(rows: Sequence[T], line: Callable[[T], str], *, as_json: bool) -> None:
    """A list a query answered: one JSON line with --json, else a ``line`` per row."""
    if as_json:
        print_json(rows)
    else:
        sys.stdout.write("".join(line(row) + "\n" for row in rows))


def print_result(
    doc: Any, summary: str | None, *, as_json: bool, out: TextIO | None = None
) -> None:
    """A finished command's result: ``doc`` as a JSON line on ``out`` (stdout) with
    ``--json``, else the ``summary`` line on stderr (None: quiet)."""
    if as_json:
        print_json(doc, out)
    elif summary is not None:
        sys.stderr.write(summary + "\n")


def print_started(key: str, ident: str, *, as_json: bool) -> None:
    """The id of what a detached command started, on stdout (``{key: ident}`` with --json)."""
    if as_json:
        print_json({key: ident})
    else:
        sys.stdout.write(ident + "\n")


class _TerminalLine:
    """One line redrawn in place on a terminal; nothing at all when the stream is not one."""

    def __init__(self, stream: TextIO | None, enabled: bool | None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self._drawn = False

    def draw(self, text: str) -> None:
        self.stream.write("\r" + text)
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False


class ProgressBar(_TerminalLine):
    """One end's transfer as a bar: bytes, rate, ETA."""

    def __init__(self, stream: TextIO | None = None, enabled: bool | None = None) -> None:
        super().__init__(stream, enabled)
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
        self.draw(
            f"[{bar}] {pct:5.1f}%  {human(done)} / {human(size)}  "
            f"{human(rate)}/s  ETA {int(eta) // 60}:{int(eta) % 60:02d} "
        )


class EndsProgress(_TerminalLine):
    """Both ends of a ctl operation, as their agents report them, on one line."""

    def __init__(self, enabled: bool) -> None:
        super().__init__(None, None if enabled else False)
        self.ends: dict[str, TransferEvent] = {}

    def __call__(self, ev: TransferEvent) -> None:
        if not self.enabled:
            return
        self.ends[ev.role] = ev
        parts = [
            f"{e.node} {e.role} {human(e.done_bytes)}/{human(e.size)} {e.state}"
            for e in self.ends.values()
        ]
        self.draw("  ".join(parts) + "   ")
