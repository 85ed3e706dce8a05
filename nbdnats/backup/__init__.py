"""Incremental backups: checkpoints of a source's disks (dirty bitmaps, fleecing:
``checkpoints``), the snapshot chain a run starts from (``chain``), and the source's hold
on a checkpoint until its snapshots are stored (``hold``)."""

from nbdnats.backup.checkpoints import Checkpoint, DiskView, offline_checkpoint, vm_checkpoint

__all__ = ["Checkpoint", "DiskView", "offline_checkpoint", "vm_checkpoint"]
