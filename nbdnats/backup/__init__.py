"""Incremental backups: checkpoints of a source's disks (``checkpoints``), the snapshot
chain a run starts from (``chain``), and the source's hold on a checkpoint until its
snapshots are stored (``hold``)."""
