"""The subject taxonomy: one subject carries plane and intent. Nothing else formats one.

ctl.cmd.<node>.<op>          commands to a node's agent
ctl.qry.<node>.<what>        request/reply queries
ctl.evt.<node>.<kind>        events (JetStream friendly)
data.cmd.<transfer>.open     transfer setup (the open handshake)
data.evt.<transfer>.<kind>   progress / done / error
data.blk.<transfer>.c        chunk frames, sender -> receiver
data.blk.<transfer>.a        acks, receiver -> sender
"""

from __future__ import annotations

import re

from nbdnats.errors import UsageError

CTL_CMD = "ctl.cmd"
CTL_QRY = "ctl.qry"
CTL_EVT = "ctl.evt"
DATA_CMD = "data.cmd"
DATA_EVT = "data.evt"
DATA_BLK = "data.blk"

_TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def check_token(value: str, what: str) -> str:
    """A value that becomes one subject token: no dots, wildcards or spaces."""
    if not _TOKEN.fullmatch(value):
        raise UsageError(
            f"invalid {what} {value!r}: use 1-64 letters, digits, '-' or '_' "
            "(it becomes a NATS subject token)"
        )
    return value


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


def ctl_events(kind: str, node: str = "*") -> str:
    """Events of one kind from one node, or from every node (a subscription pattern)."""
    node = node if node == "*" else check_token(node, "node name")
    return f"{CTL_EVT}.{node}.{check_token(kind, 'event')}"


def ctl_event(node: str, kind: str) -> str:
    return f"{CTL_EVT}.{check_token(node, 'node name')}.{check_token(kind, 'event')}"


def ctl_command(node: str, op: str) -> str:
    return f"{CTL_CMD}.{check_token(node, 'node name')}.{check_token(op, 'command')}"


def ctl_query(node: str, what: str) -> str:
    return f"{CTL_QRY}.{check_token(node, 'node name')}.{check_token(what, 'query')}"
