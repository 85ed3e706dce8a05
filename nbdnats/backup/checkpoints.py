"""Consistent checkpoints of a running VM's disks, or of a qcow2 image not in use, that
never lose a change (docs/incremental.md, "Checkpoints")::

    async with await vm_checkpoint(qmp, "vm1", since=last, workdir=work) as cp:
        for view in cp.disks:
            ...  # send view.uri, only view.bitmap's dirty ranges when it is set
        await cp.commit()
    last = cp.name
"""

from __future__ import annotations

from nbdnats.backup.live import vm_checkpoint
from nbdnats.backup.offline import offline_checkpoint
from nbdnats.backup.views import Checkpoint, DiskView

__all__ = ["Checkpoint", "DiskView", "offline_checkpoint", "vm_checkpoint"]
