"""The node agent: one per host (VM host, bare-metal host, RAM-booted installer).

It holds both planes, serves ``ctl.cmd.<node>.<op>`` and ``ctl.qry.<node>.<what>``,
publishes ``ctl.evt.<node>.<kind>`` (and the core publishes ``data.evt.<transfer>.*``), and
runs each accepted command as a job (``nbdnats.ctl.jobs``): one end of a transfer, with a
backup tool or an approval check around it when the command asks for one, or a live
migration.

Lifecycle, as aiohttp's runner: ``start()`` connects, creates the event stream if missing,
subscribes and announces; ``stop()`` stops taking commands, lets running jobs finish for
``drain_timeout`` seconds, cancels the rest (telling their peers), reports every job's end,
announces ``stopped`` and closes. SIGTERM and SIGINT call ``stop()``.

Dispatch is one table, ``Agent.ops``: op -> (schema, handler). A new command is a schema
(``nbdnats.schemas``), a handler in the table, a ``Controller`` method and a CLI subcommand.
Every command is checked before anything is opened: schema and version, idempotency key
(every ``Command`` runs once per key), role, allow-list (``nbdnats.ctl.policy``), approval
(``nbdnats.metal.approval``). A refusal is the reply's error and a ``ctl.evt.<node>.refused``
event; the agent carries on.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import logging
import os
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from nbdnats import _core, subjects
from nbdnats.ctl import events, tools
from nbdnats.ctl.config import AgentConfig
from nbdnats.ctl.jobs import Jobs
from nbdnats.ctl.metrics import MetricsServer, Sample
from nbdnats.ctl.policy import Policy
from nbdnats.errors import (
    BusyError,
    ConflictError,
    NbdNatsError,
    PolicyError,
    SchemaError,
    UsageError,
)
from nbdnats.metal.approval import TrustedKeys
from nbdnats.metal.installer import Evidence, TpmService
from nbdnats.metal.network import AdjacencyReporter
from nbdnats.metal.tpm import DEFAULT_EVENT_LOG, Tpm
from nbdnats.migration.incoming import Incoming
from nbdnats.planes import Login, Planes, redact_url
from nbdnats.schemas import (
    ActivateCommand,
    ActivateReply,
    Answer,
    BackupsQuery,
    CancelCommand,
    CheckpointCommand,
    Command,
    DigestQuery,
    IncomingCommand,
    InfoQuery,
    Message,
    MigrateCommand,
    NodeInfo,
    ProvisionCommand,
    QmpCommand,
    QmpEventsQuery,
    QuoteCommand,
    QuoteReply,
    RateCommand,
    RecvCommand,
    RefusedEvent,
    Reply,
    SendCommand,
    TpmIdentity,
    TpmQuery,
    TransfersQuery,
    VerdictCommand,
    decode,
    encode,
)
from nbdnats.transfer import resolve_state_dir

log = logging.getLogger("nbdnats.ctl.agent")

# After stop() cancels the jobs that outlived the drain: how long they may take to tell
# their peers, stop their tools and report, so that stop() itself always ends.
CANCELLED_JOBS_BOUND = 60.0
TPM_DEVICE = "/dev/tpmrm0"  # the kernel's resource-managed TPM: an installer uses it if present


@dataclass(frozen=True)
class Op:
    """What the agent does with one op: decode its message as ``schema``, answer it with
    ``handler``. ``query``: a ``ctl.qry`` subject (answered, not counted, no refused event)
    rather than a ``ctl.cmd`` one. ``relay``: the destination's side of a migration, whose
    answers are its own (the migration reports them): counted only when they fail, and
    never a refused event."""

    schema: type[Message]
    handler: Callable[[Any], Awaitable[Message]]
    query: bool = False
    relay: bool = False


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.node = subjects.check_token(config.node, "node name")
        self.policy = Policy(config.allow, config.exports, self.node)
        self.trusted = TrustedKeys(config.trusted_keys) if config.trusted_keys else None
        if config.role == "installer" and self.trusted is None:
            raise UsageError("--role installer needs --trusted-keys DIR (the approvers' keys)")
        for name in config.exports:
            subjects.check_token(name, "export name")
        self.planes: Planes | None = None
        self._keys: dict[str, tuple[str, asyncio.Future[Message]]] = {}
        self._subs: list[Subscription] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._handling: set[asyncio.Task[None]] = set()
        self._state = "up"
        self._started = dt.datetime.now(dt.UTC)
        self._stopped = asyncio.Event()
        self._counts: dict[tuple[str, str], int] = {}
        self.metrics = (
            MetricsServer(config.metrics_addr, self._samples) if config.metrics_addr else None
        )
        for name in config.vms:
            subjects.check_token(name, "VM name")
        self.jobs = Jobs(
            config,
            self.policy,
            self.trusted,
            lambda: self.planes,
            self._publish,
            lambda key: self._keys.pop(key, None),
        )
        self.incoming = Incoming(lambda: self.planes, config.vms)
        self.tpm = _tpm_service(config, self.node)
        self.jobs.evidence = self.tpm.evidence if self.tpm else None
        self.jobs.on_then = self._then
        tpm_op = self.tpm or _NoTpm(self.node)
        self.stream_problem: str | None = None
        # A bare-metal host's /128s and uplinks: published as ctl.evt.<node>.adjacency.
        self.adjacency = (
            AdjacencyReporter(
                self.node,
                config.loopbacks,
                config.uplinks,
                config.adjacency_interval,
                self._publish,
                config.lldp_socket,
                config.release_loopbacks,
            )
            if config.loopbacks or config.uplinks
            else None
        )
        self._ak_name: str | None = None
        # Everything this agent serves (the subjects are listed in nbdnats.schemas).
        self.ops: dict[str, Op] = {
            "send": Op(SendCommand, self.jobs.send),
            "recv": Op(RecvCommand, self.jobs.recv),
            "provision": Op(ProvisionCommand, self.jobs.provision),
            "cancel": Op(CancelCommand, self.jobs.cancel),
            "rate": Op(RateCommand, self.jobs.rate),
            "checkpoint": Op(CheckpointCommand, self.jobs.checkpoint),
            "migrate": Op(MigrateCommand, self.jobs.migrate),
            "incoming": Op(IncomingCommand, self.incoming.incoming, relay=True),
            "qmp": Op(QmpCommand, self.incoming.qmp, relay=True),
            "info": Op(InfoQuery, self._info, query=True),
            "transfers": Op(TransfersQuery, self.jobs.transfers, query=True),
            "digest": Op(DigestQuery, self.jobs.digest, query=True),
            "backups": Op(BackupsQuery, self.jobs.backups, query=True),
            "qmp-events": Op(QmpEventsQuery, self.incoming.events, query=True),
            "tpm": Op(TpmQuery, tpm_op.identity, query=True),
            "activate": Op(ActivateCommand, tpm_op.activate),
            "quote": Op(QuoteCommand, tpm_op.quote),
            "verdict": Op(VerdictCommand, self._verdict),
        }

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        c = self.config
        if self.adjacency is not None:  # a missing uplink is a usage error, before connecting
            await self.adjacency.check()
        login = Login.resolve(c.creds, c.nkey, c.tls_cert, c.tls_key, c.tls_ca)
        self.planes = await Planes.connect(
            self.config.data_url, self.config.ctl_url, self.node, login
        )
        ctl = self.planes.ctl
        if self.tpm is not None:
            # Announced, so an operator sees which AK to enroll; a TPM that fails here is
            # reported and the agent serves without it (its TPM ops then fail alike).
            try:
                self._ak_name = await self.tpm.evidence.ak_name()
            except NbdNatsError as e:
                log.warning("TPM: %s", e)
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
            asyncio.create_task(self._every(self.config.progress_interval, self.jobs.progress)),
        ]
        if self.adjacency is not None:
            try:
                await self.adjacency.start()
            except BaseException:
                await self.stop()
                raise
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
        running = self.jobs.tasks()
        if running:
            grace = self.config.drain_timeout if drain_timeout is None else drain_timeout
            log.info("draining %d running job(s) for up to %.0f s", len(running), grace)
            _, late = await asyncio.wait(running, timeout=grace)
            self.jobs.cancel_all()
            if late:
                await asyncio.wait(late, timeout=CANCELLED_JOBS_BOUND)
        await self.incoming.close_all()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.adjacency is not None:  # withdrawn (and the /128s released) before "stopped"
            await self.adjacency.stop()
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
        env = self.jobs.env()
        caps = ["send", "recv", "digest"]
        caps += [p for p in tools.PROGRAMS if tools.installed(p, env)]
        caps.append("pipe")
        if self.trusted is not None:
            caps.append("provision")
        if self.tpm is not None:
            caps.append("attest")
        if self.config.then_file is not None:
            caps.append("reboot")
        if self.metrics is not None:
            caps.append("metrics")
        if self.config.role == "installer":
            caps.remove("recv")
        if self.config.vms:
            caps.append("migrate")
        if self.adjacency is not None:
            caps.append("adjacency")
        return NodeInfo(
            node=self.node,
            version=_core.__version__,
            role=self.config.role,
            state=self._state,  # type: ignore[arg-type]
            capabilities=caps,
            exports=dict(self.config.exports),
            started=self._started,
            at=dt.datetime.now(dt.UTC),
            running=self.jobs.running(),
            announce_interval=self.config.announce_interval,
            vms=sorted(self.config.vms),
            ak_name=self._ak_name,
        )

    async def _info(self, _: InfoQuery) -> NodeInfo:
        return self.info()

    async def _publish(self, kind: str, payload: bytes) -> None:
        assert self.planes is not None
        with contextlib.suppress(Exception):
            await self.planes.ctl.publish(subjects.ctl_event(self.node, kind), payload)

    async def _announce(self) -> None:
        await self._publish("announce", encode(self.info()))

    # -- installer: attestation verdicts and what follows a provision ----------------------

    async def _verdict(self, cmd: VerdictCommand) -> Reply:
        """The controller refused this installer's evidence: the quote is spent, and the
        refusal is this node's ``refused`` event (nothing was written)."""
        subjects.check_token(cmd.transfer_id, "transfer id")
        if self.tpm is not None:
            self.tpm.evidence.forget(cmd.nonce)
        refused = RefusedEvent(
            node=self.node,
            op="provision",
            transfer_id=cmd.transfer_id,
            code=cmd.code if cmd.code in ("attestation", "approval") else "attestation",
            error=cmd.error,
        )
        log.info("refused provision %s: %s", cmd.transfer_id, cmd.error)
        self._count("provision", refused.code)
        await self._publish("refused", encode(refused))
        return Reply(ok=True, transfer_id=cmd.transfer_id)

    def _then(self, word: str) -> None:
        """A provision that asked to reboot or power off verified: tell /init (the file it
        reads when the agent ends) and stop; /init syncs and does it."""
        assert self.config.then_file is not None
        Path(self.config.then_file).write_text(word + "\n")
        log.info("provision verified: stopping for /init to %s", word)
        task = asyncio.create_task(self.stop())
        self._handling.add(task)  # kept until done, as command handlers are
        task.add_done_callback(self._handling.discard)

    # -- dispatch --------------------------------------------------------------------------

    def _op(self, name: str, query: bool) -> Op:
        op = self.ops.get(name)
        if op is None or op.query != query:
            kind, does = ("query", "answers") if query else ("command", "serves")
            known = ", ".join(k for k, o in self.ops.items() if o.query == query)
            raise SchemaError(f"unknown {kind} {name!r}; this agent {does} {known}")
        return op

    async def _on_command(self, msg: Msg) -> None:
        _, name = subjects.ctl_address(msg.subject)
        cmd: Any = None
        reply: Answer
        try:
            op = self._op(name, query=False)
            cmd = decode(op.schema, msg.data, f"{name} command")
            keyed = isinstance(cmd, Command)
            answer = await (self._once(name, cmd, op.handler) if keyed else op.handler(cmd))
            assert isinstance(answer, Answer), f"{name} must answer with a reply"
            reply = answer
            if op.relay:
                if not reply.ok:
                    self._count(name, reply.code or "error")
                    log.info("refused %s: %s", name, reply.error)
                await _respond(msg, encode(reply))
                return
        except NbdNatsError as e:
            reply = Reply(ok=False, code=e.code, error=str(e))
        except Exception as e:  # a bug must not take the agent down; report it
            log.exception("command %s failed", name)
            reply = Reply(ok=False, code="error", error=f"agent error: {type(e).__name__}: {e}")
        self._count(name, "ok" if reply.ok else (reply.code or "error"))
        if not reply.ok:
            log.info("refused %s: %s", name, reply.error)
            refused = RefusedEvent(
                node=self.node,
                op=name,
                key=getattr(cmd, "key", None),
                transfer_id=getattr(cmd, "transfer_id", None),
                code=reply.code or "error",
                error=reply.error or "",
            )
            await self._publish("refused", encode(refused))
        await _respond(msg, encode(reply))

    async def _once(
        self, op: str, cmd: Command, handler: Callable[[Any], Awaitable[Message]]
    ) -> Message:
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
        if self.jobs.is_running(cmd.transfer_id):
            raise BusyError(f"transfer {cmd.transfer_id} is already running on {self.node}")
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._keys[cmd.key] = (fingerprint, future)
        try:
            reply = await handler(cmd)
        except BaseException as e:
            del self._keys[cmd.key]  # a refusal is decided again on retry
            future.set_exception(e if isinstance(e, Exception) else RuntimeError(str(e)))
            future.exception()  # retrieved: duplicates waiting on it re-raise it
            raise
        future.set_result(reply)
        return reply

    async def _on_query(self, msg: Msg) -> None:
        _, name = subjects.ctl_address(msg.subject)
        try:
            op = self._op(name, query=True)
            query = decode(op.schema, msg.data or b"{}", f"{name} query")
            payload = encode(await op.handler(query))
        except NbdNatsError as e:
            payload = encode(Reply(ok=False, code=e.code, error=str(e)))
        await _respond(msg, payload)

    # -- metrics ---------------------------------------------------------------------------

    def _count(self, op: str, result: str) -> None:
        self._counts[(op, result)] = self._counts.get((op, result), 0) + 1

    def _samples(self) -> Iterable[Sample]:
        info = {"node": self.node, "role": self.config.role, "version": _core.__version__}
        yield ("nbdnats_agent_info", info, 1)
        yield from self.jobs.samples()
        for (op, result), n in sorted(self._counts.items()):
            yield ("nbdnats_commands_total", {"op": op, "result": result}, n)


async def _respond(msg: Msg, payload: bytes) -> None:
    """Answer a request (a published message has no reply subject); a requester that has
    gone away is no failure of the agent's."""
    if msg.reply:
        with contextlib.suppress(Exception):
            await msg.respond(payload)


class _NoTpm:
    """The TPM ops of an agent without a TPM: each is refused, saying how to get one."""

    def __init__(self, node: str) -> None:
        self.error = PolicyError(
            f"{node} has no TPM here: TPM attestation needs an installer with --tpm "
            "(or /dev/tpmrm0)"
        )

    async def identity(self, _: TpmQuery) -> TpmIdentity:
        raise self.error

    async def activate(self, _: ActivateCommand) -> ActivateReply:
        raise self.error

    async def quote(self, _: QuoteCommand) -> QuoteReply:
        raise self.error


def _tpm_service(config: AgentConfig, node: str) -> TpmService | None:
    """The installer's TPM, if it has one (``AgentConfig.tpm``)."""
    tcti = config.tpm
    if tcti is None and config.role == "installer" and os.path.exists(TPM_DEVICE):
        tcti = "device"
    if tcti in (None, "none"):
        return None
    if config.role != "installer":
        raise UsageError("--tpm is for --role installer (the machine being provisioned)")
    workdir = resolve_state_dir(config.state_dir) / "tpm"
    log_path = Path(config.event_log) if config.event_log else DEFAULT_EVENT_LOG
    tpm = Tpm(workdir, tcti=None if tcti == "device" else tcti, event_log=log_path)
    return TpmService(node, Evidence(tpm))


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
