"""The kernel's floor: CPU seconds per GiB that moving bytes through each kind of socket a
path uses costs on this machine, with no user-space work beyond the system calls.

    python -m bench.floor [--size BYTES]

A sender and a receiver process push ``size`` bytes through a unix stream socket pair
(qemu-nbd's sockets) and through a loopback TCP connection (nats-server's), in 1 MiB
calls; each reports its own CPU time. With the frame checksum's cost on buffers just
written (a 2 MiB working set, as a frame is checksummed right after its socket read),
that gives the least CPU an implementation of each path could use per GiB:

- nbdcopy: read from the source's unix socket, write to the target's.
- nbd-nats sender: read from the source's unix socket, checksum, write to NATS over TCP.
- nbd-nats receiver: read from NATS over TCP, checksum, write to the target's unix socket.

The suite records these beside the measured figures (``results.json`` ``floor``), so a
missed CPU target can be read against what the sockets alone cost.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from bench.harness import GiB, MiB

BLOCK = 1 * MiB

# The receiving end, run as its own process: read SIZE bytes from fd FD, print CPU seconds.
RECEIVER = """
import os, resource, socket, sys
fd, size, block = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
sock = socket.socket(fileno=fd)
buf = memoryview(bytearray(block))
got = 0
while got < size:
    n = sock.recv_into(buf)
    if n == 0:
        break
    got += n
r = resource.getrusage(resource.RUSAGE_SELF)
print(r.ru_utime + r.ru_stime, got)
"""


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _pair(kind: str) -> tuple[socket.socket, socket.socket]:
    if kind == "unix":
        return socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        a = socket.create_connection(listener.getsockname())
        b, _ = listener.accept()
    return a, b


def socket_cost(kind: str, size: int) -> tuple[float, float]:
    """Sender and receiver CPU seconds per GiB for ``size`` bytes over a ``kind`` socket."""
    send, recv = _pair(kind)
    with send, recv:
        child = subprocess.Popen(
            [sys.executable, "-c", RECEIVER, str(recv.fileno()), str(size), str(BLOCK)],
            pass_fds=[recv.fileno()],
            stdout=subprocess.PIPE,
            text=True,
        )
        recv.close()
        data = os.urandom(BLOCK)
        before = _cpu()
        for _ in range(size // BLOCK):
            send.sendall(data)
        sent = _cpu() - before
        send.shutdown(socket.SHUT_WR)
        out, _ = child.communicate(timeout=120)
    received, got = out.split()
    if int(got) != size:
        raise RuntimeError(f"{kind} receiver got {got} of {size} bytes")
    return sent / (size / GiB), float(received) / (size / GiB)


def checksum_cost(working_set: int = 2 * MiB, total: int = 1 * GiB) -> float:
    """CPU seconds per GiB of the frame checksum over buffers recently written."""
    from nbdnats import _core

    bufs = [os.urandom(BLOCK) for _ in range(working_set // BLOCK)]
    start = time.process_time()
    for i in range(total // BLOCK):
        _core.checksum_of(bufs[i % len(bufs)])
    return (time.process_time() - start) / (total / GiB)


def measure(size: int = 1 * GiB, tries: int = 2) -> dict[str, Any]:
    """The floor figures (the best of ``tries`` runs each) and the three paths' sums."""
    unix = min((socket_cost("unix", size) for _ in range(tries)), key=sum)
    tcp = min((socket_cost("tcp", size) for _ in range(tries)), key=sum)
    checksum = min(checksum_cost() for _ in range(tries))
    out = {
        "unix_send": unix[0],
        "unix_recv": unix[1],
        "tcp_send": tcp[0],
        "tcp_recv": tcp[1],
        "checksum": checksum,
    }
    out["nbdcopy"] = out["unix_recv"] + out["unix_send"]
    out["sender"] = out["unix_recv"] + checksum + out["tcp_send"]
    out["receiver"] = out["tcp_recv"] + checksum + out["unix_send"]
    out["sender_receiver"] = out["sender"] + out["receiver"]
    return {k: round(v, 4) for k, v in out.items()}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__)
    p.add_argument("--size", type=int, default=1 * GiB, help="bytes per measurement")
    args = p.parse_args(argv)
    json.dump(measure(args.size), sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
