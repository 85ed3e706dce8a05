"""The two NATS connections every node holds from day one.

``data`` belongs to the core (async-nats): chunks, acks, transfer setup and events.
``ctl`` belongs to Python (nats-py): commands, queries and ctl events. Both default to the
same server; ``--data-url``/``--ctl-url`` (env ``NBDNATS_DATA_URL``/``NBDNATS_CTL_URL``)
split them, each a comma-separated server list as the nats tools take it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from dataclasses import dataclass, field

import nats
from nats.aio.client import Client as CtlClient

from nbdnats import _core
from nbdnats._bridge import core_call
from nbdnats.errors import NatsError
from nbdnats.subjects import check_token

DEFAULT_URL = "nats://127.0.0.1:4222"
CONNECT_TIMEOUT = 5.0
DATA_CONNECT_TIMEOUT = 30.0
# Every wait on a plane while shutting down ends within this: a server that is gone must
# not keep a finished (or interrupted) process alive.
CLOSE_TIMEOUT = 5.0

log = logging.getLogger(__name__)


def resolve_urls(data_url: str | None, ctl_url: str | None) -> tuple[str, str]:
    data = data_url or os.environ.get("NBDNATS_DATA_URL") or DEFAULT_URL
    ctl = ctl_url or os.environ.get("NBDNATS_CTL_URL") or data
    return data, ctl


def urls_given(data_url: str | None, ctl_url: str | None) -> bool:
    return bool(
        data_url
        or ctl_url
        or os.environ.get("NBDNATS_DATA_URL")
        or os.environ.get("NBDNATS_CTL_URL")
    )


def default_node() -> str:
    name = socket.gethostname().split(".")[0]
    cleaned = "".join(c if c.isalnum() or c in "-_" else "_" for c in name)[:64]
    return cleaned or "node"


async def connect_data(url: str, name: str) -> _core.DataConnection:
    handle_fut = core_call(lambda done: _core.connect(url, name, done))[1]
    try:
        # The core bounds each attempt; this bounds them all, whatever the server list.
        conn = await asyncio.wait_for(handle_fut, DATA_CONNECT_TIMEOUT)
    except TimeoutError:
        raise NatsError(
            f"cannot connect to NATS at {url}: no answer within {DATA_CONNECT_TIMEOUT:.0f} s; "
            "check --data-url and that nats-server is running"
        ) from None
    assert isinstance(conn, _core.DataConnection)
    return conn


async def connect_ctl(url: str, name: str) -> CtlClient:
    servers = [s.strip() for s in url.split(",") if s.strip()]

    async def quiet(_: Exception) -> None:  # reconnects are reported by state, not logs
        return None

    try:
        nc = await asyncio.wait_for(
            nats.connect(
                servers=servers,
                name=name,
                connect_timeout=2,
                max_reconnect_attempts=1,
                reconnect_time_wait=0.2,
                error_cb=quiet,
            ),
            CONNECT_TIMEOUT,
        )
    except (OSError, TimeoutError, nats.errors.Error) as e:
        detail = str(e) or type(e).__name__
        raise NatsError(
            f"cannot connect to the ctl NATS server at {url}: {detail}; "
            "check --ctl-url and that nats-server is running"
        ) from None
    # The first connect fails fast (one round of attempts); once connected, ride out any
    # server loss: nats-py reads these options at each reconnect.
    nc.options["max_reconnect_attempts"] = -1
    nc.options["reconnect_time_wait"] = 1.0
    return nc


@dataclass
class Planes:
    """Both connections of one node, and its name on the ctl plane."""

    data: _core.DataConnection
    ctl: CtlClient
    node: str

    @classmethod
    async def connect(
        cls, data_url: str | None = None, ctl_url: str | None = None, node: str | None = None
    ) -> Planes:
        data, ctl = resolve_urls(data_url, ctl_url)
        node = check_token(node or default_node(), "node name")
        data_conn = await connect_data(data, f"nbd-nats {node} data")
        ctl_conn = await connect_ctl(ctl, f"nbd-nats {node} ctl")
        return cls(data=data_conn, ctl=ctl_conn, node=node)

    _ctl_lost: bool = field(default=False, init=False, repr=False)

    def ctl_lost(self, what: str) -> None:
        """Say once (a warning) that the ctl plane is gone and what was skipped for it. The
        ctl plane reports; it never decides a transfer's outcome."""
        if not self._ctl_lost:
            self._ctl_lost = True
            log.warning("the ctl plane was lost; %s", what)

    async def ctl_publish(self, subject: str, payload: bytes, what: str) -> None:
        """Publish on the ctl plane if it is there, within ``CLOSE_TIMEOUT``; else skip it
        (``ctl_lost``). Never raises: nats-py would queue it for a server that may never
        come back, or raise from a closed connection."""
        if not self.ctl.is_connected:
            self.ctl_lost(f"{what} was not published")
            return
        try:
            await asyncio.wait_for(self.ctl.publish(subject, payload), CLOSE_TIMEOUT)
        except Exception:
            self.ctl_lost(f"{what} was not published")

    async def close(self) -> None:
        """Flush the data plane and drain the ctl plane, each within ``CLOSE_TIMEOUT``.
        Never raises and never hangs: a plane whose server is gone is let go."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(core_call(self.data.flush)[1], CLOSE_TIMEOUT)
        if self.ctl.is_closed:
            return
        if self.ctl.is_connected:
            try:
                await asyncio.wait_for(self.ctl.drain(), CLOSE_TIMEOUT)
            except Exception:
                self.ctl_lost("its last messages may not have been delivered")
            else:
                return
        # Reconnecting (its server is gone) or a drain that failed: close without waiting
        # for a server, which also stops the reconnect loop.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ctl.close(), CLOSE_TIMEOUT)
