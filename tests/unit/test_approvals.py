"""Signed approvals: valid only for their node, device, image and time."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import msgspec
import pytest

from nbdnats.errors import ApprovalError, UsageError
from nbdnats.metal.approval import TrustedKeys, load_private, new_key, sign
from nbdnats.schemas import Approval, decode, encode


def test_an_approval_verifies_only_for_its_node_device_image_and_time(tmp_path: Path) -> None:
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
    approval = sign(
        load_private(key_path), node="n1", image_digest=digest, device="/dev/sda", expires=later
    )
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
