"""Messages on the wire: typed, versioned, and strict about what they accept."""

from __future__ import annotations

import json

import msgspec
import pytest

from nbdnats import schemas
from nbdnats.ctl.agent import Agent
from nbdnats.ctl.config import AgentConfig
from nbdnats.errors import SchemaError
from nbdnats.schemas import BackupList, SendCommand, TransferEvent, decode, encode
from tests.ctl import schema_before


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


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("id", "--password-command=x"),
        ("id", "A" * 64),
        ("short_id", "1a2b"),
        ("node", "a.b"),
        ("disk", "vm1\x1b[2J"),
        ("digest", "sha256:--x"),
        ("size", -1),
        ("transfer_id", "a b"),
    ],
)
def test_a_backups_answer_is_checked_by_the_controller_too(field: str, value: object) -> None:
    """A listing travels from an agent: a crafted id or tag value fails to decode, so the
    controller neither shows nor restores it."""
    good = {"id": "a" * 64, "short_id": "a" * 8, "time": "2026-12-02T08:00:00Z", "node": "a"}
    good |= {"disk": "/images/my vm.raw", "digest": "xxh3-128:" + "0f" * 16, "size": 4096}
    ok = decode(BackupList, json.dumps({"ok": True, "backups": [good]}).encode(), "backups")
    assert ok.backups[0].name == "a:/images/my vm.raw"
    bad = json.dumps({"ok": True, "backups": [{**good, field: value}]}).encode()
    with pytest.raises(SchemaError, match="invalid backups"):
        decode(BackupList, bad, "backups")


@pytest.mark.parametrize(
    ("kind", "good"),
    [
        (schemas.Token, "bm1"),
        (schemas.SnapshotId, "a" * 64),
        (schemas.ShortId, "1a2b3c4d"),
        (schemas.DiskName, "vm1"),
        (schemas.DigestText, "sha256:" + "0" * 64),
        (schemas.HexName, "000b" + "ab" * 32),
        (schemas.HexDigest, "f" * 64),
        (schemas.CheckpointName, "nbdnats-20261203T101010-abcdef"),
        (schemas.IfName, "eth0"),
        (schemas.Address, "2001:db8::7/128"),
        (schemas.LldpText, "tor1"),
    ],
)
def test_a_trailing_newline_is_not_part_of_any_checked_value(kind: object, good: str) -> None:
    """A regex "$" matches before a final newline too (and msgspec searches, it does not
    fullmatch): "bm1\\n" used to pass as a token, a checkpoint name with a newline as one
    that reaches QMP and a restic tag."""
    assert msgspec.convert(good, kind) == good
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert(good + "\n", kind)


def test_a_send_command_carries_its_compression_and_refuses_unknown_codecs() -> None:
    cmd = SendCommand(
        key="k", transfer_id="t", src="/x", options=schemas.TransferOptions(compress="lz4")
    )
    assert decode(SendCommand, encode(cmd), "send").options.compress == "lz4"
    assert decode(SendCommand, b'{"transfer_id": "t"}', "send").options.compress is None
    with pytest.raises(SchemaError, match="compress"):
        decode(SendCommand, b'{"transfer_id": "t", "options": {"compress": "gzip"}}', "send")


def test_a_send_command_carries_its_streams_within_the_cores_bounds() -> None:
    cmd = SendCommand(
        key="k", transfer_id="t", src="/x", options=schemas.TransferOptions(streams=4)
    )
    assert decode(SendCommand, encode(cmd), "send").options.streams == 4
    assert decode(SendCommand, b'{"transfer_id": "t"}', "send").options.streams == 1
    for bad in (b"0", b"9", b"-1", b"2.5", b'"2"'):
        payload = b'{"transfer_id": "t", "options": {"streams": ' + bad + b"}}"
        with pytest.raises(SchemaError, match="streams"):
            decode(SendCommand, payload, "send")


def test_options_left_at_their_defaults_stay_off_the_wire() -> None:
    """An agent from before an option refuses it as an unknown field: a command that does
    not use it must not carry it."""
    plain = json.loads(encode(SendCommand(key="k", transfer_id="t", src="/x")))
    assert plain["options"] == {}
    striped = schemas.TransferOptions(streams=2, rate=1 << 20)
    assert json.loads(encode(striped)) == {"rate": 1 << 20, "streams": 2}


def test_a_command_without_streams_reads_the_same_to_an_agent_from_before() -> None:
    older = schema_before(SendCommand, "streams")
    plain = SendCommand(key="k", transfer_id="t", src="/x", options=schemas.TransferOptions())
    assert decode(older, encode(plain), "send command").options.window is None
    striped = msgspec.structs.replace(plain, options=schemas.TransferOptions(streams=2))
    with pytest.raises(SchemaError, match="unknown field `streams`"):
        decode(older, encode(striped), "send command")
