"""What the backup tools print: the snapshot a backup made and the backups a repository
holds, read from their output; which backup a restore takes."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from nbdnats.ctl.controller import choose_backup
from nbdnats.ctl.tools import disk_of_tag, disk_tag, parse_backups, snapshot_id
from nbdnats.errors import EndpointError, UsageError
from nbdnats.schemas import Backup


def test_the_snapshot_is_read_from_restics_json_and_kopias_text() -> None:
    restic_out = '{"message_type":"status"}\n{"message_type":"summary","snapshot_id":"abc123"}\n'
    assert snapshot_id("restic", restic_out) == "snapshot abc123"
    assert snapshot_id("kopia", "Created snapshot with root k9f8e7 and ID 1") == "root k9f8e7"


# -- restic's listing of backups -----------------------------------------------------------

ID_A, ID_B, ID_C = "a" * 64, "b" * 64, "c" * 64
DIGEST = "sha256:" + "0f" * 32


def _snap(sid: str, time: str, *tags: str) -> dict[str, object]:
    return {"id": sid, "short_id": sid[:8], "time": time, "tags": ["nbdnats", *tags]}


def test_the_listing_reads_each_snapshots_disk_size_and_digest() -> None:
    out = json.dumps(
        [
            _snap(ID_B, "2026-12-02T10:00:00.123456789+01:00", "transfer=t2", "node=a", "disk=vm2"),
            _snap(
                ID_A,
                "2026-12-02T08:00:00Z",
                "transfer=t1",
                "node=a",
                "disk=/images/my%20vm.raw",
                "size=4096",
                f"digest={DIGEST}",
            ),
            _snap(ID_C, "2026-12-01T00:00:00Z"),  # before nbdnats tagged disks
        ]
    )
    found, skipped = parse_backups(out)
    assert skipped == 0
    assert [b.id for b in found] == [ID_C, ID_A, ID_B]  # oldest first
    assert found[1].disk == "/images/my vm.raw" and found[1].name == "a:/images/my vm.raw"
    assert (found[1].size, found[1].digest, found[1].transfer_id) == (4096, DIGEST, "t1")
    assert found[2].size is None and found[2].digest is None
    assert found[0].name == "?:?"


@pytest.mark.parametrize(
    "snap",
    [
        _snap("--password-command=x" + "0" * 44, "2026-12-02T08:00:00Z"),
        _snap(ID_A.upper(), "2026-12-02T08:00:00Z"),
        {**_snap(ID_A, "2026-12-02T08:00:00Z"), "short_id": "-x"},
        _snap(ID_A, "yesterday"),
        _snap(ID_A, "2026-12-02T08:00:00Z", "node=a.b", "disk=vm1"),
        _snap(ID_A, "2026-12-02T08:00:00Z", "node=a", "disk=vm1\x1b[2J"),
        _snap(ID_A, "2026-12-02T08:00:00Z", "node=a", "disk=vm%0a1"),  # decodes to a newline
        _snap(ID_A, "2026-12-02T08:00:00Z", "node=a", "disk=vm%31"),  # not as disk_tag writes
        _snap(ID_A, "2026-12-02T08:00:00Z", "node=a", "node=b", "disk=vm1"),
        _snap(ID_A, "2026-12-02T08:00:00Z", "digest=sha256:--x"),
        _snap(ID_A, "2026-12-02T08:00:00Z", "size=-1"),
        _snap(ID_A, "2026-12-02T08:00:00Z", "transfer=a b"),
        {**_snap(ID_A, "2026-12-02T08:00:00Z"), "tags": [1]},
        "not a snapshot",
    ],
)
def test_a_crafted_snapshot_is_left_out_and_counted(snap: object) -> None:
    """Anyone who can write the repository can craft what restic lists: every value is
    checked before it is shown or used."""
    good = _snap(ID_B, "2026-12-02T09:00:00Z", "node=a", "disk=vm1")
    found, skipped = parse_backups(json.dumps([snap, good]))
    assert [b.id for b in found] == [ID_B] and skipped == 1


def test_a_listing_that_is_not_json_is_an_error() -> None:
    with pytest.raises(EndpointError, match="not JSON"):
        parse_backups("Fatal: wrong password")
    assert parse_backups("") == ([], 0)


def test_disk_names_round_trip_through_their_tags() -> None:
    for name in ("vm1", "/images/a b,c.raw", "nbd+unix:///x?socket=/run/q.sock", "50%"):
        assert disk_of_tag(disk_tag(name)) == name
        assert "," not in disk_tag(name) and " " not in disk_tag(name)


# -- which backup a restore takes ----------------------------------------------------------


def _backup(sid: str, hour: int, node: str | None, disk: str | None) -> Backup:
    when = dt.datetime(2026, 12, 2, hour, tzinfo=dt.UTC)
    return Backup(id=sid, short_id=sid[:8], time=when, node=node, disk=disk)


def test_a_restore_takes_the_latest_backup_of_the_disk_it_is_told() -> None:
    vm1_old, vm1_new = _backup(ID_A, 8, "a", "vm1"), _backup(ID_C, 10, "a", "vm1")
    vm2 = _backup(ID_B, 11, "a", "vm2")
    backups = [vm1_old, vm1_new, vm2]
    assert choose_backup(backups, ("a", "vm1"), "/r") is vm1_new
    assert choose_backup(backups, ("a", "vm2"), "/r") is vm2
    assert choose_backup([vm1_old, vm1_new], None, "/r") is vm1_new
    with pytest.raises(UsageError) as e:
        choose_backup(backups, None, "/r")
    assert str(e.value) == (
        "restic repository /r holds backups of 2 disks: "
        "a:vm1 (latest cccccccc, 2026-12-02 10:00:00 UTC), "
        "a:vm2 (latest bbbbbbbb, 2026-12-02 11:00:00 UTC); "
        "pass --disk NODE:DISK or --snapshot ID"
    )
    with pytest.raises(UsageError, match="holds no backup of b:vm1"):
        choose_backup(backups, ("b", "vm1"), "/r")
    with pytest.raises(UsageError, match="holds no nbdnats backup"):
        choose_backup([], None, "/r")
    untagged = _backup(ID_B, 12, None, None)
    with pytest.raises(UsageError, match=r"\?:\? \(latest bbbbbbbb"):
        choose_backup([vm1_new, untagged], None, "/r")
