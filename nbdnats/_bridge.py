"""Turn the core's ``done(ok, value)`` callbacks into asyncio futures.

The core calls ``done`` from one of its own threads; we hop onto the event loop with
``call_soon_threadsafe`` so the loop is never blocked and never touched from elsewhere.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
from collections.abc import Callable
from typing import TypeVar

from nbdnats import _core
from nbdnats.errors import from_code

# The core's threads must not call into Python once it starts finalizing (CPython aborts
# the process): stop them from doing so, and wait for the calls under way, while the
# interpreter is still whole.
atexit.register(_core.shutdown)

T = TypeVar("T")
Done = Callable[[bool, object], None]


def _settle(fut: asyncio.Future[object], ok: bool, value: object) -> None:
    if fut.done():
        return
    if ok:
        fut.set_result(value)
    else:
        assert isinstance(value, tuple) and len(value) == 3
        code, message, from_peer = value
        fut.set_exception(from_code(str(code), str(message), from_peer=bool(from_peer)))


def core_call(start: Callable[[Done], T]) -> tuple[T, asyncio.Future[object]]:
    """Start a core operation; returns its handle and a future of its outcome."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[object] = loop.create_future()

    def done(ok: bool, value: object) -> None:
        # A closed loop raises RuntimeError: nobody is waiting any more.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(_settle, fut, ok, value)

    return start(done), fut
