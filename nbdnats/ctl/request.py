"""One request to an agent and its reply: what the controller and a migration's source
agent both do on the ctl plane.

The request goes out as encoded; a timeout sends the same bytes again (so the same
idempotency key) up to ``attempts`` times. The reply is decoded as the type asked for; an
agent that refused the message (unknown op, invalid fields, a version it does not speak)
answers a plain ``Reply`` instead, whatever the type would have been. A failure becomes
its exception of the error tree (``schemas.raise_for``), naming the node.
"""

from __future__ import annotations

import contextlib
from typing import TypeVar

import msgspec
import nats.errors
from nats.aio.client import Client

from nbdnats import subjects
from nbdnats.errors import ProtocolError, TransferTimeout, UsageError
from nbdnats.schemas import Answer, Message, Reply, encode, raise_for

R = TypeVar("R", bound=msgspec.Struct)


async def request(
    nc: Client,
    subject: str,
    msg: Message,
    reply_type: type[R],
    *,
    timeout: float,
    attempts: int = 1,
    check: bool = True,
) -> R:
    """Ask ``subject``'s node and decode its answer; with ``check``, a failure reply is
    raised rather than returned."""
    node, _ = subjects.ctl_address(subject)
    for attempt in range(attempts):
        try:
            resp = await nc.request(subject, encode(msg), timeout=timeout)
            break
        except nats.errors.NoRespondersError:
            raise UsageError(
                f"no agent answers for node {node!r} (see: nbd-nats ctl nodes)"
            ) from None
        except nats.errors.TimeoutError:
            if attempt == attempts - 1:
                tries = f" in {timeout:.0f} s ({attempts} tries)" if attempts > 1 else ""
                raise TransferTimeout(f"node {node} did not answer {subject}{tries}") from None
    reply: R | None = None
    with contextlib.suppress(msgspec.ValidationError, msgspec.DecodeError):
        reply = msgspec.json.decode(resp.data, type=reply_type)
    if reply is None:
        with contextlib.suppress(msgspec.ValidationError, msgspec.DecodeError):
            raise_for(msgspec.json.decode(resp.data, type=Reply), node)
        raise ProtocolError(f"node {node} answered {subject} with {resp.data[:200]!r}")
    if check and isinstance(reply, Answer):
        raise_for(reply, node)
    return reply
