"""Incremental backups: checkpoints (dirty bitmaps, fleecing)."""

from nbdnats.backup.checkpoints import Checkpoint, DiskView, offline_checkpoint, vm_checkpoint

__all__ = ["Checkpoint", "DiskView", "offline_checkpoint", "vm_checkpoint"]
