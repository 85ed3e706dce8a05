"""Which checkpoint an incremental backup starts from, read from the repository's snapshots,
and what its snapshots are tagged with."""

from __future__ import annotations

import json

import msgspec
import pytest

from nbdnats.backup import chain
from nbdnats.ctl import tools
from nbdnats.ctl.policy import Policy
from nbdnats.errors import UsageError
from nbdnats.schemas import Backup, DiskSend, Tool

ID_A, ID_B, ID_C, ID_D = "a" * 64, "b" * 64, "c" * 64, "d" * 64
C1 = "nbdnats-20261203T070000-0a0b0c"
C2 = "nbdnats-20261203T080000-1a1b1c"


def _backup(sid: str, hour: int, disk: str, *, checkpoint: str | None = C1, **kw: object) -> Backup:
    fields = {
        "id": sid,
        "short_id": sid[:8],
        "time": f"2026-12-03T{hour:02}:00:00Z",
        "node": "a",
        "disk": disk,
        "size": 1 << 20,
        "checkpoint": checkpoint,
        "kind": "full" if checkpoint else None,
        **kw,
    }
    return msgspec.convert({k: v for k, v in fields.items() if v is not None}, Backup)


def _sent(disk: str, mode: str = "incremental", since: str | None = C1) -> DiskSend:
    return DiskSend(
        transfer_id="t1-disk0", disk=disk, size=1 << 20, mode=mode, checkpoint=C2, since=since
    )  # type: ignore[arg-type]


def test_a_disk_without_snapshots_starts_full() -> None:
    begun = chain.start([_backup(ID_A, 7, "other")], "a", "vm1", vm=False)
    assert begun.since is None
    assert begun.reason == "no earlier backup of a:vm1 in the repository"


def test_the_latest_snapshot_names_the_checkpoint_and_is_the_parent() -> None:
    older = _backup(ID_A, 7, "vm1/disk0", checkpoint="nbdnats-20261203T060000-000000")
    latest = _backup(ID_B, 8, "vm1/disk0")
    begun = chain.start([latest, older], "a", "vm1", vm=True)
    assert (begun.since, begun.reason) == (C1, "")
    assert chain.parent_of(begun, _sent("vm1/disk0")) == latest
    assert chain.mismatch(begun, [_sent("vm1/disk0")]) == ""


def test_a_later_snapshot_by_another_tool_forces_a_full_run() -> None:
    ours = _backup(ID_A, 7, "/images/vm1.qcow2")
    theirs = _backup(ID_B, 8, "/images/vm1.qcow2", checkpoint=None)
    begun = chain.start([ours, theirs], "a", "/images/vm1.qcow2", vm=False)
    assert begun.since is None
    assert "has no checkpoint tag" in begun.reason and "bbbbbbbb" in begun.reason


def test_a_snapshot_whose_backup_did_not_end_forces_a_full_run() -> None:
    cut = msgspec.structs.replace(_backup(ID_A, 7, "vm1/disk0"), size=None)
    begun = chain.start([cut], "a", "vm1", vm=True)
    assert begun.since is None and "lacks its size tag" in begun.reason


def test_a_vms_disks_at_different_checkpoints_start_full() -> None:
    disks = [_backup(ID_A, 7, "vm1/disk0"), _backup(ID_B, 7, "vm1/disk1", checkpoint=C2)]
    begun = chain.start(disks, "a", "vm1", vm=True)
    assert begun.since is None and "different checkpoints" in begun.reason


def test_a_vm_name_does_not_take_another_vms_disks() -> None:
    begun = chain.start([_backup(ID_A, 7, "vm10/disk0")], "a", "vm1", vm=True)
    assert begun.since is None


def test_an_incremental_disk_without_a_parent_at_its_checkpoint_is_refused() -> None:
    begun = chain.start([_backup(ID_A, 7, "vm1/disk0")], "a", "vm1", vm=True)
    why = chain.mismatch(begun, [_sent("vm1/disk0"), _sent("vm1/disk1")])
    assert "vm1/disk1" in why
    assert chain.parent_of(begun, _sent("vm1/disk1", mode="full", since=None)) is None


# -- tags --------------------------------------------------------------------------------


def test_an_incremental_snapshot_is_tagged_with_checkpoint_kind_and_parent() -> None:
    tool = Tool(kind="restic", repo="/r", node="a", disk="vm1/disk0", checkpoint=C2, parent=ID_A)
    tags = tools.labels(tool, "t1-disk0")
    assert tags["checkpoint"] == C2 and tags["kind"] == "incremental" and tags["parent"] == ID_A
    full = msgspec.structs.replace(tool, parent=None)
    assert tools.labels(full, "t1-disk0")["kind"] == "full"
    assert "parent" not in tools.labels(full, "t1-disk0")


def test_the_parent_is_read_back_with_restic_dump() -> None:
    tool = Tool(kind="restic", repo="/r", checkpoint=C2, parent=ID_A)
    argv = tools.base_argv(tool, Policy(["/r"]))
    assert argv == ["restic", "--repo=/r", "dump", "--", ID_A, "disk.img"]
    assert tools.base_argv(msgspec.structs.replace(tool, parent=None), Policy(["/r"])) is None


def test_an_incremental_backup_into_kopia_is_refused() -> None:
    tool = Tool(kind="kopia", source="/vms/vm1", checkpoint=C2)
    with pytest.raises(UsageError, match="incremental backups need restic"):
        tools.labels(tool, "t1")


def test_a_checkpoint_name_that_is_not_one_is_refused_on_receipt() -> None:
    raw = json.dumps({"kind": "restic", "repo": "/r", "checkpoint": "x,--tag=evil"})
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(raw, type=Tool)


def test_the_listing_reads_kind_checkpoint_and_parent_and_skips_bad_ones() -> None:
    def snap(sid: str, *tags: str) -> dict[str, object]:
        base = ["nbdnats", "node=a", "disk=vm1/disk0", "size=1048576"]
        return {
            "id": sid,
            "short_id": sid[:8],
            "time": "2026-12-03T08:00:00Z",
            "tags": [*base, *tags],
        }

    out = json.dumps(
        [
            snap(ID_A, f"checkpoint={C1}", "kind=full"),
            snap(ID_B, f"checkpoint={C2}", "kind=incremental", f"parent={ID_A}"),
            snap(ID_C, "checkpoint=not-ours", "kind=full"),
            snap(ID_D, f"checkpoint={C1}", "kind=sideways"),
        ]
    )
    found, skipped = tools.parse_backups(out)
    assert skipped == 2
    by_id = {b.id: b for b in found}
    assert (by_id[ID_A].kind, by_id[ID_A].checkpoint, by_id[ID_A].parent) == ("full", C1, None)
    assert (by_id[ID_B].kind, by_id[ID_B].parent) == ("incremental", ID_A)
    assert by_id[ID_B].disk == "vm1/disk0"
