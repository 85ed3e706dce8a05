"""Live migration of QEMU VMs: QMP, disks, the paths between hosts, the run."""
