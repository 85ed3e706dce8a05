"""Byte sizes and durations as people type them, checked once at the edge.

Sizes: 4096, 4K, 4KiB, 1.5G, 2MB (binary multiples, as qemu-img), at most ``MAX_SIZE``
(below 2^63: what every size, offset and length of the core and of NBD holds).
Printed: sizes in binary units (``human``), rates in MB/s (``rate``), times as m:ss (``clock``).
Rate caps: a size per second (50M: 50 MiB/s; ``/s`` may follow), more than 0 and at most
``MAX_RATE`` (the core's, 1 TiB/s).
Timeouts: seconds, finite, from 0 to ``MAX_TIMEOUT`` (a week); what reaches a sleep or the
core's clock is never NaN, infinite or negative.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable
from decimal import Decimal, InvalidOperation

from nbdnats import _core
from nbdnats.errors import UsageError

MAX_SIZE = 2**63 - 1
MAX_TIMEOUT = 7 * 86400.0
MAX_DURATION = 100 * 365 * 86400.0  # dates this far off still compute
MAX_RATE: int = _core.MAX_RATE

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(?:i?B)?\s*$", re.IGNORECASE)
_POWER = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4, "P": 5}


def _size(text: str) -> int:
    """The size ``text`` says, or ``ValueError`` with what is wrong with it."""
    m = _SIZE.match(text)
    if not m:
        raise ValueError("is not a size: use bytes or a suffix like 4M, 1G, 512K")
    # Exact arithmetic: a float would round big sizes and overflow on long digit strings.
    value = Decimal(m.group(1)) * 1024 ** _POWER[m.group(2).upper()]
    if value != value.to_integral_value():
        raise ValueError("is not a whole number of bytes")
    if value > MAX_SIZE:
        raise ValueError("is more than the largest size, 2^63 - 1 bytes (8 EiB)")
    return int(value)


def _rate(text: str) -> int:
    """The rate cap ``text`` says in bytes/s, or ``ValueError`` with what is wrong with it."""
    body = text.strip()
    if body[-2:].lower() == "/s":
        body = body[:-2]
    try:
        value = _size(body)
    except ValueError:
        value = -1
    if not 0 < value <= MAX_RATE:
        raise ValueError(
            "is not a rate cap: use bytes per second above 0, with a suffix like 512K, 50M or "
            "1G (binary, per second), at most 1T (1 TiB/s)"
        )
    return value


def parse_rate(text: str, what: str = "rate") -> int:
    """A rate cap in bytes/s (``50M``: 50 MiB/s) from 1 to ``MAX_RATE``."""
    try:
        return _rate(text)
    except ValueError as e:
        raise UsageError(f"invalid {what}: {text!r} {e}") from None


def rate_arg(text: str) -> int:
    """argparse ``type`` of ``--rate``: one line saying what is wrong, exit 2."""
    try:
        return _rate(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r} {e}") from None


def _timeout(text: str, zero: bool) -> float:
    try:
        value = float(Decimal(text.strip()))
    except (InvalidOperation, ValueError):
        value = math.nan
    low = 0.0 if zero else math.ulp(0.0)
    if not (math.isfinite(value) and low <= value <= MAX_TIMEOUT):
        lowest = "from 0 (no limit)" if zero else "more than 0 and up"
        raise ValueError(f"is not a number of seconds {lowest} to {MAX_TIMEOUT:.0f} (7 days)")
    return value


def parse_size(text: str, what: str = "size") -> int:
    try:
        return _size(text)
    except ValueError as e:
        raise UsageError(f"invalid {what}: {text!r} {e}") from None


def parse_timeout(text: str, what: str = "timeout", *, zero: bool = True) -> float:
    """Seconds from 0 (when ``zero``: no limit) or more, up to ``MAX_TIMEOUT``."""
    try:
        return _timeout(text, zero)
    except ValueError as e:
        raise UsageError(f"invalid {what}: {text!r} {e}") from None


def size_arg(text: str) -> int:
    """argparse ``type`` of a size option: one line saying what is wrong, exit 2."""
    try:
        return _size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r} {e}") from None


def _timeout_arg(zero: bool) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            return _timeout(text, zero)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"{text!r} {e}") from None

    return parse


timeout_arg = _timeout_arg(zero=True)
"""argparse ``type`` of a timeout in seconds, 0 meaning no limit."""
interval_arg = _timeout_arg(zero=False)
"""argparse ``type`` of an interval in seconds, more than 0."""


def count_arg(text: str) -> int:
    """argparse ``type`` of a count or sequence number: 1 to 2^63 - 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_SIZE:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number from 1 to 2^63 - 1")
    return value


def human(n: float) -> str:
    """A size in binary units (KiB, MiB, as qemu-img): every size a command prints."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def rate(done: float, seconds: float) -> str:
    """Bytes moved in ``seconds`` as a rate in MB/s (10^6 bytes/s, as nbdcopy and the
    ``mb_per_s`` of ``--json`` reports): every rate a command prints, bar and summary alike."""
    return f"{done / seconds / 1e6 if seconds > 0 else 0.0:.1f} MB/s"


def clock(seconds: float | None) -> str:
    """A duration as ``m:ss`` (``h:mm:ss`` from an hour), ``--:--`` when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "--:--"
    s = int(seconds)
    if s >= 3600:
        return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
    return f"{s // 60}:{s % 60:02d}"


_DURATION = re.compile(r"^\s*(\d{1,9}(?:\.\d{1,9})?)\s*(s|m|h|d)?\s*$", re.IGNORECASE)
_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str, what: str = "duration") -> float:
    """Seconds from ``90``, ``90s``, ``30m``, ``2h``, ``1d``."""
    m = _DURATION.match(text)
    seconds = float(m.group(1)) * _SECONDS[(m.group(2) or "").lower()] if m else 0.0
    if not 0 < seconds <= MAX_DURATION:
        raise UsageError(
            f"invalid {what} {text!r}: use a positive number with s, m, h or d, at most 100 years"
        )
    return seconds
