"""What commands print: progress on a terminal line, results as JSON lines or summaries.

Results go to stdout only as JSON (``--json``) or ids a script reads; the summaries people
read go to stderr, so stdout stays free for data (``recv -`` writes the image there).
Sizes, rates and times are written by ``nbdnats.units`` (``human``, ``rate``, ``clock``).
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, TextIO, TypeVar

import msgspec

from nbdnats import _core
from nbdnats.planes import redact_url
from nbdnats.schemas import TransferEvent
from nbdnats.transfer import WAITING_STATES
from nbdnats.units import clock, human, rate

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


def progress_text(done: int, size: int, seconds: float) -> str:
    """Bar, percent, bytes, rate and ETA: the progress line of every command (local ends
    and ctl operations alike). ``size`` > 0."""
    pct = min(100.0, 100.0 * done / size)
    speed = done / seconds if seconds > 0 else 0.0
    eta = (size - done) / speed if speed > 0 else None
    width = 24
    filled = min(width, width * done // size)
    bar = "#" * filled + "-" * (width - filled)
    return (
        f"[{bar}] {pct:5.1f}%  {human(done)} / {human(size)}  "
        f"{rate(done, seconds)}  ETA {clock(eta)}"
    )


class _TerminalLine:
    """One line redrawn in place on a terminal; nothing at all when the stream is not one."""

    def __init__(self, stream: TextIO | None, enabled: bool | None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self._drawn = 0  # the length of the text on the line

    def draw(self, text: str) -> None:
        # Blanks over what a longer line before left (the waiting line under the bar).
        self.stream.write("\r" + text + " " * (self._drawn - len(text)))
        self.stream.flush()
        self._drawn = len(text)

    def close(self) -> None:
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = 0


class ProgressBar(_TerminalLine):
    """One end's transfer as a bar: bytes, rate, ETA. Until the peer answers, a line saying
    what it waits for, where (``where``: the server list, passwords masked) and how long it
    will still wait (``timeout``, 0: forever), redrawn about once a second."""

    def __init__(
        self,
        stream: TextIO | None = None,
        enabled: bool | None = None,
        *,
        where: str | None = None,
        timeout: float = 0.0,
    ) -> None:
        super().__init__(stream, enabled)
        self.where = redact_url(where) if where else None
        self.timeout = timeout
        self._last = 0.0
        self._waiting_since: float | None = None
        self._handshake = False

    def __call__(self, stats: _core.Stats) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if stats.state in WAITING_STATES:
            if not self._handshake:
                self._waiting(stats, now)
            return
        self._handshake = True
        if stats.size == 0:
            return
        if now - self._last < 0.2 and stats.state == "running":
            return
        self._last = now
        self.draw(progress_text(stats.done_bytes, stats.size, stats.seconds) + " ")

    def _waiting(self, stats: _core.Stats, now: float) -> None:
        # Shown from a second of waiting on: a peer that is there answers before.
        if self._waiting_since is None:
            self._waiting_since = self._last = now
        if now - self._last < 1.0:
            return
        self._last = now
        peer = "receiver" if stats.role == "send" else "sender"
        text = f"waiting for the {peer} of {stats.transfer_id}"
        if self.where:
            text += f" on {self.where}"
        if self.timeout > 0:
            left = max(0, math.ceil(self.timeout - (now - self._waiting_since)))
            text += f", {left} s left"
        self.draw(text)


class PercentLines:
    """``--progress=FD``: ``N/100`` lines on file descriptor ``fd``, as nbdcopy writes them:
    from the handshake on, each time the whole percent grows, ``100/100`` once the transfer
    is done. A reader that goes away stops the lines, not the transfer. Fed one end's stats,
    or one end's ctl events."""

    def __init__(self, fd: int) -> None:
        self.fd: int | None = fd
        self._last = -1

    def __call__(self, stats: _core.Stats | TransferEvent) -> None:
        if self.fd is None or stats.state in WAITING_STATES:
            return
        if stats.state == "done":
            pct = 100
        elif stats.size == 0:
            return
        else:
            pct = min(99, 100 * stats.done_bytes // stats.size)
        if pct <= self._last:
            return
        self._last = pct
        try:
            os.write(self.fd, f"{pct}/100\n".encode())
        except OSError:
            self.fd = None


def fan_out(*callbacks: Callable[[T], None] | None) -> Callable[[T], None]:
    """One progress callback calling each of ``callbacks`` (None: skipped)."""
    chosen = [c for c in callbacks if c is not None]

    def call(value: T) -> None:
        for c in chosen:
            c(value)

    return call


class EndsProgress(_TerminalLine):
    """Both ends of a ctl operation, as their agents report them, on one line: the bar of
    the end furthest along (the receiver once it knows the size), then the two nodes."""

    def __init__(self, enabled: bool, *, forced: bool = False) -> None:
        """``enabled``: on a terminal; ``forced``: anywhere (``--progress``)."""
        super().__init__(None, True if forced else None if enabled else False)
        self.ends: dict[str, TransferEvent] = {}

    def __call__(self, ev: TransferEvent) -> None:
        if not self.enabled:
            return
        self.ends[ev.role] = ev
        self.draw(ends_text(self.ends) + " ")


def ends_text(ends: dict[str, TransferEvent]) -> str:
    """The line ``EndsProgress`` draws for the latest event of each end (by role)."""
    nodes = " -> ".join(e.node for e in sorted(ends.values(), key=lambda e: e.role != "send"))
    moving = [e for e in (ends.get("recv"), ends.get("send")) if e is not None and e.size > 0]
    if not moving:
        return "  ".join(f"{e.node} {e.role} {e.state}" for e in ends.values())
    e = moving[0]
    return f"{progress_text(e.done_bytes, e.size, e.seconds)}  {nodes}"
