"""Messages on the wire: typed, versioned, and strict about what they accept."""

from __future__ import annotations

import json

import msgspec
import pytest

from nbdnats.ctl.agent import Agent
from nbdnats.ctl.config import AgentConfig
from nbdnats.errors import SchemaError
from nbdnats.schemas import SendCommand, TransferEvent, decode, encode


def test_event_schema_round_trip_and_rejects_bad_types() -> None:
    ev = TransferEvent(transfer_id="t", node="n", role="send", state="done", size=5)
    back = msgspec.json.decode(msgspec.json.encode(ev), type=TransferEvent)
    assert back == ev and back.v == 1
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(
            b'{"transfer_id":1,"node":"n","role":"r","state":"s"}', type=TransferEvent
        )


def test_every_command_schema_refuses_unknown_fields_and_versions() -> None:
    ops = Agent(AgentConfig("n1")).ops
    for op, cls in ((name, o.schema) for name, o in ops.items() if not o.query):
        with pytest.raises(SchemaError, match="unknown field"):
            decode(cls, b'{"transfer_id": "x", "nope": 1}', op)
        with pytest.raises(SchemaError, match="schema version 2"):
            decode(cls, b'{"v": 2, "transfer_id": "x"}', op)
    sent = encode(SendCommand(key="k", transfer_id="t", src="/x"))
    assert json.loads(sent)["v"] == 1  # the version is always on the wire
