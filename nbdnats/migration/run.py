"""``nbd-nats migrate``: live migration of a running QEMU VM, RAM and disks, over QMP.

The push flow libvirt and Proxmox use (docs/migration.md has the whole sequence):

destination (started by the user with ``-incoming defer``)
    migrate-set-capabilities events, late-block-activate; nbd-server-start on a local unix
    socket; block-export-add (writable) per disk; migrate-incoming unix:...
source
    migrate-set-capabilities events, pause-before-switchover; per disk blockdev-add an NBD
    client node and blockdev-mirror sync=full copy-mode=write-blocking; wait
    BLOCK_JOB_READY; migrate unix:...; at ``pre-switchover``: block-job-cancel (mirror
    complete, no pivot), wait BLOCK_JOB_COMPLETED, blockdev-del, migrate-continue
destination again
    wait for the migration to complete, nbd-server-stop, cont

The byte streams between the two QEMUs (the mirror's NBD connection and the migration
stream) go through a :class:`Path`. :class:`DirectPath` joins the unix sockets directly
(both QEMUs on one host: the baseline); the NATS path, where each side's sockets are local
to its host and only NATS crosses, implements the same interface.

Until the source reports the migration completed, any failure (or a cancellation) rolls
back: the migration and the mirror jobs are cancelled, the nodes this added are removed,
the source's capabilities restored and its VM left running, and the destination, which
never ran the guest, is told to quit. After that point the guest's state lives on the
destination and nothing is rolled back; the error says where things stand.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import enum
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path as FsPath
from typing import Any, Protocol, TypeVar

import msgspec
from qemu.qmp import (
    ConnectError,
    EventListener,
    ExecuteError,
    Message,
    QMPClient,
    QMPError,
    Runstate,
)

from nbdnats import _core
from nbdnats.errors import (
    MigrationError,
    MigrationTimeout,
    NbdNatsError,
    QmpCommandError,
    UsageError,
)
from nbdnats.subjects import check_token, new_id
from nbdnats.transfer import resolve_state_dir
from nbdnats.units import human, parse_size, timeout_arg

# How long a step may go without progress before the migration fails (--timeout).
DEFAULT_TIMEOUT = _core.DEFAULT_TIMEOUT
# One QMP command's answer; rollback steps; how often counters are polled.
COMMAND_TIMEOUT = 30.0
CLEANUP_TIMEOUT = 10.0
POLL_INTERVAL = 0.25
# Every job, node and export this adds in QEMU is named with this prefix, so a later
# `--cancel` finds exactly what a migration left.
PREFIX = "nbdnats-"
MIRROR_JOB = PREFIX + "mirror-{}"
TARGET_NODE = PREFIX + "target-{}"
EXPORT = PREFIX + "disk-{}"
MIGRATIONS_DIR = "migrations"

T = TypeVar("T")


class State(enum.Enum):
    """Where a migration is. Failures name the state they happened in."""

    CONNECTING = "connecting"
    INSPECTING = "inspecting"
    PREPARING = "preparing"
    MIRRORING = "mirroring"
    MIGRATING = "migrating"
    SWITCHOVER = "switchover"
    HANDOVER = "handover"
    DONE = "done"
    ROLLING_BACK = "rolling back"
    FAILED = "failed"


class MigrationReport(msgspec.Struct, kw_only=True):
    """What ``--json`` prints when a migration succeeds."""

    id: str
    mode: str
    disks: int
    total_seconds: float
    # QEMU's own figure (query-migrate "downtime"): from the source VM's stop until the
    # source finished sending; includes the switchover's block-job-cancel.
    downtime_ms: int
    # Measured here: the source VM's STOP event until the destination's RESUME event.
    paused_ms: int
    disk_bytes: int
    ram_bytes: int


@dataclass
class Progress:
    state: State
    disk_done: int = 0
    disk_total: int = 0
    ram_bytes: int = 0
    ram_remaining: int = 0


ProgressCallback = Callable[[Progress], None]


# --- the data path --------------------------------------------------------------------


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

    async def drain(self) -> None:
        """In the handover, before the destination's NBD server stops and its guest may
        run: return when the destination's disks hold and have flushed everything they
        were sent (the mirrors' NBD clients are gone by then)."""
        ...

    async def close(self) -> None:
        """Tear the path down, ending every connection through it; called after
        failures too, possibly twice. Must not raise."""
        ...


class DirectPath:
    """Both QEMUs on this host: the source connects straight to the destination's
    sockets. No copy in between; the baseline the NATS path is measured against."""

    mode = "direct"

    def __init__(self, socket_dir: str | None = None) -> None:
        self._parent = socket_dir
        self._dir: str | None = None

    async def listen(self) -> Sockets:
        self._dir = tempfile.mkdtemp(prefix="nbdnats-mig-", dir=self._parent)
        return Sockets(nbd=f"{self._dir}/nbd.sock", migration=f"{self._dir}/migration.sock")

    async def start(self, destination: Sockets, exports: dict[str, int]) -> Sockets:
        return destination

    async def drain(self) -> None:
        return None  # QEMU's own NBD client flushed before it disconnected

    async def close(self) -> None:
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


# --- QMP --------------------------------------------------------------------------------


class EventLog:
    """A QEMU's events in arrival order, with the (monotonic) time each arrived."""

    events: list[tuple[float, Message]]

    def find(
        self, name: str, since: int, match: Callable[[dict[str, Any]], bool]
    ) -> dict[str, Any] | None:
        """The data of the first event ``name`` at or after index ``since`` that matches."""
        for _, ev in self.events[since:]:
            if ev["event"] == name and match(_data(ev)):
                return _data(ev)
        return None

    def arrived(self, name: str, since: int = 0) -> float | None:
        for at, ev in self.events[since:]:
            if ev["event"] == name:
                return at
        return None


class _Qmp(EventLog):
    """One QEMU's monitor: commands with timeouts and one-line errors; events kept in
    arrival order with the time they arrived."""

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


def _data(event: Message) -> dict[str, Any]:
    data = event.get("data")
    return data if isinstance(data, dict) else {}


def _device_is(job: str) -> Callable[[dict[str, Any]], bool]:
    return lambda data: data.get("device") == job


# --- disks ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Disk:
    key: str  # the guest device (qdev path, or the drive name of -drive)
    source_node: str
    target_node: str  # the destination's node, exported over NBD
    size: int


def _writable_disks(block: list[dict[str, Any]]) -> dict[str, tuple[str, int]]:
    """``query-block`` → {device key: (node name, size)} of the disks to migrate: inserted,
    writable, not removable media (CD-ROMs, floppies)."""
    disks: dict[str, tuple[str, int]] = {}
    for b in block:
        inserted = b.get("inserted")
        if not inserted or inserted.get("ro") or b.get("removable"):
            continue
        key = b.get("qdev") or b.get("device")
        if not key:
            continue
        disks[key] = (inserted["node-name"], int(inserted["image"]["virtual-size"]))
    return disks


def disk_name(key: str) -> str:
    """A disk's name for people: the device id of ``/machine/peripheral/<id>/...``."""
    parts = key.split("/")
    if key.startswith("/machine/peripheral/") and len(parts) > 3:
        return parts[3]
    return key


def match_disks(source: list[dict[str, Any]], destination: list[dict[str, Any]]) -> list[Disk]:
    """Pair the source's disks with the destination's by guest device; the destination must
    have every one, of the same size."""
    src = _writable_disks(source)
    dst = _writable_disks(destination)
    disks = []
    for key, (node, size) in src.items():
        if key not in dst:
            raise UsageError(
                f"the destination has no disk {disk_name(key)}: start it with the "
                "same devices (and ids)"
            )
        dst_node, dst_size = dst[key]
        if dst_size != size:
            raise UsageError(
                f"disk {disk_name(key)}: the destination's is {dst_size} bytes, the source's "
                f"{size}: "
                "give the destination a disk of exactly the source's size"
            )
        disks.append(Disk(key, node, dst_node, size))
    return disks


# --- the migration ----------------------------------------------------------------------


async def _finish(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to its end even if we are cancelled meanwhile; re-raise the
    cancellation afterwards. Used for rollback, whose steps are each bounded."""
    task = asyncio.ensure_future(coro)
    cancelled = False
    while True:
        try:
            result = await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.done():
                raise
            cancelled = True
            continue
        if cancelled:
            raise asyncio.CancelledError
        return result


@dataclass
class _Run:
    src: _Qmp
    dst: Any  # _Qmp, or a monitor relayed by the destination's agent (nbdnats.migration.remote)
    path: Path
    migration_id: str
    timeout: float
    mirror_speed: int
    return_path: bool
    on_progress: ProgressCallback | None
    changed: asyncio.Event
    state: State = State.CONNECTING
    disks: list[Disk] = field(default_factory=list)
    saved_caps: dict[str, bool] = field(default_factory=dict)
    source_was_running: bool = False
    nbd_server: bool = False
    migrate_started: bool = False
    # Set once the source says the migration completed: nothing is rolled back after it.
    committed: bool = False
    progress: Progress = field(default_factory=lambda: Progress(State.CONNECTING))

    def enter(self, state: State) -> None:
        self.state = state
        self.progress.state = state
        if self.on_progress:
            self.on_progress(self.progress)

    async def wait(
        self,
        what: str,
        check: Callable[[], T | None],
        progress: Callable[[], Awaitable[object]] | None = None,
        timeout: float | None = None,
    ) -> T:
        """Wait until ``check`` returns a value (it raises to fail). With ``progress``, the
        timeout is a stall timeout: it restarts whenever the value changes."""
        limit = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        last: object = None
        while True:
            self.changed.clear()
            found = check()
            if found is not None:
                return found
            for side in (self.src, self.dst):
                if not side.alive:
                    raise MigrationError(
                        f"the {side.side} QEMU went away (its QMP connection closed) while {what}"
                    )
            if progress is not None:
                value = await progress()
                if value != last:
                    last = value
                    deadline = time.monotonic() + limit
            if limit and time.monotonic() > deadline:
                stalled = "made no progress" if progress else "did not finish"
                raise MigrationTimeout(f"{what} {stalled} for {limit:g} s")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), POLL_INTERVAL)

    # -- the steps --

    async def inspect(self) -> None:
        self.enter(State.INSPECTING)
        src_status = await self.src.status()
        if src_status not in ("running", "paused"):
            raise UsageError(f"the source VM cannot migrate: its status is {src_status}")
        self.source_was_running = src_status == "running"
        dst_status = await self.dst.status()
        if dst_status != "inmigrate":
            raise UsageError(
                f"the destination QEMU is not waiting for a migration (status {dst_status}): "
                "start it with -incoming defer"
            )
        state = await self.src.cmd("query-migrate")
        if state.get("status") in ("setup", "active", "pre-switchover", "device"):
            raise UsageError("the source VM is already migrating")
        self.disks = match_disks(
            await self.src.cmd("query-block"), await self.dst.cmd("query-block")
        )

    async def _set_caps(self, side: _Qmp, caps: dict[str, bool]) -> None:
        await side.cmd(
            "migrate-set-capabilities",
            capabilities=[{"capability": k, "state": v} for k, v in caps.items()],
        )

    async def prepare(self) -> Sockets:
        self.enter(State.PREPARING)
        # return-path (opt-in): the destination reports back, so a failure to load the
        # migration reaches the source rather than the source declaring success; it costs
        # downtime, since the source then waits for the destination to have loaded.
        wanted = {"events": True, "pause-before-switchover": True}
        if self.return_path:
            wanted["return-path"] = True
        current = {
            c["capability"]: bool(c["state"])
            for c in await self.src.cmd("query-migrate-capabilities")
        }
        self.saved_caps = {
            k: current.get(k, False) for k, v in wanted.items() if current.get(k, False) != v
        }
        await self._set_caps(self.src, wanted)
        dst_caps = {"events": True, "late-block-activate": True}
        if self.return_path:
            dst_caps["return-path"] = True
        await self._set_caps(self.dst, dst_caps)

        listen = await self.path.listen()
        if self.disks:
            await self.dst.cmd(
                "nbd-server-start", addr={"type": "unix", "data": {"path": listen.nbd}}
            )
            self.nbd_server = True
            for i, disk in enumerate(self.disks):
                await self.dst.cmd(
                    "block-export-add", type="nbd", id=EXPORT.format(i),
                    **{"node-name": disk.target_node}, name=EXPORT.format(i), writable=True,
                )  # fmt: skip
        await self.dst.cmd("migrate-incoming", uri=f"unix:{listen.migration}")
        exports = {EXPORT.format(i): disk.size for i, disk in enumerate(self.disks)}
        return await self.path.start(listen, exports)

    async def _job_offsets(self) -> tuple[int, int]:
        jobs = await self.src.cmd("query-block-jobs")
        ours = [j for j in jobs if str(j.get("device", "")).startswith(PREFIX)]
        done = sum(int(j.get("offset", 0)) for j in ours)
        total = sum(int(j.get("len", 0)) for j in ours)
        self.progress.disk_done, self.progress.disk_total = done, total
        if self.on_progress:
            self.on_progress(self.progress)
        return done, total

    def _job_failure(self, since: int) -> None:
        """Raise if one of our mirror jobs ended or reported an error since ``since``."""
        for _, ev in self.src.events[since:]:
            data = _data(ev)
            job = str(data.get("device", ""))
            if not job.startswith(PREFIX):
                continue
            if ev["event"] == "BLOCK_JOB_ERROR":
                raise MigrationError(f"mirror {job}: {data.get('operation')} error")
            if ev["event"] in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED") and (
                self.state != State.SWITCHOVER or data.get("error")
            ):
                why = data.get("error") or "it was cancelled"
                raise MigrationError(f"mirror {job} ended: {why}")

    async def mirror(self, source_side: Sockets) -> None:
        """Start a mirror job per disk (still part of preparing), then wait until every
        one is READY (mirroring: from here on the jobs exist in the source)."""
        since = len(self.src.events)
        for i, disk in enumerate(self.disks):
            await self.src.cmd(
                "blockdev-add", driver="nbd", **{"node-name": TARGET_NODE.format(i)},
                server={"type": "unix", "path": source_side.nbd_for(EXPORT.format(i))},
                export=EXPORT.format(i),
            )  # fmt: skip
            args: dict[str, Any] = {"copy-mode": "write-blocking"}
            if self.mirror_speed:
                args["speed"] = self.mirror_speed
            await self.src.cmd(
                "blockdev-mirror", **{"job-id": MIRROR_JOB.format(i)}, device=disk.source_node,
                target=TARGET_NODE.format(i), sync="full", **args,
            )  # fmt: skip
        jobs = {MIRROR_JOB.format(i) for i in range(len(self.disks))}
        self.enter(State.MIRRORING)

        def ready() -> bool | None:
            self._job_failure(since)
            seen = {
                str(_data(ev).get("device"))
                for _, ev in self.src.events[since:]
                if ev["event"] == "BLOCK_JOB_READY"
            }
            return True if jobs <= seen else None

        await self.wait("mirroring the disks", ready, self._job_offsets)
        await self._job_offsets()

    async def _ram(self) -> tuple[str, int]:
        info = await self.src.cmd("query-migrate")
        ram = info.get("ram", {})
        self.progress.ram_bytes = int(ram.get("transferred", 0))
        self.progress.ram_remaining = int(ram.get("remaining", 0))
        if self.on_progress:
            self.on_progress(self.progress)
        return str(info.get("status")), self.progress.ram_bytes

    def _migration_event(self, since: int, want: str) -> bool | None:
        if self.src.find("MIGRATION", since, lambda d: d.get("status") == want):
            return True
        failed = self.src.find(
            "MIGRATION", since, lambda d: d.get("status") in ("failed", "cancelled")
        )
        if failed:
            raise MigrationError(f"the source QEMU reports the migration {failed['status']}")
        if self.dst.find("MIGRATION", 0, lambda d: d.get("status") == "failed"):
            raise MigrationError("the destination QEMU reports the incoming migration failed")
        return None

    async def migrate(self, source_side: Sockets) -> tuple[int, float | None]:
        self.enter(State.MIGRATING)
        since_src = len(self.src.events)
        await self.src.cmd("migrate", uri=f"unix:{source_side.migration}")
        self.migrate_started = True

        def paused() -> bool | None:
            self._job_failure(since_src)
            return self._migration_event(since_src, "pre-switchover")

        async def moved() -> object:
            return (await self._ram(), await self._job_offsets())

        await self.wait("migrating the RAM", paused, moved)
        return since_src, self.src.arrived("STOP", since_src)

    async def switchover(self, since: int) -> int:
        """The source VM is stopped: complete the mirrors (no pivot), drop their targets,
        let the migration finish. Returns the bytes the mirrors moved."""
        self.enter(State.SWITCHOVER)
        since_jobs = len(self.src.events)
        jobs = [MIRROR_JOB.format(i) for i in range(len(self.disks))]
        for job in jobs:
            await self.src.cmd("block-job-cancel", device=job)

        def completed() -> int | None:
            self._job_failure(since_jobs)
            done = [
                self.src.find("BLOCK_JOB_COMPLETED", since_jobs, _device_is(job)) for job in jobs
            ]
            if all(d is not None for d in done):
                return sum(int(d.get("offset", 0)) for d in done if d is not None)
            return None

        disk_bytes = 0
        if jobs:
            disk_bytes = await self.wait("completing the mirrors", completed)
        for i in range(len(self.disks)):
            await self.src.cmd("blockdev-del", **{"node-name": TARGET_NODE.format(i)})
        await self.src.cmd("migrate-continue", state="pre-switchover")

        def done() -> bool | None:
            return self._migration_event(since, "completed")

        await self.wait("finishing the migration", done, lambda: self._ram())
        self.committed = True
        return disk_bytes

    async def handover(self) -> float | None:
        """The guest's state is on the destination: stop its NBD server and start it."""
        self.enter(State.HANDOVER)

        def incoming_done() -> bool | None:
            if self.dst.find("MIGRATION", 0, lambda d: d.get("status") == "completed"):
                return True
            if self.dst.find("MIGRATION", 0, lambda d: d.get("status") == "failed"):
                raise MigrationError("the destination QEMU failed to load the migration")
            return None

        await self.wait("the destination loading the migration", incoming_done)
        # Every disk write was acknowledged before the mirrors completed; the disks' streams
        # end (destination flushed, digests compared) while the device state travels, and
        # must have ended before the destination's guest may run.
        await self.path.drain()
        since = len(self.dst.events)
        if self.nbd_server:
            await self.dst.cmd("nbd-server-stop")
            self.nbd_server = False
        if await self.dst.status() != "running":
            await self.dst.cmd("cont")
        resumed = self.dst.arrived("RESUME", since) or self.dst.arrived("RESUME")
        return resumed if resumed is not None else time.monotonic()

    async def restore_caps(self) -> None:
        if self.saved_caps:
            await self._set_caps(self.src, self.saved_caps)
            self.saved_caps = {}

    # -- rollback --

    async def rollback(self) -> list[str]:
        """Undo everything on both sides, each step bounded; returns what could not be
        undone (empty when all went well)."""
        self.enter(State.ROLLING_BACK)
        problems: list[str] = []

        async def step(what: str, coro: Awaitable[Any]) -> None:
            try:
                await asyncio.wait_for(coro, CLEANUP_TIMEOUT)
            except (NbdNatsError, QMPError, OSError, TimeoutError) as e:
                problems.append(f"{what}: {e}")

        if self.src.alive:
            if self.migrate_started:
                await step("migrate_cancel", self._cancel_migration())
            # Closing the path ends the streams' connections, which frees an NBD request
            # stuck on a stalled stream, so the mirror can be cancelled.
            await step("closing the data path", self.path.close())
            await step("cancelling the mirrors", cancel_jobs(self.src))
            await step("removing the mirror targets", remove_nodes(self.src))
            await step("restoring the capabilities", self.restore_caps())
            if self.source_was_running:
                await step("resuming the source", resume(self.src))
        else:
            problems.append("the source QEMU is gone")
        await step("stopping the destination", quit_destination(self.dst))
        return problems

    async def _cancel_migration(self) -> None:
        await self.src.cmd("migrate_cancel")
        while (await self.src.cmd("query-migrate")).get("status") in (
            "setup", "active", "pre-switchover", "device", "cancelling",
        ):  # fmt: skip
            await asyncio.sleep(POLL_INTERVAL)


async def cancel_jobs(src: _Qmp) -> None:
    """Cancel (force) every block job of ours and wait until they are gone."""
    for job in await src.cmd("query-block-jobs"):
        if str(job.get("device", "")).startswith(PREFIX):
            with contextlib.suppress(QmpCommandError):
                await src.cmd("block-job-cancel", device=job["device"], force=True)
    while any(
        str(j.get("device", "")).startswith(PREFIX) for j in await src.cmd("query-block-jobs")
    ):
        await asyncio.sleep(POLL_INTERVAL)


async def remove_nodes(src: _Qmp) -> None:
    for node in await src.cmd("query-named-block-nodes", flat=True):
        name = str(node.get("node-name", ""))
        if name.startswith(TARGET_NODE.format("")):
            await src.cmd("blockdev-del", **{"node-name": name})


async def resume(src: _Qmp) -> None:
    """Restart the source VM if the migration left it paused (QEMU restarts it itself
    after migrate_cancel; a pause-before-switchover or finish may still hold it)."""
    if await src.status() in ("paused", "finish-migrate"):
        await src.cmd("cont")


async def quit_destination(dst: _Qmp) -> None:
    """Quit the destination QEMU — only while it still waits for (or failed) an incoming
    migration, so it never ran the guest."""
    if not dst.alive:
        return
    status = await dst.status()
    if status not in ("inmigrate", "prelaunch"):
        raise MigrationError(f"left the destination alone: its status is {status}")
    with contextlib.suppress(MigrationError):
        await dst.cmd("quit")


async def migrate(
    src_qmp: str,
    dst_qmp: str,
    *,
    path: Path | None = None,
    migration_id: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    mirror_speed: int = 0,
    on_progress: ProgressCallback | None = None,
    dst_monitor: Callable[[asyncio.Event], Any] | None = None,
    return_path: bool = False,
) -> MigrationReport:
    """Live-migrate the VM behind the source QMP socket into the destination QEMU (started
    with ``-incoming defer``). ``timeout``: seconds a step may go without progress (0: no
    limit). ``mirror_speed``: bytes/s cap of the disk mirrors' bulk copy (0: none).
    ``dst_monitor``: how to reach the destination's monitor when it is not a local socket
    (given the event that wakes the orchestration; ``nbdnats.migration.remote``).

    Raises UsageError for what the user must change (sockets, sizes, states),
    MigrationTimeout for a stall, MigrationError otherwise; CancelledError passes through
    after the rollback."""
    path = path or DirectPath()
    changed = asyncio.Event()
    run = _Run(
        src=_Qmp("source", src_qmp, changed),
        dst=dst_monitor(changed) if dst_monitor else _Qmp("destination", dst_qmp, changed),
        path=path,
        migration_id=migration_id or new_id(),
        timeout=timeout,
        mirror_speed=mirror_speed,
        return_path=return_path,
        on_progress=on_progress,
        changed=changed,
    )
    start = time.monotonic()
    connect_timeout = timeout or COMMAND_TIMEOUT
    try:
        await run.src.connect(connect_timeout)
        await run.dst.connect(connect_timeout)
        await run.inspect()
        source_side = await run.prepare()
        await run.mirror(source_side)
        since, stopped = await run.migrate(source_side)
        disk_bytes = await run.switchover(since)
        # Committed: the guest's state is on the destination. A cancellation now would
        # leave the VM paused on both sides, so the (short, bounded) handover runs to its end.
        resumed = await _finish(run.handover())
        info = await run.src.cmd("query-migrate")
        await run.restore_caps()
        run.enter(State.DONE)
        return MigrationReport(
            id=run.migration_id,
            mode=path.mode,
            disks=len(run.disks),
            total_seconds=round(time.monotonic() - start, 3),
            downtime_ms=int(info.get("downtime", 0)),
            paused_ms=round(((resumed or 0) - (stopped or 0)) * 1000) if stopped else 0,
            disk_bytes=disk_bytes,
            ram_bytes=int(info.get("ram", {}).get("transferred", 0)),
        )
    except BaseException as e:
        failed_in = run.state
        stop = isinstance(e, (asyncio.CancelledError, KeyboardInterrupt))
        if failed_in in (State.CONNECTING, State.INSPECTING):
            # Nothing was changed in either QEMU yet.
            if stop or isinstance(e, NbdNatsError):
                raise
            raise MigrationError(f"migration failed while {failed_in.value}: {_describe(e)}") from e
        if not run.committed and run.state == State.SWITCHOVER:
            # The source may have completed just as this failed: then it is too late to
            # roll back (the destination would be quit while it holds the only state).
            run.committed = await _finish(_source_completed(run.src))
        if run.committed:
            if stop:
                raise
            raise _after_commit(e) from e
        problems = await _finish(run.rollback())
        run.enter(State.FAILED)
        if stop:
            raise
        raise _rolled_back(e, failed_in, problems) from e
    finally:
        await _finish(_close(run))


async def _source_completed(src: _Qmp) -> bool:
    try:
        info = await asyncio.wait_for(src.cmd("query-migrate"), CLEANUP_TIMEOUT)
    except (NbdNatsError, TimeoutError):
        return False
    return bool(info.get("status") == "completed")


def _describe(e: BaseException) -> str:
    if isinstance(e, NbdNatsError):
        return str(e)
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def _rolled_back(e: BaseException, state: State, problems: list[str]) -> NbdNatsError:
    cls: type[NbdNatsError] = MigrationError
    if isinstance(e, (MigrationTimeout, UsageError)):
        cls = type(e)
    if problems:
        after = "rollback incomplete: " + "; ".join(problems)
    else:
        after = "rolled back: the source VM runs on, the destination QEMU was stopped"
    return cls(f"migration failed while {state.value}: {_describe(e)} ({after})")


def _after_commit(e: BaseException) -> NbdNatsError:
    return MigrationError(
        f"the migration completed on the source, then: {_describe(e)}. The source VM is "
        "stopped (postmigrate); the guest's state is on the destination, which was not "
        "resumed: check it, then `cont` it (or, if it never ran, `cont` the source)"
    )


async def _close(run: _Run) -> None:
    await run.src.close()
    await run.dst.close()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(run.path.close(), CLEANUP_TIMEOUT)


async def abort(src_qmp: str, dst_qmp: str | None = None) -> list[str]:
    """Roll back what a migration left in QEMU, from outside it: migrate_cancel on the
    source, cancel our mirror jobs, remove our nodes, resume a paused source; quit the
    destination if it still waits for the migration. Returns what could not be done."""
    changed = asyncio.Event()
    src = _Qmp("source", src_qmp, changed)
    dst = _Qmp("destination", dst_qmp, changed) if dst_qmp else None
    problems: list[str] = []
    try:
        await src.connect(CLEANUP_TIMEOUT)
        status = (await src.cmd("query-migrate")).get("status")
        if status in ("setup", "active", "pre-switchover", "device"):
            await src.cmd("migrate_cancel")
        for what, coro in (
            ("cancelling the mirrors", cancel_jobs(src)),
            ("removing the mirror targets", remove_nodes(src)),
            ("resuming the source", resume(src)),
            # The values before the migration died with its process; a capability left on
            # would hold a later migration at pre-switchover for good.
            (
                "clearing pause-before-switchover",
                src.cmd(
                    "migrate-set-capabilities",
                    capabilities=[{"capability": "pause-before-switchover", "state": False}],
                ),
            ),
        ):
            try:
                await asyncio.wait_for(coro, CLEANUP_TIMEOUT)
            except (NbdNatsError, TimeoutError) as e:
                problems.append(f"{what}: {e}")
        if dst is not None:
            await dst.connect(CLEANUP_TIMEOUT)
            try:
                await quit_destination(dst)
            except NbdNatsError as e:
                problems.append(str(e))
    finally:
        await src.close()
        if dst is not None:
            await dst.close()
    return problems


# --- running migrations, for --cancel ------------------------------------------------


def _record_path(migration_id: str) -> FsPath:
    return resolve_state_dir() / MIGRATIONS_DIR / f"{migration_id}.json"


@contextlib.contextmanager
def _recorded(migration_id: str, args: argparse.Namespace) -> Any:
    """While a migration runs, $STATE/migrations/ID.json names its process."""
    path = _record_path(migration_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        try:
            pid = int(json.loads(path.read_text())["pid"])
        except (ValueError, KeyError, OSError):
            pid = 0
        if pid and _alive(pid):
            raise UsageError(f"migration {migration_id} is already running (pid {pid})")
    record = {"pid": os.getpid(), "src_qmp": args.src_qmp, "dst_qmp": args.dst_qmp}
    path.write_text(json.dumps(record) + "\n")
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


async def cancel(migration_id: str | None, src_qmp: str | None, dst_qmp: str | None) -> str:
    """``--cancel``: stop the migration ``migration_id`` started by another ``nbd-nats
    migrate`` (SIGTERM; it rolls back and exits), else roll back through the QMP sockets."""
    if migration_id:
        path = _record_path(migration_id)
        record: dict[str, Any] = {}
        with contextlib.suppress(OSError, ValueError):
            record = json.loads(path.read_text())
        pid = int(record.get("pid", 0))
        if pid and _alive(pid):
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + COMMAND_TIMEOUT + 4 * CLEANUP_TIMEOUT
            while _alive(pid) and path.exists():
                if time.monotonic() > deadline:
                    raise MigrationError(f"migration {migration_id} (pid {pid}) did not stop")
                await asyncio.sleep(POLL_INTERVAL)
            return f"cancelled migration {migration_id}: process {pid} stopped and rolled back"
        src_qmp = src_qmp or record.get("src_qmp")
        dst_qmp = dst_qmp or record.get("dst_qmp")
        with contextlib.suppress(OSError):
            path.unlink()
    if not src_qmp:
        raise UsageError(
            f"no running migration {migration_id}: give --src-qmp to roll back through QMP"
            if migration_id
            else "--cancel needs --id of a running migration or --src-qmp"
        )
    problems = await abort(src_qmp, dst_qmp)
    if problems:
        raise MigrationError("cancel incomplete: " + "; ".join(problems))
    return "cancelled: nothing of a migration is left on the source" + (
        "; the destination was stopped" if dst_qmp else ""
    )


# --- CLI ------------------------------------------------------------------------------


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``migrate`` to the ``nbd-nats`` subcommands."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "migrate",
        help="live-migrate a running QEMU VM (RAM and disks)",
        description="Live-migrate the VM behind --src-qmp into the QEMU behind --dst-qmp, "
        "started with -incoming defer and disks of the same sizes. The disks are found "
        "through QMP. See docs/migration.md.",
    )
    p.add_argument("--src-qmp", metavar="SOCK", help="the source QEMU's QMP unix socket")
    p.add_argument("--dst-qmp", metavar="SOCK", help="the destination QEMU's QMP unix socket")
    p.add_argument("--id", dest="migration_id", metavar="ID", help="migration id (default: random)")
    p.add_argument(
        "--direct",
        action="store_true",
        help="join the two QEMUs' sockets directly, no NATS (the baseline)",
    )
    p.add_argument(
        "--data-url",
        metavar="URL",
        help="data-plane servers for the streams (default: $NBDNATS_DATA_URL, else an "
        "embedded nats-server)",
    )
    p.add_argument(
        "--ctl-url",
        metavar="URL",
        help="ctl-plane servers for the migration's event (default: $NBDNATS_CTL_URL, else "
        "the data URL)",
    )
    p.add_argument("--node", help="this node's name in ctl.evt.NODE.migration (default: hostname)")
    p.add_argument(
        "--timeout",
        type=timeout_arg,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help="fail when a step makes no progress for this long; 0 waits forever "
        f"(default: {DEFAULT_TIMEOUT:g})",
    )
    p.add_argument(
        "--cancel",
        action="store_true",
        help="cancel migration --id run by another nbd-nats migrate, or roll back what a "
        "migration left behind through --src-qmp (and --dst-qmp)",
    )
    p.add_argument(
        "--mirror-speed",
        default="0",
        metavar="BYTES",
        help="cap the disks' bulk copy at BYTES per second, like 50M (default: no cap)",
    )
    p.add_argument(
        "--return-path",
        action="store_true",
        help="turn on QEMU's return path: a destination that fails to load tells the source "
        "(costs downtime: the source waits for the destination to have loaded)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON line with the results")
    p.add_argument("--quiet", "-q", action="store_true", help="no state lines or summary")
    return p


@contextlib.asynccontextmanager
async def _data_path(args: argparse.Namespace, migration_id: str) -> AsyncIterator[Path]:
    """--direct, or NATS: the given data plane (or $NBDNATS_DATA_URL), else an embedded
    nats-server for the duration."""
    if args.direct:
        yield DirectPath()
        return
    from nbdnats.embedded import EmbeddedServer
    from nbdnats.migration.paths import NatsPath
    from nbdnats.planes import Planes, urls_given

    async with contextlib.AsyncExitStack() as stack:
        url = args.data_url
        if not urls_given(url, None):
            url = await stack.enter_async_context(EmbeddedServer())
        ctl = args.ctl_url or (None if args.data_url else url)
        planes = await Planes.connect(url, ctl, args.node)
        stack.push_async_callback(planes.close)
        timeout = args.timeout or DEFAULT_TIMEOUT
        yield NatsPath(planes, migration_id, timeout=timeout)


async def _announce(path: Path, migration_id: str, state: str, **fields: Any) -> None:
    """Report the end as ``ctl.evt.<node>.migration`` on the NATS path's ctl connection."""
    planes = getattr(path, "planes", None)
    if planes is None:
        return
    from nbdnats import subjects
    from nbdnats.schemas import MigrationEvent

    fields = {k: v for k, v in fields.items() if k in MigrationEvent.__struct_fields__}
    fields.update(migration_id=migration_id, node=planes.node, state=state, mode=path.mode)
    with contextlib.suppress(Exception):
        event = msgspec.json.encode(MigrationEvent(**fields))
        await planes.ctl.publish(subjects.ctl_event(planes.node, "migration"), event)
        await planes.ctl.flush(timeout=2)


def _summary(r: MigrationReport) -> str:
    return (
        f"migrated {r.disks} disk{'s' if r.disks != 1 else ''} ({human(r.disk_bytes)}) and "
        f"{human(r.ram_bytes)} of RAM in {r.total_seconds:.2f} s, downtime {r.downtime_ms} ms "
        f"(paused {r.paused_ms} ms), {r.mode}"
    )


async def run(args: argparse.Namespace) -> None:
    if args.migration_id is not None:
        # It names a file here, and subjects once the migration travels over NATS.
        check_token(args.migration_id, "migration id")
    if args.cancel:
        message = await cancel(args.migration_id, args.src_qmp, args.dst_qmp)
        if not args.quiet:
            sys.stderr.write(f"nbd-nats: {message}\n")
        return
    if not args.src_qmp or not args.dst_qmp:
        raise UsageError("migrate needs --src-qmp and --dst-qmp")
    if args.direct and args.data_url:
        raise UsageError("--direct joins the sockets without NATS: drop --data-url")
    if args.timeout < 0:
        raise UsageError("--timeout must be 0 (no limit) or more seconds")
    speed = parse_size(args.mirror_speed, "--mirror-speed")
    migration_id = args.migration_id or new_id()
    seen: list[State] = []

    def show(p: Progress) -> None:
        # One line per state on stderr: what a person (or a script waiting for a state)
        # needs; --json and --quiet keep stderr for errors.
        if not seen or seen[-1] != p.state:
            seen.append(p.state)
            sys.stderr.write(f"nbd-nats: migration {migration_id}: {p.state.value}\n")

    with _recorded(migration_id, args):
        async with _data_path(args, migration_id) as path:
            try:
                report = await migrate(
                    args.src_qmp,
                    args.dst_qmp,
                    path=path,
                    migration_id=migration_id,
                    timeout=args.timeout,
                    mirror_speed=speed,
                    return_path=args.return_path,
                    on_progress=None if (args.quiet or args.json) else show,
                )
            except NbdNatsError as e:
                await _announce(path, migration_id, "failed", error_code=e.code, error=str(e))
                raise
            await _announce(path, migration_id, "done", **msgspec.structs.asdict(report))
    if args.json:
        sys.stdout.write(msgspec.json.encode(report).decode() + "\n")
    elif not args.quiet:
        sys.stderr.write(_summary(report) + "\n")
