"""QEMU's monitor as a migration uses it: commands with timeouts and one-line errors, events
kept in arrival order, and the statuses that tell where a VM or its migration stands.

:class:`Monitor` is what the orchestration needs of a monitor; :class:`Qmp` is a local QMP
socket, ``nbdnats.migration.remote.RemoteQmp`` the destination's monitor relayed by its
agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any, Protocol

from qemu.qmp import (
    ConnectError,
    EventListener,
    ExecuteError,
    Message,
    QMPClient,
    QMPError,
    Runstate,
)

from nbdnats.errors import MigrationError, MigrationTimeout, QmpCommandError, UsageError

# One QMP command's answer; rollback steps; how often counters are polled.
COMMAND_TIMEOUT = 30.0
CLEANUP_TIMEOUT = 10.0
POLL_INTERVAL = 0.25

# query-migrate's statuses of a migration under way (migrate_cancel applies), and while
# it is being cancelled.
MIGRATION_ACTIVE = frozenset({"setup", "active", "pre-switchover", "device"})
MIGRATION_ENDING = MIGRATION_ACTIVE | {"cancelling"}
# query-status of a QEMU that waits for an incoming migration (or failed to load one): it
# never ran the guest, so it may be told to quit.
WAITING_FOR_MIGRATION = frozenset({"inmigrate", "prelaunch"})
# A source VM a migration may have left paused: before the switchover, or finishing.
PAUSED_BY_MIGRATION = frozenset({"paused", "finish-migrate"})


def event_data(event: Message) -> dict[str, Any]:
    """An event's ``data``, or an empty dict for an event without any."""
    data = event.get("data")
    return data if isinstance(data, dict) else {}


def device_is(job: str) -> Callable[[dict[str, Any]], bool]:
    """A match for :meth:`EventLog.find`: the event is about block job ``job``."""
    return lambda data: data.get("device") == job


class EventLog:
    """A QEMU's events in arrival order, with the (monotonic) time each arrived."""

    events: list[tuple[float, Message]]

    def find(
        self, name: str, since: int, match: Callable[[dict[str, Any]], bool]
    ) -> dict[str, Any] | None:
        """The data of the first event ``name`` at or after index ``since`` that matches."""
        for _, ev in self.events[since:]:
            if ev["event"] == name and match(event_data(ev)):
                return event_data(ev)
        return None

    def arrived(self, name: str, since: int = 0) -> float | None:
        for at, ev in self.events[since:]:
            if ev["event"] == name:
                return at
        return None


class Monitor(Protocol):
    """What a migration needs of a QEMU's monitor, local or relayed by an agent."""

    side: str
    events: list[tuple[float, Message]]

    @property
    def alive(self) -> bool:
        """False once the monitor's connection is gone (the QEMU, or its agent)."""
        ...

    def find(
        self, name: str, since: int, match: Callable[[dict[str, Any]], bool]
    ) -> dict[str, Any] | None: ...

    def arrived(self, name: str, since: int = 0) -> float | None: ...

    async def connect(self, timeout: float) -> None: ...

    async def cmd(self, name: str, /, **args: Any) -> Any:
        """Run a QMP command; raises QmpCommandError when QEMU refuses it."""
        ...

    async def status(self) -> str: ...

    async def close(self) -> None:
        """Let go of the monitor. Must not raise."""
        ...


class Qmp(EventLog):
    """One QEMU's monitor on a local QMP socket."""

    def __init__(self, side: str, address: str, changed: asyncio.Event) -> None:
        self.side = side
        self.address = address
        self.client = QMPClient(side)
        self.events: list[tuple[float, Message]] = []
        self._changed = changed
        self._listener = EventListener()
        self._pump: asyncio.Task[None] | None = None

    async def connect(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self.client.connect(self.address), timeout or None)
        except TimeoutError:
            raise MigrationError(
                f"the {self.side} QMP socket {self.address} did not greet within {timeout:g} s "
                "(QEMU serves one QMP client at a time: is another one connected?)"
            ) from None
        except ConnectError as e:
            cause = e.exc if e.exc is not None else e
            raise UsageError(
                f"cannot connect to the {self.side} QMP socket {self.address}: {cause}"
            ) from None
        self.client.register_listener(self._listener)
        self._pump = asyncio.create_task(self._pump_events())

    async def _pump_events(self) -> None:
        async for event in self._listener:
            self.events.append((time.monotonic(), event))
            self._changed.set()

    @property
    def alive(self) -> bool:
        return self.client.runstate == Runstate.RUNNING

    async def cmd(self, name: str, /, **args: Any) -> Any:
        timeout = COMMAND_TIMEOUT
        try:
            return await asyncio.wait_for(self.client.execute(name, args or None), timeout)
        except ExecuteError as e:
            raise QmpCommandError(f"{self.side} QEMU: {name}: {e}", e.error_class) from None
        except TimeoutError:
            raise MigrationTimeout(
                f"{self.side} QEMU did not answer {name} within {timeout:g} s"
            ) from None
        except QMPError:
            raise MigrationError(
                f"{self.side} QEMU went away (its QMP connection closed) during {name}"
            ) from None

    async def status(self) -> str:
        return str((await self.cmd("query-status"))["status"])

    async def close(self) -> None:
        if self._pump:
            self._pump.cancel()
            with contextlib.suppress(BaseException):
                await self._pump
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.client.disconnect(), CLEANUP_TIMEOUT)


async def resume(src: Monitor) -> None:
    """Restart the source VM if the migration left it paused (QEMU restarts it itself
    after migrate_cancel; a pause-before-switchover or finish may still hold it)."""
    if await src.status() in PAUSED_BY_MIGRATION:
        await src.cmd("cont")


async def quit_destination(dst: Monitor) -> None:
    """Quit the destination QEMU — only while it still waits for (or failed) an incoming
    migration, so it never ran the guest."""
    if not dst.alive:
        return
    status = await dst.status()
    if status not in WAITING_FOR_MIGRATION:
        raise MigrationError(f"left the destination alone: its status is {status}")
    with contextlib.suppress(MigrationError):
        await dst.cmd("quit")
