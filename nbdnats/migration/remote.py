"""Live migration between two hosts' agents (``nbd-nats ctl migrate a:VM b``).

The source's agent runs the whole orchestration (``nbdnats.migration.run``) with its own
QEMU's monitor, and reaches the destination's through the destination's agent:

- ``RemoteQmp`` stands in for the destination's monitor: each command is a
  ``ctl.cmd.<b>.qmp`` request, events come from ``ctl.qry.<b>.qmp-events``.
- ``AgentPath`` is the NATS path with the destination's ends (receivers, sockets) in the
  destination's agent (``ctl.cmd.<b>.incoming``).

The destination's agent answers both with ``nbdnats.migration.incoming.Incoming``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any, Literal

from nats.aio.client import Client

from nbdnats import subjects
from nbdnats.ctl.request import request
from nbdnats.errors import MigrationError, NbdNatsError
from nbdnats.migration.paths import NatsPath, Sockets
from nbdnats.migration.qmp import EventLog
from nbdnats.planes import Planes
from nbdnats.schemas import (
    IncomingCommand,
    IncomingReply,
    QmpCommand,
    QmpEvents,
    QmpEventsQuery,
    QmpReply,
    raise_for,
)

REQUEST_TIMEOUT = 40.0  # a relayed QMP command waits up to 30 s for QEMU
EVENT_POLL = 0.1
AGENT_GONE = 5.0  # seconds the destination's agent may not answer before it counts as gone


class RemoteQmp(EventLog):
    """The destination's monitor, through its agent."""

    side = "destination"

    def __init__(
        self, nc: Client, node: str, vm: str, migration_id: str, changed: asyncio.Event
    ) -> None:
        self.nc, self.node, self.vm, self.migration_id = nc, node, vm, migration_id
        self.address = f"{node}:{vm}"
        self.events = []
        self._changed = changed
        self._alive = False
        self._poll: asyncio.Task[None] | None = None

    @property
    def alive(self) -> bool:
        return self._alive

    async def connect(self, timeout: float) -> None:
        await self._fetch()
        self._poll = asyncio.create_task(self._pump())

    async def _fetch(self) -> None:
        query = QmpEventsQuery(migration_id=self.migration_id, vm=self.vm, since=len(self.events))
        subject = subjects.ctl_query(self.node, "qmp-events")
        got = await request(self.nc, subject, query, QmpEvents, timeout=REQUEST_TIMEOUT)
        now = time.monotonic()
        for ev in got.events:
            self.events.append((now - ev.age, {"event": ev.event, "data": ev.data}))  # type: ignore[arg-type]
        if got.events or got.alive != self._alive:
            self._changed.set()
        self._alive = got.alive

    async def _pump(self) -> None:
        """Fetch events; an agent that stays unreachable counts as a QEMU gone away."""
        since_ok = time.monotonic()
        while True:
            await asyncio.sleep(EVENT_POLL)
            try:
                await self._fetch()
                since_ok = time.monotonic()
            except NbdNatsError:
                if self._alive and time.monotonic() - since_ok > AGENT_GONE:
                    self._alive = False
                    self._changed.set()

    async def cmd(self, name: str, /, **args: Any) -> Any:
        msg = QmpCommand(migration_id=self.migration_id, vm=self.vm, command=name, arguments=args)
        subject = subjects.ctl_command(self.node, "qmp")
        reply = await request(self.nc, subject, msg, QmpReply, timeout=REQUEST_TIMEOUT, check=False)
        raise_for(reply, self.node, command=name)
        return reply.result

    async def status(self) -> str:
        return str((await self.cmd("query-status"))["status"])

    async def close(self) -> None:
        if self._poll is not None:
            self._poll.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poll


class AgentPath(NatsPath):
    """The NATS path with the destination's receivers in the destination's agent."""

    def __init__(self, planes: Planes, node: str, vm: str, migration_id: str, **kw: Any) -> None:
        super().__init__(planes, migration_id, **kw)
        self.node, self.vm = node, vm

    async def _incoming(
        self, action: Literal["listen", "recv", "close"], exports: dict[str, int] | None = None
    ) -> IncomingReply:
        msg = IncomingCommand(
            migration_id=self.migration_id,
            vm=self.vm,
            action=action,
            exports=exports or {},
            timeout=self.timeout,
        )
        subject = subjects.ctl_command(self.node, "incoming")
        return await request(self.planes.ctl, subject, msg, IncomingReply, timeout=REQUEST_TIMEOUT)

    async def listen(self) -> Sockets:
        reply = await self._incoming("listen")
        assert reply.nbd is not None and reply.migration is not None
        return Sockets(nbd=reply.nbd, migration=reply.migration)

    async def start_receivers(self, destination: Sockets, exports: dict[str, int]) -> None:
        await self._incoming("recv", exports)

    async def close_receivers(self) -> None:
        await self._incoming("close")


__all__ = ["AgentPath", "MigrationError", "RemoteQmp"]
