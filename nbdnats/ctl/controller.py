"""The controller API: drive agents over the ctl plane.

    async with await Controller.connect("nats://ctl:4222") as c:
        await c.nodes()
        result = await c.copy(src=("a", "vm1"), dst=("b", "/dev/sdb"))
        await c.backup(("a", "vm1"), "b", Tool(kind="restic", repo="/backups/repo"))
        await c.backups("b", Tool(kind="restic", repo="/backups/repo"))
        await c.restore("b", ("a", "/images/vm1.raw"), Tool(kind="restic", repo="/backups/repo"),
                        disk=("a", "vm1"))
        async for event in c.events():
            ...

An operation is two commands, each with an idempotency key: the receiving end first, then
the sending end. A command that gets no answer is sent again with the same key, so a lost
reply never starts a second transfer. The operation then follows both agents' transfer
events; if they go quiet it asks the agents directly, so a lost event is not a hang. When one
end fails, the other is cancelled and the first real cause is raised.

An incremental backup (``backup(..., incremental=True)``) turns that round: the source is
commanded first (it takes the checkpoint and says which disks it sends, and how), then the
backup node once per disk; when every disk's snapshot is stored the source is told to
commit the checkpoint, else to roll it back (``nbdnats.backup``).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, TypeVar, overload

import msgspec
from cryptography import x509
from nats.aio.client import Client

from nbdnats import _core, subjects
from nbdnats.backup import chain
from nbdnats.ctl import events, tools
from nbdnats.ctl.request import request
from nbdnats.errors import (
    AttestationError,
    IntegrityError,
    NbdNatsError,
    SchemaError,
    TransferCancelled,
    TransferError,
    UsageError,
    from_code,
)
from nbdnats.metal import attest, verifier
from nbdnats.metal.verifier import Attestation, Enrollment, Enrollments
from nbdnats.planes import Login, connect_ctl, redact_url, resolve_urls
from nbdnats.schemas import (
    ActivateCommand,
    ActivateReply,
    AdjacencyEvent,
    AdjacencyView,
    Approval,
    Backup,
    BackupList,
    BackupsQuery,
    CancelCommand,
    CheckpointCommand,
    Command,
    DigestQuery,
    DigestReply,
    DiskSend,
    Incremental,
    InfoQuery,
    Message,
    MigrateCommand,
    MigrationEvent,
    NodeInfo,
    ProvisionCommand,
    QuoteCommand,
    QuoteReply,
    RateCommand,
    RecvCommand,
    Reply,
    RoutesQuery,
    RoutesReply,
    SendCommand,
    SendReply,
    Then,
    Tool,
    TpmIdentity,
    TpmQuery,
    TransferEvent,
    TransferList,
    TransferOptions,
    TransfersQuery,
    VerdictCommand,
)
from nbdnats.transfer import check_streams


@dataclass(frozen=True)
class AttestOptions:
    """How to attest an installer before provisioning it: where enrollments are kept,
    the golden PCR values of its installer image (none: not compared), which PCRs."""

    store: Enrollments
    golden: attest.Golden | None = None
    pcrs: Sequence[int] = attest.DEFAULT_PCRS


REQUEST_TIMEOUT = 10.0  # per attempt
# A TPM's first identity query makes its EK and AK (RSA key generation, seconds on a real
# TPM, longer on swtpm under emulation): its per-attempt bound.
TPM_TIMEOUT = 60.0
ATTEMPTS = 3
QUIET = 5.0  # no event for this long: ask the agents how the transfer is doing
DIGEST_TIMEOUT = 3600.0  # hashing an image reads all of it
BACKUPS_TIMEOUT = 300.0  # restic reads the repository's index (maybe remote) to list
# Taking a checkpoint: a QMP transaction, then a read-only view of each disk served.
CHECKPOINT_TIMEOUT = 60.0
TERMINAL = ("done", "failed", "cancelled")
INJECTOR_TIMEOUT = 3.0  # ctl adjacency shows what it has without the injector's view
LOST_AFTER = 3  # announce intervals without a word before a node counts as lost

M = TypeVar("M", bound=msgspec.Struct)
Endpoint = tuple[str, str]
EventCallback = Callable[[TransferEvent], None]


def parse_endpoint(text: str) -> Endpoint:
    """``NODE:SRC`` -> (node, src); SRC may itself contain colons (URIs)."""
    node, sep, rest = text.partition(":")
    if not sep or not rest or rest.startswith("//"):
        raise UsageError(f"endpoint {text!r} must be NODE:PATH, NODE:EXPORT or NODE:URI")
    return subjects.check_token(node, "node name"), rest


@dataclass
class OperationResult:
    """Both ends of a finished operation, as their agents reported them."""

    transfer_id: str
    sender: TransferEvent
    receiver: TransferEvent
    # A restic restore: the snapshot it restored, as the repository lists it (None when
    # it was named by --snapshot and is not one nbdnats tagged).
    snapshot: Backup | None = None

    @property
    def ok(self) -> bool:
        return self.sender.state == self.receiver.state == "done"


@dataclass
class DiskBackup:
    """One disk of an incremental backup run: what the source sent (``sent``: mode, why
    full, checkpoint), both ends' reports, and the snapshot it changed (``parent``)."""

    sent: DiskSend
    result: OperationResult
    parent: Backup | None = None

    @property
    def snapshot(self) -> str | None:
        """The stored snapshot's id, as the backup node reported it."""
        out = self.result.receiver.tool_output or ""
        word = out.removeprefix("snapshot ").split(" ", 1)[0]
        return word if out.startswith("snapshot ") and tools.is_restic_snapshot(word) else None


@dataclass
class BackupRun:
    """An incremental backup run: the checkpoint it took (committed on the source), the
    one it started from (None: full, ``reason`` says why) and each disk's outcome."""

    transfer_id: str
    checkpoint: str
    since: str | None
    reason: str
    disks: list[DiskBackup]

    @property
    def ok(self) -> bool:
        return all(d.result.ok for d in self.disks)


def _check_restored(result: OperationResult) -> None:
    """A restore's content digest must be the one its backup recorded: both name the image's
    bytes (docs/protocol.md, "Content digest"), so a difference means the repository gave
    back other bytes than were backed up. Digests of different algorithms (a backup by an
    older version) are not compared."""
    snap, got = result.snapshot, result.receiver.digest
    if snap is None or not snap.digest or not got:
        return
    if snap.digest.split(":", 1)[0] != got.split(":", 1)[0] or snap.digest == got:
        return
    raise IntegrityError(
        f"restored {result.receiver.node}'s target from snapshot {snap.short_id} of "
        f"{snap.name}, but its bytes ({got}) are not what was backed up "
        f"({snap.digest}): check the repository (restic check --read-data) and restore "
        "again or from another snapshot"
    )


class Controller:
    def __init__(self, nc: Client, *, request_timeout: float = REQUEST_TIMEOUT) -> None:
        self.nc = nc
        self.request_timeout = request_timeout
        # The events() readers not yet finished, held here (a loop left early drops its last
        # reference): close() ends them before the connection goes, rather than the garbage
        # collector after it.
        self._readers: set[AsyncGenerator[events.Event, None]] = set()

    @classmethod
    async def connect(
        cls, ctl_url: str | None = None, *, login: Login | None = None, **kw: Any
    ) -> Controller:
        _, url = resolve_urls(None, ctl_url)
        nc = await connect_ctl(url, "nbd-nats controller", login or Login.resolve())
        controller = cls(nc, **kw)
        await events.ensure_stream(nc)
        return controller

    async def close(self) -> None:
        readers, self._readers = self._readers, set()
        for reader in readers:
            with contextlib.suppress(Exception):  # one another task is still reading
                await reader.aclose()
        if not self.nc.is_closed:
            await self.nc.drain()

    async def __aenter__(self) -> Controller:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # -- requests --------------------------------------------------------------------------

    async def _request(
        self, subject: str, msg: Message, reply_type: type[M], *, timeout: float | None = None
    ) -> M:
        """Request with retries (same bytes, so the same idempotency key)."""
        timeout = timeout or self.request_timeout
        return await request(self.nc, subject, msg, reply_type, timeout=timeout, attempts=ATTEMPTS)

    async def _command(self, node: str, op: str, cmd: Message) -> Reply:
        return await self._request(subjects.ctl_command(node, op), cmd, Reply)

    # -- queries ---------------------------------------------------------------------------

    async def nodes(self, *, include_stopped: bool = False) -> list[NodeInfo]:
        """Each node's last announcement (from the event stream), by name; a node silent
        for three announce intervals is ``lost``; stopped ones only when asked."""
        found: dict[str, NodeInfo] = {}
        now = dt.datetime.now(dt.UTC)
        async for ev in events.read(
            self.nc, subject=subjects.ctl_events("announce"), last_per_subject=True, follow=False
        ):
            with contextlib.suppress(msgspec.ValidationError):
                info = msgspec.convert(ev.data, NodeInfo)
                silent = (now - info.at).total_seconds() > LOST_AFTER * info.announce_interval
                if info.state in ("up", "stopping") and silent:
                    info = msgspec.structs.replace(info, state="lost")
                if include_stopped or info.state != "stopped":
                    found[info.node] = info
        return [found[k] for k in sorted(found)]

    async def adjacency(
        self, node: str | None = None, *, injector: str = subjects.DEFAULT_INJECTOR
    ) -> list[AdjacencyView]:
        """Each bare-metal node's last adjacency (loopbacks, uplinks, ToR ports) from the
        event stream, with the route injector's view of it when ``injector`` answers. A node
        silent for three of its intervals is ``lost`` (the stream's clock, not the node's);
        one whose last word was invalid is left out."""
        if node is not None:
            subjects.check_token(node, "node name")
        subjects.check_token(injector, "injector name")
        found: dict[str, AdjacencyView] = {}
        now = dt.datetime.now(dt.UTC)
        subject = subjects.ctl_event(node, subjects.ADJACENCY) if node else subjects.ALL_ADJACENCIES
        async for ev in events.read(self.nc, subject=subject, last_per_subject=True, follow=False):
            try:
                adj = msgspec.convert(ev.data, AdjacencyEvent)
            except msgspec.ValidationError:
                continue
            if adj.node != ev.node:  # the stream's subject says who sent it
                continue
            silent = (now - ev.time).total_seconds() > LOST_AFTER * adj.interval
            state = "lost" if adj.state == "up" and silent else adj.state
            found[ev.node] = AdjacencyView(
                node=ev.node,
                state=state,
                loopbacks=adj.loopbacks,
                uplinks=adj.uplinks,
                at=ev.time,
            )
        views = [found[k] for k in sorted(found)]
        if not views:
            return views
        try:
            reply = await request(
                self.nc,
                subjects.ctl_query(injector, "routes"),
                RoutesQuery(node=node),
                RoutesReply,
                timeout=min(self.request_timeout, INJECTOR_TIMEOUT),
            )
        except UsageError:
            why = f"no route injector named {injector!r} answers (nbd-nats route-injector)"
            return [msgspec.structs.replace(v, injector=why) for v in views]
        except NbdNatsError as e:
            why = f"route injector {injector!r}: {e}"
            return [msgspec.structs.replace(v, injector=why) for v in views]
        status = {r.node: r for r in reply.routes}
        return [
            msgspec.structs.replace(
                v, routes=status.get(v.node), injector=reply.injector or injector
            )
            for v in views
        ]

    async def info(self, node: str) -> NodeInfo:
        return await self._request(subjects.ctl_query(node, "info"), InfoQuery(), NodeInfo)

    async def transfers(self, nodes: list[str] | None = None) -> list[TransferEvent]:
        """Running and recently finished transfers of the given nodes (default: all up)."""
        names = nodes or [n.node for n in await self.nodes()]
        out: list[TransferEvent] = []
        for node in names:
            with contextlib.suppress(NbdNatsError):
                out += await self._transfers(node)
        return out

    async def _transfers(self, node: str, transfer_id: str | None = None) -> list[TransferEvent]:
        subject = subjects.ctl_query(node, "transfers")
        query = TransfersQuery(transfer_id=transfer_id)
        return (await self._request(subject, query, TransferList)).transfers

    async def digest(self, node: str, src: str, *, raw: bool = False) -> tuple[str, int]:
        subject = subjects.ctl_query(node, "digest")
        query = DigestQuery(src=src, raw=raw)
        reply = await self._request(subject, query, DigestReply, timeout=DIGEST_TIMEOUT)
        assert reply.digest is not None and reply.size is not None
        return reply.digest, reply.size

    async def backups(self, node: str, tool: Tool, *, disk: Endpoint | None = None) -> list[Backup]:
        """The backups nbdnats stored with ``tool`` (restic) on ``node``, oldest first: all,
        or only those of ``disk`` (``("a", "vm1")``). Snapshots whose ids or tags do not
        pass the checks are left out (the agent logs how many)."""
        if tool.kind != "restic":
            raise UsageError(f"listing backups needs restic, not {tool.kind}")
        if disk is not None:
            tool = msgspec.structs.replace(tool, node=disk[0], disk=disk[1])
        subject = subjects.ctl_query(node, "backups")
        query = BackupsQuery(tool=tool)
        reply = await self._request(subject, query, BackupList, timeout=BACKUPS_TIMEOUT)
        return reply.backups

    async def _pick(self, node: str, tool: Tool, disk: Endpoint | None) -> Backup | None:
        """The snapshot a restic restore restores: ``tool.snapshot`` when given (looked up,
        to name it), else the latest of ``disk``, or of the one disk the repository holds."""
        if tool.snapshot is not None:
            if disk is not None:
                raise UsageError("give --disk or --snapshot, not both")
            wanted = tool.snapshot
            if wanted == "latest" or not tools.is_restic_snapshot(wanted):
                return None  # the agent refuses what is not an id, and says why
            found = [b for b in await self.backups(node, tool) if b.id.startswith(wanted)]
            return found[0] if len(found) == 1 else None
        return choose_backup(await self.backups(node, tool, disk=disk), disk, tool.repo or "")

    async def rate(
        self, transfer_id: str, rate: int | None, nodes: list[str] | None = None
    ) -> list[str]:
        """Cap the sending end of a transfer (or migration) wherever it runs at ``rate``
        bytes/s from now on (None: lift the cap); returns the nodes that changed it."""
        cmd = RateCommand(transfer_id=subjects.check_token(transfer_id, "transfer id"), rate=rate)
        names = nodes or [n.node for n in await self.nodes()]
        changed: list[str] = []
        refusals: list[NbdNatsError] = []
        for node in names:
            try:
                await self._command(node, "rate", cmd)
                changed.append(node)
            except NbdNatsError as e:
                refusals.append(e)
        if not changed:
            # A node that knows the transfer (it receives it, or it finished) says why.
            for refusal in refusals:
                if not str(refusal).endswith("(unknown)"):
                    raise UsageError(str(refusal))
            raise UsageError(
                f"no node runs the sending end of transfer {transfer_id} "
                "(see: nbd-nats ctl transfers)"
            )
        return changed

    async def cancel(self, transfer_id: str, nodes: list[str] | None = None) -> list[str]:
        """Cancel a transfer wherever it runs; returns the nodes that had it running."""
        names = nodes or [n.node for n in await self.nodes()]
        cancelled = []
        for node in names:
            with contextlib.suppress(NbdNatsError):
                await self._command(node, "cancel", CancelCommand(transfer_id=transfer_id))
                cancelled.append(node)
        if not cancelled:
            raise UsageError(f"no node runs transfer {transfer_id} (see: nbd-nats ctl transfers)")
        return cancelled

    def events(
        self,
        *,
        since_seq: int | None = None,
        since: dt.datetime | None = None,
        node: str = "*",
        kind: str = "*",
        follow: bool = True,
    ) -> AsyncIterator[events.Event]:
        """Events as they happen, or from a stream sequence or time on (what a controller
        that was away missed). Leaving the loop early is fine: ``close()`` ends the reader."""
        everything = (node, kind) == ("*", "*")
        reader = events.read(
            self.nc,
            subject=subjects.ALL_CTL_EVENTS if everything else subjects.ctl_events(kind, node),
            since_seq=since_seq,
            since_time=since,
            follow=follow,
        )
        running = {r for r in self._readers if getattr(r, "ag_frame", None) is not None}
        self._readers = running | {reader}  # a finished generator has no frame left
        return reader

    # -- operations ------------------------------------------------------------------------

    @overload
    async def copy(
        self,
        src: Endpoint,
        dst: Endpoint,
        *,
        transfer_id: str | None = None,
        chunk_size: int | None = None,
        target_is_zero: bool = False,
        options: TransferOptions | None = None,
        wait: Literal[True] = True,
        on_event: EventCallback | None = None,
    ) -> OperationResult: ...

    @overload
    async def copy(
        self,
        src: Endpoint,
        dst: Endpoint,
        *,
        transfer_id: str | None = None,
        chunk_size: int | None = None,
        target_is_zero: bool = False,
        options: TransferOptions | None = None,
        wait: Literal[False],
        on_event: EventCallback | None = None,
    ) -> str: ...

    @overload
    async def copy(
        self,
        src: Endpoint,
        dst: Endpoint,
        *,
        transfer_id: str | None = None,
        chunk_size: int | None = None,
        target_is_zero: bool = False,
        options: TransferOptions | None = None,
        wait: bool,
        on_event: EventCallback | None = None,
    ) -> OperationResult | str: ...

    async def copy(
        self,
        src: Endpoint,
        dst: Endpoint,
        *,
        transfer_id: str | None = None,
        chunk_size: int | None = None,
        target_is_zero: bool = False,
        options: TransferOptions | None = None,
        wait: bool = True,
        on_event: EventCallback | None = None,
    ) -> OperationResult | str:
        """Copy a disk from one node to another (VM<->VM, VM<->bare metal, ...).
        ``options.streams``: the sending agent splits it into that many sub-streams (the
        receiving one agrees, or runs it as one stream)."""
        both = self._both(transfer_id, options)
        opts: TransferOptions = both["options"]
        check_streams(opts.streams, both["transfer_id"])
        send = SendCommand(src=src[1], chunk_size=chunk_size, **both)
        # Only the sender asks for sub-streams; the receiver agrees in the open handshake.
        # Left off the receiver's command, an older receiving agent reads it as before.
        both["options"] = msgspec.structs.replace(opts, streams=1)
        recv = RecvCommand(dst=dst[1], target_is_zero=target_is_zero, **both)
        return await self._pair(src[0], send, dst[0], recv, wait, on_event)

    @overload
    async def backup(
        self,
        src: Endpoint,
        node: str,
        tool: Tool,
        *,
        transfer_id: str | None = None,
        options: TransferOptions | None = None,
        wait: Literal[True] = True,
        on_event: EventCallback | None = None,
        incremental: Literal[False] = False,
    ) -> OperationResult: ...

    @overload
    async def backup(
        self,
        src: Endpoint,
        node: str,
        tool: Tool,
        *,
        transfer_id: str | None = None,
        options: TransferOptions | None = None,
        wait: Literal[True] = True,
        on_event: EventCallback | None = None,
        incremental: Literal[True],
    ) -> BackupRun: ...

    @overload
    async def backup(
        self,
        src: Endpoint,
        node: str,
        tool: Tool,
        *,
        transfer_id: str | None = None,
        options: TransferOptions | None = None,
        wait: Literal[False],
        on_event: EventCallback | None = None,
        incremental: Literal[False] = False,
    ) -> str: ...

    @overload
    async def backup(
        self,
        src: Endpoint,
        node: str,
        tool: Tool,
        *,
        transfer_id: str | None = None,
        options: TransferOptions | None = None,
        wait: bool,
        on_event: EventCallback | None = None,
        incremental: bool = False,
    ) -> OperationResult | BackupRun | str: ...

    async def backup(
        self,
        src: Endpoint,
        node: str,
        tool: Tool,
        *,
        transfer_id: str | None = None,
        options: TransferOptions | None = None,
        wait: bool = True,
        on_event: EventCallback | None = None,
        incremental: bool = False,
    ) -> OperationResult | BackupRun | str:
        """Stream a disk of one node into a backup tool on ``node``, stored as disk.img;
        restic and kopia snapshots are tagged with the disk (``node=a``, ``disk=vm1``).

        ``incremental`` (restic): ``src`` names a VM its agent knows (every writable disk,
        one snapshot each, tagged ``<vm>/<drive>``) or a qcow2 image; only what changed
        since the checkpoint of the disk's latest snapshot crosses the network, and each
        snapshot still holds the whole image (``BackupRun`` says, per disk, which and why)."""
        if incremental:
            if not wait:
                raise UsageError(
                    "an incremental backup cannot --detach: the controller confirms each "
                    "snapshot before the source commits its checkpoint"
                )
            return await self._incremental(src, node, tool, transfer_id, options, on_event)
        if tool.kind != "pipe":
            tool = msgspec.structs.replace(tool, node=src[0], disk=src[1])
        both = self._both(transfer_id, options)
        recv = RecvCommand(tool=tool, **both)
        send = SendCommand(src=src[1], **both)
        return await self._pair(src[0], send, node, recv, wait, on_event)

    async def _incremental(
        self,
        src: Endpoint,
        node: str,
        tool: Tool,
        transfer_id: str | None,
        options: TransferOptions | None,
        on_event: EventCallback | None,
    ) -> BackupRun:
        if tool.kind != "restic":
            raise UsageError(
                f"--incremental needs --restic, not --{tool.kind}: the run starts from the "
                "checkpoint its latest snapshot is tagged with and reads that snapshot back"
            )
        snode, name = src
        tid, key = self._ids(transfer_id)
        opts = options or TransferOptions()
        vm = name in (await self.info(snode)).vms
        begun = chain.start(await self.backups(node, tool), snode, name, vm=vm)
        prefix = f"{tid}-disk"
        queues: dict[str, asyncio.Queue[TransferEvent]] = {}

        async def collect(msg: Any) -> None:
            with contextlib.suppress(msgspec.ValidationError, msgspec.DecodeError):
                ev = msgspec.json.decode(msg.data, type=TransferEvent)
                if ev.transfer_id.startswith(prefix):
                    queues.setdefault(ev.transfer_id, asyncio.Queue()).put_nowait(ev)

        subs = [
            await self.nc.subscribe(subjects.ctl_event(n, "transfer"), cb=collect)
            for n in dict.fromkeys((snode, node))
        ]
        send = SendCommand(
            key=key,
            transfer_id=tid,
            src=name,
            incremental=Incremental(since=begun.since, reason=begun.reason[:1024]),
        )
        send = msgspec.structs.replace(send, options=opts)
        confirmed = False
        try:
            subject = subjects.ctl_command(snode, "send")
            reply = await self._request(subject, send, SendReply, timeout=CHECKPOINT_TIMEOUT)
            sent = reply.disks
            if not sent:
                raise UsageError(f"{snode}:{name} has no disk to back up")
            why = chain.mismatch(begun, sent)
            if why:
                raise UsageError(f"cannot back up {snode}:{name} incrementally: {why}")
            runs = [
                DiskBackup(
                    d, OperationResult(d.transfer_id, *_pending(d)), chain.parent_of(begun, d)
                )
                for d in sent
            ]
            for run in runs:
                tagged = msgspec.structs.replace(
                    tool,
                    node=snode,
                    disk=run.sent.disk,
                    checkpoint=run.sent.checkpoint,
                    parent=run.parent.id if run.parent is not None else None,
                )
                recv = RecvCommand(
                    key=subjects.idempotency_key(),
                    transfer_id=run.sent.transfer_id,
                    tool=tagged,
                    options=opts,
                )
                await self._command(node, "recv", recv)
            follows = [
                asyncio.ensure_future(
                    self._follow(
                        r.sent.transfer_id,
                        snode,
                        node,
                        queues.setdefault(r.sent.transfer_id, asyncio.Queue()),
                        on_event,
                    )
                )
                for r in runs
            ]
            try:
                _, left = await asyncio.wait(follows, return_when=asyncio.FIRST_EXCEPTION)
                if left:  # one disk failed: stop the others before they store a snapshot
                    await self._roll_back(tid, snode, node)
                    await asyncio.wait(left)
            finally:
                for f in follows:
                    f.cancel()
            for run, follow in zip(runs, follows, strict=True):
                run.result = follow.result()
            confirmed = True
            await self._command(snode, "checkpoint", CheckpointCommand(transfer_id=tid, ok=True))
        except BaseException:
            if not confirmed:
                with contextlib.suppress(Exception):
                    await asyncio.shield(self._roll_back(tid, snode, node))
            raise
        finally:
            for sub in subs:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
        first = runs[0].sent
        return BackupRun(
            transfer_id=tid,
            checkpoint=first.checkpoint,
            since=first.since,
            reason=first.reason,
            disks=runs,
        )

    async def _roll_back(self, tid: str, snode: str, node: str) -> None:
        """An incremental run failed: the source rolls its checkpoint back (stopping the
        sends still running), the backup node stops its receivers: nothing is stored."""
        with contextlib.suppress(NbdNatsError):
            await self._command(snode, "checkpoint", CheckpointCommand(transfer_id=tid, ok=False))
        for ev in await self._transfers(node):
            if ev.transfer_id.startswith(f"{tid}-disk") and ev.state not in TERMINAL:
                with contextlib.suppress(NbdNatsError):
                    await self._command(node, "cancel", CancelCommand(transfer_id=ev.transfer_id))

    @overload
    async def restore(
        self,
        node: str,
        dst: Endpoint,
        tool: Tool,
        *,
        disk: Endpoint | None = None,
        size: int | None = None,
        transfer_id: str | None = None,
        target_is_zero: bool = False,
        options: TransferOptions | None = None,
        wait: Literal[True] = True,
        on_event: EventCallback | None = None,
    ) -> OperationResult: ...

    @overload
    async def restore(
        self,
        node: str,
        dst: Endpoint,
        tool: Tool,
        *,
        disk: Endpoint | None = None,
        size: int | None = None,
        transfer_id: str | None = None,
        target_is_zero: bool = False,
        options: TransferOptions | None = None,
        wait: Literal[False],
        on_event: EventCallback | None = None,
    ) -> str: ...

    @overload
    async def restore(
        self,
        node: str,
        dst: Endpoint,
        tool: Tool,
        *,
        disk: Endpoint | None = None,
        size: int | None = None,
        transfer_id: str | None = None,
        target_is_zero: bool = False,
        options: TransferOptions | None = None,
        wait: bool,
        on_event: EventCallback | None = None,
    ) -> OperationResult | str: ...

    async def restore(
        self,
        node: str,
        dst: Endpoint,
        tool: Tool,
        *,
        disk: Endpoint | None = None,
        size: int | None = None,
        transfer_id: str | None = None,
        target_is_zero: bool = False,
        options: TransferOptions | None = None,
        wait: bool = True,
        on_event: EventCallback | None = None,
    ) -> OperationResult | str:
        """Stream a backup tool's image on ``node`` back into a target.

        restic: the snapshot ``tool.snapshot`` names (an id, or ``latest``: the newest
        whatever its disk), else the latest backup of ``disk`` (``("a", "vm1")``), else the
        latest of the one disk the repository holds backups of; with several, a
        ``UsageError`` lists them. The result's ``snapshot`` is the one restored."""
        chosen: Backup | None = None
        if tool.kind == "restic":
            chosen = await self._pick(node, tool, disk)
            if chosen is not None:
                tool = msgspec.structs.replace(tool, snapshot=chosen.id)
        elif disk is not None:
            raise UsageError("--disk picks a restic snapshot: it needs --restic")
        both = self._both(transfer_id, options)
        recv = RecvCommand(dst=dst[1], target_is_zero=target_is_zero, **both)
        send = SendCommand(tool=tool, size=size, **both)
        result = await self._pair(node, send, dst[0], recv, wait, on_event)
        if isinstance(result, OperationResult):
            result.snapshot = chosen
            _check_restored(result)
        return result

    async def provision(
        self,
        src: Endpoint,
        dst: Endpoint,
        approval: Approval,
        *,
        transfer_id: str | None = None,
        options: TransferOptions | None = None,
        wait: bool = True,
        on_event: EventCallback | None = None,
        attestation: AttestOptions | None = None,
        then: Then = "stay",
    ) -> OperationResult | str:
        """Write an image onto an installer's device under a signed approval. The source's
        digest is asked first, so the installer can refuse before a byte is written.

        With ``attestation`` (and always when the approval is bound to a TPM), the installer
        is attested just before: its quote must verify (``attest``) and, for a bound
        approval, show the approval's AK and PCR digest; the provision then names that
        quote, which the installer checks again. ``then``: what the installer does once
        the image verified (reboot into it, power off, or stay)."""
        both = self._both(transfer_id, options)
        digest, size = await self.digest(*src, raw=both["options"].raw)
        nonce = None
        if attestation is None and approval.ak_name is not None:
            attestation = AttestOptions(Enrollments())
        if attestation is not None:
            tid = both["transfer_id"]
            pcrs = approval.pcrs or list(attestation.pcrs)
            found, nonce = await self.attest(
                dst[0], attestation.store, golden=attestation.golden, pcrs=pcrs, transfer_id=tid
            )
            if approval.ak_name is not None:
                await self._check_binding(dst[0], approval, found, nonce, tid)
        recv = ProvisionCommand(
            device=dst[1],
            approval=approval,
            image_digest=digest,
            size=size,
            quote_nonce=nonce,
            then=then,
            **both,
        )
        send = SendCommand(src=src[1], **both)
        return await self._pair(src[0], send, dst[0], recv, wait, on_event)

    # -- bare metal: TPM enrollment and attestation ----------------------------------------

    async def enroll(
        self, node: str, cas: list[x509.Certificate], store: Enrollments | None = None
    ) -> Enrollment:
        """Enroll an installer's TPM (``nbdnats.metal.verifier``): its EK certificate must
        chain to one of ``cas``, and its AK must be proven to live in that TPM: a
        credential made for the AK's name and encrypted to the EK (MakeCredential) comes
        back opened (ActivateCredential). The AK is then stored under the node's name."""
        subjects.check_token(node, "node name")
        store = store or Enrollments()
        identity = await self._request(
            subjects.ctl_query(node, "tpm"), TpmQuery(), TpmIdentity, timeout=TPM_TIMEOUT
        )
        ek, ak, cert = verifier.check_identity(identity, cas)
        secret = os.urandom(32)
        blob, encrypted = attest.make_credential(ek, ak.name, secret)
        reply = await self._request(
            subjects.ctl_command(node, "activate"),
            ActivateCommand(credential=blob, secret=encrypted),
            ActivateReply,
            timeout=TPM_TIMEOUT,
        )
        verifier.check_secret(secret, reply.secret)
        enrollment = verifier.enrollment_of(node, identity, ak, cert)
        store.save(enrollment)
        return enrollment

    async def attest(
        self,
        node: str,
        store: Enrollments | None = None,
        *,
        golden: attest.Golden | None = None,
        pcrs: Sequence[int] = attest.DEFAULT_PCRS,
        transfer_id: str | None = None,
    ) -> tuple[Attestation, bytes]:
        """Quote an enrolled installer's boot PCRs with a fresh nonce and verify the
        evidence (``verifier.verify_quote``); the values and the nonce. A refusal during a
        provision (``transfer_id``) is also told to the installer, whose ``refused`` event
        then records it."""
        subjects.check_token(node, "node name")
        enrollment = (store or Enrollments()).load(node)
        nonce = os.urandom(32)
        reply = await self._request(
            subjects.ctl_command(node, "quote"),
            QuoteCommand(nonce=nonce, pcrs=sorted(set(pcrs))),
            QuoteReply,
            timeout=TPM_TIMEOUT,
        )
        try:
            return verifier.verify_quote(enrollment, reply, nonce, pcrs, golden), nonce
        except AttestationError as e:
            if transfer_id is not None:
                await self._refuse(node, nonce, transfer_id, e)
            raise AttestationError(f"{node}: {e}") from None

    async def _check_binding(
        self, node: str, approval: Approval, found: Attestation, nonce: bytes, tid: str
    ) -> None:
        """A TPM-bound approval fits only the machine and boot state it was signed for."""
        error = None
        if found.ak_name != approval.ak_name:
            error = (
                f"the approval is bound to attestation key {str(approval.ak_name)[:16]}…, but "
                f"{node}'s is {found.ak_name[:16]}… (an approval for another machine)"
            )
        elif found.pcr_digest != approval.pcr_digest:
            error = (
                f"{node}'s boot PCRs differ from those the approval was signed for (a "
                "different or changed installer image, firmware or boot path)"
            )
        if error is not None:
            err = AttestationError(error)
            await self._refuse(node, nonce, tid, err)
            raise AttestationError(f"{node}: {error}")

    async def _refuse(self, node: str, nonce: bytes, tid: str, err: AttestationError) -> None:
        """Tell an installer its evidence was refused (best effort: the refusal stands)."""
        cmd = VerdictCommand(nonce=nonce, transfer_id=tid, code=err.code, error=str(err)[:1000])
        with contextlib.suppress(NbdNatsError):
            await self._command(node, "verdict", cmd)

    async def migrate(
        self,
        src: Endpoint,
        dst: str,
        *,
        migration_id: str | None = None,
        timeout: float = _core.DEFAULT_TIMEOUT,
        mirror_speed: int = 0,
        rate: int | None = None,
        return_path: bool = False,
        wait: bool = True,
        on_event: Callable[[MigrationEvent], None] | None = None,
    ) -> MigrationEvent | str:
        """Live-migrate VM ``src[1]`` from node ``src[0]`` to node ``dst`` (whose agent knows
        the destination QEMU by the same name). ``rate``: a cap in bytes/s, as
        ``nbdnats.migration.run.migrate`` applies it. Returns the final ``MigrationEvent``
        (``state == "done"``) or raises the migration's error."""
        mid, key = self._ids(migration_id)
        node, vm = src
        subjects.check_token(dst, "node name")
        queue: asyncio.Queue[MigrationEvent] = asyncio.Queue()

        async def collect(msg: Any) -> None:
            with contextlib.suppress(msgspec.ValidationError, msgspec.DecodeError):
                ev = msgspec.json.decode(msg.data, type=MigrationEvent)
                if ev.migration_id == mid:
                    queue.put_nowait(ev)

        sub = await self.nc.subscribe(subjects.ctl_event(node, "migration"), cb=collect)
        try:
            cmd = MigrateCommand(
                key=key,
                transfer_id=mid,
                vm=vm,
                to_node=dst,
                timeout=timeout,
                mirror_speed=mirror_speed,
                rate=rate,
                return_path=return_path,
            )
            await self._command(node, "migrate", cmd)
            if not wait:
                return mid
            while True:
                ev = await queue.get()
                if on_event is not None:
                    on_event(ev)
                if ev.state == "done":
                    return ev
                if ev.state in TERMINAL:
                    raise from_code(ev.error_code or "migration", f"{node}: {ev.error}")
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await asyncio.shield(self.cancel(mid, [node]))
            raise
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    # -- the two ends ----------------------------------------------------------------------

    @staticmethod
    def _ids(transfer_id: str | None) -> tuple[str, str]:
        tid = subjects.check_token(transfer_id or subjects.new_id(), "transfer id")
        return tid, subjects.idempotency_key()

    def _both(self, transfer_id: str | None, options: TransferOptions | None) -> dict[str, Any]:
        """What the commands to both ends share: the transfer, one idempotency key and the
        options."""
        tid, key = self._ids(transfer_id)
        return {"key": key, "transfer_id": tid, "options": options or TransferOptions()}

    async def _pair(
        self,
        snode: str,
        send: SendCommand,
        rnode: str,
        recv: Command,
        wait: bool,
        on_event: EventCallback | None,
    ) -> OperationResult | str:
        tid = send.transfer_id
        queue: asyncio.Queue[TransferEvent] = asyncio.Queue()

        async def collect(msg: Any) -> None:
            with contextlib.suppress(msgspec.ValidationError, msgspec.DecodeError):
                ev = msgspec.json.decode(msg.data, type=TransferEvent)
                if ev.transfer_id == tid:
                    queue.put_nowait(ev)

        subs = [
            await self.nc.subscribe(subjects.ctl_event(n, "transfer"), cb=collect)
            for n in dict.fromkeys((snode, rnode))
        ]
        try:
            recv_op = "provision" if isinstance(recv, ProvisionCommand) else "recv"
            await self._command(rnode, recv_op, recv)
            try:
                await self._send(snode, send)
            except BaseException:
                with contextlib.suppress(NbdNatsError):
                    await self._command(rnode, "cancel", CancelCommand(transfer_id=tid))
                raise
            if not wait:
                return tid
            return await self._follow(tid, snode, rnode, queue, on_event)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await asyncio.shield(self.cancel(tid, [snode, rnode]))
            raise
        finally:
            for sub in subs:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()

    async def _send(self, node: str, send: SendCommand) -> None:
        """The send command of a pair; an agent from before ``--streams`` refuses the option
        as an unknown field, which is said in words an operator can act on."""
        try:
            await self._command(node, "send", send)
        except SchemaError as e:
            if send.options.streams > 1 and "unknown field `streams`" in str(e):
                raise SchemaError(
                    f"{node}: its agent does not support --streams (an nbd-nats from before "
                    "striping): upgrade it, or copy without --streams"
                ) from None
            raise

    async def _follow(
        self,
        tid: str,
        snode: str,
        rnode: str,
        queue: asyncio.Queue[TransferEvent],
        on_event: EventCallback | None,
    ) -> OperationResult:
        final: dict[str, TransferEvent] = {}  # by role
        ends = {"send": snode, "recv": rnode}
        cancelled_other = False
        while len(final) < 2:
            try:
                ev = await asyncio.wait_for(queue.get(), QUIET)
                found = [ev]
            except TimeoutError:
                found = await self._ask(tid, ends, final)
            for ev in found:
                if ev.role not in ends or ev.node != ends[ev.role] or ev.role in final:
                    continue
                if on_event is not None:
                    on_event(ev)
                if ev.state in TERMINAL:
                    final[ev.role] = ev
            failed = [e for e in final.values() if e.state != "done"]
            if failed and not cancelled_other:
                cancelled_other = True
                for role, node in ends.items():
                    if role not in final:
                        with contextlib.suppress(NbdNatsError):
                            await self._command(node, "cancel", CancelCommand(transfer_id=tid))
        result = OperationResult(tid, final["send"], final["recv"])
        if not result.ok:
            raise _cause(result)
        return result

    async def _ask(
        self, tid: str, ends: dict[str, str], final: dict[str, TransferEvent]
    ) -> list[TransferEvent]:
        """Events went quiet: ask each unfinished end directly."""
        found: list[TransferEvent] = []
        for role, node in ends.items():
            if role in final:
                continue
            mine = [e for e in await self._transfers(node, tid) if e.role == role]
            if not mine:
                raise TransferError(
                    f"node {node} no longer knows transfer {tid} (its agent restarted?)"
                )
            found += mine
        return found


def choose_backup(backups: list[Backup], disk: Endpoint | None, repo: str) -> Backup:
    """The latest of ``disk``'s backups, or of the one disk ``backups`` are of."""
    where = f"restic repository {redact_url(repo)}"
    if disk is not None:
        name = f"{disk[0]}:{disk[1]}"
        mine = [b for b in backups if (b.node, b.disk) == disk]
        if not mine:
            raise UsageError(f"{where} holds no backup of {name} (see: nbd-nats ctl backups)")
        return max(mine, key=lambda b: b.time)
    latest: dict[str, Backup] = {}
    for b in sorted(backups, key=lambda b: b.time):
        latest[b.name] = b
    if not latest:
        raise UsageError(f"{where} holds no nbdnats backup: pass --snapshot ID")
    if len(latest) > 1:
        shown = ", ".join(
            f"{name} (latest {b.short_id}, {b.time.astimezone(dt.UTC):%Y-%m-%d %H:%M:%S} UTC)"
            for name, b in sorted(latest.items())
        )
        raise UsageError(
            f"{where} holds backups of {len(latest)} disks: {shown}; "
            "pass --disk NODE:DISK or --snapshot ID"
        )
    return next(iter(latest.values()))


def _pending(d: DiskSend) -> tuple[TransferEvent, TransferEvent]:
    """Placeholders for a disk's two ends until their reports come."""
    return tuple(  # type: ignore[return-value]
        TransferEvent(transfer_id=d.transfer_id, node="", role=role, state="accepted")
        for role in ("send", "recv")
    )


def _cause(result: OperationResult) -> NbdNatsError:
    """The real failure of two ends: a peer's cancellation, or an error that only relays
    the peer's (``from_peer``), is a consequence."""
    ends = [result.sender, result.receiver]
    failed = [e for e in ends if e.state == "failed"] or [e for e in ends if e.state != "done"]
    own = [e for e in failed if not e.from_peer]
    ev = (own or failed)[0]
    err = from_code(ev.error_code or "error", f"{ev.node}: {ev.error or ev.state}")
    if ev.state == "cancelled" and not isinstance(err, TransferCancelled):
        return TransferCancelled(f"{ev.node}: {ev.error or 'cancelled'}")
    return err
