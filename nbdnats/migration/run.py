"""The live migration of a running QEMU VM, RAM and disks, over QMP: a state machine.

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
stream) go through a :class:`~nbdnats.migration.paths.Path`: sockets joined directly, or
NATS in between.

A rate cap (``rate``, ``--rate``; :func:`caps`) is set where the bytes are made as well as
where they travel, so QEMU never produces faster than the streams may drain: QEMU's
``max-bandwidth`` (the RAM stream) and the NATS stream of the RAM take the cap; the disks'
mirror jobs (``speed``) and their NATS streams share it, each ``rate / disks`` (or
``mirror_speed`` when that is lower). The mirrors' bulk copy ends (READY) before the RAM
moves, so the migration as a whole stays near the cap; while the RAM moves, the mirrors
only carry the guest's new writes. ``RateControl`` changes all of them on a running run.

Each step declares the state it starts from (:func:`require`), and the states say what
was done: the rollback needs no flags of its own. Until the source reports the migration
completed (the run enters ``handover``), any failure (or a cancellation) rolls back: the
migration and the mirror jobs are cancelled, the nodes this added are removed, the source's
capabilities restored and its VM left running, and the destination, which never ran the
guest, is told to quit. After that point the guest's state lives on the destination and
nothing is rolled back; the error says where things stand.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Concatenate, ParamSpec, TypeVar

import msgspec
from qemu.qmp import QMPError

from nbdnats import _core
from nbdnats.errors import MigrationError, MigrationTimeout, NbdNatsError, UsageError
from nbdnats.migration.disks import (
    EXPORT,
    MIRROR_JOB,
    PREFIX,
    TARGET_NODE,
    Disk,
    cancel_jobs,
    match_disks,
    ours,
    remove_nodes,
)
from nbdnats.migration.paths import DirectPath, Path, Sockets
from nbdnats.migration.qmp import (
    CLEANUP_TIMEOUT,
    COMMAND_TIMEOUT,
    MIGRATION_ACTIVE,
    MIGRATION_ENDING,
    POLL_INTERVAL,
    Monitor,
    Qmp,
    device_is,
    event_data,
    quit_destination,
    resume,
)
from nbdnats.subjects import new_id

T = TypeVar("T")
P = ParamSpec("P")


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


# From here on the source reported the migration completed: the guest's state is on the
# destination, and nothing is rolled back.
COMMITTED = frozenset({State.HANDOVER, State.DONE})
# The states in which something was changed in QEMU that a rollback undoes.
UNDOABLE = frozenset({State.PREPARING, State.MIRRORING, State.MIGRATING, State.SWITCHOVER})
# The source QEMU was told to migrate: a rollback cancels that migration.
STARTED = frozenset({State.MIGRATING, State.SWITCHOVER})


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


def caps(rate: int | None, disks: int, mirror_speed: int = 0) -> tuple[int, int]:
    """The RAM stream's cap and each disk mirror's (bytes/s, 0: none) under ``rate`` for
    the whole migration: the RAM takes ``rate``, the ``disks`` mirrors share it (never
    above ``mirror_speed`` when one is given, never below 1)."""
    if not rate:
        return 0, mirror_speed
    share = max(1, rate // max(1, disks))
    return rate, min(share, mirror_speed) if mirror_speed else share


@dataclass
class Progress:
    state: State
    disk_done: int = 0
    disk_total: int = 0
    ram_bytes: int = 0
    ram_remaining: int = 0


ProgressCallback = Callable[[Progress], None]


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


# A step of the run: a coroutine method of _Run.
Step = Callable[Concatenate["_Run", P], Coroutine[Any, Any, T]]


class StateError(RuntimeError):
    """A step of the run was called in a state it may not start from: a bug here, never
    something a user can cause, and it touches neither QEMU."""


def require(*states: State) -> Callable[[Step[P, T]], Step[P, T]]:
    """A step declares the states it may start from, as qemu.qmp's ``require`` does:
    called in any other, it raises :class:`StateError` before it sends QEMU anything."""

    def decorator(step: Step[P, T]) -> Step[P, T]:
        @functools.wraps(step)
        async def guarded(run: _Run, /, *args: P.args, **kwargs: P.kwargs) -> T:
            if run.state not in states:
                allowed = ", ".join(s.value for s in State if s in states)
                raise StateError(
                    f"{step.__name__} may start only while {allowed}, not {run.state.value}"
                )
            return await step(run, *args, **kwargs)

        return guarded

    return decorator


@dataclass
class _Run:
    src: Qmp
    dst: Monitor  # a local Qmp, or the destination's agent's relay (nbdnats.migration.remote)
    path: Path
    migration_id: str
    timeout: float
    mirror_speed: int
    return_path: bool
    on_progress: ProgressCallback | None
    changed: asyncio.Event
    rate: int | None = None
    # The source's max-bandwidth before a cap changed it (restored with the capabilities).
    saved_bandwidth: int | None = None
    state: State = State.CONNECTING
    disks: list[Disk] = field(default_factory=list)
    saved_caps: dict[str, bool] = field(default_factory=dict)
    # The source VM's status before the migration ("running" or "paused"): a rollback
    # leaves it as it was.
    source_status: str = ""
    progress: Progress = field(default_factory=lambda: Progress(State.CONNECTING))

    @property
    def committed(self) -> bool:
        return self.state in COMMITTED

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

    @require(State.CONNECTING)
    async def inspect(self) -> None:
        self.enter(State.INSPECTING)
        src_status = await self.src.status()
        if src_status not in ("running", "paused"):
            raise UsageError(f"the source VM cannot migrate: its status is {src_status}")
        self.source_status = src_status
        dst_status = await self.dst.status()
        if dst_status != "inmigrate":
            raise UsageError(
                f"the destination QEMU is not waiting for a migration (status {dst_status}): "
                "start it with -incoming defer"
            )
        state = await self.src.cmd("query-migrate")
        if state.get("status") in MIGRATION_ACTIVE:
            raise UsageError("the source VM is already migrating")
        self.disks = match_disks(
            await self.src.cmd("query-block"), await self.dst.cmd("query-block")
        )

    async def _set_caps(self, side: Monitor, caps: dict[str, bool]) -> None:
        await side.cmd(
            "migrate-set-capabilities",
            capabilities=[{"capability": k, "state": v} for k, v in caps.items()],
        )

    @require(State.INSPECTING)
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
            for i, disk in enumerate(self.disks):
                await self.dst.cmd(
                    "block-export-add",
                    type="nbd",
                    id=EXPORT.format(i),
                    name=EXPORT.format(i),
                    writable=True,
                    **{"node-name": disk.target_node},
                )
        await self.dst.cmd("migrate-incoming", uri=f"unix:{listen.migration}")
        exports = {EXPORT.format(i): disk.size for i, disk in enumerate(self.disks)}
        await self._apply_rate(jobs=False)
        return await self.path.start(listen, exports)

    async def _apply_rate(self, *, jobs: bool) -> None:
        """Set the cap (``caps``) on the source's RAM migration, on the streams of the path
        and, with ``jobs``, on the running mirror jobs. Without a cap, QEMU's
        max-bandwidth goes back to what it was."""
        ram, mirror = caps(self.rate, len(self.disks), self.mirror_speed)
        if ram and self.saved_bandwidth is None:
            params = await self.src.cmd("query-migrate-parameters")
            self.saved_bandwidth = int(params.get("max-bandwidth", 0))
        if ram or self.saved_bandwidth is not None:
            await self.src.cmd(
                "migrate-set-parameters", **{"max-bandwidth": ram or self.saved_bandwidth}
            )
        self.path.set_rate(ram or None, mirror or None)
        if jobs:
            for i in range(len(self.disks)):
                await self.src.cmd("block-job-set-speed", device=MIRROR_JOB.format(i), speed=mirror)

    async def set_rate(self, rate: int | None) -> None:
        """A new cap for the running migration (``RateControl``): QEMU's limits while it
        mirrors or migrates, the path's streams in any state."""
        self.rate = rate
        if self.state in (State.MIRRORING, State.MIGRATING):
            await self._apply_rate(jobs=True)
        elif self.state == State.PREPARING:
            await self._apply_rate(jobs=False)  # the jobs, once started, take it
        else:
            ram, mirror = caps(rate, len(self.disks), self.mirror_speed)
            self.path.set_rate(ram or None, mirror or None)

    async def _job_offsets(self) -> tuple[int, int]:
        jobs = await self.src.cmd("query-block-jobs")
        mirrors = [j for j in jobs if ours(j)]
        done = sum(int(j.get("offset", 0)) for j in mirrors)
        total = sum(int(j.get("len", 0)) for j in mirrors)
        self.progress.disk_done, self.progress.disk_total = done, total
        if self.on_progress:
            self.on_progress(self.progress)
        return done, total

    def _job_failure(self, since: int) -> None:
        """Raise if one of our mirror jobs ended or reported an error since ``since``."""
        for _, ev in self.src.events[since:]:
            data = event_data(ev)
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

    @require(State.PREPARING)
    async def mirror(self, source_side: Sockets) -> None:
        """Start a mirror job per disk (still part of preparing), then wait until every
        one is READY (mirroring: from here on the jobs exist in the source)."""
        since = len(self.src.events)
        for i, disk in enumerate(self.disks):
            await self.src.cmd(
                "blockdev-add",
                driver="nbd",
                server={"type": "unix", "path": source_side.nbd_for(EXPORT.format(i))},
                export=EXPORT.format(i),
                **{"node-name": TARGET_NODE.format(i)},
            )
            args: dict[str, Any] = {"job-id": MIRROR_JOB.format(i), "copy-mode": "write-blocking"}
            speed = caps(self.rate, len(self.disks), self.mirror_speed)[1]
            if speed:
                args["speed"] = speed
            await self.src.cmd(
                "blockdev-mirror",
                device=disk.source_node,
                target=TARGET_NODE.format(i),
                sync="full",
                **args,
            )
        jobs = {MIRROR_JOB.format(i) for i in range(len(self.disks))}
        self.enter(State.MIRRORING)

        def ready() -> bool | None:
            self._job_failure(since)
            seen = {
                str(event_data(ev).get("device"))
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

    @require(State.MIRRORING)
    async def migrate(self, source_side: Sockets) -> tuple[int, float | None]:
        self.enter(State.MIGRATING)
        since_src = len(self.src.events)
        await self.src.cmd("migrate", uri=f"unix:{source_side.migration}")

        def paused() -> bool | None:
            self._job_failure(since_src)
            return self._migration_event(since_src, "pre-switchover")

        async def moved() -> object:
            return (await self._ram(), await self._job_offsets())

        await self.wait("migrating the RAM", paused, moved)
        return since_src, self.src.arrived("STOP", since_src)

    @require(State.MIGRATING)
    async def switchover(self, since: int) -> int:
        """The source VM is stopped: complete the mirrors (no pivot), drop their targets,
        let the migration finish; once the source says it completed, the run is in the
        handover (committed). Returns the bytes the mirrors moved."""
        self.enter(State.SWITCHOVER)
        since_jobs = len(self.src.events)
        jobs = [MIRROR_JOB.format(i) for i in range(len(self.disks))]
        for job in jobs:
            await self.src.cmd("block-job-cancel", device=job)

        def completed() -> int | None:
            self._job_failure(since_jobs)
            done = [
                self.src.find("BLOCK_JOB_COMPLETED", since_jobs, device_is(job)) for job in jobs
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
        self.enter(State.HANDOVER)
        return disk_bytes

    @require(State.HANDOVER)
    async def handover(self) -> float | None:
        """The guest's state is on the destination: stop its NBD server and start it."""

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
        if self.disks:  # prepare started the NBD server for them
            await self.dst.cmd("nbd-server-stop")
        if await self.dst.status() != "running":
            await self.dst.cmd("cont")
        resumed = self.dst.arrived("RESUME", since) or self.dst.arrived("RESUME")
        return resumed if resumed is not None else time.monotonic()

    async def restore_caps(self) -> None:
        if self.saved_caps:
            await self._set_caps(self.src, self.saved_caps)
            self.saved_caps = {}
        if self.saved_bandwidth is not None:
            bandwidth = {"max-bandwidth": self.saved_bandwidth}
            await self.src.cmd("migrate-set-parameters", **bandwidth)
            self.saved_bandwidth = None

    # -- rollback --

    @require(*UNDOABLE)
    async def rollback(self) -> list[str]:
        """Undo everything on both sides, each step bounded; returns what could not be
        undone (empty when all went well)."""
        started = self.state in STARTED
        self.enter(State.ROLLING_BACK)
        problems: list[str] = []

        async def step(what: str, coro: Awaitable[Any]) -> None:
            try:
                await asyncio.wait_for(coro, CLEANUP_TIMEOUT)
            except (NbdNatsError, QMPError, OSError, TimeoutError) as e:
                problems.append(f"{what}: {e}")

        if self.src.alive:
            if started:
                await step("migrate_cancel", self._cancel_migration())
            # Closing the path ends the streams' connections, which frees an NBD request
            # stuck on a stalled stream, so the mirror can be cancelled.
            await step("closing the data path", self.path.close())
            await step("cancelling the mirrors", cancel_jobs(self.src))
            await step("removing the mirror targets", remove_nodes(self.src))
            await step("restoring the capabilities", self.restore_caps())
            if self.source_status == "running":
                await step("resuming the source", resume(self.src))
        else:
            problems.append("the source QEMU is gone")
        await step("stopping the destination", quit_destination(self.dst))
        return problems

    async def _cancel_migration(self) -> None:
        await self.src.cmd("migrate_cancel")
        while (await self.src.cmd("query-migrate")).get("status") in MIGRATION_ENDING:
            await asyncio.sleep(POLL_INTERVAL)


class RateControl:
    """Changes the cap of a running ``migrate`` (``ctl rate``): pass one as ``control``."""

    def __init__(self) -> None:
        self.run: _Run | None = None

    async def set_rate(self, rate: int | None) -> None:
        if self.run is None or self.run.state in (State.DONE, State.FAILED):
            raise UsageError("the migration is not running")
        await self.run.set_rate(rate)


async def migrate(
    src_qmp: str,
    dst_qmp: str,
    *,
    path: Path | None = None,
    migration_id: str | None = None,
    timeout: float = _core.DEFAULT_TIMEOUT,
    mirror_speed: int = 0,
    on_progress: ProgressCallback | None = None,
    dst_monitor: Callable[[asyncio.Event], Monitor] | None = None,
    return_path: bool = False,
    rate: int | None = None,
    control: RateControl | None = None,
) -> MigrationReport:
    """Live-migrate the VM behind the source QMP socket into the destination QEMU (started
    with ``-incoming defer``). ``timeout``: seconds a step may go without progress (0: no
    limit). ``mirror_speed``: bytes/s cap of the disk mirrors' bulk copy (0: none).
    ``rate``: a cap in bytes/s on the whole migration (see the module's docstring and
    ``caps``); ``control``, when given, changes it while the migration runs.
    ``dst_monitor``: how to reach the destination's monitor when it is not a local socket
    (given the event that wakes the orchestration; ``nbdnats.migration.remote``).

    Raises UsageError for what the user must change (sockets, sizes, states),
    MigrationTimeout for a stall, MigrationError otherwise; CancelledError passes through
    after the rollback."""
    path = path or DirectPath()
    changed = asyncio.Event()
    run = _Run(
        src=Qmp("source", src_qmp, changed),
        dst=dst_monitor(changed) if dst_monitor else Qmp("destination", dst_qmp, changed),
        path=path,
        migration_id=migration_id or new_id(),
        timeout=timeout,
        mirror_speed=mirror_speed,
        return_path=return_path,
        on_progress=on_progress,
        changed=changed,
        rate=rate,
    )
    if control is not None:
        control.run = run
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
        committed = run.committed
        if failed_in == State.SWITCHOVER:
            # The source may have completed just as this failed: then it is too late to
            # roll back (the destination would be quit while it holds the only state).
            committed = await _finish(_source_completed(run.src))
        if committed:
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


async def _source_completed(src: Monitor) -> bool:
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
    src = Qmp("source", src_qmp, changed)
    dst = Qmp("destination", dst_qmp, changed) if dst_qmp else None
    problems: list[str] = []
    try:
        await src.connect(CLEANUP_TIMEOUT)
        status = (await src.cmd("query-migrate")).get("status")
        if status in MIGRATION_ACTIVE:
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
