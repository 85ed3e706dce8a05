"""The two NATS connections every node holds from day one.

``data`` belongs to the core (async-nats): chunks, acks, transfer setup and events.
``ctl`` belongs to Python (nats-py): commands, queries and ctl events. Both default to the
same server; ``--data-url``/``--ctl-url`` (env ``NBDNATS_DATA_URL``/``NBDNATS_CTL_URL``)
split them, each a comma-separated server list as the nats tools take it.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
from dataclasses import dataclass

import nats
from nats.aio.client import Client as CtlClient

from nbdnats import _core
from nbdnats._bridge import core_call
from nbdnats.errors import NatsError
from nbdnats.subjects import check_token

DEFAULT_URL = "nats://127.0.0.1:4222"
CONNECT_TIMEOUT = 5.0


_USERINFO = re.compile(r"(://)([^/?#\s]*)@")


def redact_url(url: str) -> str:
    """``url`` with the password (``user:pw@``) or token (``token@``) of every userinfo in
    it shown as ``***``: ``rest:https://u:pw@h/`` -> ``rest:https://u:***@h/``. Also
    for lists (``nats://a@h1,nats://b@h2``) and URLs inside another (restic's ``rest:``)."""

    def mask(m: re.Match[str]) -> str:
        user, colon, _ = m.group(2).partition(":")
        return f"{m.group(1)}{user}:***@" if colon else f"{m.group(1)}***@"

    return _USERINFO.sub(mask, url)


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
    conn = await handle_fut
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

    async def close(self) -> None:
        await core_call(self.data.flush)[1]
        if not self.ctl.is_closed:
            await self.ctl.drain()
