"""The ``CTL_EVENTS`` JetStream stream: every node's ``ctl.evt.>``, kept for replay.

Agents publish events as plain messages; the stream stores them, so a controller that was
away reads what it missed (``Controller.events(since=...)``) and ``nodes()`` reads each
node's last announcement. The definition below is the JetStream API's JSON, as in
``control/streams/ctl-events.json`` (a test keeps the two equal); agents and controllers
create the stream when it is missing, with as many replicas as the cluster allows.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as dt
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js.api import ConsumerConfig, DeliverPolicy, StreamConfig

from nbdnats import subjects
from nbdnats.errors import NatsError

STREAM = subjects.EVENTS_STREAM
DEFINITION: dict[str, Any] = {
    "name": STREAM,
    "description": "ctl.evt.<node>.<kind>: every node's events, kept a week for replay",
    "subjects": [subjects.ALL_CTL_EVENTS],
    "retention": "limits",
    "storage": "file",
    "num_replicas": 3,
    "discard": "old",
    "max_age": 7 * 24 * 3600 * 10**9,
    "max_bytes": 256 * 1024 * 1024,
    "max_msg_size": 1024 * 1024,
    "duplicate_window": 120 * 10**9,
}


def stream_config(replicas: int) -> StreamConfig:
    definition = copy.deepcopy(DEFINITION)
    definition["num_replicas"] = replicas
    config: StreamConfig = StreamConfig.from_response(definition)
    return config


async def ensure_stream(nc: Client) -> str | None:
    """Create the stream if it is missing; returns why it cannot be used, or None."""
    js = nc.jetstream(timeout=2.0)  # a node may lack the right to create it: do not hang
    try:
        await js.stream_info(STREAM)
        return None
    except nats.js.errors.NotFoundError:
        pass
    except nats.errors.NoRespondersError:
        return "the ctl server has no JetStream (start it with -js; control/ configs do)"
    except (nats.errors.Error, TimeoutError) as e:
        return f"JetStream: {e or type(e).__name__}"
    last: Exception | None = None
    for replicas in (3, 1):  # a cluster takes 3; a single server only 1
        try:
            await js.add_stream(stream_config(replicas))
            return None
        except nats.js.errors.BadRequestError as e:
            last = e
            if "already in use" in str(e) or "name already" in str(e):
                return None
        except (nats.errors.Error, TimeoutError) as e:
            last = e
    return f"cannot create the {STREAM} stream: {last}"


@dataclass
class Event:
    """One stored event: its stream sequence (resume from it with ``since_seq``)."""

    seq: int
    subject: str
    node: str
    kind: str
    time: dt.datetime
    data: dict[str, Any]
    raw: bytes = b""  # the message as published (a reader that decodes it strictly)


async def read(
    nc: Client,
    *,
    subject: str = subjects.ALL_CTL_EVENTS,
    since_seq: int | None = None,
    since_time: dt.datetime | None = None,
    last_per_subject: bool = False,
    follow: bool = True,
) -> AsyncGenerator[Event, None]:
    """Events from the stream: new ones only by default, or from a sequence or a time, or
    each subject's last; ``follow=False`` stops once the stored ones are read."""
    js = nc.jetstream()
    kwargs: dict[str, Any] = {"ordered_consumer": True}
    if last_per_subject:
        kwargs["deliver_policy"] = DeliverPolicy.LAST_PER_SUBJECT
    elif since_seq is not None:
        kwargs["deliver_policy"] = DeliverPolicy.BY_START_SEQUENCE
        kwargs["config"] = ConsumerConfig(opt_start_seq=since_seq)
    elif since_time is not None:
        kwargs["deliver_policy"] = DeliverPolicy.BY_START_TIME
        kwargs["config"] = ConsumerConfig(opt_start_time=since_time)
    else:
        kwargs["deliver_policy"] = DeliverPolicy.NEW
    try:
        sub = await js.subscribe(subject, stream=STREAM, **kwargs)
    except nats.js.errors.NotFoundError:
        raise NatsError(f"no {STREAM} stream on the ctl server: start an agent first") from None
    except nats.errors.NoRespondersError:
        raise NatsError("the ctl server has no JetStream (start it with -js)") from None
    try:
        # Without follow: read up to what the stream held when we started. Each message
        # says how many more the consumer holds; a quiet second ends a filtered read.
        last = (await js.stream_info(STREAM)).state.last_seq if not follow else 0
        while True:
            try:
                msg = await sub.next_msg(timeout=1.0)
            except TimeoutError:
                if follow:
                    continue
                return
            ev = _event(msg)
            yield ev
            if not follow and (ev.seq >= last or msg.metadata.num_pending == 0):
                return
    finally:
        # A reader left early may be closed after its connection: nothing is left to undo.
        with contextlib.suppress(nats.errors.Error):
            await sub.unsubscribe()


def _event(msg: Any) -> Event:
    try:
        node, kind = subjects.ctl_address(msg.subject)
    except ValueError:
        node, kind = "", ""
    meta = msg.metadata
    try:
        data = msgspec.json.decode(msg.data)
    except msgspec.DecodeError:
        data = {"raw": msg.data.decode(errors="replace")}
    return Event(
        seq=meta.sequence.stream,
        subject=msg.subject,
        node=node,
        kind=kind,
        time=meta.timestamp,
        data=data if isinstance(data, dict) else {"value": data},
        raw=bytes(msg.data),
    )
