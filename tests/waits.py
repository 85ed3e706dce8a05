"""Waiting on a condition, never for a fixed time: CI runs on a shared machine where a sleep
long enough here is too short there."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


def wait_for(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.02)
    raise TimeoutError(f"{what} did not come up within {timeout}s")


async def until(check: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """``wait_for`` for a test running an event loop: polls without blocking it."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen within {timeout}s")
        await asyncio.sleep(0.02)
