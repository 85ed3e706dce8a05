"""What the backup tools print: the snapshot a backup made, read from their output."""

from __future__ import annotations

from nbdnats.ctl.tools import snapshot_id


def test_the_snapshot_is_read_from_restics_json_and_kopias_text() -> None:
    restic_out = '{"message_type":"status"}\n{"message_type":"summary","snapshot_id":"abc123"}\n'
    assert snapshot_id("restic", restic_out) == "snapshot abc123"
    assert snapshot_id("kopia", "Created snapshot with root k9f8e7 and ID 1") == "root k9f8e7"
