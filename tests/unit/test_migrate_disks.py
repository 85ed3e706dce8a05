"""Which disks a migration moves, and how source and destination disks are paired
(nbdnats.migration.disks.match_disks), on query-block answers shaped as QEMU gives them."""

from __future__ import annotations

from typing import Any

import pytest

from nbdnats.errors import UsageError
from nbdnats.migration.disks import disk_name, match_disks

MiB = 1 << 20


def block(qdev: str, node: str, size: int, **extra: Any) -> dict[str, Any]:
    inserted = {"node-name": node, "ro": extra.pop("ro", False), "image": {"virtual-size": size}}
    entry: dict[str, Any] = {"device": "", "qdev": qdev, "removable": False, "locked": False}
    entry.update(extra)
    if not entry.pop("empty", False):
        entry["inserted"] = inserted
    return entry


VDA = "/machine/peripheral/vda/virtio-backend"
VDB = "/machine/peripheral/vdb/virtio-backend"
CD = "/machine/peripheral/cd0"


def test_pairs_by_device_and_skips_what_is_not_a_writable_disk() -> None:
    source = [
        block(VDA, "disk0", 64 * MiB),
        block(VDB, "#block123", 8 * MiB),
        block(CD, "cd", 4 * MiB, removable=True),
        block("/machine/peripheral/ro", "ro0", MiB, ro=True),
        block("/machine/peripheral/empty", "x", 0, empty=True),
    ]
    dest = [block(VDB, "other1", 8 * MiB), block(VDA, "other0", 64 * MiB)]
    disks = match_disks(source, dest)
    assert [(d.source_node, d.target_node, d.size) for d in disks] == [
        ("disk0", "other0", 64 * MiB),
        ("#block123", "other1", 8 * MiB),
    ]


def test_drive_style_disks_pair_by_drive_name() -> None:
    inserted = {"node-name": "#block1", "ro": False, "image": {"virtual-size": MiB}}
    src = [{"device": "virtio0", "qdev": "", "removable": False, "inserted": inserted}]
    dst = [{**src[0], "inserted": {**src[0]["inserted"], "node-name": "#block9"}}]
    [disk] = match_disks(src, dst)
    assert (disk.key, disk.target_node) == ("virtio0", "#block9")


def test_a_destination_disk_of_another_size_is_refused() -> None:
    with pytest.raises(UsageError, match=r"disk vda: the destination's is 33554432 bytes"):
        match_disks([block(VDA, "a", 64 * MiB)], [block(VDA, "b", 32 * MiB)])


def test_a_missing_destination_disk_is_refused() -> None:
    with pytest.raises(UsageError, match="the destination has no disk vdb"):
        match_disks([block(VDA, "a", MiB), block(VDB, "b", MiB)], [block(VDA, "c", MiB)])


def test_a_disk_is_named_by_its_device_or_drive() -> None:
    assert disk_name(VDA) == "vda"
    assert disk_name("virtio0") == "virtio0"
