"""The NATS data path of a live migration: QEMU's sockets stay local, only NATS crosses.

    source host                                              destination host
    QEMU mirror ─NBD─► bridge nbd-<i>.sock ══ data.blk.<id>-disk<i> ══► recv ─NBD─► QEMU export
    QEMU migrate ────► bridge migration.sock ══ data.blk.<id>-ram ════► recv ────► migrate-incoming

One transfer per disk (the core's NBD server: a write is answered once the destination
wrote it, FLUSH once everything before it is) and one for the migration stream. The
destination's ends are ordinary receivers of the core (an NBD export, ``unix:PATH``); both
ends run in this process on one data connection (``nbd-nats migrate``).

``drain()`` runs in the switchover, after the mirrors' NBD clients disconnected and before
the migration completes: it waits until every disk transfer has ended with the
destination flushed and the digests compared, so the destination's disks are complete and
durable before its guest can run.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from typing import Any

from nbdnats import _core
from nbdnats.errors import MigrationError, NbdNatsError
from nbdnats.migrate import Sockets
from nbdnats.planes import Planes
from nbdnats.transfer import TransferHandle, start_bridge, start_recv

DRAIN_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
# The streams' peer timeout: never below the keepalive period several times over.
MIN_STREAM_TIMEOUT = 10.0


class NatsPath:
    mode = "nats"

    def __init__(
        self,
        planes: Planes,
        migration_id: str,
        *,
        window: int = _core.DEFAULT_WINDOW,
        timeout: float = 60.0,
        socket_dir: str | None = None,
    ) -> None:
        self.planes = planes
        self.migration_id = migration_id
        self.window = window
        self.timeout = max(timeout, MIN_STREAM_TIMEOUT) if timeout else 0.0
        self._parent = socket_dir
        self._dirs: list[str] = []
        self.disks: list[tuple[TransferHandle, TransferHandle]] = []
        self.stream: tuple[TransferHandle, TransferHandle] | None = None

    def _mkdir(self, side: str) -> str:
        d = tempfile.mkdtemp(prefix=f"nbdnats-{side}-", dir=self._parent)
        self._dirs.append(d)
        return d

    async def listen(self) -> Sockets:
        d = self._mkdir("dst")
        return Sockets(nbd=f"{d}/nbd.sock", migration=f"{d}/migration.sock")

    async def start(self, destination: Sockets, exports: dict[str, int]) -> Sockets:
        src = self._mkdir("src")
        common: dict[str, Any] = {
            "planes": self.planes,
            "window": self.window,
            "timeout": self.timeout,
        }
        per_export: dict[str, str] = {}
        for i, (name, size) in enumerate(exports.items()):
            tid = f"{self.migration_id}-disk{i}"
            rx = await start_recv(
                f"nbd+unix:///{name}?socket={destination.nbd}", transfer_id=tid, **common
            )
            sock = f"{src}/nbd-{i}.sock"
            tx = await start_bridge("nbd", sock, transfer_id=tid, size=size, **common)
            self.disks.append((tx, rx))
            per_export[name] = sock
        tid = f"{self.migration_id}-ram"
        rx = await start_recv(f"unix:{destination.migration}", transfer_id=tid, **common)
        tx = await start_bridge("stream", f"{src}/migration.sock", transfer_id=tid, **common)
        self.stream = (tx, rx)
        return Sockets(nbd="", migration=f"{src}/migration.sock", nbd_exports=per_export)

    async def drain(self) -> None:
        """Every disk transfer ends (its NBD client is gone): destination flushed, digests
        equal. A failure here fails the migration before it completes."""
        ends = [h for pair in self.disks for h in pair]
        try:
            await asyncio.wait_for(asyncio.gather(*(h.wait() for h in ends)), DRAIN_TIMEOUT)
        except TimeoutError:
            raise MigrationError(
                f"the disks' streams did not finish within {DRAIN_TIMEOUT:g} s"
            ) from None
        except NbdNatsError as e:
            raise MigrationError(f"a disk's stream failed: {e}") from e

    def moved(self) -> tuple[int, int]:
        """(disk bytes, migration stream bytes) acknowledged by the destination so far."""
        disk = sum(tx.stats().done_bytes for tx, _ in self.disks)
        ram = self.stream[0].stats().done_bytes if self.stream else 0
        return disk, ram

    async def close(self) -> None:
        """Let finished streams finish (the migration stream ends when the source closes
        it); cancel the rest, which ends their connections and frees a stuck request."""
        ends = [h for pair in self.disks for h in pair]
        if self.stream:
            ends += list(self.stream)
        if ends:
            # Every outcome is collected (a failed end's error included), once.
            waits = [asyncio.ensure_future(_quietly(h)) for h in ends]
            _, late = await asyncio.wait(waits, timeout=STOP_TIMEOUT / 2)
            for h in ends:
                if not h.done():
                    h.cancel()
            if late:
                await asyncio.wait(late, timeout=STOP_TIMEOUT)
        self.disks, self.stream = [], None
        for d in self._dirs:
            shutil.rmtree(d, ignore_errors=True)
        self._dirs.clear()


async def _quietly(h: TransferHandle) -> None:
    with contextlib.suppress(Exception):
        await h.wait()
