"""Message schemas of the ctl plane and of transfer events, versioned msgspec Structs.

The data plane's own handshake and frames are binary/JSON defined by the core
(``docs/protocol.md``); everything Python publishes is defined here, once. Every message
carries ``v`` (``SCHEMA_VERSION``); a receiver refuses versions newer than its own.

    ctl.cmd.<node>.send        SendCommand       -> Reply (SendReply when incremental)
    ctl.cmd.<node>.recv        RecvCommand       -> Reply
    ctl.cmd.<node>.provision   ProvisionCommand  -> Reply
    ctl.cmd.<node>.cancel      CancelCommand     -> Reply
    ctl.cmd.<node>.rate        RateCommand       -> Reply        (the sending end's agent)
    ctl.cmd.<node>.checkpoint  CheckpointCommand -> Reply        (an incremental backup's source)
    ctl.cmd.<node>.migrate     MigrateCommand    -> Reply        (the source's agent)
    ctl.cmd.<node>.incoming    IncomingCommand   -> IncomingReply (the destination's agent)
    ctl.cmd.<node>.qmp         QmpCommand        -> QmpReply      (the destination's agent)
    ctl.cmd.<node>.activate    ActivateCommand   -> ActivateReply (an installer: TPM enrollment)
    ctl.cmd.<node>.quote       QuoteCommand      -> QuoteReply    (an installer: TPM quote)
    ctl.cmd.<node>.verdict     VerdictCommand    -> Reply         (an installer: evidence refused)
    ctl.qry.<node>.info        InfoQuery         -> NodeInfo
    ctl.qry.<node>.transfers   TransfersQuery    -> TransferList
    ctl.qry.<node>.digest      DigestQuery       -> DigestReply
    ctl.qry.<node>.backups     BackupsQuery      -> BackupList
    ctl.qry.<node>.qmp-events  QmpEventsQuery    -> QmpEvents
    ctl.qry.<node>.tpm         TpmQuery          -> TpmIdentity   (an installer's EK and AK)
    ctl.evt.<node>.announce    NodeInfo
    ctl.evt.<node>.transfer    TransferEvent
    ctl.evt.<node>.refused     RefusedEvent
    ctl.evt.<node>.migration   MigrationEvent
    ctl.evt.<node>.adjacency   AdjacencyEvent    (a bare-metal host: loopbacks, uplinks, ToR ports)
    ctl.qry.<injector>.routes  RoutesQuery       -> RoutesReply   (a route injector's table)
    ctl.evt.<injector>.route   RouteEvent        (a route injector installed or withdrew a route)
    ctl.evt.<injector>.refused RefusedEvent      (``about``: the node whose adjacency it refused)

Every reply is an ``Answer`` (``ok``, or an error ``code``) and ``raise_for`` turns a failed
one into its exception. The agent's one table (``nbdnats.ctl.agent``) maps each op above to
its schema and its handler.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal, TypeVar

import msgspec

from nbdnats import _core
from nbdnats.errors import QmpCommandError, SchemaError, from_code
from nbdnats.subjects import TOKEN_PATTERN
from nbdnats.units import MAX_RATE, MAX_SIZE, MAX_TIMEOUT

SCHEMA_VERSION = 1

Op = Literal["send", "recv", "provision"]
ToolKind = Literal["restic", "kopia", "pipe"]
BackupKind = Literal["full", "incremental"]
Role = Literal["host", "installer"]
# ``--compress``: data frames compressed with this codec where that saves (``auto``: the
# best both ends have; ``zstd``/``lz4``: that one, or fail if the receiver lacks it).
Compress = Literal["off", "zstd", "lz4", "auto"]

# Numbers that reach the core or a sleep are bounded here, so a message that would overflow
# a u64, panic a Duration or sleep forever is refused as ``schema`` before anything runs
# (JSON has no NaN or infinity; a number too large for a float is refused too).
Bytes = Annotated[int, msgspec.Meta(ge=0, le=MAX_SIZE)]
"""A size, length, offset or rate in bytes: 0 to 2^63 - 1."""
Rate = Annotated[int, msgspec.Meta(gt=0, le=MAX_RATE)]
"""A rate cap in bytes/s: more than 0, at most the core's ``MAX_RATE`` (no cap: leave it out)."""
Seconds = Annotated[float, msgspec.Meta(ge=0, le=MAX_TIMEOUT)]
"""A timeout: 0 (no limit) to ``MAX_TIMEOUT`` (7 days)."""
Interval = Annotated[float, msgspec.Meta(gt=0, le=MAX_TIMEOUT)]
"""A period: more than 0, at most ``MAX_TIMEOUT``."""
Count = Annotated[int, msgspec.Meta(ge=0, le=MAX_SIZE)]
Streams = Annotated[int, msgspec.Meta(ge=1, le=_core.MAX_STREAMS)]
"""``--streams``: the sub-streams a transfer is split into, 1 to the core's ``MAX_STREAMS``."""


# What a restic snapshot's listing may hold. Values come from the tool's output (anyone who
# can write the repository can craft them), so each is checked here, when the agent reads
# them and again when the controller does.
SnapshotId = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}\Z")]
ShortId = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{8,64}\Z")]
Token = Annotated[str, msgspec.Meta(pattern=TOKEN_PATTERN)]  # as subjects.check_token
DiskName = Annotated[str, msgspec.Meta(pattern=r"^[^\x00-\x1f\x7f]{1,1024}\Z")]
"""An export name, path or NBD URI as a backup was asked for, without control characters
(a restic tag holds it percent-encoded: ``nbdnats.ctl.tools.disk_tag``)."""
DigestText = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,32}:[0-9a-f]{16,256}\Z")]
HexName = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{4,132}\Z")]
"""A TPM object's name in hex (nameAlg || digest of its public area): an attestation key's."""
HexDigest = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}\Z")]
"""A sha256 in hex: the digest of an installer's boot PCR values an approval binds to."""
PcrIndex = Annotated[int, msgspec.Meta(ge=0, le=23)]
Then = Literal["stay", "reboot", "poweroff"]
"""What an installer does after a provision verified: stay in the installer (default), or
sync and reboot (into the new disk) or power off."""
# TPM evidence from an installer: bounded here, parsed (bounds-checked) by nbdnats.metal.attest.
TpmBlob = Annotated[bytes, msgspec.Meta(max_length=4096)]
CertBlob = Annotated[bytes, msgspec.Meta(max_length=16384)]
EventLog = Annotated[bytes, msgspec.Meta(max_length=512 * 1024)]
Nonce = Annotated[bytes, msgspec.Meta(min_length=16, max_length=64)]
CheckpointName = Annotated[str, msgspec.Meta(pattern=r"^nbdnats-[0-9]{8}T[0-9]{6}-[0-9a-f]{6}\Z")]
"""A checkpoint's name as ``nbdnats.backup`` makes them (``nbdnats-<UTC time>-<6 hex>``):
the dirty bitmap that records what changed since the snapshot tagged with it. It reaches
QMP and a restic tag."""


class Message(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Base of ctl messages: the schema version, checked on receipt."""

    v: int = SCHEMA_VERSION


class Command(Message, kw_only=True):
    """Every command names its transfer and an idempotency key: a command retried with the
    same key gets the first reply and never starts a second transfer."""

    key: str = msgspec.field(default="")
    transfer_id: str


class Tool(Message, kw_only=True):
    """A backup tool at one end of a stream, run by the agent with its own environment
    (credentials such as ``RESTIC_PASSWORD`` never travel in a command).

    backup (the tool reads the image on stdin): restic ``repo``; kopia ``source`` (the
    snapshot's source path); pipe ``command``. ``node`` and ``disk`` name the disk being
    stored: restic and kopia snapshots are tagged with them (``node=a``, ``disk=vm1``).
    restore (the tool writes it on stdout): restic ``repo`` + ``snapshot`` (the
    controller picks it: ``Controller.restore``); kopia ``object``
    (``<rootOID>/disk.img`` or a snapshot's object id); pipe ``command``.
    backups (the ``backups`` query): restic ``repo``, and ``node`` + ``disk`` to list
    only that disk's snapshots.
    incremental backup (restic only): ``checkpoint``, the source's checkpoint the image is
    taken at, and ``parent``, the snapshot it changes (the stream holds only what changed:
    the agent reads the rest from ``restic dump PARENT``, and stores the whole image). The
    snapshot is tagged ``checkpoint=``, ``kind=full|incremental`` and ``parent=``.

    The agent checks every value before it joins a command line (``nbdnats.ctl.tools``,
    ``nbdnats.ctl.policy``): ``repo`` is under its allow-list; ``snapshot`` is hex or
    ``latest``; ``node`` a node name and ``disk`` a disk name of printable characters;
    ``object`` is an id with plain names after it; ``source`` an absolute
    path of plain names; ``command``'s program is allowed, and every argument that names
    a path names an absolute one under the allow-list.
    """

    kind: ToolKind
    repo: str | None = None
    snapshot: str | None = None
    source: str | None = None
    object: str | None = None
    command: list[str] | None = None
    node: str | None = None
    disk: str | None = None
    checkpoint: CheckpointName | None = None
    parent: SnapshotId | None = None


class TransferOptions(Message, kw_only=True, omit_defaults=True):
    """``raw``: a file endpoint whose header names an image format (qcow2, vmdk, ...) is
    moved as the bytes it holds, not as the disk it holds through qemu-nbd.
    ``rate``: the sending end's cap in bytes/s (None: no cap; a receiver ignores it).
    ``streams``: the sending end splits the transfer into that many sub-streams (a receiver
    ignores it: it agrees to what the sender asks in the open handshake, or to one).

    Options left at their defaults stay off the wire, so a command that uses none of the
    newer ones reads the same to an agent from before them (which refuses fields it does
    not know: ``Message`` forbids them)."""

    window: Bytes | None = None
    timeout: Seconds | None = None
    verify: bool = False
    raw: bool = False
    rate: Rate | None = None
    # The sender's compression (None: the core's default, ``_core.DEFAULT_COMPRESS``).
    compress: Compress | None = None
    streams: Streams = 1


class Incremental(Message, kw_only=True):
    """An incremental backup's source side: take a checkpoint of ``src`` (a VM the agent
    knows: all its writable disks at one instant; or an export or path of a qcow2 image
    not in use) and send what changed since checkpoint ``since`` (None: everything, and
    ``reason`` says why, as the controller found it)."""

    since: CheckpointName | None = None
    reason: Annotated[str, msgspec.Meta(max_length=1024)] = ""


class SendCommand(Command, kw_only=True):
    """Send ``src`` (an export name, path or NBD URI on the node), or a restore tool's
    output of ``size`` bytes (``size`` is found from restic/kopia when not given).
    ``incremental``: take a checkpoint of ``src`` first and send each of its disks as
    transfer ``subjects.backup_disk_id(transfer_id, n)``; the answer is a ``SendReply``
    and the checkpoint is held until a ``CheckpointCommand`` (or the timeout) ends it."""

    src: str | None = None
    tool: Tool | None = None
    size: Bytes | None = None
    chunk_size: Bytes | None = None
    incremental: Incremental | None = None
    options: TransferOptions = msgspec.field(default_factory=TransferOptions)


class RecvCommand(Command, kw_only=True):
    """Receive into ``dst`` (export name, path or NBD URI), or into a backup tool."""

    dst: str | None = None
    tool: Tool | None = None
    target_is_zero: bool = False
    options: TransferOptions = msgspec.field(default_factory=TransferOptions)


class Approval(Message, kw_only=True):
    """Permission to write one image onto one device of one node until ``expires``, signed
    with Ed25519 by the key whose id is ``key_id`` (``nbd-nats approve``). The signature
    covers this struct's JSON with ``signature`` empty."""

    node: str
    image_digest: str
    device: str
    expires: dt.datetime
    key_id: str
    signature: str = ""
    # Bound to a TPM (nbd-nats approve --attestation): the installer's attestation key and
    # the digest of its boot PCR values (``pcrs``) that the quote before the write must show.
    # Left out of the signed bytes when unset, so approvals without them read as before.
    ak_name: HexName | None = None
    pcr_digest: HexDigest | None = None
    pcrs: list[PcrIndex] | None = None


class ProvisionCommand(Command, kw_only=True):
    """Write an image into ``device`` on an installer; the source's digest and size were
    asked of the sending node and must match the approval."""

    device: str
    approval: Approval
    image_digest: str
    size: Bytes
    options: TransferOptions = msgspec.field(default_factory=TransferOptions)
    # The nonce of the quote the controller verified just before (attested provisioning):
    # the installer checks that quote against the approval's binding before a byte is written.
    quote_nonce: Nonce | None = None
    then: Then = "stay"


class CancelCommand(Message, kw_only=True):
    transfer_id: str


class RateCommand(Message, kw_only=True):
    """Change the rate cap of transfer (or migration) ``transfer_id``'s sending end on this
    node, from now on: ``rate`` bytes/s, or None to lift the cap."""

    transfer_id: str
    rate: Rate | None = None


class CheckpointCommand(Message, kw_only=True):
    """The end of an incremental backup's checkpoint (``transfer_id``: the backup's, as
    its ``SendCommand`` named it): ``ok``, every disk's snapshot is stored, so the source
    commits it (the next backup starts from it); else it rolls back (no change is lost)."""

    transfer_id: str
    ok: bool


class MigrateCommand(Command, kw_only=True):
    """Live-migrate the VM the source's agent knows as ``vm`` into the QEMU that agent
    ``to_node`` knows by the same name (started with ``-incoming defer``); ``transfer_id``
    is the migration id."""

    vm: str
    to_node: str
    timeout: Seconds = _core.DEFAULT_TIMEOUT
    mirror_speed: Bytes = 0
    rate: Rate | None = None
    return_path: bool = False


class IncomingCommand(Message, kw_only=True):
    """The destination's side of a migration, run by its agent: ``listen`` (sockets for
    its QEMU), ``recv`` (receivers for the exports, name: size, and the migration stream,
    with the streams' ``timeout`` the source uses for its own ends), ``close`` (end them)."""

    migration_id: str
    vm: str
    action: Literal["listen", "recv", "close"]
    exports: dict[str, Bytes] = msgspec.field(default_factory=dict)
    timeout: Seconds = _core.DEFAULT_TIMEOUT


class Answer(Message, kw_only=True):
    """Base of every reply: ``ok``, or an error ``code`` (``nbdnats.errors``) and its
    message; ``raise_for`` turns a failure into its exception."""

    ok: bool
    code: str | None = None
    error: str | None = None


class IncomingReply(Answer, kw_only=True):
    nbd: str | None = None
    migration: str | None = None


class QmpCommand(Message, kw_only=True):
    """One QMP command for the destination QEMU of a migration, which its agent runs only
    if it is one a migration's destination needs, with the arguments it expects."""

    migration_id: str
    vm: str
    command: str
    arguments: dict[str, Any] = msgspec.field(default_factory=dict)


class QmpReply(Answer, kw_only=True):
    """A relayed QMP command's answer. Code ``qmp``: QEMU itself refused the command
    (``error_class`` is QEMU's); any other code: the agent refused to relay it."""

    result: Any = None
    error_class: str | None = None


class QmpEventsQuery(Message, kw_only=True):
    """The destination QEMU's events from index ``since`` on (it opens the session)."""

    migration_id: str
    vm: str
    since: Count = 0


class QmpEvent(Message, kw_only=True):
    event: str
    data: dict[str, Any] = msgspec.field(default_factory=dict)
    age: float = 0.0  # seconds since it arrived at the agent


class QmpEvents(Message, kw_only=True):
    events: list[QmpEvent]
    alive: bool


class Reply(Answer, kw_only=True):
    """The answer to a command that names no other reply, and any refusal (an unknown op,
    an invalid message) whatever the reply would have been."""

    transfer_id: str | None = None


class TpmQuery(Message, kw_only=True):
    """An installer's TPM identity: its endorsement key (EK) with the manufacturer's
    certificate, and the attestation key (AK) it made under the EK."""


class TpmIdentity(Answer, kw_only=True):
    node: str = ""
    ek_certificate: CertBlob | None = None  # DER
    ek_public: TpmBlob = b""  # TPM2B_PUBLIC
    ak_public: TpmBlob = b""  # TPM2B_PUBLIC


class ActivateCommand(Message, kw_only=True):
    """Enrollment's proof that the AK lives in the TPM of that EK: a credential made for the
    AK's name and encrypted to the EK (TPM2_MakeCredential); only that TPM can open it."""

    credential: TpmBlob  # TPM2B_ID_OBJECT
    secret: TpmBlob  # TPM2B_ENCRYPTED_SECRET


class ActivateReply(Answer, kw_only=True):
    secret: TpmBlob = b""


class QuoteCommand(Message, kw_only=True):
    """A fresh nonce for a TPM quote over ``pcrs`` (sha256 bank)."""

    nonce: Nonce
    pcrs: list[PcrIndex] = msgspec.field(default_factory=lambda: [0, 4, 7])


class QuoteReply(Answer, kw_only=True):
    attest: TpmBlob = b""  # TPMS_ATTEST, signed by the AK
    signature: TpmBlob = b""  # TPMT_SIGNATURE
    pcrs: dict[PcrIndex, TpmBlob] = msgspec.field(default_factory=dict)
    event_log: EventLog = b""


class VerdictCommand(Message, kw_only=True):
    """The controller refused the evidence of quote ``nonce`` (for transfer
    ``transfer_id``): the installer forgets that quote and publishes the refusal as its
    ``refused`` event, so the log shows why nothing was written."""

    nonce: Nonce
    transfer_id: Token
    code: str
    error: Annotated[str, msgspec.Meta(max_length=1000)]


class DiskSend(msgspec.Struct, kw_only=True):
    """One disk of an incremental backup's checkpoint, being sent as ``transfer_id``:
    ``disk`` (``<vm>/<drive>``, or the export as named), its ``size``, ``mode`` and, when
    full, why (``reason``), the ``checkpoint`` taken and the one it started from."""

    transfer_id: Token
    disk: DiskName
    size: Bytes
    mode: BackupKind
    checkpoint: CheckpointName
    reason: str = ""
    since: CheckpointName | None = None


class SendReply(Reply, kw_only=True):
    """The answer to an incremental ``SendCommand``: the disks being sent."""

    disks: list[DiskSend] = msgspec.field(default_factory=list)


class InfoQuery(Message, kw_only=True):
    pass


class NodeInfo(Message, kw_only=True):
    """``ctl.evt.<node>.announce`` (on start, periodically, on stop) and the ``info`` query.
    A controller marks a node ``lost`` when its last announcement is older than three
    announce intervals (it died without saying so)."""

    node: str
    version: str
    role: Role
    state: Literal["up", "stopping", "stopped", "lost"]
    capabilities: list[str]
    exports: dict[str, str] = msgspec.field(default_factory=dict)
    started: dt.datetime
    at: dt.datetime
    running: Count = 0
    announce_interval: Interval = 30.0
    vms: list[str] = msgspec.field(default_factory=list)
    ak_name: HexName | None = None  # an installer with a TPM: its attestation key's name


class TransfersQuery(Message, kw_only=True):
    transfer_id: str | None = None


class DigestQuery(Message, kw_only=True):
    src: str
    raw: bool = False  # as ``TransferOptions.raw``


class DigestReply(Answer, kw_only=True):
    digest: str | None = None
    size: int | None = None


class BackupsQuery(Message, kw_only=True):
    """The snapshots nbdnats stored with ``tool`` (restic): all, or one disk's
    (``tool.node`` + ``tool.disk``)."""

    tool: Tool


class Backup(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One stored backup: its snapshot and the tags its backup gave it. ``node``/``disk``
    are None for a snapshot made before nbdnats tagged them; ``size`` and ``digest`` are
    the transfer's (the digest as its stats reported it)."""

    id: SnapshotId
    short_id: ShortId
    time: dt.datetime
    node: Token | None = None
    disk: DiskName | None = None
    size: Bytes | None = None
    digest: DigestText | None = None
    transfer_id: Token | None = None
    kind: BackupKind | None = None
    checkpoint: CheckpointName | None = None
    parent: SnapshotId | None = None

    @property
    def name(self) -> str:
        """``node:disk``, ``?`` where a tag is missing."""
        return f"{self.node or '?'}:{self.disk or '?'}"


class BackupList(Answer, kw_only=True):
    """The ``backups`` answer, oldest first; ``skipped``: snapshots whose id, time or tags
    did not pass the checks, left out."""

    backups: list[Backup] = msgspec.field(default_factory=list)
    skipped: Count = 0


class TransferEvent(msgspec.Struct, kw_only=True, omit_defaults=True):
    """``data.evt.<transfer>.{progress,done,error}`` and ``ctl.evt.<node>.transfer``.

    ``state`` is the core's (running, done, failed) or the agent's: ``accepted`` and, once
    the whole job (tool included) has ended, ``done``/``failed``/``cancelled``."""

    v: int = SCHEMA_VERSION
    transfer_id: str
    node: str
    role: str
    state: str
    op: str | None = None
    key: str | None = None
    endpoint: str | None = None
    format: str | None = None  # the endpoint's image format when it is a file or device
    tool: str | None = None
    tool_output: str | None = None
    image_digest: str | None = None
    size: int = 0
    done_bytes: int = 0
    data_bytes: int = 0
    zero_bytes: int = 0
    seconds: float = 0.0
    mb_per_s: float = 0.0
    digest: str | None = None
    verified: bool = False
    bad_frames: int = 0
    duplicate_frames: int = 0
    corrupt_frames: int = 0
    retransmits: int = 0
    resumes: int = 0
    sent_bytes: int = 0
    # Bytes a dirty bitmap marked changed (a dirty transfer; 0 otherwise).
    dirty_bytes: int = 0
    # The sending end's rate cap in bytes/s (0: none).
    rate_limit: int = 0
    # Payload bytes on the wire, compressed where that paid.
    wire_bytes: int = 0
    # The sub-streams the transfer ran with (--streams; 1: one, left out).
    streams: int = 1
    error_code: str | None = None
    error: str | None = None
    # The error is the peer's (reported to this end), so this end's failure is a consequence.
    from_peer: bool = False
    # An incremental backup's disk: the checkpoint, full or incremental and why (the
    # source's), the snapshot it changes (the receiver's).
    checkpoint: str | None = None
    backup_kind: str | None = None
    reason: str | None = None
    parent: str | None = None


class Report(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The one line ``--json`` prints when a transfer ends: this end's counters. ``copy``
    prints the receiver's (``role`` "recv", as before) with the sender's own report nested
    as ``sender``: only the sender counts ``retransmits`` and ``sent_bytes``, only the
    receiver ``bad_frames``, ``duplicate_frames`` and ``corrupt_frames``."""

    id: str
    role: str
    size: int
    data_bytes: int
    zero_bytes: int
    seconds: float
    mb_per_s: float
    digest: str | None
    verified: bool
    chunk_size: int
    window: int
    frames: int
    bad_frames: int
    duplicate_frames: int
    corrupt_frames: int
    retransmits: int
    resumes: int
    sent_bytes: int
    # Bytes the source's dirty bitmap marked changed: 0 unless --dirty-bitmap.
    dirty_bytes: int
    # The sender's rate cap in bytes/s when it ended (--rate, ctl rate); 0: none.
    rate_limit: int = 0
    # Payload bytes on the wire (--compress): at most sent_bytes (the sender's), or the
    # data bytes that arrived (the receiver's).
    wire_bytes: int
    # The sub-streams the transfer ran with (--streams): 1 unless the receiver agreed to more.
    streams: int
    # The endpoint's image format when it is a file or device ("raw", "qcow2", ...).
    format: str | None = None
    sender: Report | None = None


class MigrationEvent(msgspec.Struct, kw_only=True, omit_defaults=True):
    """``ctl.evt.<node>.migration``: a live migration ended (``done`` or ``failed``)."""

    v: int = SCHEMA_VERSION
    migration_id: str
    node: str
    state: str
    mode: str
    total_seconds: float = 0.0
    downtime_ms: int = 0
    paused_ms: int = 0
    disk_bytes: int = 0
    ram_bytes: int = 0
    error_code: str | None = None
    error: str | None = None


class TransferList(Message, kw_only=True):
    transfers: list[TransferEvent]


class RefusedEvent(Message, kw_only=True):
    """``ctl.evt.<node>.refused``: a command the agent refused, and why. A route injector
    refusing a node's adjacency publishes it under its own name with ``op="adjacency"`` and
    the node it refused in ``about``."""

    node: str
    op: str
    key: str | None = None
    transfer_id: str | None = None
    code: str
    error: str
    about: str | None = None


# -- bare-metal networking (nbdnats.metal.network, nbdnats.metal.injector) -------------------
# An adjacency is untrusted twice over: the host wrote it, and what it says about its ToR
# came from LLDP frames anyone on the link can send. Everything is bounded here; the injector
# then checks each address and name against what it manages (docs/networking.md).
MAX_ADJACENCY_BYTES = 64 * 1024
"""An adjacency event larger than this is refused before it is decoded."""
# \Z, not $: "$" also matches before a final newline, and these values reach argv and logs.
IfName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.:@-]{0,14}\Z")]
"""A Linux interface name (at most 15 bytes), never starting with '-'."""
Address = Annotated[str, msgspec.Meta(max_length=64, pattern=r"^[0-9A-Fa-f:./]{2,64}\Z")]
"""An IPv6 address or prefix as text (parsed with ``ipaddress`` where it is used)."""
LldpText = Annotated[str, msgspec.Meta(max_length=255, pattern=r"^[^\x00-\x1f\x7f]*\Z")]
"""A string from an LLDP TLV (at most 255 bytes on the wire), without control characters."""


class Uplink(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One uplink of a bare-metal host as its agent sees it."""

    name: IfName
    link_local: Address | None = None  # the host's fe80:: address on it
    default_route: bool = False  # a default route via a link-local next hop on it exists
    tor: LldpText | None = None  # the LLDP neighbour's system (chassis) name
    chassis_id: LldpText | None = None
    port: LldpText | None = None  # the neighbour's port id (an ifname on the ToR)
    port_description: LldpText | None = None
    management: list[Address] = msgspec.field(default_factory=list)


class AdjacencyEvent(Message, kw_only=True):
    """``ctl.evt.<node>.adjacency``: a bare-metal host's /128 loopbacks and where it is
    plugged in. Published on change, every ``interval`` seconds, and once with
    ``state="withdrawn"`` (no loopbacks) when its agent stops."""

    node: Token
    state: Literal["up", "withdrawn"] = "up"
    loopbacks: Annotated[list[Address], msgspec.Meta(max_length=64)] = msgspec.field(
        default_factory=list
    )
    uplinks: Annotated[list[Uplink], msgspec.Meta(max_length=16)] = msgspec.field(
        default_factory=list
    )
    interval: Interval = 30.0
    at: dt.datetime


class RoutesQuery(Message, kw_only=True):
    """``ctl.qry.<injector>.routes``: the injector's table; ``node`` narrows it to one."""

    node: Token | None = None


class RouteStatus(msgspec.Struct, kw_only=True):
    """One node's routes as an injector holds them."""

    node: str
    state: Literal["up", "withdrawn", "lost", "refused"]
    loopbacks: list[str]
    tor: str | None = None
    port: str | None = None
    link_local: str | None = None
    installed: bool = False  # every loopback's route is in the ToR's RIB as asked
    error: str | None = None  # why it was refused or could not be programmed
    at: dt.datetime | None = None  # the adjacency it is based on


class RoutesReply(Answer, kw_only=True):
    injector: str = ""
    routes: list[RouteStatus] = msgspec.field(default_factory=list)


class AdjacencyView(msgspec.Struct, kw_only=True):
    """``ctl adjacency``: a node's last adjacency as the events stream holds it (``state``
    ``lost`` when it has been silent for three of its intervals) and, when a route injector
    answered, what it made of it (``routes``; None: no injector answered, see ``injector``)."""

    node: str
    state: Literal["up", "withdrawn", "lost"]
    loopbacks: list[str]
    uplinks: list[Uplink]
    at: dt.datetime  # when the stream stored it
    routes: RouteStatus | None = None
    injector: str | None = None  # why no injector's view is there


class RouteEvent(Message, kw_only=True):
    """``ctl.evt.<injector>.route``: a route the injector installed on or withdrew from a
    ToR (``reason``: announced, moved, withdrawn, lost, reconcile)."""

    injector: str
    node: str
    action: Literal["installed", "withdrawn"]
    prefix: str
    tor: str
    port: str
    via: str
    reason: str


encode = msgspec.json.encode


def raise_for(reply: Answer, node: str, *, command: str = "") -> None:
    """Raise the error of the tree that a failure reply from ``node`` stands for; nothing
    when it is ``ok``. QEMU's own refusal of a relayed QMP ``command`` is a
    ``QmpCommandError`` with QEMU's class."""
    if reply.ok:
        return
    if isinstance(reply, QmpReply) and reply.code == "qmp":
        message = f"destination QEMU: {command}: {reply.error}"
        raise QmpCommandError(message, reply.error_class or "")
    raise from_code(reply.code or "error", f"{node}: {reply.error}")


class _Versioned(msgspec.Struct):
    v: int = SCHEMA_VERSION


def decode(cls: type[M], data: bytes, what: str) -> M:
    """Decode a ctl message, or raise ``SchemaError`` saying what is wrong with it."""
    try:
        msg = msgspec.json.decode(data, type=cls)
    except msgspec.ValidationError as e:
        try:
            v = msgspec.json.decode(data, type=_Versioned).v
        except msgspec.DecodeError:
            v = SCHEMA_VERSION
        if v != SCHEMA_VERSION:
            raise SchemaError(
                f"{what} has schema version {v}; this node speaks {SCHEMA_VERSION}"
            ) from None
        raise SchemaError(f"invalid {what}: {e}") from None
    except msgspec.DecodeError as e:
        raise SchemaError(f"invalid {what}: not JSON ({e})") from None
    if msg.v != SCHEMA_VERSION:
        raise SchemaError(f"{what} has schema version {msg.v}; this node speaks {SCHEMA_VERSION}")
    return msg


S = TypeVar("S", bound=msgspec.Struct)
M = TypeVar("M", bound=Message)


def from_stats(cls: type[S], stats: object, **fields: Any) -> S:
    """Build ``cls`` from a core ``Stats``: every field of ``cls`` that is one of the core's
    ``STATS_FIELDS``, by name, then ``fields`` on top."""
    taken = {f: getattr(stats, f) for f in cls.__struct_fields__ if f in _core.STATS_FIELDS}
    return cls(**{**taken, **fields})
