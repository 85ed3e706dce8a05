"""The subject taxonomy: one subject carries plane and intent. Nothing else formats one.

ctl.cmd.<node>.<op>          commands to a node's agent
ctl.qry.<node>.<what>        request/reply queries
ctl.evt.<node>.<kind>        events (JetStream friendly)
data.cmd.<transfer>.open     transfer setup (the open handshake)
data.evt.<transfer>.<kind>   progress / done / error
data.blk.<transfer>.c        chunk frames, sender -> receiver
data.blk.<transfer>.a        acks, receiver -> sender

A striped transfer (``--streams N``) opens on its own subjects and moves its bytes as child
transfers ``<transfer>-s0`` .. ``-s<N-1>`` (``stripe_transfers``), each with the subjects above.
"""

from __future__ import annotations

import re
import uuid

from nbdnats import _core
from nbdnats.errors import UsageError

CTL_CMD = "ctl.cmd"
CTL_QRY = "ctl.qry"
CTL_EVT = "ctl.evt"
DATA_CMD = "data.cmd"
DATA_EVT = "data.evt"
DATA_BLK = "data.blk"

# One subject token (message schemas use it too). Not starting with '-': an id also names
# files (a receiver's journal) and may meet an argv (the core's `journal::check_id` holds
# the same rule).
TOKEN_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_-]{0,63}\Z"
_TOKEN = re.compile(TOKEN_PATTERN)


def is_token(value: str) -> bool:
    """Whether ``value`` may be one subject token (a node, export or transfer name)."""
    return _TOKEN.fullmatch(value) is not None


def check_token(value: str, what: str) -> str:
    """A value that becomes one subject token: no dots, wildcards or spaces."""
    if not is_token(value):
        raise UsageError(
            f"invalid {what} {value!r}: use 1-64 letters, digits, '-' or '_', not starting "
            "with '-' (it becomes a NATS subject token)"
        )
    return value


# Ids. A transfer id (and a migration's) is one subject token; the streams that belong to
# another transfer or to a migration are named from its id, so each end derives the same.


def new_id() -> str:
    """A fresh transfer or migration id: short enough to read, random enough not to meet
    another one on the same servers."""
    return uuid.uuid4().hex[:16]


def idempotency_key() -> str:
    """A command's key: the agent runs a command once per key, so a retry (the same bytes)
    gets the first reply."""
    return uuid.uuid4().hex


def return_id(transfer_id: str) -> str:
    """The transfer that carries a stream's other direction (what the receiving end's
    connection writes back, e.g. QEMU's migration return path)."""
    return f"{transfer_id}-back"


def migration_ram_id(migration_id: str) -> str:
    """A migration's stream (RAM and device state) from the source's QEMU to the
    destination's; ``return_id`` of it carries the return path."""
    return f"{migration_id}-ram"


def migration_disk_id(migration_id: str, disk: int) -> str:
    """The mirror of a migration's disk number ``disk`` (its place in the source's list)."""
    return f"{migration_id}-disk{disk}"


def backup_disk_id(transfer_id: str, disk: int) -> str:
    """The stream of disk number ``disk`` (its place in the checkpoint's list) of an
    incremental backup ``transfer_id``: one transfer and one snapshot per disk."""
    return f"{transfer_id}-disk{disk}"


# A striped transfer's children are named "<id>-s<k>" (k < MAX_STREAMS, one digit): an id
# longer than this would give children longer than one token, so it cannot be striped.
MAX_STRIPED_ID = 64 - len(f"-s{_core.MAX_STREAMS - 1}")


def stripe_id(transfer_id: str, k: int) -> str:
    """The child transfer that carries stripe ``k`` of a striped transfer ``transfer_id``
    (``--streams``): an ordinary transfer with its own subjects, session and journal."""
    return f"{transfer_id}-s{k}"


def stripe_transfers(transfer_id: str) -> list[tuple[str, tuple[str, str, str]]] | None:
    """Every child a striped ``transfer_id`` may have, ``(child id, its subjects)`` for
    k = 0 .. ``MAX_STREAMS`` - 1, as the core takes them; None when the id is too long for
    its children's ids to be tokens (more than ``MAX_STRIPED_ID`` characters)."""
    check_token(transfer_id, "transfer id")
    if len(transfer_id) > MAX_STRIPED_ID:
        return None
    children = (stripe_id(transfer_id, k) for k in range(_core.MAX_STREAMS))
    return [(child, transfer(child)) for child in children]


def transfer(transfer_id: str) -> tuple[str, str, str]:
    """The (open, chunks, acks) subjects of one transfer, as the core takes them."""
    t = check_token(transfer_id, "transfer id")
    return (f"{DATA_CMD}.{t}.open", f"{DATA_BLK}.{t}.c", f"{DATA_BLK}.{t}.a")


def blocks(transfer_id: str) -> str:
    """Everything on a transfer's block subjects (for permissions and monitoring)."""
    return f"{DATA_BLK}.{check_token(transfer_id, 'transfer id')}.>"


def data_event(transfer_id: str, kind: str) -> str:
    return f"{DATA_EVT}.{check_token(transfer_id, 'transfer id')}.{check_token(kind, 'event')}"


def data_events(transfer_id: str) -> str:
    """Every event of one transfer (a subscription pattern)."""
    return f"{DATA_EVT}.{check_token(transfer_id, 'transfer id')}.>"


def ctl_events(kind: str = "*", node: str = "*") -> str:
    """Events of one kind (or all) from one node (or every node): a subscription pattern."""
    node = node if node == "*" else check_token(node, "node name")
    kind = kind if kind == "*" else check_token(kind, "event")
    return f"{CTL_EVT}.{node}.{kind}"


def ctl_event(node: str, kind: str) -> str:
    return f"{CTL_EVT}.{check_token(node, 'node name')}.{check_token(kind, 'event')}"


def ctl_command(node: str, op: str) -> str:
    return f"{CTL_CMD}.{check_token(node, 'node name')}.{check_token(op, 'command')}"


def ctl_query(node: str, what: str) -> str:
    return f"{CTL_QRY}.{check_token(node, 'node name')}.{check_token(what, 'query')}"


def ctl_address(subject: str) -> tuple[str, str]:
    """(node, op) of ``ctl.cmd.<node>.<op>``, (node, what) of a query, (node, kind) of an
    event: what a ctl subject is addressed to or comes from, and what it is."""
    tokens = subject.split(".")
    if len(tokens) < 4 or ".".join(tokens[:2]) not in (CTL_CMD, CTL_QRY, CTL_EVT):
        raise ValueError(f"{subject!r} is not a ctl subject")
    return tokens[2], tokens[3]


def ctl_commands(node: str) -> str:
    """Every command to a node (its agent's subscription)."""
    return f"{CTL_CMD}.{check_token(node, 'node name')}.*"


def ctl_queries(node: str) -> str:
    """Every query to a node (its agent's subscription)."""
    return f"{CTL_QRY}.{check_token(node, 'node name')}.*"


ALL_CTL_EVENTS = f"{CTL_EVT}.>"
# Bare-metal networking: every host's adjacency (what a route injector consumes) and the
# name a route injector answers and publishes under unless told another.
ADJACENCY = "adjacency"
ALL_ADJACENCIES = f"{CTL_EVT}.*.{ADJACENCY}"
DEFAULT_INJECTOR = "route-injector"


def injector_consumer(injector: str) -> str:
    """The durable JetStream consumer a route injector reads adjacencies through."""
    return f"routes-{check_token(injector, 'injector name')}"


# The JetStream stream that stores ctl events (nbdnats/ctl/events.py defines it).
EVENTS_STREAM = "CTL_EVENTS"


# Permissions (nats-server `permissions` blocks) are subject patterns too, so they are made
# here. NATS wildcards match whole tokens only ("data.blk.node1-*.c" is a literal, not a
# prefix match), and a transfer id is one token: a static config cannot tell one node's
# transfers from another's. Nodes get the data subjects of any transfer id; per-transfer
# scoping needs credentials issued per transfer (docs/dev-environment.md, "Permissions").
INBOX = "_INBOX.>"


def node_grants(plane: str, node: str) -> tuple[list[str], list[str]]:
    """What a node may (publish, subscribe) on a plane. Replies to requests it received
    (the open handshake, ctl queries) need ``allow_responses``, not ``_INBOX.>``."""
    node = check_token(node, "node name")
    if plane == "ctl":
        # Agents check that the events stream exists; creating it is the controller's.
        publish = [f"{CTL_EVT}.{node}.>", f"$JS.API.STREAM.INFO.{EVENTS_STREAM}"]
        return publish, [f"{CTL_CMD}.{node}.>", f"{CTL_QRY}.{node}.>", INBOX]
    if plane == "data":
        transfer = [f"{DATA_CMD}.*.open", f"{DATA_BLK}.*.c", f"{DATA_BLK}.*.a"]
        return [*transfer, f"{DATA_EVT}.*.*"], [*transfer, INBOX]
    raise ValueError(f"unknown plane {plane!r}")


def controller_grants(plane: str) -> tuple[list[str], list[str]]:
    """What the controller may (publish, subscribe): command and query every node, read
    every event, use JetStream on the ctl plane (its API, and flow control replies of the
    ordered consumers that read events)."""
    if plane == "ctl":
        publish = [f"{CTL_CMD}.>", f"{CTL_QRY}.>", "$JS.API.>", "$JS.FC.>", INBOX]
        return publish, [f"{CTL_EVT}.>", INBOX]
    if plane == "data":
        return [f"{DATA_CMD}.>"], [f"{DATA_EVT}.>", INBOX]
    raise ValueError(f"unknown plane {plane!r}")


def injector_grants(injector: str) -> tuple[list[str], list[str]]:
    """What a route injector may (publish, subscribe) on the ctl plane: its own events and
    answers, its durable consumer on the events stream (create, pull, ack) and nothing of
    any node's: it cannot command a node or speak for one."""
    injector = check_token(injector, "injector name")
    consumer = injector_consumer(injector)
    stream = EVENTS_STREAM
    publish = [
        f"{CTL_EVT}.{injector}.>",
        f"$JS.API.STREAM.INFO.{stream}",
        f"$JS.API.CONSUMER.CREATE.{stream}.{consumer}.>",
        # The ordered snapshot reader (ephemeral, unnamed): nats-py creates it on the bare
        # subject, which ".>" does not match.
        f"$JS.API.CONSUMER.CREATE.{stream}",
        f"$JS.API.CONSUMER.CREATE.{stream}.>",
        f"$JS.API.CONSUMER.DURABLE.CREATE.{stream}.{consumer}",
        f"$JS.API.CONSUMER.INFO.{stream}.>",
        f"$JS.API.CONSUMER.DELETE.{stream}.>",
        f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}",
        f"$JS.ACK.{stream}.{consumer}.>",
        "$JS.FC.>",
        INBOX,
    ]
    return publish, [f"{CTL_QRY}.{injector}.>", ALL_ADJACENCIES, INBOX]


def rack_grants() -> tuple[list[str], list[str]]:
    """What a rack leafnode may carry between its rack and the data cluster."""
    return ["data.>", INBOX], ["data.>", INBOX]
