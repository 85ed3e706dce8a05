"""Which checkpoint an incremental backup starts from, and which snapshot each disk changes.

The controller reads the backup node's snapshots of the disk (``ctl.qry.<node>.backups``):
the latest snapshot of each disk names, in its ``checkpoint=`` tag, the checkpoint its
image was taken at. When every disk's latest snapshot names the same checkpoint, the run
asks the source for what changed since it, and each disk's new snapshot has that latest
snapshot as its parent. Otherwise the run is full, and says why. The source may still
answer full (it no longer holds that checkpoint: ``DiskSend.reason`` says why).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from nbdnats.schemas import Backup, DiskSend


@dataclass(frozen=True)
class Start:
    """Where a run starts: ``since`` (None: full, ``reason`` says why) and each disk's
    latest snapshot, its parent when the disk is sent incrementally."""

    since: str | None
    reason: str
    parents: dict[str, Backup] = field(default_factory=dict)


def disks_of(backups: list[Backup], node: str, name: str, *, vm: bool) -> dict[str, Backup]:
    """The latest snapshot of each disk of ``node:name``: a VM's disks are tagged
    ``<vm>/<drive>``, an export's as it was named."""
    latest: dict[str, Backup] = {}
    for b in sorted(backups, key=lambda b: (b.time, b.id)):
        if b.node != node or b.disk is None:
            continue
        if b.disk == name if not vm else b.disk.startswith(f"{name}/"):
            latest[b.disk] = b
    return latest


def start(backups: list[Backup], node: str, name: str, *, vm: bool) -> Start:
    """The checkpoint a run of ``node:name`` starts from, given the repository's snapshots."""
    latest = disks_of(backups, node, name, vm=vm)
    if not latest:
        return Start(None, f"no earlier backup of {node}:{name} in the repository")
    untagged = [b for b in latest.values() if b.checkpoint is None]
    if untagged:
        b = untagged[0]
        return Start(
            None,
            f"the latest snapshot of {node}:{b.disk} ({b.short_id}) has no checkpoint tag "
            "(another tool or a plain backup stored it)",
        )
    unfinished = [b for b in latest.values() if b.size is None]
    if unfinished:
        b = unfinished[0]
        return Start(
            None,
            f"the latest snapshot of {node}:{b.disk} ({b.short_id}) lacks its size tag "
            "(its backup did not end as nbdnats ends one)",
        )
    names = sorted({b.checkpoint for b in latest.values() if b.checkpoint})
    if len(names) > 1:
        return Start(
            None,
            f"the latest snapshots of {node}:{name}'s disks name different checkpoints "
            f"({', '.join(names)})",
        )
    return Start(names[0], "", dict(latest))


def parent_of(begun: Start, disk: DiskSend) -> Backup | None:
    """The snapshot a disk's incremental image changes: the latest of that disk, which
    must have been taken at the checkpoint the source sent changes since. None for a
    disk the source sends full."""
    if disk.mode == "full":
        return None
    parent = begun.parents.get(disk.disk)
    if parent is None or parent.checkpoint != disk.since or disk.since != begun.since:
        return None
    return parent


def mismatch(begun: Start, disks: list[DiskSend]) -> str:
    """Why the source's incremental answer cannot be stored (a disk without a matching
    parent: one added to the VM since, a snapshot removed meanwhile), or ""."""
    for d in disks:
        if d.mode == "incremental" and parent_of(begun, d) is None:
            return (
                f"{d.disk} changed since checkpoint {d.since}, but the repository's latest "
                f"snapshot of it is not the one taken at that checkpoint"
            )
    return ""
