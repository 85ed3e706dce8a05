"""The control plane's pure parts: policy, approvals, schemas, metrics text, stream config."""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path

import msgspec
import pytest

from nbdnats.approval import TrustedKeys, load_private, new_key, sign
from nbdnats.ctl import events
from nbdnats.ctl.agent import Agent, AgentConfig
from nbdnats.ctl.controller import parse_endpoint
from nbdnats.ctl.metrics import parse_addr, render
from nbdnats.ctl.policy import Policy
from nbdnats.ctl.tools import snapshot_id
from nbdnats.errors import ApprovalError, PolicyError, SchemaError, UsageError
from nbdnats.schemas import Approval, SendCommand, decode, encode
from nbdnats.units import parse_duration

ROOT = Path(__file__).resolve().parents[2]


def test_events_stream_matches_the_control_definition() -> None:
    on_disk = json.loads((ROOT / "control" / "streams" / "ctl-events.json").read_text())
    assert on_disk == events.DEFINITION
    config = events.stream_config(1)
    assert config.num_replicas == 1 and config.subjects == ["ctl.evt.>"]
    assert config.max_age == 7 * 24 * 3600  # nats-py takes seconds


def test_policy_paths_resolve_before_the_prefix_check(tmp_path: Path) -> None:
    allowed = tmp_path / "images"
    allowed.mkdir()
    (allowed / "link").symlink_to("/etc")
    p = Policy([str(allowed)], {"vm1": "nbd+unix:///vm1?socket=/run/vm1.sock"})
    assert p.endpoint(f"{allowed}/a.raw") == f"{allowed}/a.raw"
    assert p.endpoint("vm1") == "nbd+unix:///vm1?socket=/run/vm1.sock"
    for bad in (f"{allowed}2/a.raw", f"{allowed}/../x", f"{allowed}/link/passwd", "x.raw", "-"):
        with pytest.raises(PolicyError):
            p.endpoint(bad)
    with pytest.raises(PolicyError, match="exactly one socket"):
        p.endpoint("nbd+unix:///x")
    assert Policy(["nbd://10.0.0.5:10809/"]).endpoint("nbd://10.0.0.5:10809/d") == (
        "nbd://10.0.0.5:10809/d"
    )
    with pytest.raises(PolicyError):
        Policy(["nbd://10.0.0.5:10809/"]).endpoint("nbd://10.0.0.6:10809/d")


def test_approvals_sign_and_verify(tmp_path: Path) -> None:
    key_path, pub = new_key(tmp_path / "ops")
    assert oct(os.stat(key_path).st_mode & 0o777) == "0o600"
    with pytest.raises(UsageError, match="exists"):
        new_key(tmp_path / "ops")
    trusted_dir = tmp_path / "trusted"
    trusted_dir.mkdir()
    (trusted_dir / "ops.pub").write_bytes(pub.read_bytes())
    trusted = TrustedKeys(trusted_dir)
    later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    digest = "sha256:" + "ab" * 32
    approval = sign(load_private(key_path), node="n1", image_digest=digest, device="/dev/sda",
                    expires=later)  # fmt: skip
    # Through its JSON, as it travels.
    approval = decode(Approval, encode(approval), "approval")
    trusted.verify(approval, node="n1", device="/dev/sda", image_digest=digest)
    for kwargs, message in [
        ({"node": "n2"}, "for node n1"),
        ({"device": "/dev/sdb"}, "for device /dev/sda"),
        ({"image_digest": "sha256:" + "cd" * 32}, "for image"),
        ({"now": later + dt.timedelta(seconds=1)}, "expired"),
    ]:
        args = {"node": "n1", "device": "/dev/sda", "image_digest": digest, **kwargs}
        with pytest.raises(ApprovalError, match=message):
            trusted.verify(approval, **args)  # type: ignore[arg-type]
    forged = msgspec.structs.replace(approval, device="/dev/sdb")
    with pytest.raises(ApprovalError, match="not valid"):
        trusted.verify(forged, node="n1", device="/dev/sdb", image_digest=digest)
    with pytest.raises(UsageError, match="holds no"):
        TrustedKeys(tmp_path / "empty-does-not-exist")


def test_every_command_schema_refuses_unknown_fields_and_versions() -> None:
    ops = Agent(AgentConfig("n1")).ops
    for op, cls in ((name, o.schema) for name, o in ops.items() if not o.query):
        with pytest.raises(SchemaError, match="unknown field"):
            decode(cls, b'{"transfer_id": "x", "nope": 1}', op)
        with pytest.raises(SchemaError, match="schema version 2"):
            decode(cls, b'{"v": 2, "transfer_id": "x"}', op)
    sent = encode(SendCommand(key="k", transfer_id="t", src="/x"))
    assert json.loads(sent)["v"] == 1  # the version is always on the wire


def test_metrics_text_format() -> None:
    text = render(
        [
            ("nbdnats_transfer_bytes", {"transfer": 't"1', "role": "recv"}, 5.0),
            ("nbdnats_transfer_rate_bytes_per_second", {"transfer": "t1"}, 1.5),
        ]
    )
    assert '# TYPE nbdnats_transfer_bytes gauge\nnbdnats_transfer_bytes{role="recv",' in text
    assert 'transfer="t\\"1"} 5\n' in text
    assert 'nbdnats_transfer_rate_bytes_per_second{transfer="t1"} 1.5\n' in text
    assert parse_addr("127.0.0.1:9464") == ("127.0.0.1", 9464)
    assert parse_addr("[::1]:9464") == ("::1", 9464)
    with pytest.raises(UsageError):
        parse_addr("9464x")


def test_endpoints_durations_and_tool_output() -> None:
    assert parse_endpoint("a:nbd+unix:///x?socket=/s") == ("a", "nbd+unix:///x?socket=/s")
    assert parse_endpoint("b:/dev/sda") == ("b", "/dev/sda")
    for bad in ("/dev/sda", "a:", "nbd://h/x"):
        with pytest.raises(UsageError):
            parse_endpoint(bad)
    assert parse_duration("90") == 90 and parse_duration("2h") == 7200
    with pytest.raises(UsageError):
        parse_duration("-1m")
    restic_out = '{"message_type":"status"}\n{"message_type":"summary","snapshot_id":"abc123"}\n'
    assert snapshot_id("restic", restic_out) == "snapshot abc123"
    assert snapshot_id("kopia", "Created snapshot with root k9f8e7 and ID 1") == "root k9f8e7"
