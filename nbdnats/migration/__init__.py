"""Live migration of QEMU VMs, one concern a module, each importing only those above it:

qmp       the QMP client (local socket), the Monitor a migration needs, events, statuses
disks     which disks move, paired source to destination; the names of what we add in QEMU
paths     the sockets, and how the streams cross: directly, or through NATS
run       the state machine: inspect, prepare, mirror, migrate, switchover, handover;
          rollback
record    the record of a running ``nbd-nats migrate``, for ``--cancel``
remote    the source's agent's view of the destination: its monitor and receivers, by NATS
incoming  the destination's agent's side: the sessions, the relayed QMP it allows
"""
