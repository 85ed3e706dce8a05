"""Prometheus metrics of an agent or a route injector (``--metrics-addr HOST:PORT``, off by
default).

A plain asyncio HTTP responder for ``GET /metrics`` in the text exposition format; the
agent (or injector) hands it a function that renders the current samples.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable

from nbdnats.errors import UsageError

Sample = tuple[str, dict[str, str], float]

# Node-level series (the compose dashboard's contract, docs/dev-environment.md) and
# per-transfer gauges. A scrape config adds the node label (compose/prometheus).
HELP = {
    "nbdnats_agent_info": ("gauge", "The agent: node, role and version as labels"),
    "nbdnats_transfer_bytes_total": ("counter", "Disk bytes completed (data and zeros)"),
    "nbdnats_transfer_data_bytes_total": ("counter", "Payload bytes sent or written"),
    "nbdnats_transfers_active": ("gauge", "Transfers running now"),
    "nbdnats_transfers_total": ("counter", "Finished transfers by outcome"),
    "nbdnats_frames_dropped_total": ("counter", "Frames dropped: bad, corrupt or duplicate"),
    "nbdnats_commands_total": ("counter", "Commands received, by op and result"),
    "nbdnats_backups_total": ("counter", "Incremental backups' disks, by kind and outcome"),
    "nbdnats_backup_dirty_bytes_total": ("counter", "Bytes the dirty bitmaps marked changed"),
    "nbdnats_transfer_done_bytes": ("gauge", "Disk bytes moved so far, per transfer"),
    "nbdnats_transfer_size_bytes": ("gauge", "Size of the disk being moved, per transfer"),
    "nbdnats_transfer_rate_bytes_per_second": ("gauge", "Mean rate of a transfer"),
    "nbdnats_transfer_retransmits": ("gauge", "Frames sent again, per transfer"),
    "nbdnats_transfer_errors": ("gauge", "Bad and corrupt frames, plus 1 if it failed"),
    # A route injector's (nbdnats.metal.injector).
    "nbdnats_injector_routes_installed": ("gauge", "The injector's routes in a ToR's FIB"),
    "nbdnats_injector_refusals_total": ("counter", "Adjacencies refused, by error code"),
    "nbdnats_injector_reconciles_total": ("counter", "Reconciles of every ToR"),
    "nbdnats_injector_errors_total": (
        "counter",
        "Failed vtysh calls, changes not read back as asked, announcer failures",
    ),
}


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render(samples: Iterable[Sample]) -> str:
    by_name: dict[str, list[Sample]] = {}
    for s in samples:
        by_name.setdefault(s[0], []).append(s)
    out: list[str] = []
    for name, rows in by_name.items():
        kind, text = HELP.get(name, ("gauge", name))
        out += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
        for _, labels, value in rows:
            inner = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items()))
            number = repr(float(value)) if value != int(value) else str(int(value))
            out.append(f"{name}{{{inner}}} {number}" if inner else f"{name} {number}")
    return "\n".join(out) + "\n"


def parse_addr(addr: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        raise UsageError(f"--metrics-addr {addr!r}: use HOST:PORT, e.g. 127.0.0.1:9464")
    return host.strip("[]") or "0.0.0.0", int(port)


class MetricsServer:
    def __init__(self, addr: str, collect: Callable[[], Iterable[Sample]]) -> None:
        self.host, self.port = parse_addr(addr)
        self._collect = collect
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        try:
            self._server = await asyncio.start_server(self._serve, self.host, self.port)
        except OSError as e:
            raise UsageError(
                f"cannot serve metrics on {self.host}:{self.port}: {e.strerror}"
            ) from None
        sock = self._server.sockets[0]
        self.port = int(sock.getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError, TimeoutError):
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            path = head.split(b" ", 2)[1] if head.count(b" ") >= 2 else b""
            if path.split(b"?")[0] == b"/metrics":
                body, status = render(self._collect()).encode(), b"200 OK"
            else:
                body, status = b"metrics are at /metrics\n", b"404 Not Found"
            writer.write(
                b"HTTP/1.1 " + status + b"\r\nContent-Type: text/plain; version=0.0.4\r\n"
                b"Content-Length: "
                + str(len(body)).encode()
                + b"\r\nConnection: close\r\n\r\n"
                + body
            )
            await writer.drain()
        writer.close()
