"""How a migration's byte streams get from the source's QEMU to the destination's.

Two streams cross: the mirror's NBD connection (one per disk) and the migration stream.
:class:`Path` is what the orchestration needs of a way across; :class:`DirectPath` joins
the unix sockets directly (both QEMUs on one host: the baseline), :class:`NatsPath` keeps
each side's sockets local to its host and only NATS crosses:

    source host                                              destination host
    QEMU mirror ─NBD─► bridge nbd-<i>.sock ══ data.blk.<id>-disk<i> ══► recv ─NBD─► QEMU export
    QEMU migrate ────► bridge migration.sock ══ data.blk.<id>-ram ════► recv ────► migrate-incoming

One transfer per disk (the core's NBD server: a write is answered once the destination
wrote it, FLUSH once everything before it is) and one for the migration stream. The
destination's ends are ordinary receivers of the core (an NBD export, ``unix:PATH``); both
ends run in this process on one data connection (``nbd-nats migrate``), or the
destination's run in its agent (``nbdnats.migration.remote.AgentPath``).

``drain()`` runs in the handover, before the destination's NBD server stops and its guest
may run: it waits until every disk transfer has ended with the destination flushed and the
digests compared. Every write was acknowledged before the mirrors completed, so this
overlaps with the device state's transfer instead of lengthening the switchover.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any, Protocol

from nbdnats import _core, subjects
from nbdnats.errors import MigrationError, NbdNatsError
from nbdnats.planes import Planes
from nbdnats.transfer import TransferHandle, start_bridge, start_recv

DRAIN_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
# The streams' peer timeout: never below the keepalive period several times over.
MIN_STREAM_TIMEOUT = 10.0


@dataclass(frozen=True)
class Sockets:
    """Unix socket paths: the NBD server's and the migration stream's. A path may serve
    each export on a socket of its own (``nbd_exports``, by export name)."""

    nbd: str
    migration: str
    nbd_exports: dict[str, str] = field(default_factory=dict)

    def nbd_for(self, export: str) -> str:
        return self.nbd_exports.get(export, self.nbd)


class Path(Protocol):
    """How the mirror's NBD connection and the migration stream get from source to
    destination. Used in this order: ``listen``, then (once the destination QEMU listens
    on those sockets) ``start``, and ``close`` always."""

    mode: str

    async def listen(self) -> Sockets:
        """Sockets on the destination's host where its QEMU is to listen
        (``nbd-server-start``, ``migrate-incoming``)."""
        ...

    async def start(self, destination: Sockets, exports: dict[str, int]) -> Sockets:
        """Sockets on the source's host that the source QEMU is to connect to: the NBD
        client node of the mirror (one connection per export of ``exports``, name: size),
        and ``migrate``. What the source writes must reach the matching destination
        socket in order; an NBD write completes once the destination has it."""
        ...

    def set_rate(self, ram: int | None, disk: int | None) -> None:
        """Cap the streams this path carries (bytes/s, None: no cap): the migration
        stream at ``ram`` and each disk's at ``disk``, those running and those started
        later. A path without streams of its own has nothing to cap (QEMU's limits do)."""
        ...

    async def drain(self) -> None:
        """In the handover, before the destination's NBD server stops and its guest may
        run: return when the destination's disks hold and have flushed everything they
        were sent (the mirrors' NBD clients are gone by then)."""
        ...

    async def close(self) -> None:
        """Tear the path down, ending every connection through it; called after
        failures too, possibly twice. Must not raise."""
        ...


def destination_sockets(directory: str) -> Sockets:
    return Sockets(nbd=f"{directory}/nbd.sock", migration=f"{directory}/migration.sock")


class DirectPath:
    """Both QEMUs on this host: the source connects straight to the destination's
    sockets. No copy in between; the baseline the NATS path is measured against."""

    mode = "direct"

    def __init__(self, socket_dir: str | None = None) -> None:
        self._parent = socket_dir
        self._dir: str | None = None

    async def listen(self) -> Sockets:
        self._dir = tempfile.mkdtemp(prefix="nbdnats-mig-", dir=self._parent)
        return destination_sockets(self._dir)

    async def start(self, destination: Sockets, exports: dict[str, int]) -> Sockets:
        return destination

    def set_rate(self, ram: int | None, disk: int | None) -> None:
        return None  # the sockets are joined directly: QEMU's own limits cap them

    async def drain(self) -> None:
        return None  # QEMU's own NBD client flushed before it disconnected

    async def close(self) -> None:
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


class NatsPath:
    """Both ends in this process (``nbd-nats migrate``); ``nbdnats.migration.remote.AgentPath``
    puts the destination's ends in the destination host's agent."""

    mode = "nats"

    def __init__(
        self,
        planes: Planes,
        migration_id: str,
        *,
        window: int = _core.DEFAULT_WINDOW,
        timeout: float = _core.DEFAULT_TIMEOUT,
        socket_dir: str | None = None,
    ) -> None:
        self.planes = planes
        self.migration_id = migration_id
        self.window = window
        self.timeout = max(timeout, MIN_STREAM_TIMEOUT) if timeout else 0.0
        self._parent = socket_dir
        self._dirs: list[str] = []
        self.disk_senders: list[TransferHandle] = []
        self.ram_sender: TransferHandle | None = None
        self.handles: list[TransferHandle] = []
        self.ram_rate: int | None = None
        self.disk_rate: int | None = None

    def _mkdir(self, side: str) -> str:
        d = tempfile.mkdtemp(prefix=f"nbdnats-{side}-", dir=self._parent)
        self._dirs.append(d)
        return d

    def _options(self) -> dict[str, Any]:
        return {"planes": self.planes, "window": self.window, "timeout": self.timeout}

    # -- the destination's ends (overridden by AgentPath) --

    async def listen(self) -> Sockets:
        return destination_sockets(self._mkdir("dst"))

    async def start_receivers(self, destination: Sockets, exports: dict[str, int]) -> None:
        self.handles += await start_receivers(
            self.migration_id, destination, exports, **self._options()
        )

    async def close_receivers(self) -> None:
        return None  # they are among self.handles

    # -- the source's ends --

    async def start(self, destination: Sockets, exports: dict[str, int]) -> Sockets:
        await self.start_receivers(destination, exports)
        src = self._mkdir("src")
        mid = self.migration_id
        per_export: dict[str, str] = {}
        for i, (name, size) in enumerate(exports.items()):
            sock = f"{src}/nbd-{i}.sock"
            disk = subjects.migration_disk_id(mid, i)
            tx = await start_bridge(
                "nbd", sock, transfer_id=disk, size=size, rate=self.disk_rate, **self._options()
            )
            self.disk_senders.append(tx)
            self.handles.append(tx)
            per_export[name] = sock
        ram = subjects.migration_ram_id(mid)
        tx = await start_bridge(
            "stream",
            f"{src}/migration.sock",
            transfer_id=ram,
            return_id=subjects.return_id(ram),
            rate=self.ram_rate,
            **self._options(),
        )
        self.ram_sender = tx
        self.handles.append(tx)
        return Sockets(nbd="", migration=f"{src}/migration.sock", nbd_exports=per_export)

    def set_rate(self, ram: int | None, disk: int | None) -> None:
        self.ram_rate, self.disk_rate = ram, disk
        for h in self.disk_senders:
            if not h.done():
                h.set_rate(disk)
        if self.ram_sender is not None and not self.ram_sender.done():
            self.ram_sender.set_rate(ram)

    async def drain(self) -> None:
        """Every disk stream ends (its NBD client is gone): a sender ends once its receiver
        reported DONE, i.e. flushed the destination and found the digests equal. A failure
        here leaves the destination paused, and is reported."""
        try:
            await asyncio.wait_for(
                asyncio.gather(*(h.wait() for h in self.disk_senders)), DRAIN_TIMEOUT
            )
        except TimeoutError:
            raise MigrationError(
                f"the disks' streams did not finish within {DRAIN_TIMEOUT:g} s"
            ) from None
        except NbdNatsError as e:
            raise MigrationError(f"a disk's stream failed: {e}") from e

    async def close(self) -> None:
        """Let finished streams finish (the migration stream ends when the source closes
        it); cancel the rest, which ends their connections and frees a stuck request."""
        await stop_all(self.handles)
        self.handles, self.disk_senders, self.ram_sender = [], [], None
        with contextlib.suppress(Exception):
            await self.close_receivers()
        for d in self._dirs:
            shutil.rmtree(d, ignore_errors=True)
        self._dirs.clear()


async def start_receivers(
    migration_id: str, destination: Sockets, exports: dict[str, int], **options: Any
) -> list[TransferHandle]:
    """The destination's ends: a receiver per export into the destination QEMU's NBD
    server, and one for the migration stream into its migrate-incoming socket."""
    handles = []
    for i, name in enumerate(exports):
        uri = f"nbd+unix:///{name}?socket={destination.nbd}"
        disk = subjects.migration_disk_id(migration_id, i)
        handles.append(await start_recv(uri, transfer_id=disk, **options))
    ram = subjects.migration_ram_id(migration_id)
    migration = f"unix:{destination.migration}"
    handles.append(
        await start_recv(migration, transfer_id=ram, return_id=subjects.return_id(ram), **options)
    )
    return handles


async def stop_all(handles: list[TransferHandle]) -> None:
    """Collect every outcome (a failed end's error included, once); cancel what still runs
    after a short wait."""
    if not handles:
        return
    waits = [asyncio.ensure_future(_quietly(h)) for h in handles]
    _, late = await asyncio.wait(waits, timeout=STOP_TIMEOUT / 2)
    for h in handles:
        if not h.done():
            h.cancel()
    if late:
        await asyncio.wait(late, timeout=STOP_TIMEOUT)


async def _quietly(h: TransferHandle) -> None:
    with contextlib.suppress(Exception):
        await h.wait()
