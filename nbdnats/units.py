"""Byte sizes as people type them: 4096, 4K, 4KiB, 1.5G, 2MB (binary multiples, as qemu-img)."""

from __future__ import annotations

import re

from nbdnats.errors import UsageError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(?:i?B)?\s*$", re.IGNORECASE)
_POWER = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4, "P": 5}


def parse_size(text: str, what: str = "size") -> int:
    m = _SIZE.match(text)
    if not m:
        raise UsageError(f"invalid {what} {text!r}: use bytes or a suffix like 4M, 1G, 512K")
    value = float(m.group(1)) * 1024 ** _POWER[m.group(2).upper()]
    if value != int(value):
        raise UsageError(f"invalid {what} {text!r}: not a whole number of bytes")
    return int(value)


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)?\s*$", re.IGNORECASE)
_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str, what: str = "duration") -> float:
    """Seconds from ``90``, ``90s``, ``30m``, ``2h``, ``1d``."""
    m = _DURATION.match(text)
    if not m or float(m.group(1)) <= 0:
        raise UsageError(f"invalid {what} {text!r}: use a positive number with s, m, h or d")
    return float(m.group(1)) * _SECONDS[(m.group(2) or "").lower()]
