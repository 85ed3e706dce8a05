"""The nats-server configs ``dev up`` runs, and the environment each server's config reads.

Every server runs one of the configs in ``control/`` unchanged; what differs per server
(name, ports, routes, TLS files, passwords) is passed in its environment, as compose does.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from nbdnats.dev.tls import tls_files
from nbdnats.dev.topology import Server, State, url_host
from nbdnats.embedded import bulk_env
from nbdnats.errors import DevError

CONTROL_ENV = "NBDNATS_CONTROL_DIR"
# The configs dev up runs; accounts-*.conf are rendered per topology beside them.
CONFIGS = ("ctl-cluster.conf", "data-cluster.conf", "rack-leaf.conf")
# JetStream streams of the ctl cluster, in the JSON of the JetStream API (STREAM.CREATE).
STREAMS = "streams"


def password_var(user: str) -> str:
    """The environment variable that carries a user's password into nats-server."""
    return "NBDNATS_PASSWORD_" + user.upper().replace("-", "_")


def nats_list(items: Sequence[str]) -> str:
    """A list in nats-server's config syntax (its strings are JSON's)."""
    return "[" + ", ".join(json.dumps(i) for i in items) + "]"


def control_dir() -> Path:
    """control/ of the source checkout (or $NBDNATS_CONTROL_DIR)."""
    given = os.environ.get(CONTROL_ENV)
    # nbdnats/dev/config.py -> the checkout's root
    path = Path(given) if given else Path(__file__).resolve().parents[2] / "control"
    if not (path / CONFIGS[0]).is_file():
        raise DevError(
            f"control configs not found in {path}; run from a source checkout of nbdnats "
            f"or set {CONTROL_ENV} to its control/ directory"
        )
    return path


def server_env(state: State, server: Server) -> dict[str, str]:
    """The environment a server's config reads (see the variables at the top of each)."""
    root = Path(state.state_dir)
    tls = tls_files(root)
    env = {
        "NBDNATS_SERVER_NAME": server.name,
        "NBDNATS_HOST": json.dumps(state.host),
        "NBDNATS_PORT": str(server.port),
        "NBDNATS_HTTP_PORT": str(server.http_port),
        "NBDNATS_TLS_CERT": json.dumps(str(tls.cert)),
        "NBDNATS_TLS_KEY": json.dumps(str(tls.key)),
        "NBDNATS_TLS_CA": json.dumps(str(tls.ca)),
    }
    env.update({password_var(u): json.dumps(p) for u, p in state.passwords.items()})
    h = url_host(state.host)
    if server.kind in ("ctl", "data"):
        env["NBDNATS_CLUSTER_PORT"] = str(server.cluster_port)
        env["NBDNATS_ROUTES"] = nats_list(
            [f"nats-route://{h}:{s.cluster_port}" for s in state.servers if s.kind == server.kind]
        )
    if server.kind == "ctl":
        env["NBDNATS_STORE_DIR"] = json.dumps(str(root / "jetstream" / server.name))
    if server.kind == "data":
        env["NBDNATS_LEAF_PORT"] = str(server.leaf_port)
    if server.kind in ("data", "rack"):
        env.update(bulk_env())  # they carry the block streams
    if server.kind == "rack":
        user = "rack" + server.name.split("-")[1]
        pw = state.passwords[user]
        env["NBDNATS_HUB_URLS"] = nats_list(
            [
                f"nats-leaf://{user}:{pw}@{h}:{s.leaf_port}"
                for s in state.servers
                if s.kind == "data"
            ]
        )
    return env


def config_of(server: Server) -> str:
    return {"ctl": CONFIGS[0], "data": CONFIGS[1], "rack": CONFIGS[2]}[server.kind]
