"""The development topology as data: its servers, nodes and processes, the ports they
take, and the record of them (``STATE/dev.json``) that ``dev down`` and ``dev status`` read.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nbdnats.embedded import free_port
from nbdnats.errors import DevError, UsageError

STATE_ENV = "NBDNATS_STATE_DIR"
DEFAULT_STATE = ".state"
STATE_FILE = "dev.json"
STATE_VERSION = 1
# What `up` creates inside the state directory; `down` removes exactly these.
CREATED = (STATE_FILE, "nats", "nodes", "logs", "tls", "jetstream")
CLUSTER_SIZE = 3
MAX_RACKS = 16
# The compose topology's racks (compose/compose.yaml), for which control/ is rendered.
COMPOSE_RACKS = 2


def node_names(racks: int) -> list[str]:
    return [f"node{i}" for i in range(1, racks + 1)]


def rack_names(racks: int) -> list[str]:
    return [f"rack{i}" for i in range(1, racks + 1)]


def users_of(racks: int) -> list[str]:
    return ["dev", "controller", "sys", *node_names(racks), *rack_names(racks)]


@dataclass
class Server:
    name: str  # ctl-1, data-2, rack-1
    kind: str  # ctl, data, rack
    port: int
    http_port: int
    cluster_port: int | None = None
    leaf_port: int | None = None


@dataclass
class Node:
    name: str
    rack: str
    image: str
    socket: str
    nbd: str
    metrics_port: int = 0

    @property
    def directory(self) -> str:
        return str(Path(self.image).parent)


@dataclass
class Proc:
    name: str
    pid: int
    argv: list[str]
    log: str


@dataclass
class State:
    state_dir: str
    host: str
    racks: int
    servers: list[Server]
    nodes: list[Node]
    passwords: dict[str, str]
    processes: list[Proc] = field(default_factory=list)
    version: int = STATE_VERSION

    def url(self, server: Server, user: str | None = None) -> str:
        auth = f"{user}:{self.passwords[user]}@" if user else ""
        return f"nats://{auth}{url_host(self.host)}:{server.port}"

    def cluster_url(self, kind: str, user: str | None = None) -> str:
        return ",".join(self.url(s, user) for s in self.servers if s.kind == kind)

    def to_json(self, *, with_passwords: bool = True) -> dict[str, Any]:
        """The state as JSON; ``with_passwords=False`` (what is printed) leaves the passwords out
        and says where they are."""
        out = asdict(self)
        if not with_passwords:
            out["passwords"] = str(Path(self.state_dir) / STATE_FILE)
        out["urls"] = {
            "ctl": self.cluster_url("ctl"),
            "data": self.cluster_url("data"),
            **{s.name: self.url(s) for s in self.servers if s.kind == "rack"},
        }
        return out

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> State:
        return cls(
            state_dir=raw["state_dir"],
            host=raw["host"],
            racks=raw["racks"],
            servers=[Server(**s) for s in raw["servers"]],
            nodes=[Node(**n) for n in raw["nodes"]],
            passwords=dict(raw["passwords"]),
            processes=[Proc(**p) for p in raw["processes"]],
            version=raw.get("version", STATE_VERSION),
        )


def url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def state_dir(given: str | None) -> Path:
    return Path(given or os.environ.get(STATE_ENV) or DEFAULT_STATE).absolute()


def _ports(host: str, base: int | None, count: int) -> Iterator[int]:
    if base is None:
        seen: set[int] = set()
        for _ in range(count * 20):  # the kernel rarely hands out a port twice in a row
            port = free_port(host)
            if port not in seen:
                seen.add(port)
                yield port
                if len(seen) == count:
                    return
        raise DevError(f"could not find {count} free ports on {host}")
    if not 1024 <= base <= 65535 - count:
        raise UsageError(f"--base-port {base} must leave room for {count} ports below 65536")
    for port in range(base, base + count):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                raise DevError(
                    f"port {port} on {host} is in use; choose another --base-port "
                    f"(the topology needs {count} ports from it) or stop what listens there"
                ) from None
        yield port


def plan(root: Path, host: str, racks: int, base_port: int | None) -> State:
    # Each cluster server: client, route, monitoring (+ leafnode on data); each rack leaf:
    # client, monitoring.
    count = CLUSTER_SIZE * 3 + CLUSTER_SIZE * 4 + racks * 3
    ports = _ports(host, base_port, count)
    servers = [
        Server(f"{kind}-{i}", kind, next(ports), next(ports), cluster_port=next(ports))
        for kind in ("ctl", "data")
        for i in range(1, CLUSTER_SIZE + 1)
    ]
    for s in servers:
        if s.kind == "data":
            s.leaf_port = next(ports)
    servers += [Server(f"rack-{i}", "rack", next(ports), next(ports)) for i in range(1, racks + 1)]
    nodes = []
    for node, rack in zip(node_names(racks), rack_names(racks), strict=True):
        sock = root / "nodes" / node / "nbd.sock"
        nodes.append(
            Node(
                node,
                rack,
                str(root / "nodes" / node / "disk.img"),
                str(sock),
                f"nbd+unix:///disk?socket={sock}",
                next(ports),
            )
        )
    passwords = {user: secrets.token_hex(12) for user in users_of(racks)}
    return State(str(root), host, racks, servers, nodes, passwords)


def save(state: State) -> None:
    """Write the record (mode 0600: it holds the passwords) in one step, never half."""
    path = Path(state.state_dir) / STATE_FILE
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # a leftover .tmp keeps its mode through O_CREAT
    with os.fdopen(fd, "w") as f:
        json.dump(state.to_json(), f, indent=1)
    tmp.replace(path)


def load(root: Path) -> State | None:
    """The record in ``root``, or None when there is none."""
    path = root / STATE_FILE
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise DevError(f"cannot read {path}: {e}; remove it if no dev topology runs") from None
    if raw.get("version") != STATE_VERSION:
        raise DevError(f"{path} is from another version of nbd-nats dev; remove it")
    return State.from_json(raw)


def remove_created(root: Path) -> None:
    """Remove what ``up`` made in ``root``, and ``root`` itself if nothing else is in it."""
    for name in CREATED:
        path = root / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    with contextlib.suppress(OSError):
        root.rmdir()  # only if nothing else is in it
