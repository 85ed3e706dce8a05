"""The destination's side of a migration between agents (``nbd-nats ctl migrate a:VM b``),
run by the destination host's agent for the source's (``nbdnats.migration.remote``).

It relays **only** what a migration's destination needs, for VMs its admin named
(``--vm NAME=QMP``): queries, the capabilities ``events`` and ``late-block-activate``,
``nbd-server-start`` on the socket it chose, ``block-export-add`` of that VM's nodes as
``nbdnats-*`` exports, ``migrate-incoming`` on its socket, ``nbd-server-stop``, ``cont``
once the migration was loaded, and ``quit`` only while the QEMU still waits for the
migration — a QEMU running a guest is never stopped from the network. The migration's
receivers (``ctl.cmd.<node>.incoming``) run here, with the timeout the source asked for.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from nbdnats import subjects
from nbdnats.errors import NbdNatsError, PolicyError, QmpCommandError, SchemaError
from nbdnats.migration.disks import EXPORT, PREFIX
from nbdnats.migration.paths import Sockets, destination_sockets, start_receivers, stop_all
from nbdnats.migration.qmp import WAITING_FOR_MIGRATION, Qmp, event_data
from nbdnats.schemas import (
    IncomingCommand,
    IncomingReply,
    QmpCommand,
    QmpEvent,
    QmpEvents,
    QmpEventsQuery,
    QmpReply,
)
from nbdnats.transfer import TransferHandle

CAPABILITIES = {"events", "late-block-activate", "return-path"}


@dataclass
class _Session:
    vm: str
    qmp: Qmp
    directory: str
    sockets: Sockets
    receivers: list[TransferHandle] = field(default_factory=list)
    nbd_started: bool = False


class Incoming:
    """The migrations this agent receives: a QMP session per migration, its sockets and
    receivers."""

    def __init__(self, planes_of: Any, vms: dict[str, str]) -> None:
        self._planes_of = planes_of  # a callable giving the agent's Planes
        self.vms = vms
        self.sessions: dict[str, _Session] = {}
        self._changed = asyncio.Event()

    async def _session(self, migration_id: str, vm: str) -> _Session:
        subjects.check_token(migration_id, "migration id")
        session = self.sessions.get(migration_id)
        if session is not None:
            if session.vm != vm:
                raise PolicyError(f"migration {migration_id} is of VM {session.vm}, not {vm}")
            return session
        if vm not in self.vms:
            known = ", ".join(sorted(self.vms)) or "none"
            raise PolicyError(f"no VM {vm!r} on this node (its agent knows: {known}; --vm)")
        qmp = Qmp("destination", self.vms[vm], self._changed)
        await qmp.connect(10.0)
        # Only a QEMU waiting for an incoming migration: holding the monitor of one that
        # runs a guest would lock its owner out (QMP serves one client at a time).
        status = await qmp.status()
        if status != "inmigrate":
            await qmp.close()
            raise PolicyError(
                f"VM {vm} here is {status}, not waiting for an incoming migration "
                "(start it with -incoming defer)"
            )
        directory = tempfile.mkdtemp(prefix=f"nbdnats-in-{migration_id}-")
        session = _Session(vm, qmp, directory, destination_sockets(directory))
        self.sessions[migration_id] = session
        return session

    async def qmp(self, cmd: QmpCommand) -> QmpReply:
        try:
            session = await self._session(cmd.migration_id, cmd.vm)
            await self._allowed(session, cmd.command, cmd.arguments)
            result = await session.qmp.cmd(cmd.command, **cmd.arguments)
        except QmpCommandError as e:
            error = str(e).split(": ", 2)[-1]
            return QmpReply(ok=False, code="qmp", error=error, error_class=e.error_class)
        except NbdNatsError as e:
            return QmpReply(ok=False, code=e.code, error=str(e))
        return QmpReply(ok=True, result=result)

    async def _allowed(self, s: _Session, command: str, args: dict[str, Any]) -> None:
        """Only what a migration's destination needs, with the arguments it expects."""

        def deny(why: str) -> PolicyError:
            return PolicyError(f"QMP {command} refused: {why}")

        if command in ("query-status", "query-block", "query-migrate"):
            return
        if command == "nbd-server-stop":
            if not s.nbd_started:
                raise deny("only the NBD server this migration started")
            return
        if command == "migrate-set-capabilities":
            caps = args.get("capabilities") or []
            if not all(isinstance(c, dict) and c.get("capability") in CAPABILITIES for c in caps):
                raise deny(f"only {', '.join(sorted(CAPABILITIES))} may be set")
            return
        if command == "nbd-server-start":
            if args != {"addr": {"type": "unix", "data": {"path": s.sockets.nbd}}}:
                raise deny("only on the socket this agent chose for the migration")
            s.nbd_started = True
            return
        if command == "block-export-add":
            nodes = {
                b["inserted"]["node-name"]
                for b in await s.qmp.cmd("query-block")
                if b.get("inserted") and not b["inserted"].get("ro")
            }
            names = {str(args.get("id")), str(args.get("name"))}
            if (
                args.get("type") != "nbd"
                or not all(n.startswith(EXPORT.format("")) for n in names)
                or args.get("node-name") not in nodes
                or set(args) - {"type", "id", "name", "node-name", "writable"}
            ):
                raise deny("only the VM's writable disks, as nbdnats- NBD exports")
            return
        if command == "migrate-incoming":
            if args != {"uri": f"unix:{s.sockets.migration}"}:
                raise deny("only on the socket this agent chose for the migration")
            return
        if command in ("cont", "quit"):
            status = await s.qmp.status()
            if command == "quit" and status not in WAITING_FOR_MIGRATION:
                raise deny(f"the QEMU is {status}; only one still waiting for the migration")
            if command == "cont" and not s.qmp.find("MIGRATION", 0, _completed):
                raise deny("the migration has not been loaded")
            return
        raise deny("not a command a migration's destination needs")

    async def events(self, q: QmpEventsQuery) -> QmpEvents:
        session = await self._session(q.migration_id, q.vm)
        now = time.monotonic()
        evs = [
            QmpEvent(event=str(ev["event"]), data=event_data(ev), age=now - at)
            for at, ev in session.qmp.events[max(q.since, 0) :]
        ]
        return QmpEvents(events=evs, alive=session.qmp.alive)

    async def incoming(self, cmd: IncomingCommand) -> IncomingReply:
        try:
            if cmd.action == "close":
                await self.close(cmd.migration_id)
                return IncomingReply(ok=True)
            s = await self._session(cmd.migration_id, cmd.vm)
            if cmd.action == "recv":
                if s.receivers:
                    raise SchemaError(f"migration {cmd.migration_id} already receives")
                for name in cmd.exports:
                    if not name.startswith(PREFIX):
                        raise PolicyError(f"export {name!r} is not one of a migration")
                s.receivers = await start_receivers(
                    cmd.migration_id,
                    s.sockets,
                    cmd.exports,
                    planes=self._planes_of(),
                    timeout=cmd.timeout,
                )
            return IncomingReply(ok=True, nbd=s.sockets.nbd, migration=s.sockets.migration)
        except NbdNatsError as e:
            return IncomingReply(ok=False, code=e.code, error=str(e))

    async def close(self, migration_id: str) -> None:
        s = self.sessions.pop(migration_id, None)
        if s is None:
            return
        await stop_all(s.receivers)
        await s.qmp.close()
        shutil.rmtree(s.directory, ignore_errors=True)

    async def close_all(self) -> None:
        for mid in list(self.sessions):
            await self.close(mid)


def _completed(data: dict[str, Any]) -> bool:
    return data.get("status") == "completed"
