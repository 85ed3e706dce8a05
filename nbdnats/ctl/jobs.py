"""The agent's jobs: what an accepted command runs, from its start to its one final report.

A transfer job is one end of a transfer, with a backup tool (``nbdnats.ctl.tools``) or a
provisioning approval around it; the agent publishes its events itself (``accepted``,
``running`` each progress interval, then ``done``/``failed``/``cancelled`` once the whole
job, tool included, has ended). A provisioned image is read back from the device before it
counts as done. A migration job runs ``nbdnats.migration`` with the destination's monitor
and ends reached through the destination's agent, and reports ``ctl.evt.<node>.migration``.

An incremental backup's source takes a checkpoint (``nbdnats.backup.checkpoints``), starts
one send job per disk and holds the checkpoint (``nbdnats.backup.hold``) until the
controller's ``checkpoint`` command commits or rolls it back; its receiver lays the changed
ranges over the parent snapshot (``restic dump``) and stores the whole image.

Finished jobs are kept (``KEEP_FINISHED``) for queries, metrics and idempotent replies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec

from nbdnats import _core, formats, subjects
from nbdnats.backup.hold import Hold
from nbdnats.ctl import tools
from nbdnats.ctl.metrics import Sample
from nbdnats.ctl.policy import Policy
from nbdnats.errors import (
    AttestationError,
    BusyError,
    IntegrityError,
    NbdNatsError,
    PolicyError,
    SchemaError,
    TransferCancelled,
    TransferError,
    UsageError,
)
from nbdnats.metal.approval import TrustedKeys
from nbdnats.metal.installer import Evidence
from nbdnats.planes import Planes
from nbdnats.schemas import (
    BackupKind,
    BackupList,
    BackupsQuery,
    CancelCommand,
    CheckpointCommand,
    Command,
    DigestQuery,
    DigestReply,
    DiskSend,
    MigrateCommand,
    MigrationEvent,
    ProvisionCommand,
    RateCommand,
    RecvCommand,
    Reply,
    SendCommand,
    SendReply,
    Tool,
    TransferEvent,
    TransferList,
    TransfersQuery,
    encode,
)
from nbdnats.transfer import (
    DEFAULT_TIMEOUT,
    TransferHandle,
    event_of,
    image_digest,
    resolve_state_dir,
    start_recv,
    start_send,
)

if TYPE_CHECKING:
    from nbdnats.backup.checkpoints import Checkpoint
    from nbdnats.ctl.config import AgentConfig

log = logging.getLogger("nbdnats.ctl.jobs")

KEEP_FINISHED = 256  # finished jobs kept for queries, metrics and idempotent replies

Publish = Callable[[str, bytes], Coroutine[Any, Any, None]]


@dataclass
class Job:
    """One accepted command: one end of a transfer, with whatever runs around it."""

    op: str
    role: str
    transfer_id: str
    key: str
    endpoint: str
    handle: TransferHandle | None = None
    tool: tools.ToolRun | None = None
    backup: Tool | None = None  # a restic backup's tool: its snapshot is tagged at the end
    task: asyncio.Task[None] | None = None
    approved_digest: str | None = None
    then: str = "stay"  # a provision's: what the installer does once it verified
    final: TransferEvent | None = None
    base: tools.ToolRun | None = None  # an incremental backup's parent image (restic dump)
    # An incremental backup's disk, as its events show it: checkpoint, backup_kind, reason
    # (why full), parent.
    info: dict[str, Any] | None = None
    # Set once its tool (and base) ended, well or not: its restic holds no lock any more.
    tool_ended: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def running(self) -> bool:
        return self.final is None


class Jobs:
    """A node's jobs and the counters of finished ones. ``planes_of`` gives the agent's
    planes once it is connected; ``publish(kind, payload)`` sends a ``ctl.evt.<node>.<kind>``
    event; ``forget(key)`` is told the idempotency key of a job no longer kept."""

    def __init__(
        self,
        config: AgentConfig,
        policy: Policy,
        trusted: TrustedKeys | None,
        planes_of: Callable[[], Planes | None],
        publish: Publish,
        forget: Callable[[str], object],
    ) -> None:
        self.node = config.node
        self.config = config
        self.policy = policy
        self.trusted = trusted
        self._planes_of = planes_of
        self._publish = publish
        self._forget = forget
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self.migrations: dict[str, asyncio.Task[None]] = {}
        # A running migration's ``set_rate`` (its QEMU limits and its NATS streams).
        self.migration_rates: dict[str, Callable[[int | None], Awaitable[None]]] = {}
        self.holds: OrderedDict[str, Hold] = OrderedDict()  # by the backup's transfer id
        self._publishing: set[asyncio.Task[None]] = set()
        # Counters of finished jobs (running ones are added at each scrape).
        self._outcomes: dict[tuple[str, str], int] = {}
        self._totals: dict[tuple[str, str], float] = {}
        self._backups: dict[tuple[str, str, str], int] = {}  # (role, kind, outcome)
        self._tagging: dict[str, asyncio.Lock] = {}  # by restic repository
        # An installer's TPM (checks an approval's binding) and what the agent does when a
        # provision that asked to reboot or power off has verified (set by the agent).
        self.evidence: Evidence | None = None
        self.on_then: Callable[[str], None] | None = None

    @property
    def planes(self) -> Planes:
        planes = self._planes_of()
        assert planes is not None, "the agent is not connected"
        return planes

    def running(self) -> int:
        return sum(j.running for j in self.jobs.values())

    def is_running(self, transfer_id: str) -> bool:
        job = self.jobs.get(transfer_id)
        return job is not None and job.running

    def tasks(self) -> list[asyncio.Task[None]]:
        """What the agent waits for when it drains: running jobs and migrations."""
        running = [j.task for j in self.jobs.values() if j.running and j.task]
        held = [h.task for h in self.holds.values() if h.task and not h.task.done()]
        return running + held + [t for t in self.migrations.values() if not t.done()]

    def cancel_all(self) -> None:
        for job in self.jobs.values():
            if job.running and job.handle is not None:
                job.handle.cancel(resumable=True)  # a drained agent's jobs are interrupted
        for task in self.migrations.values():
            task.cancel()  # rolls back before it ends
        for hold in self.holds.values():
            hold.confirm(False)  # a stopping agent's checkpoints roll back, losing nothing

    def env(self) -> dict[str, str]:
        """A tool's environment: the agent's, less its own NATS logins (URLs with passwords,
        creds and NKey files are the node's, not the tool's), plus the config's ``[env]``."""
        own = {k: v for k, v in os.environ.items() if not k.startswith("NBDNATS_")}
        return {**own, **self.config.env}

    # -- events ----------------------------------------------------------------------------

    def event(self, job: Job, state: str | None = None, **extra: Any) -> TransferEvent:
        context = {
            "op": job.op,
            "key": job.key,
            "endpoint": job.endpoint,
            "tool": job.tool.name if job.tool else None,
            "format": job.handle.format if job.handle else None,
            **(job.info or {}),
            **extra,
        }
        if job.handle is not None:
            ev = event_of(job.handle.stats(), self.node, **context)
            return ev if state is None else msgspec.structs.replace(ev, state=state)
        return TransferEvent(
            transfer_id=job.transfer_id,
            node=self.node,
            role=job.role,
            state=state or "accepted",
            **context,
        )

    async def progress(self) -> None:
        for job in list(self.jobs.values()):
            if job.running and job.handle is not None and not job.handle.done():
                await self._publish("transfer", encode(self.event(job, "running")))

    async def transfers(self, query: TransfersQuery) -> TransferList:
        jobs = [j for j in self.jobs.values() if query.transfer_id in (None, j.transfer_id)]
        return TransferList(transfers=[j.final or self.event(j, "running") for j in jobs])

    async def digest(self, query: DigestQuery) -> DigestReply:
        try:
            src = await self._endpoint(query.src, query.raw)
            digest, size = await image_digest(src, allow_local_file=True, raw=query.raw)
        except NbdNatsError as e:
            return DigestReply(ok=False, code=e.code, error=str(e))
        return DigestReply(ok=True, digest=digest, size=size)

    # -- starting transfers ----------------------------------------------------------------

    def _ends(self, cmd: SendCommand | RecvCommand | ProvisionCommand) -> dict[str, Any]:
        """What every end the agent starts is given: the command's transfer and options."""
        o = cmd.options
        return {
            "transfer_id": cmd.transfer_id,
            "planes": self.planes,
            "state_dir": self.config.state_dir,
            "window": o.window or _core.DEFAULT_WINDOW,
            "timeout": DEFAULT_TIMEOUT if o.timeout is None else o.timeout,
            "verify": o.verify,
            "raw": o.raw,
        }

    async def _endpoint(self, spec: str, raw: bool, *, target: bool = False) -> str:
        """The core endpoint for what a command named, once allowed; an image file served
        by qemu-nbd (``nbdnats.formats``) must open only allowed files too: its header
        (a backing file, a data file, a vmdk's extents) is data, not a permission."""
        endpoint = self.policy.endpoint(spec)
        for f in await formats.referenced_files(endpoint, raw=raw, target=target):
            if not f.startswith("/"):
                raise PolicyError(
                    f"{spec} refers to {f!r}, which is not a local file: this agent serves "
                    "only images whose files are under its allow-list (or pass --raw)"
                )
            self.policy.path(f, f"{spec} refers to a file: path")
        return endpoint

    async def send(self, cmd: SendCommand) -> Reply:
        if (cmd.src is None) == (cmd.tool is None):
            raise SchemaError("send command needs exactly one of 'src' and 'tool'")
        if cmd.incremental is not None:
            return await self._send_checkpoint(cmd)
        run: tools.ToolRun | None = None
        size: int | None = None
        if cmd.src is not None:
            endpoint = await self._endpoint(cmd.src, cmd.options.raw)
            shown = cmd.src
            if cmd.size is not None:
                raise SchemaError("'size' applies only to a tool's output")
        else:
            assert cmd.tool is not None
            argv = tools.restore_argv(cmd.tool, self.policy)
            size = cmd.size
            if size is None:
                size = await tools.image_size(cmd.tool, self.policy, self.env())
            run = await tools.ToolRun.start(argv, "restore", self.env())
            endpoint, shown = run.endpoint, tools.shown(argv)
        # The policy has checked every file an NBD URI names (policy.nbd_uri).
        started = start_send(
            endpoint,
            size=size,
            chunk_size=cmd.chunk_size,
            allow_local_file=True,
            rate=cmd.options.rate,
            compress=cmd.options.compress,
            streams=cmd.options.streams,
            **self._ends(cmd),
        )
        return await self._accept("send", "send", cmd, shown, started, run)

    # -- incremental backups: the source's checkpoint ---------------------------------------

    async def _take_checkpoint(self, src: str, since: str | None) -> Checkpoint:
        """A checkpoint of a VM this agent knows (all its writable disks at one instant),
        or of an allowed qcow2 image that nothing has open."""
        from nbdnats.backup import checkpoints

        workdir = resolve_state_dir(self.config.state_dir) / "checkpoints"
        if src in self.config.vms:
            return await checkpoints.vm_checkpoint(
                self.config.vms[src], src, since=since, workdir=workdir
            )
        # Its header's files (a backing file, a data file) are opened too: allowed ones only.
        path = await self._endpoint(src, raw=False)
        if not path.startswith("/") or formats.format_of(path) != "qcow2":
            known = ", ".join(sorted(self.config.vms)) or "none"
            raise UsageError(
                f"an incremental backup of {src} needs a VM this agent knows (--vm; it knows: "
                f"{known}) or a qcow2 image file (its dirty bitmaps record the changes)"
            )
        return await checkpoints.offline_checkpoint(path, src, since=since, workdir=workdir)

    async def _send_checkpoint(self, cmd: SendCommand) -> SendReply:
        """Take a checkpoint of ``cmd.src``, send each of its disks (only what changed since
        ``cmd.incremental.since`` where the checkpoint has a bitmap for it) and hold the
        checkpoint until the ``checkpoint`` command or the timeout ends it."""
        assert cmd.src is not None and cmd.incremental is not None
        if cmd.chunk_size is not None or cmd.size is not None:
            raise SchemaError("an incremental send takes neither 'size' nor 'chunk_size'")
        tid = cmd.transfer_id
        if tid in self.holds and not self.holds[tid].ended.done():
            raise BusyError(f"backup {tid} already holds a checkpoint on {self.node}")
        # One checkpoint of a source at a time: a second one's recovery would take the
        # first one's views and bitmaps for a killed run's leftovers.
        source = self.config.vms.get(cmd.src) or self.policy.endpoint(cmd.src)
        for other in self.holds.values():
            if other.source == source and not other.ended.done():
                raise BusyError(
                    f"backup {other.transfer_id} of {cmd.src} is still running on {self.node}; "
                    "run the next one once it has ended"
                )
        checkpoint = await self._take_checkpoint(cmd.src, cmd.incremental.since)
        ends = self._ends(cmd)
        await checkpoint.__aenter__()
        hold = Hold(checkpoint, tid, ends["timeout"] or DEFAULT_TIMEOUT, source)
        self.holds[tid] = hold
        started: list[Job] = []
        disks: list[DiskSend] = []
        try:
            for n, view in enumerate(checkpoint.disks):
                mode: BackupKind = "full" if view.bitmap is None else "incremental"
                # Why full: the controller's reason when it asked for a full run, else the
                # checkpoint's (the source no longer holds ``since``).
                asked = cmd.incremental.reason if cmd.incremental.since is None else ""
                reason = "" if view.bitmap else (asked or checkpoint.reason or "no bitmap")
                disk = DiskSend(
                    transfer_id=subjects.backup_disk_id(tid, n),
                    disk=view.disk,
                    size=view.size,
                    mode=mode,
                    reason=reason,
                    checkpoint=checkpoint.name,
                    since=checkpoint.since if mode == "incremental" else None,
                )
                one = {**ends, "transfer_id": disk.transfer_id}
                # The checkpoint's own read-only export of the frozen disk: no policy applies.
                handle = start_send(
                    view.uri,
                    dirty_bitmap=view.bitmap,
                    rate=cmd.options.rate,
                    compress=cmd.options.compress,
                    **one,
                )
                info = {
                    "checkpoint": checkpoint.name,
                    "backup_kind": mode,
                    "reason": reason or None,
                }
                keyed = msgspec.structs.replace(cmd, transfer_id=disk.transfer_id)
                await self._accept("send", "send", keyed, view.disk, handle, None, info=info)
                started.append(self.jobs[disk.transfer_id])
                disks.append(disk)
        except BaseException:
            for job in started:
                if job.handle is not None:
                    job.handle.cancel()
            hold.confirm(False)
            hold.start([self._sent(j) for j in started])
            raise
        hold.start([self._sent(j) for j in started])
        self._trim_holds()
        log.info(
            "checkpoint %s of %s (%s): %d disk(s)",
            checkpoint.name,
            cmd.src,
            f"since {checkpoint.since}" if checkpoint.since else f"full: {checkpoint.reason}",
            len(disks),
        )
        return SendReply(ok=True, transfer_id=tid, disks=disks)

    @staticmethod
    async def _sent(job: Job) -> bool:
        """Whether a disk's send ended done (its job reported)."""
        if job.task is not None:
            await asyncio.shield(job.task)
        return job.final is not None and job.final.state == "done"

    def _give_up(self, hold: Hold) -> None:
        """Roll a held checkpoint back now: stop its disks' sends too."""
        prefix = f"{hold.transfer_id}-disk"
        for job in self.jobs.values():
            if job.running and job.transfer_id.startswith(prefix) and job.handle is not None:
                job.handle.cancel()
        hold.confirm(False)

    def _trim_holds(self) -> None:
        ended = [k for k, h in self.holds.items() if h.ended.done()]
        for k in ended[: max(0, len(self.holds) - KEEP_FINISHED)]:
            del self.holds[k]

    async def checkpoint(self, cmd: CheckpointCommand) -> Reply:
        """The controller's word on a held checkpoint: commit it (every snapshot stored) or
        roll it back. The reply says which happened."""
        subjects.check_token(cmd.transfer_id, "transfer id")
        hold = self.holds.get(cmd.transfer_id)
        if hold is None:
            raise TransferError(
                f"{self.node} holds no checkpoint of backup {cmd.transfer_id} (its agent "
                "restarted?): the next backup sends these changes again"
            )
        if cmd.ok:
            hold.confirm(True)
        else:
            self._give_up(hold)
        await hold.outcome()
        return Reply(ok=True, transfer_id=cmd.transfer_id)

    async def recv(self, cmd: RecvCommand) -> Reply:
        if self.config.role == "installer":
            raise PolicyError(
                f"{self.node} is an installer: it writes its disks only through 'provision' "
                "with a signed approval"
            )
        if (cmd.dst is None) == (cmd.tool is None):
            raise SchemaError("recv command needs exactly one of 'dst' and 'tool'")
        run: tools.ToolRun | None = None
        base: tools.ToolRun | None = None
        if cmd.dst is not None:
            endpoint, shown = await self._endpoint(cmd.dst, cmd.options.raw, target=True), cmd.dst
        else:
            assert cmd.tool is not None
            tags = tools.labels(cmd.tool, cmd.transfer_id)
            argv = tools.backup_argv(cmd.tool, self.policy, tags)
            base_argv = tools.base_argv(cmd.tool, self.policy)
            if base_argv is not None:
                await self._check_parent(cmd.tool)
                base = await tools.ToolRun.start(base_argv, "restore", self.env())
            try:
                run = await tools.ToolRun.start(argv, "backup", self.env())
            except BaseException:
                if base is not None:
                    await base.abort()
                raise
            endpoint, shown = run.endpoint, tools.shown(argv)
        # The policy has checked every file an NBD URI names (policy.nbd_uri).
        started = start_recv(
            endpoint,
            target_is_zero=cmd.target_is_zero,
            allow_local_file=True,
            # The parent's image, read as the stream arrives: what did not change.
            base=base.endpoint.removeprefix("pipe:") if base is not None else None,
            **self._ends(cmd),
        )
        backup = cmd.tool if cmd.tool is not None and cmd.tool.kind == "restic" else None
        try:
            return await self._accept(
                "recv", "recv", cmd, shown, started, run, backup=backup, base=base
            )
        except BaseException:
            if base is not None:
                await base.abort()
            raise

    async def _check_parent(self, tool: Tool) -> None:
        """An incremental snapshot is the parent's image with the changes laid over it: the
        parent must be a whole backup of the same disk, whoever chose it."""
        if tool.node is None or tool.disk is None:
            raise SchemaError("an incremental backup's tool names its disk: node and disk")
        found, _ = await tools.list_backups(tool, self.policy, self.env())
        mine = next((b for b in found if b.id == tool.parent), None)
        name = f"{tool.node}:{tool.disk}"
        if mine is None or mine.size is None:
            what = "is not a backup of" if mine is None else "is an unfinished backup of"
            raise UsageError(
                f"snapshot {str(tool.parent)[:8]} {what} {name} in this repository: an "
                "incremental backup is laid only over a whole backup of the same disk "
                "(run it without --incremental)"
            )

    async def backups(self, query: BackupsQuery) -> BackupList:
        """The snapshots nbdnats stored in a restic repository (``tools.backups_argv``)."""
        found, skipped = await tools.list_backups(query.tool, self.policy, self.env())
        if skipped:
            log.warning("backups: %d snapshot(s) with invalid ids or tags left out", skipped)
        return BackupList(ok=True, backups=found, skipped=skipped)

    async def provision(self, cmd: ProvisionCommand) -> Reply:
        if self.trusted is None:
            raise PolicyError(
                f"{self.node} has no --trusted-keys: it accepts no provisioning approvals"
            )
        device = self.policy.path(cmd.device, "device")
        self.trusted.verify(
            cmd.approval, node=self.node, device=device, image_digest=cmd.image_digest
        )
        if cmd.then != "stay" and self.config.then_file is None:
            raise PolicyError(
                f"{self.node} cannot {cmd.then} after a provision: its agent has no "
                "--then-file (an installer's /init gives it one)"
            )
        if self.evidence is not None:
            await self.evidence.check(cmd.approval, cmd.quote_nonce)
        elif cmd.approval.ak_name is not None:
            raise AttestationError(
                f"the approval is bound to a TPM, but {self.node} has none (--tpm)"
            )
        # The approval names the image's sha256: the stream is hashed as it is written,
        # and a different image leaves the device wiped at both ends, never bootable.
        digest = cmd.approval.image_digest
        started = start_recv(device, expect_sha256=digest, **self._ends(cmd))
        return await self._accept(
            "provision", "recv", cmd, cmd.device, started, None, digest, then=cmd.then
        )

    async def _accept(
        self,
        op: str,
        role: str,
        cmd: Command,
        shown: str,
        started: Awaitable[TransferHandle],
        run: tools.ToolRun | None,
        approved_digest: str | None = None,
        backup: Tool | None = None,
        base: tools.ToolRun | None = None,
        info: dict[str, Any] | None = None,
        then: str = "stay",
    ) -> Reply:
        """Keep and watch the job of a transfer being started; its tool is stopped if the
        start fails. The agent publishes the job's ctl events itself (with op and tool)."""
        try:
            handle = await started
        except BaseException:
            if run is not None:
                await run.abort()
            raise
        handle.ctl_events = False
        job = Job(op, role, cmd.transfer_id, cmd.key, shown, handle, run)
        job.approved_digest = approved_digest
        job.then = then
        job.backup = backup
        job.base = base
        if info is None and backup is not None and backup.checkpoint is not None:
            kind = "full" if backup.parent is None else "incremental"
            info = {"checkpoint": backup.checkpoint, "backup_kind": kind, "parent": backup.parent}
        job.info = info
        self.jobs[job.transfer_id] = job
        self.jobs.move_to_end(job.transfer_id)
        self._trim()
        job.task = asyncio.create_task(self._watch(job))
        log.info("accepted %s %s (%s)", op, job.transfer_id, job.endpoint)
        await self._publish("transfer", encode(self.event(job, "accepted")))
        return Reply(ok=True, transfer_id=job.transfer_id)

    def _trim(self) -> None:
        finished = [k for k, j in self.jobs.items() if not j.running]
        for k in finished[: max(0, len(self.jobs) - KEEP_FINISHED)]:
            self._forget(self.jobs.pop(k).key)

    async def cancel(self, cmd: CancelCommand) -> Reply:
        task = self.migrations.get(cmd.transfer_id)
        if task is not None and not task.done():
            task.cancel()
            return Reply(ok=True, transfer_id=cmd.transfer_id)
        hold = self.holds.get(cmd.transfer_id)
        if hold is not None and not hold.ended.done():
            self._give_up(hold)
            return Reply(ok=True, transfer_id=cmd.transfer_id)
        job = self.jobs.get(cmd.transfer_id)
        if job is None or not job.running:
            state = "finished" if job else "unknown"
            return Reply(
                ok=False,
                transfer_id=cmd.transfer_id,
                code="usage",
                error=f"no running transfer {cmd.transfer_id} on {self.node} ({state})",
            )
        if job.handle is not None:
            job.handle.cancel()
        return Reply(ok=True, transfer_id=cmd.transfer_id)

    async def rate(self, cmd: RateCommand) -> Reply:
        """Change the cap of the sending end(s) this node runs for ``cmd.transfer_id``: a
        transfer, each disk of an incremental backup, or a migration's streams."""
        tid = cmd.transfer_id
        setter = self.migration_rates.get(tid)
        task = self.migrations.get(tid)
        if setter is not None and task is not None and not task.done():
            await setter(cmd.rate)
            return Reply(ok=True, transfer_id=tid)
        hold = self.holds.get(tid)
        ids = {tid}
        if hold is not None and not hold.ended.done():
            # Its disks' streams (at most one per job this node keeps).
            ids |= {subjects.backup_disk_id(tid, n) for n in range(len(self.jobs))}
        found = [self.jobs[i] for i in ids if i in self.jobs]
        sending = [j for j in found if j.running and j.role == "send" and j.handle is not None]
        if not sending:
            if any(j.running for j in found):
                why = "this node receives it; a cap applies to its sending end"
            else:
                why = "finished" if found else "unknown"
            return Reply(
                ok=False,
                transfer_id=tid,
                code="usage",
                error=f"no running sending end of transfer {tid} on {self.node} ({why})",
            )
        for job in sending:
            assert job.handle is not None
            job.handle.set_rate(cmd.rate)
        log.info("rate of %s: %s", tid, f"{cmd.rate} bytes/s" if cmd.rate else "no cap")
        return Reply(ok=True, transfer_id=tid)

    # -- running transfers -----------------------------------------------------------------

    async def _watch(self, job: Job) -> None:
        """Wait for a job's end, finish or stop its tool, check its digest, report once."""
        assert job.handle is not None
        extra: dict[str, Any] = {}
        try:
            stats = await job.handle.wait()
            try:
                if job.base is not None:
                    await job.base.finish()  # the parent was read whole: restic dump ended well
                if job.tool is not None:
                    extra["tool_output"] = await job.tool.finish()
            finally:
                job.tool_ended.set()
            if job.backup is not None:
                extra["tool_output"] = await self._tag(job, stats, extra["tool_output"])
            if job.approved_digest is not None:
                extra["image_digest"] = await self._read_back(job, stats.size)
            state = "done"
        except NbdNatsError as e:
            cause = await job.tool.abort() if job.tool is not None else None
            if job.base is not None:
                cause = await job.base.abort() or cause
            state = "cancelled" if isinstance(e, TransferCancelled) else "failed"
            job.tool_ended.set()
            extra |= {"error_code": e.code, "error": cause or str(e)}
            extra["from_peer"] = e.from_peer and not cause
        except Exception as e:  # report, never leave a job half-reported
            log.exception("job %s failed", job.transfer_id)
            if job.tool is not None:
                await job.tool.abort()
            if job.base is not None:
                await job.base.abort()
            job.tool_ended.set()
            state, extra = "failed", {"error_code": "error", "error": f"agent error: {e}"}
        job.final = self.event(job, state, **extra)
        outcome = (job.role, state)
        self._outcomes[outcome] = self._outcomes.get(outcome, 0) + 1
        for key, value in _tallies(job.role, job.handle.stats()):
            self._totals[key] = self._totals.get(key, 0) + value
        if job.info is not None:
            tally = (job.role, str(job.info.get("backup_kind")), state)
            self._backups[tally] = self._backups.get(tally, 0) + 1
            dirty = ("dirty", job.role)
            self._totals[dirty] = self._totals.get(dirty, 0) + job.final.dirty_bytes
        log.info(
            "%s %s %s%s",
            job.op,
            job.transfer_id,
            state,
            f": {extra['error']}" if "error" in extra else "",
        )
        await self._publish("transfer", encode(job.final))
        if state == "done" and job.then != "stay" and self.on_then is not None:
            self.on_then(job.then)

    async def _tag(self, job: Job, stats: _core.Stats, output: str) -> str:
        """Tag a restic backup's snapshot once no other backup of this agent into the same
        repository still runs its restic: ``restic tag`` needs the repository to itself, and
        the disks of one VM, stored side by side, would otherwise keep each other's tags
        out (and an incremental run needs them: ``nbdnats.backup.chain``). One tag at a
        time per repository; a restic that is stopping ends without this."""
        assert job.backup is not None
        repo = job.backup.repo or ""
        async with self._tagging.setdefault(repo, asyncio.Lock()):
            for other in list(self.jobs.values()):
                same = other.backup is not None and other.backup.repo == repo
                if other is not job and same and other.running:
                    await other.tool_ended.wait()
            return await tools.tag_backup(
                job.backup,
                self.policy,
                self.env(),
                job.transfer_id,
                output,
                tools.done_tags(stats.digest, stats.size),
            )

    async def _read_back(self, job: Job, size: int) -> str:
        """Read the written image back from the device (not the page cache) and compare."""
        path = job.endpoint
        with contextlib.suppress(OSError):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        digest, _ = await image_digest(self.policy.path(path, "device"), length=size)
        if digest != job.approved_digest:
            raise IntegrityError(
                f"{path} reads back as {digest}, not the approved {job.approved_digest}"
            )
        return digest

    # -- migrations ------------------------------------------------------------------------

    async def migrate(self, cmd: MigrateCommand) -> Reply:
        if cmd.vm not in self.config.vms:
            known = ", ".join(sorted(self.config.vms)) or "none"
            raise PolicyError(f"no VM {cmd.vm!r} on {self.node} (its agent knows: {known}; --vm)")
        subjects.check_token(cmd.to_node, "node name")
        mid = cmd.transfer_id
        if mid in self.migrations and not self.migrations[mid].done():
            raise BusyError(f"migration {mid} is already running on {self.node}")
        task = self.migrations[mid] = asyncio.create_task(self._migrate(cmd))
        task.add_done_callback(lambda _: self.migration_rates.pop(mid, None))
        log.info("accepted migrate %s of %s to %s", mid, cmd.vm, cmd.to_node)
        return Reply(ok=True, transfer_id=mid)

    async def _migrate(self, cmd: MigrateCommand) -> None:
        """Run a migration of one of this node's VMs; report each state and the end as
        ``ctl.evt.<node>.migration``."""
        from nbdnats.migration import run as migrate
        from nbdnats.migration.remote import AgentPath, RemoteQmp

        planes, mid = self.planes, cmd.transfer_id
        seen: list[str] = []

        def publish(state: str, **fields: Any) -> None:
            event = MigrationEvent(
                migration_id=mid, node=self.node, state=state, mode="nats", **fields
            )
            task = asyncio.create_task(self._publish("migration", encode(event)))
            self._publishing.add(task)
            task.add_done_callback(self._publishing.discard)

        def on_progress(p: migrate.Progress) -> None:
            if not seen or seen[-1] != p.state.value:
                seen.append(p.state.value)
                if p.state not in (migrate.State.DONE, migrate.State.FAILED):
                    publish(p.state.value)

        def dst_monitor(changed: asyncio.Event) -> RemoteQmp:
            return RemoteQmp(planes.ctl, cmd.to_node, cmd.vm, mid, changed)

        path = AgentPath(planes, cmd.to_node, cmd.vm, mid, timeout=cmd.timeout)
        control = migrate.RateControl()
        self.migration_rates[mid] = control.set_rate
        try:
            report = await migrate.migrate(
                self.config.vms[cmd.vm],
                f"{cmd.to_node}:{cmd.vm}",
                path=path,
                migration_id=mid,
                timeout=cmd.timeout,
                mirror_speed=cmd.mirror_speed,
                on_progress=on_progress,
                return_path=cmd.return_path,
                dst_monitor=dst_monitor,
                rate=cmd.rate,
                control=control,
            )
        except asyncio.CancelledError:
            publish("cancelled", error_code="cancelled", error="cancelled (rolled back)")
            log.info("migrate %s cancelled", mid)
            return
        except NbdNatsError as e:
            publish("failed", error_code=e.code, error=str(e))
            log.info("migrate %s failed: %s", mid, e)
            return
        except Exception as e:  # report, never leave a migration half-reported
            log.exception("migrate %s failed", mid)
            publish("failed", error_code="error", error=f"agent error: {e}")
            return
        fields = msgspec.structs.asdict(report)
        publish("done", **{k: v for k, v in fields.items() if k in _MIGRATION_FIELDS})
        log.info("migrate %s done: downtime %d ms", mid, report.downtime_ms)

    # -- metrics ---------------------------------------------------------------------------

    def samples(self) -> Iterable[Sample]:
        """Each job's gauges and the node's transfer counters."""
        totals: dict[tuple[str, str], float] = dict(self._totals)
        active = {"send": 0, "recv": 0}
        for job in self.jobs.values():
            if job.handle is None:
                continue
            s = job.handle.stats()
            labels = {"transfer": job.transfer_id, "op": job.op, "role": job.role}
            failed = 1 if job.final is not None and job.final.state == "failed" else 0
            yield ("nbdnats_transfer_done_bytes", labels, s.done_bytes)
            yield ("nbdnats_transfer_size_bytes", labels, s.size)
            yield ("nbdnats_transfer_rate_bytes_per_second", labels, s.mb_per_s * 1e6)
            yield ("nbdnats_transfer_retransmits", labels, s.retransmits)
            yield ("nbdnats_transfer_errors", labels, s.bad_frames + s.corrupt_frames + failed)
            if job.running:
                active[job.role] += 1
                for key, value in _tallies(job.role, s):
                    totals[key] = totals.get(key, 0) + value
        for role in ("send", "recv"):
            by_role = {"role": role}
            yield ("nbdnats_transfer_bytes_total", by_role, totals.get(("bytes", role), 0))
            yield ("nbdnats_transfer_data_bytes_total", by_role, totals.get(("data", role), 0))
            yield ("nbdnats_transfers_active", by_role, active[role])
        for reason in ("bad", "corrupt", "duplicate"):
            dropped = totals.get(("frames", reason), 0)
            yield ("nbdnats_frames_dropped_total", {"reason": reason}, dropped)
        for (role, outcome), n in sorted(self._outcomes.items()):
            yield ("nbdnats_transfers_total", {"role": role, "outcome": outcome}, n)
        for (role, kind, outcome), n in sorted(self._backups.items()):
            labels = {"role": role, "kind": kind, "outcome": outcome}
            yield ("nbdnats_backups_total", labels, n)
        for role in ("send", "recv"):
            dirty = totals.get(("dirty", role), 0)
            yield ("nbdnats_backup_dirty_bytes_total", {"role": role}, dirty)


def _tallies(role: str, s: _core.Stats) -> list[tuple[tuple[str, str], float]]:
    """What a job adds to the node's counters."""
    return [
        (("bytes", role), s.done_bytes),
        (("data", role), s.data_bytes),
        (("frames", "bad"), s.bad_frames),
        (("frames", "corrupt"), s.corrupt_frames),
        (("frames", "duplicate"), s.duplicate_frames),
    ]


_MIGRATION_FIELDS = set(MigrationEvent.__struct_fields__) - {"v", "migration_id", "node", "mode"}
