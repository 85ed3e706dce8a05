"""A migration's disks: which of the source's to mirror, paired with the destination's, and
the names of what the migration adds in QEMU for them (mirror jobs, NBD client nodes,
exports), so that a rollback, or a later ``--cancel``, finds exactly what a migration left.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any

from nbdnats.errors import QmpCommandError, UsageError
from nbdnats.migration.qmp import POLL_INTERVAL, Monitor

# Every job, node and export this adds in QEMU is named with this prefix.
PREFIX = "nbdnats-"
MIRROR_JOB = PREFIX + "mirror-{}"
TARGET_NODE = PREFIX + "target-{}"
EXPORT = PREFIX + "disk-{}"


@dataclass(frozen=True)
class Disk:
    key: str  # the guest device (qdev path, or the drive name of -drive)
    source_node: str
    target_node: str  # the destination's node, exported over NBD
    size: int


def _writable_disks(block: list[dict[str, Any]]) -> dict[str, tuple[str, int]]:
    """``query-block`` → {device key: (node name, size)} of the disks to migrate: inserted,
    writable, not removable media (CD-ROMs, floppies)."""
    disks: dict[str, tuple[str, int]] = {}
    for b in block:
        inserted = b.get("inserted")
        if not inserted or inserted.get("ro") or b.get("removable"):
            continue
        key = b.get("qdev") or b.get("device")
        if not key:
            continue
        disks[key] = (inserted["node-name"], int(inserted["image"]["virtual-size"]))
    return disks


def disk_name(key: str) -> str:
    """A disk's name for people: the device id of ``/machine/peripheral/<id>/...``."""
    parts = key.split("/")
    if key.startswith("/machine/peripheral/") and len(parts) > 3:
        return parts[3]
    return key


def match_disks(source: list[dict[str, Any]], destination: list[dict[str, Any]]) -> list[Disk]:
    """Pair the source's disks with the destination's by guest device; the destination must
    have every one, of the same size."""
    src = _writable_disks(source)
    dst = _writable_disks(destination)
    disks = []
    for key, (node, size) in src.items():
        if key not in dst:
            raise UsageError(
                f"the destination has no disk {disk_name(key)}: start it with the "
                "same devices (and ids)"
            )
        dst_node, dst_size = dst[key]
        if dst_size != size:
            raise UsageError(
                f"disk {disk_name(key)}: the destination's is {dst_size} bytes, the source's "
                f"{size}: "
                "give the destination a disk of exactly the source's size"
            )
        disks.append(Disk(key, node, dst_node, size))
    return disks


def ours(job: dict[str, Any]) -> bool:
    """A ``query-block-jobs`` entry of a migration's mirror."""
    return str(job.get("device", "")).startswith(PREFIX)


async def cancel_jobs(src: Monitor) -> None:
    """Cancel (force) every block job of ours and wait until they are gone."""
    for job in await src.cmd("query-block-jobs"):
        if ours(job):
            with contextlib.suppress(QmpCommandError):
                await src.cmd("block-job-cancel", device=job["device"], force=True)
    while any(ours(j) for j in await src.cmd("query-block-jobs")):
        await asyncio.sleep(POLL_INTERVAL)


async def remove_nodes(src: Monitor) -> None:
    """Remove the mirrors' NBD client nodes."""
    for node in await src.cmd("query-named-block-nodes", flat=True):
        name = str(node.get("node-name", ""))
        if name.startswith(TARGET_NODE.format("")):
            await src.cmd("blockdev-del", **{"node-name": name})
