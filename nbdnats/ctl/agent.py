"""The node agent: one per host (VM host, bare-metal host, RAM-booted installer).

It holds both planes, serves ``ctl.cmd.<node>.<op>`` and ``ctl.qry.<node>.<what>``,
publishes ``ctl.evt.<node>.<kind>`` (and the core publishes ``data.evt.<transfer>.*``), and
runs each accepted command as a job: one end of a transfer, with a backup tool or an
approval check around it when the command asks for one.

Lifecycle, as aiohttp's runner: ``start()`` connects, creates the event stream if missing,
subscribes and announces; ``stop()`` stops taking commands, lets running jobs finish for
``drain_timeout`` seconds, cancels the rest (telling their peers), reports every job's end,
announces ``stopped`` and closes. SIGTERM and SIGINT call ``stop()``.

Every command is checked before anything is opened: schema and version, idempotency key,
role, allow-list (``nbdnats.ctl.policy``), approval (``nbdnats.approval``). A refusal is the
reply's error and a ``ctl.evt.<node>.refused`` event; the agent carries on.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import logging
import os
from collections import OrderedDict
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from nbdnats import _core, subjects
from nbdnats.approval import TrustedKeys
from nbdnats.ctl import events, tools
from nbdnats.ctl.metrics import MetricsServer, Sample
from nbdnats.ctl.policy import Policy
from nbdnats.errors import (
    BusyError,
    ConflictError,
    IntegrityError,
    NbdNatsError,
    PolicyError,
    SchemaError,
    TransferCancelled,
    UsageError,
)
from nbdnats.migration.remote import Incoming
from nbdnats.planes import Login, Planes, redact_url
from nbdnats.schemas import (
    COMMANDS,
    QUERIES,
    CancelCommand,
    Command,
    DigestQuery,
    DigestReply,
    IncomingCommand,
    MigrateCommand,
    MigrationEvent,
    NodeInfo,
    ProvisionCommand,
    QmpCommand,
    QmpEventsQuery,
    RecvCommand,
    RefusedEvent,
    Reply,
    Role,
    SendCommand,
    TransferEvent,
    TransferList,
    TransfersQuery,
    decode,
    encode,
)
from nbdnats.transfer import (
    DEFAULT_TIMEOUT,
    TransferHandle,
    event_of,
    image_digest,
    start_recv,
    start_send,
)

log = logging.getLogger("nbdnats.ctl.agent")

ANNOUNCE_INTERVAL = 30.0  # seconds between announcements (NodeInfo.announce_interval)
PROGRESS_INTERVAL = 1.0  # at most one progress event per job per this many seconds
DRAIN_TIMEOUT = 30.0  # on SIGTERM, how long running jobs may take to finish
KEEP_FINISHED = 256  # finished jobs kept for queries, metrics and idempotent replies


@dataclass
class AgentConfig:
    node: str
    data_url: str | None = None
    ctl_url: str | None = None
    # Login files (--creds, --nkey; default $NBDNATS_CREDS/$NBDNATS_NKEY), read here only.
    creds: str | None = None
    nkey: str | None = None
    role: Role = "host"
    allow: list[str] = field(default_factory=list)
    exports: dict[str, str] = field(default_factory=dict)
    trusted_keys: Path | None = None
    metrics_addr: str | None = None
    state_dir: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    # VMs this node's agent may migrate or receive: name -> QMP unix socket.
    vms: dict[str, str] = field(default_factory=dict)
    announce_interval: float = ANNOUNCE_INTERVAL
    progress_interval: float = PROGRESS_INTERVAL
    drain_timeout: float = DRAIN_TIMEOUT


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
    task: asyncio.Task[None] | None = None
    approved_digest: str | None = None
    final: TransferEvent | None = None

    @property
    def running(self) -> bool:
        return self.final is None


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.node = subjects.check_token(config.node, "node name")
        self.policy = Policy(config.allow, config.exports)
        self.trusted = TrustedKeys(config.trusted_keys) if config.trusted_keys else None
        if config.role == "installer" and self.trusted is None:
            raise UsageError("--role installer needs --trusted-keys DIR (the approvers' keys)")
        for name in config.exports:
            subjects.check_token(name, "export name")
        self.planes: Planes | None = None
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self._keys: dict[str, tuple[str, asyncio.Future[Reply]]] = {}
        self._subs: list[Subscription] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._handling: set[asyncio.Task[None]] = set()
        self._state = "up"
        self._started = dt.datetime.now(dt.UTC)
        self._stopped = asyncio.Event()
        self._counts: dict[tuple[str, str], int] = {}
        # Counters of finished jobs (running ones are added at each scrape).
        self._outcomes: dict[tuple[str, str], int] = {}
        self._totals: dict[tuple[str, str], float] = {}
        self.metrics = (
            MetricsServer(config.metrics_addr, self._samples) if config.metrics_addr else None
        )
        for name in config.vms:
            subjects.check_token(name, "VM name")
        self.incoming = Incoming(lambda: self.planes, config.vms)
        self.migrations: dict[str, asyncio.Task[None]] = {}
        self.stream_problem: str | None = None

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        login = Login.resolve(self.config.creds, self.config.nkey)
        self.planes = await Planes.connect(
            self.config.data_url, self.config.ctl_url, self.node, login
        )
        ctl = self.planes.ctl
        self.stream_problem = await events.ensure_stream(ctl)
        if self.stream_problem:
            log.warning("events are not stored: %s", self.stream_problem)
        if self.metrics:
            await self.metrics.start()
        # Each message is handled in a task of its own: nats-py runs a subscription's
        # callbacks one at a time, and a digest query or a tool's start may take a while.
        self._subs = [
            await ctl.subscribe(subjects.ctl_commands(self.node), cb=self._spawn(self._on_command)),
            await ctl.subscribe(subjects.ctl_queries(self.node), cb=self._spawn(self._on_query)),
        ]
        await self._announce()
        self._tasks = [
            asyncio.create_task(self._every(self.config.announce_interval, self._announce)),
            asyncio.create_task(self._every(self.config.progress_interval, self._progress)),
        ]
        log.info(
            "agent %s (%s) up on ctl %s, data %s%s",
            self.node,
            self.config.role,
            redact_url(ctl.connected_url.netloc) if ctl.connected_url else "?",
            redact_url(self.planes.data.servers),
            f", metrics on {self.metrics.host}:{self.metrics.port}" if self.metrics else "",
        )

    def _spawn(self, handler: Any) -> Any:
        async def dispatch(msg: Msg) -> None:
            task = asyncio.create_task(handler(msg))
            self._handling.add(task)
            task.add_done_callback(self._handling.discard)

        return dispatch

    async def stop(self, drain_timeout: float | None = None) -> None:
        """Stop taking commands, drain or cancel running jobs, report them, close."""
        if self._state != "up" or self.planes is None:
            return
        self._state = "stopping"
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        await self._announce()
        running = [j.task for j in self.jobs.values() if j.running and j.task]
        running += [t for t in self.migrations.values() if not t.done()]
        if running:
            grace = self.config.drain_timeout if drain_timeout is None else drain_timeout
            log.info("draining %d running job(s) for up to %.0f s", len(running), grace)
            _, late = await asyncio.wait(running, timeout=grace)
            for job in self.jobs.values():
                if job.running and job.handle is not None:
                    job.handle.cancel()
            for task in self.migrations.values():
                task.cancel()  # rolls back before it ends
            if late:
                await asyncio.wait(late, timeout=60)
        await self.incoming.close_all()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._state = "stopped"
        await self._announce()
        if self.metrics:
            await self.metrics.stop()
        await self.planes.close()
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def _every(self, interval: float, work: Any) -> None:
        while True:
            await asyncio.sleep(interval)
            with contextlib.suppress(Exception):
                await work()

    # -- announcements and events ----------------------------------------------------------

    def info(self) -> NodeInfo:
        caps = ["send", "recv", "digest", "restic", "kopia", "pipe"]
        if self.trusted is not None:
            caps.append("provision")
        if self.metrics is not None:
            caps.append("metrics")
        if self.config.role == "installer":
            caps.remove("recv")
        if self.config.vms:
            caps.append("migrate")
        return NodeInfo(
            node=self.node,
            version=_core.__version__,
            role=self.config.role,
            state=self._state,  # type: ignore[arg-type]
            capabilities=caps,
            exports=dict(self.config.exports),
            started=self._started,
            at=dt.datetime.now(dt.UTC),
            running=sum(j.running for j in self.jobs.values()),
            announce_interval=self.config.announce_interval,
            vms=sorted(self.config.vms),
        )

    async def _publish(self, kind: str, payload: bytes) -> None:
        assert self.planes is not None
        with contextlib.suppress(Exception):
            await self.planes.ctl.publish(subjects.ctl_event(self.node, kind), payload)

    async def _announce(self) -> None:
        await self._publish("announce", encode(self.info()))

    def _event(self, job: Job, state: str | None = None, **extra: Any) -> TransferEvent:
        context = {
            "op": job.op,
            "key": job.key,
            "endpoint": job.endpoint,
            "tool": job.tool.name if job.tool else None,
            **extra,
        }
        if job.handle is not None:
            ev = event_of(job.handle.stats(), self.node, **context)
            return ev if state is None else _with_state(ev, state)
        return TransferEvent(
            transfer_id=job.transfer_id,
            node=self.node,
            role=job.role,
            state=state or "accepted",
            **context,
        )

    async def _progress(self) -> None:
        for job in list(self.jobs.values()):
            if job.running and job.handle is not None and not job.handle.done():
                await self._publish("transfer", encode(self._event(job, "running")))

    # -- commands --------------------------------------------------------------------------

    async def _on_command(self, msg: Msg) -> None:
        op = msg.subject.rsplit(".", 1)[-1]
        cmd: Any = None
        try:
            cls = COMMANDS.get(op)
            if cls is None:
                raise SchemaError(
                    f"unknown command {op!r}; this agent serves {', '.join(COMMANDS)}"
                )
            cmd = decode(cls, msg.data, f"{op} command")
            if isinstance(cmd, IncomingCommand | QmpCommand):
                # The destination's side of a migration: its own replies.
                answer = await (
                    self.incoming.incoming(cmd)
                    if isinstance(cmd, IncomingCommand)
                    else self.incoming.qmp(cmd)
                )
                if not answer.ok:
                    self._count(op, answer.code or "error")
                    log.info("refused %s: %s", op, answer.error)
                if msg.reply:
                    with contextlib.suppress(Exception):
                        await msg.respond(encode(answer))
                return
            if isinstance(cmd, CancelCommand):
                reply = self._cancel(cmd)
            else:
                assert isinstance(cmd, Command)
                reply = await self._once(op, cmd)
        except NbdNatsError as e:
            reply = Reply(ok=False, code=e.code, error=str(e))
        except Exception as e:  # a bug must not take the agent down; report it
            log.exception("command %s failed", op)
            reply = Reply(ok=False, code="error", error=f"agent error: {type(e).__name__}: {e}")
        self._count(op, "ok" if reply.ok else (reply.code or "error"))
        if not reply.ok:
            log.info("refused %s: %s", op, reply.error)
            await self._publish(
                "refused",
                encode(
                    RefusedEvent(
                        node=self.node,
                        op=op,
                        key=getattr(cmd, "key", None),
                        transfer_id=getattr(cmd, "transfer_id", None),
                        code=reply.code or "error",
                        error=reply.error or "",
                    )
                ),
            )
        if msg.reply:
            with contextlib.suppress(Exception):
                await msg.respond(encode(reply))

    async def _once(self, op: str, cmd: Command) -> Reply:
        """Run a command once per idempotency key: a retry gets the first reply."""
        if not cmd.key:
            raise SchemaError(f"{op} command has no idempotency key ('key')")
        subjects.check_token(cmd.transfer_id, "transfer id")
        fingerprint = hashlib.sha256(op.encode() + b"\0" + encode(cmd)).hexdigest()
        if cmd.key in self._keys:
            first, pending = self._keys[cmd.key]
            if first != fingerprint:
                raise ConflictError(
                    f"idempotency key {cmd.key} was used for a different command; "
                    "use a new key for a new command"
                )
            return await asyncio.shield(pending)
        if self._state != "up":
            raise BusyError(f"agent {self.node} is shutting down")
        existing = self.jobs.get(cmd.transfer_id)
        if existing is not None and existing.running:
            raise BusyError(f"transfer {cmd.transfer_id} is already running on {self.node}")
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._keys[cmd.key] = (fingerprint, future)
        try:
            reply = await self._start(op, cmd)
        except BaseException as e:
            del self._keys[cmd.key]  # a refusal is decided again on retry
            future.set_exception(e if isinstance(e, Exception) else RuntimeError(str(e)))
            future.exception()  # retrieved: duplicates waiting on it re-raise it
            raise
        future.set_result(reply)
        return reply

    async def _start(self, op: str, cmd: Command) -> Reply:
        if isinstance(cmd, SendCommand):
            job = await self._start_send(cmd)
        elif isinstance(cmd, RecvCommand):
            job = await self._start_recv(cmd)
        elif isinstance(cmd, ProvisionCommand):
            job = await self._start_provision(cmd)
        elif isinstance(cmd, MigrateCommand):
            return self._start_migration(cmd)
        else:  # pragma: no cover - COMMANDS and this dispatch are kept together
            raise SchemaError(f"unknown command {op!r}")
        self.jobs[job.transfer_id] = job
        self.jobs.move_to_end(job.transfer_id)
        self._trim()
        job.task = asyncio.create_task(self._watch(job))
        log.info("accepted %s %s (%s)", op, job.transfer_id, job.endpoint)
        await self._publish("transfer", encode(self._event(job, "accepted")))
        return Reply(ok=True, transfer_id=job.transfer_id)

    def _options(self, cmd: SendCommand | RecvCommand | ProvisionCommand) -> dict[str, Any]:
        o = cmd.options
        return {
            "window": o.window or _core.DEFAULT_WINDOW,
            "timeout": DEFAULT_TIMEOUT if o.timeout is None else o.timeout,
            "verify": o.verify,
        }

    async def _start_send(self, cmd: SendCommand) -> Job:
        assert self.planes is not None
        if (cmd.src is None) == (cmd.tool is None):
            raise SchemaError("send command needs exactly one of 'src' and 'tool'")
        run: tools.ToolRun | None = None
        size: int | None = None
        if cmd.src is not None:
            endpoint = self.policy.endpoint(cmd.src)
            shown = cmd.src
            if cmd.size is not None:
                raise SchemaError("'size' applies only to a tool's output")
        else:
            assert cmd.tool is not None
            argv = tools.restore_argv(cmd.tool, self.policy)
            size = cmd.size
            if size is None:
                size = await tools.image_size(cmd.tool, self.policy, self._env())
            run = await tools.ToolRun.start(argv, "restore", self._env())
            endpoint, shown = run.endpoint, tools.shown(argv)
        started = start_send(
            endpoint,
            transfer_id=cmd.transfer_id,
            planes=self.planes,
            size=size,
            chunk_size=cmd.chunk_size,
            state_dir=self.config.state_dir,
            # The policy has checked every file an NBD URI names (policy.nbd_uri).
            allow_local_file=True,
            **self._options(cmd),
        )
        return await self._job("send", "send", cmd, shown, started, run)

    async def _start_recv(self, cmd: RecvCommand) -> Job:
        assert self.planes is not None
        if self.config.role == "installer":
            raise PolicyError(
                f"{self.node} is an installer: it writes its disks only through 'provision' "
                "with a signed approval"
            )
        if (cmd.dst is None) == (cmd.tool is None):
            raise SchemaError("recv command needs exactly one of 'dst' and 'tool'")
        run: tools.ToolRun | None = None
        if cmd.dst is not None:
            endpoint, shown = self.policy.endpoint(cmd.dst), cmd.dst
        else:
            assert cmd.tool is not None
            tags = ["nbdnats", f"transfer={cmd.transfer_id}"]
            argv = tools.backup_argv(cmd.tool, self.policy, tags)
            run = await tools.ToolRun.start(argv, "backup", self._env())
            endpoint, shown = run.endpoint, tools.shown(argv)
        started = start_recv(
            endpoint,
            transfer_id=cmd.transfer_id,
            planes=self.planes,
            target_is_zero=cmd.target_is_zero,
            state_dir=self.config.state_dir,
            # The policy has checked every file an NBD URI names (policy.nbd_uri).
            allow_local_file=True,
            **self._options(cmd),
        )
        return await self._job("recv", "recv", cmd, shown, started, run)

    async def _job(
        self,
        op: str,
        role: str,
        cmd: Command,
        shown: str,
        started: Awaitable[TransferHandle],
        run: tools.ToolRun | None = None,
    ) -> Job:
        """The job of a transfer being started; its tool is stopped if the start fails.
        The agent publishes the job's ctl events itself (with op and tool)."""
        try:
            handle = await started
        except BaseException:
            if run is not None:
                await run.abort()
            raise
        handle.ctl_events = False
        return Job(op, role, cmd.transfer_id, cmd.key, shown, handle, run)

    async def _start_provision(self, cmd: ProvisionCommand) -> Job:
        assert self.planes is not None
        if self.trusted is None:
            raise PolicyError(
                f"{self.node} has no --trusted-keys: it accepts no provisioning approvals"
            )
        device = self.policy.path(cmd.device, "device")
        self.trusted.verify(
            cmd.approval, node=self.node, device=device, image_digest=cmd.image_digest
        )
        # The approval names the image's sha256: the stream is hashed as it is written,
        # and a different image leaves the device wiped at both ends, never bootable.
        started = start_recv(
            device,
            transfer_id=cmd.transfer_id,
            planes=self.planes,
            state_dir=self.config.state_dir,
            expect_sha256=cmd.approval.image_digest,
            **self._options(cmd),
        )
        job = await self._job("provision", "recv", cmd, cmd.device, started)
        job.approved_digest = cmd.approval.image_digest
        return job

    def _start_migration(self, cmd: MigrateCommand) -> Reply:
        if cmd.vm not in self.config.vms:
            known = ", ".join(sorted(self.config.vms)) or "none"
            raise PolicyError(f"no VM {cmd.vm!r} on {self.node} (its agent knows: {known}; --vm)")
        subjects.check_token(cmd.to_node, "node name")
        mid = cmd.transfer_id
        if mid in self.migrations and not self.migrations[mid].done():
            raise BusyError(f"migration {mid} is already running on {self.node}")
        self.migrations[mid] = asyncio.create_task(self._migrate(cmd))
        log.info("accepted migrate %s of %s to %s", mid, cmd.vm, cmd.to_node)
        return Reply(ok=True, transfer_id=mid)

    async def _migrate(self, cmd: MigrateCommand) -> None:
        """Run a migration of one of this node's VMs; report each state and the end as
        ``ctl.evt.<node>.migration``."""
        from nbdnats.migration import run as migrate
        from nbdnats.migration.remote import AgentPath, RemoteQmp

        assert self.planes is not None
        planes, mid = self.planes, cmd.transfer_id
        seen: list[str] = []

        def publish(state: str, **fields: Any) -> None:
            event = MigrationEvent(migration_id=mid, node=self.node, state=state, mode="nats",
                                   **fields)  # fmt: skip
            task = asyncio.create_task(self._publish("migration", encode(event)))
            self._handling.add(task)
            task.add_done_callback(self._handling.discard)

        def on_progress(p: migrate.Progress) -> None:
            if not seen or seen[-1] != p.state.value:
                seen.append(p.state.value)
                if p.state not in (migrate.State.DONE, migrate.State.FAILED):
                    publish(p.state.value)

        path = AgentPath(planes, cmd.to_node, cmd.vm, mid, timeout=cmd.timeout)
        try:
            report = await migrate.migrate(
                self.config.vms[cmd.vm], f"{cmd.to_node}:{cmd.vm}", path=path,
                migration_id=mid, timeout=cmd.timeout, mirror_speed=cmd.mirror_speed,
                on_progress=on_progress, return_path=cmd.return_path,
                dst_monitor=lambda changed: RemoteQmp(planes.ctl, cmd.to_node, cmd.vm, mid,
                                                      changed),
            )  # fmt: skip
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

    def _cancel(self, cmd: CancelCommand) -> Reply:
        task = self.migrations.get(cmd.transfer_id)
        if task is not None and not task.done():
            task.cancel()
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

    def _env(self) -> dict[str, str]:
        """A tool's environment: the agent's, less its own NATS logins (URLs with passwords,
        creds and NKey files are the node's, not the tool's), plus the config's ``[env]``."""
        own = {k: v for k, v in os.environ.items() if not k.startswith("NBDNATS_")}
        return {**own, **self.config.env}

    # -- running jobs ----------------------------------------------------------------------

    async def _watch(self, job: Job) -> None:
        """Wait for a job's end, finish or stop its tool, check its digest, report once."""
        assert job.handle is not None
        extra: dict[str, Any] = {}
        try:
            stats = await job.handle.wait()
            if job.tool is not None:
                extra["tool_output"] = await job.tool.finish()
            if job.approved_digest is not None:
                extra["image_digest"] = await self._read_back(job, stats.size)
            state = "done"
        except NbdNatsError as e:
            cause = await job.tool.abort() if job.tool is not None else None
            state = "cancelled" if isinstance(e, TransferCancelled) else "failed"
            extra |= {"error_code": e.code, "error": cause or str(e)}
            extra["from_peer"] = e.from_peer and not cause
        except Exception as e:  # report, never leave a job half-reported
            log.exception("job %s failed", job.transfer_id)
            if job.tool is not None:
                await job.tool.abort()
            state, extra = "failed", {"error_code": "error", "error": f"agent error: {e}"}
        job.final = self._event(job, state, **extra)
        outcome = (job.role, state)
        self._outcomes[outcome] = self._outcomes.get(outcome, 0) + 1
        for key, value in _tallies(job.role, job.handle.stats()):
            self._totals[key] = self._totals.get(key, 0) + value
        log.info(
            "%s %s %s%s",
            job.op,
            job.transfer_id,
            state,
            f": {extra['error']}" if "error" in extra else "",
        )
        await self._publish("transfer", encode(job.final))

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

    def _trim(self) -> None:
        finished = [k for k, j in self.jobs.items() if not j.running]
        for k in finished[: max(0, len(self.jobs) - KEEP_FINISHED)]:
            job = self.jobs.pop(k)
            self._keys.pop(job.key, None)

    # -- queries ---------------------------------------------------------------------------

    async def _on_query(self, msg: Msg) -> None:
        what = msg.subject.rsplit(".", 1)[-1]
        try:
            cls = QUERIES.get(what)
            if cls is None:
                raise SchemaError(
                    f"unknown query {what!r}; this agent answers {', '.join(QUERIES)}"
                )
            query = decode(cls, msg.data or b"{}", f"{what} query")
            if isinstance(query, TransfersQuery):
                payload = encode(self._transfers(query.transfer_id))
            elif isinstance(query, DigestQuery):
                payload = encode(await self._digest(query))
            elif isinstance(query, QmpEventsQuery):
                payload = encode(await self.incoming.events(query))
            else:
                payload = encode(self.info())
        except NbdNatsError as e:
            payload = encode(Reply(ok=False, code=e.code, error=str(e)))
        if msg.reply:
            with contextlib.suppress(Exception):
                await msg.respond(payload)

    def _transfers(self, transfer_id: str | None) -> TransferList:
        jobs = [j for j in self.jobs.values() if transfer_id in (None, j.transfer_id)]
        return TransferList(transfers=[j.final or self._event(j, "running") for j in jobs])

    async def _digest(self, query: DigestQuery) -> DigestReply:
        try:
            digest, size = await image_digest(
                self.policy.endpoint(query.src), allow_local_file=True
            )
        except NbdNatsError as e:
            return DigestReply(ok=False, code=e.code, error=str(e))
        return DigestReply(ok=True, digest=digest, size=size)

    # -- metrics ---------------------------------------------------------------------------

    def _count(self, op: str, result: str) -> None:
        self._counts[(op, result)] = self._counts.get((op, result), 0) + 1

    def _samples(self) -> Iterable[Sample]:
        info = {"node": self.node, "role": self.config.role, "version": _core.__version__}
        yield ("nbdnats_agent_info", info, 1)
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
            yield ("nbdnats_transfer_bytes_total", {"role": role},
                   totals.get(("bytes", role), 0))  # fmt: skip
            yield ("nbdnats_transfer_data_bytes_total", {"role": role},
                   totals.get(("data", role), 0))  # fmt: skip
            yield ("nbdnats_transfers_active", {"role": role}, active[role])
        for reason in ("bad", "corrupt", "duplicate"):
            yield ("nbdnats_frames_dropped_total", {"reason": reason},
                   totals.get(("frames", reason), 0))  # fmt: skip
        for (role, outcome), n in sorted(self._outcomes.items()):
            yield ("nbdnats_transfers_total", {"role": role, "outcome": outcome}, n)
        for (op, result), n in sorted(self._counts.items()):
            yield ("nbdnats_commands_total", {"op": op, "result": result}, n)


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


def _with_state(event: TransferEvent, state: str) -> TransferEvent:
    import msgspec

    return msgspec.structs.replace(event, state=state)


async def run_agent(config: AgentConfig) -> None:
    """Run until SIGTERM/SIGINT, then stop gracefully."""
    import signal

    agent = Agent(config)
    await agent.start()
    loop = asyncio.get_running_loop()
    stopping: list[asyncio.Task[None]] = []

    def on_signal() -> None:
        if not stopping:
            stopping.append(asyncio.create_task(agent.stop()))

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    try:
        await agent.wait_stopped()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
