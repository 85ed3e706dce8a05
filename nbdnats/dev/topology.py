"""``nbd-nats dev``: the development topology as local processes.

``dev up`` starts what compose and the Tiltfile describe, without Docker: a ctl cluster
(three nats-servers, JetStream), a data cluster (three nats-servers, no JetStream), a
leafnode per rack, and per node a qemu-nbd export of a small sample disk and the node's
agent (``nbd-nats agent``, with that node's credentials). Every server
runs one of the configs in ``control/`` unchanged; what differs per server (name, ports,
routes, TLS files, passwords) is passed in its environment, as compose does. Everything
listens on loopback (``--ipv6``: ``[::1]``) on free ports. ``dev up`` records each
process it started (pid and command line) in ``STATE/dev.json``; ``dev down`` stops
exactly those and removes what ``up`` made; ``dev status`` shows what runs.

Each agent may open only its node's directory, announces the sample disk as export
``disk`` and serves Prometheus metrics on a port of its own; drive them with
``nbd-nats ctl`` (the controller's login is in ``STATE/dev.json``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import nats

from nbdnats import subjects
from nbdnats.embedded import bulk_env, free_port, nats_server_binary
from nbdnats.errors import DevError, UsageError
from nbdnats.units import human, parse_size

STATE_ENV = "NBDNATS_STATE_DIR"
CONTROL_ENV = "NBDNATS_CONTROL_DIR"
DEFAULT_STATE = ".state"
STATE_FILE = "dev.json"
STATE_VERSION = 1
# What `up` creates inside the state directory; `down` removes exactly these.
CREATED = (STATE_FILE, "nats", "nodes", "logs", "tls", "jetstream")
CLUSTER_SIZE = 3
MAX_RACKS = 16
# The compose topology's racks (compose/compose.yaml), for which control/ is rendered.
COMPOSE_RACKS = 2
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
# sun_path holds 108 bytes with its terminating zero.
SOCKET_PATH_MAX = 107
# The configs dev up runs; accounts-*.conf are rendered per topology beside them.
CONFIGS = ("ctl-cluster.conf", "data-cluster.conf", "rack-leaf.conf")
# JetStream streams of the ctl cluster, in the JSON of the JetStream API (STREAM.CREATE).
STREAMS = "streams"


# --- rendering: the one place that writes what differs per topology -------------------


def node_names(racks: int) -> list[str]:
    return [f"node{i}" for i in range(1, racks + 1)]


def rack_names(racks: int) -> list[str]:
    return [f"rack{i}" for i in range(1, racks + 1)]


def password_var(user: str) -> str:
    """The environment variable that carries a user's password into nats-server."""
    return "NBDNATS_PASSWORD_" + user.upper().replace("-", "_")


def _quote_list(items: Sequence[str]) -> str:
    return "[" + ", ".join(json.dumps(i) for i in items) + "]"


def _permissions(grants: tuple[list[str], list[str]], responses: bool) -> str:
    publish, subscribe = grants
    lines = [
        "permissions: {",
        f"  publish: {{ allow: {_quote_list(publish)} }}",
        f"  subscribe: {{ allow: {_quote_list(subscribe)} }}",
    ]
    if responses:
        lines.append("  allow_responses: true")
    lines.append("}")
    return "\n".join(lines)


def _user(name: str, perms: str | None = None) -> str:
    head = f"{{ user: {name}, password: ${password_var(name)}"
    if perms is None:
        return head + " }"
    body = "\n".join("  " + line for line in perms.splitlines())
    return f"{head}\n{body}\n}}"


def render_accounts(plane: str, racks: int) -> str:
    """accounts-<plane>.conf for a topology of ``racks`` racks, one node each.

    The committed control/accounts-*.conf are this for the compose topology (2 racks);
    ``dev up`` renders its own into the state directory. Passwords are not in the file:
    each user's comes from the environment (``$NBDNATS_PASSWORD_<USER>``).
    """
    users = [
        "# dev: a login for people trying things by hand (nats://dev:PASSWORD@...). There is",
        "# no no_auth_user: a client without credentials is refused, so every connection is",
        "# one of these users, with its permissions. Development only.",
        _user("dev"),
        "# The controller: commands and queries to every node, every event.",
        _user("controller", _permissions(subjects.controller_grants(plane), True)),
        "# One user per node: its own ctl subjects; on the data plane the subjects of any",
        "# transfer (NATS permissions cannot match part of a token; see dev-environment.md).",
    ]
    users += [
        _user(node, _permissions(subjects.node_grants(plane, node), True))
        for node in node_names(racks)
    ]
    if plane == "data":
        users.append("# One user per rack leafnode: the link from its rack to the data cluster.")
        users += [
            _user(rack, _permissions(subjects.rack_grants(), False)) for rack in rack_names(racks)
        ]
    body = "\n".join("      " + line for line in "\n".join(users).splitlines())
    js = "    jetstream: enabled\n" if plane == "ctl" else ""
    return (
        f"# accounts-{plane}.conf: generated by nbdnats.dev.topology.render_accounts({plane!r}, "
        f"racks={racks}); do not edit.\n"
        "# `nbd-nats dev up` renders its own for --racks N into the state directory;\n"
        "# this copy is the compose topology's. Passwords come from the environment.\n"
        "accounts {\n"
        "  NBDNATS {\n"
        f"{js}"
        "    users: [\n"
        f"{body}\n"
        "    ]\n"
        "  }\n"
        "  SYS {\n"
        "    users: [\n"
        f"      {_user('sys')}\n"
        "    ]\n"
        "  }\n"
        "}\n"
        "system_account: SYS\n"
    )


def write_accounts(directory: Path, racks: int = COMPOSE_RACKS) -> None:
    """Write accounts-ctl.conf and accounts-data.conf for ``racks`` racks into ``directory``
    (``make control`` rewrites the committed ones in control/ with this)."""
    for plane in ("ctl", "data"):
        (directory / f"accounts-{plane}.conf").write_text(render_accounts(plane, racks))


def users_of(racks: int) -> list[str]:
    return ["dev", "controller", "sys", *node_names(racks), *rack_names(racks)]


# --- the topology ---------------------------------------------------------------------


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


def control_dir() -> Path:
    """control/ of the source checkout (or $NBDNATS_CONTROL_DIR)."""
    given = os.environ.get(CONTROL_ENV)
    path = Path(given) if given else Path(__file__).resolve().parent.parent / "control"
    if not (path / CONFIGS[0]).is_file():
        raise DevError(
            f"control configs not found in {path}; run from a source checkout of nbdnats "
            f"or set {CONTROL_ENV} to its control/ directory"
        )
    return path


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


def server_env(state: State, server: Server) -> dict[str, str]:
    """The environment a server's config reads (see the variables at the top of each)."""
    root = Path(state.state_dir)
    tls = root / "tls"
    env = {
        "NBDNATS_SERVER_NAME": server.name,
        "NBDNATS_HOST": json.dumps(state.host),
        "NBDNATS_PORT": str(server.port),
        "NBDNATS_HTTP_PORT": str(server.http_port),
        "NBDNATS_TLS_CERT": json.dumps(str(tls / "server.pem")),
        "NBDNATS_TLS_KEY": json.dumps(str(tls / "server.key")),
        "NBDNATS_TLS_CA": json.dumps(str(tls / "ca.pem")),
    }
    env.update({password_var(u): json.dumps(p) for u, p in state.passwords.items()})
    h = url_host(state.host)
    if server.kind in ("ctl", "data"):
        env["NBDNATS_CLUSTER_PORT"] = str(server.cluster_port)
        env["NBDNATS_ROUTES"] = _quote_list(
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
        env["NBDNATS_HUB_URLS"] = _quote_list(
            [
                f"nats-leaf://{user}:{pw}@{h}:{s.leaf_port}"
                for s in state.servers
                if s.kind == "data"
            ]
        )
    return env


def config_of(server: Server) -> str:
    return {"ctl": CONFIGS[0], "data": CONFIGS[1], "rack": CONFIGS[2]}[server.kind]


# --- processes ------------------------------------------------------------------------


def _spawn(argv: list[str], log: Path, env: dict[str, str]) -> int:
    """Start a process in its own session, output to ``log``; only its pid is kept."""
    log.parent.mkdir(parents=True, exist_ok=True)
    actions = [
        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, str(log), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644),
        (os.POSIX_SPAWN_DUP2, 1, 2),
    ]
    return os.posix_spawn(argv[0], argv, {**os.environ, **env}, file_actions=actions, setsid=True)


def _reap(pid: int) -> None:
    """Collect a child of this process that exited (children of an earlier `up` are not)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def running(proc: Proc) -> bool:
    """Whether ``proc`` still runs: same pid, same command line, not a zombie."""
    _reap(proc.pid)
    try:
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        stat = Path(f"/proc/{proc.pid}/stat").read_text()
    except OSError:
        return False
    if stat.rsplit(")", 1)[-1].split()[0] == "Z":
        return False
    return cmdline.split(b"\0")[:-1] == [a.encode() for a in proc.argv]


def _tail(path: str, lines: int = 3) -> str:
    try:
        text = Path(path).read_text(errors="replace").strip().splitlines()
    except OSError:
        return "no log"
    return " / ".join(text[-lines:]) or "no output"


def _save(state: State) -> None:
    path = Path(state.state_dir) / STATE_FILE
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # a leftover .tmp keeps its mode through O_CREAT
    with os.fdopen(fd, "w") as f:
        json.dump(state.to_json(), f, indent=1)
    tmp.replace(path)


def load(root: Path) -> State | None:
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


async def _stop(procs: Sequence[Proc]) -> tuple[int, int]:
    """SIGTERM the processes still running, wait, SIGKILL stragglers. (stopped, gone)."""
    alive = [p for p in procs if running(p)]
    for p in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    while any(running(p) for p in alive) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    for p in alive:
        if running(p):
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGKILL)
    for _ in range(100):
        if not any(running(p) for p in alive):
            break
        await asyncio.sleep(0.05)
    return len(alive), len(procs) - len(alive)


def _remove_created(root: Path) -> None:
    for name in CREATED:
        path = root / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    with contextlib.suppress(OSError):
        root.rmdir()  # only if nothing else is in it


# --- readiness ------------------------------------------------------------------------


def _monitor(state: State, server: Server, path: str) -> dict[str, Any] | None:
    url = f"http://{url_host(state.host)}:{server.http_port}/{path}"
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            data = json.loads(r.read())
    except (OSError, ValueError, urllib.error.URLError):
        return None
    return data if isinstance(data, dict) else None


def _ready(state: State, server: Server) -> bool:
    if server.kind == "rack":
        leafz = _monitor(state, server, "leafz")
        return bool(leafz and leafz.get("leafnodes", 0) >= 1)
    routez = _monitor(state, server, "routez")
    if not routez:
        return False
    peers = {r.get("remote_name") for r in routez.get("routes") or []}
    return len(peers - {None}) >= CLUSTER_SIZE - 1


async def _wait_ready(state: State) -> None:
    by_name = {p.name: p for p in state.processes}
    waiting = {s.name: s for s in state.servers}
    sockets = {n.name: n for n in state.nodes}
    deadline = time.monotonic() + READY_TIMEOUT
    while waiting or sockets:
        for name in list(waiting) + [f"qemu-nbd-{n}" for n in sockets]:
            proc = by_name[f"nats-{name}" if name in waiting else name]
            if not running(proc):
                raise DevError(f"{proc.name} exited at start: {_tail(proc.log)}")
        for name, server in list(waiting.items()):
            if await asyncio.to_thread(_ready, state, server):
                del waiting[name]
        for name, node in list(sockets.items()):
            if Path(node.socket).exists():
                del sockets[name]
        if time.monotonic() > deadline:
            late = ", ".join([*waiting, *sockets])
            raise DevError(
                f"{late} not ready within {READY_TIMEOUT:.0f} s (routes, leafnode links or "
                f"NBD sockets); see the logs in {Path(state.state_dir) / 'logs'}"
            )
        await asyncio.sleep(0.1)


async def _create_streams(state: State, directory: Path) -> None:
    """Create the ctl cluster's JetStream streams, once JetStream has a meta leader (as
    the controller, whose job that is)."""
    nc = await nats.connect(
        [state.url(s) for s in state.servers if s.kind == "ctl"],
        user="controller",
        password=state.passwords["controller"],
        connect_timeout=5,
    )
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        for path in sorted(directory.glob("*.json")):
            config = json.loads(path.read_text())
            subject = f"$JS.API.STREAM.CREATE.{config['name']}"
            while True:
                detail = await _js_request(nc, subject, path.read_bytes())
                if detail is None:
                    break
                if time.monotonic() > deadline:
                    raise DevError(f"JetStream stream {config['name']} not created: {detail}")
                await asyncio.sleep(0.25)
    finally:
        await nc.close()


async def _js_request(nc: Any, subject: str, payload: bytes) -> str | None:
    """None on success, else why not (JetStream not ready yet, or a real error)."""
    try:
        reply = json.loads((await nc.request(subject, payload, timeout=2)).data)
    except (nats.errors.Error, TimeoutError, ValueError) as e:
        return str(e) or type(e).__name__
    error = reply.get("error")
    return None if error is None else str(error.get("description", error))


# --- up -------------------------------------------------------------------------------


def _sample_disk(path: Path, size: int, seed: int) -> None:
    """A sparse raw image: random data in a few places, holes elsewhere."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rnd = random.Random(seed)
    with path.open("wb") as f:
        f.truncate(size)
        step = max(size // 4, 4096)
        for offset in range(0, size, step):
            f.seek(offset)
            f.write(rnd.randbytes(min(step // 4, size - offset)))


def _tls(control: Path, root: Path) -> None:
    script = control / "gen-dev-tls.sh"
    if not shutil.which("openssl"):
        raise DevError("openssl not found; install it (Debian: openssl) to make dev TLS files")
    done = subprocess.run(
        [str(script), str(root / "tls")], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise DevError(f"{script.name} failed: {done.stderr.strip() or done.returncode}")


async def up(root: Path, *, racks: int, ipv6: bool, base_port: int | None, disk_size: int) -> State:
    if not 1 <= racks <= MAX_RACKS:
        raise UsageError(f"--racks must be between 1 and {MAX_RACKS}")
    if disk_size < 1024 * 1024 or disk_size % 4096:
        raise UsageError("--disk-size must be a multiple of 4K, at least 1M")
    old = load(root)
    if old is not None:
        alive = [p for p in old.processes if running(p)]
        if alive:
            raise DevError(
                f"a dev topology already runs in {root} ({len(alive)} processes, e.g. "
                f"{alive[0].name} pid {alive[0].pid}); stop it with `nbd-nats dev down` "
                "or use another --state-dir"
            )
        _remove_created(root)  # a stale record: nothing of it runs any more
    qemu_nbd = shutil.which("qemu-nbd")
    if not qemu_nbd:
        raise DevError("qemu-nbd not found; install qemu-utils")
    nats_server = nats_server_binary()
    control = control_dir()
    host = "::1" if ipv6 else "127.0.0.1"
    try:
        free_port(host)
    except OSError:
        raise DevError(f"cannot listen on {host} here; is the loopback interface up?") from None

    state = plan(root, host, racks, base_port)
    longest = max(len(n.socket.encode()) for n in state.nodes)
    if longest > SOCKET_PATH_MAX:
        raise UsageError(
            f"the state directory {root} is too deep for unix sockets ({longest} bytes, at "
            f"most {SOCKET_PATH_MAX}); use a shorter --state-dir"
        )
    root.mkdir(parents=True, exist_ok=True)
    _save(state)  # from here on `down` can clean up whatever happens
    try:
        _tls(control, root)
        confs = root / "nats"
        confs.mkdir(exist_ok=True)
        for name in CONFIGS:
            shutil.copyfile(control / name, confs / name)
        write_accounts(confs, racks)
        logs = root / "logs"
        for server in state.servers:
            argv = [nats_server, "-c", str(confs / config_of(server))]
            log = logs / f"nats-{server.name}.log"
            pid = _spawn(argv, log, server_env(state, server))
            state.processes.append(Proc(f"nats-{server.name}", pid, argv, str(log)))
            _save(state)
        for i, node in enumerate(state.nodes, 1):
            _sample_disk(Path(node.image), disk_size, seed=i)
            argv = [
                qemu_nbd, "--persistent", "--shared=8", "--discard=unmap", "-f", "raw",
                "-x", "disk", "-k", node.socket, node.image,
            ]  # fmt: skip
            log = logs / f"qemu-nbd-{node.name}.log"
            state.processes.append(
                Proc(f"qemu-nbd-{node.name}", _spawn(argv, log, {}), argv, str(log))
            )
            _save(state)
        await _wait_ready(state)
        await _create_streams(state, control / STREAMS)
        for node in state.nodes:
            state.processes.append(_start_agent(state, node, logs))
            _save(state)
        await _wait_agents(state)
    except BaseException:
        await _stop(state.processes)
        _remove_created(root)
        raise
    return state


def _start_agent(state: State, node: Node, logs: Path) -> Proc:
    """The node's agent, logged in as the node on both planes (credentials in its
    environment, not its command line)."""
    argv = [
        sys.executable, "-m", "nbdnats.cli.main", "agent", "--node", node.name,
        "--allow", node.directory, "--export", f"disk={node.nbd}",
        "--state-dir", str(Path(node.directory) / "state"),
        "--metrics-addr", f"{url_host(state.host)}:{node.metrics_port}",
    ]  # fmt: skip
    env = {
        "NBDNATS_CTL_URL": state.cluster_url("ctl", node.name),
        "NBDNATS_DATA_URL": state.cluster_url("data", node.name),
    }
    log = logs / f"agent-{node.name}.log"
    return Proc(f"agent-{node.name}", _spawn(argv, log, env), argv, str(log))


async def _wait_agents(state: State) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    for proc in [p for p in state.processes if p.name.startswith("agent-")]:
        while " up on " not in Path(proc.log).read_text(errors="replace"):
            if not running(proc):
                raise DevError(f"{proc.name} exited at start: {_tail(proc.log)}")
            if time.monotonic() > deadline:
                raise DevError(f"{proc.name} not up within {READY_TIMEOUT:.0f} s: see {proc.log}")
            await asyncio.sleep(0.1)


async def down(root: Path) -> tuple[int, int]:
    state = load(root)
    if state is None:
        raise DevError(
            f"nothing to stop: no dev topology in {root} (start one with `nbd-nats dev up`)"
        )
    # Agents first, so they can drain and announce that they stop while the servers run.
    agents = [p for p in state.processes if p.name.startswith("agent-")]
    a = await _stop(agents)
    rest = await _stop([p for p in state.processes if p not in agents])
    _remove_created(root)
    return a[0] + rest[0], a[1] + rest[1]


# --- output ---------------------------------------------------------------------------


def describe(state: State) -> list[str]:
    root = Path(state.state_dir)
    ctl, data = state.cluster_url("ctl"), state.cluster_url("data")
    rows = [("ctl cluster", ctl), ("data cluster", data)]
    rows += [(f"{s.name} leaf", state.url(s)) for s in state.servers if s.kind == "rack"]
    rows += [(f"{n.name} ({n.rack})", n.nbd) for n in state.nodes]
    rows += [
        (f"{n.name} agent", f"metrics http://{url_host(state.host)}:{n.metrics_port}/metrics")
        for n in state.nodes
    ]
    monitors = ", ".join(f"{s.name}:{s.http_port}" for s in state.servers)
    rows.append(("monitoring", f"http://{url_host(state.host)}:PORT/varz, PORT of {monitors}"))
    rows.append(("TLS", f"tls:// URLs verify with SSL_CERT_FILE={root / 'tls' / 'ca.pem'}"))
    rows.append(("logins", f"nats://USER:PASSWORD@..., users and passwords in {root / STATE_FILE}"))
    lines = [f"{label:<15}{value}" for label, value in rows]
    # The first server's login serves the whole list; PASSWORD: the user's, in the file.
    login = "nats://{}:PASSWORD@"
    dev_data, dev_ctl = (u.replace("nats://", login.format("dev"), 1) for u in (data, ctl))
    lines.append(f"export NBDNATS_DATA_URL={dev_data} NBDNATS_CTL_URL={dev_ctl}")
    controller = ctl.replace("nats://", login.format("controller"), 1)
    lines.append(f"nbd-nats ctl --ctl-url {controller} nodes")
    return lines


def _status_rows(state: State) -> list[dict[str, Any]]:
    rows = []
    servers = {f"nats-{s.name}": s for s in state.servers}
    for p in state.processes:
        row: dict[str, Any] = {"name": p.name, "pid": p.pid, "running": running(p)}
        server = servers.get(p.name)
        if server is not None:
            row["url"] = state.url(server)
            varz = _monitor(state, server, "varz") if row["running"] else None
            if varz is not None:
                row["connections"] = varz.get("connections")
                row["routes"] = varz.get("routes")
                row["leafnodes"] = varz.get("leafnodes")
            if server.kind == "ctl" and varz is not None:
                jsz = _monitor(state, server, "jsz")
                row["streams"] = jsz.get("streams") if jsz else None
        rows.append(row)
    return rows


# --- CLI ------------------------------------------------------------------------------


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``dev up|down|status`` to the ``nbd-nats`` subcommands."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "dev",
        help="run the development topology as local processes",
        description="The development topology (ctl and data NATS clusters, rack leafnodes, "
        "sample NBD exports) as local processes, without Docker. See docs/dev-environment.md.",
    )
    sub = p.add_subparsers(dest="dev_command", metavar="ACTION", required=True)
    u = sub.add_parser("up", help="start the topology and print its URLs")
    u.add_argument("--racks", type=int, default=2, help="racks, one node each (default: 2)")
    u.add_argument("--ipv6", action="store_true", help="listen on [::1] instead of 127.0.0.1")
    u.add_argument(
        "--base-port",
        type=int,
        metavar="PORT",
        help="use consecutive ports from PORT (default: free ports)",
    )
    u.add_argument(
        "--disk-size", default="16M", metavar="BYTES", help="size of each node's sample disk"
    )
    u.add_argument("--json", action="store_true", help="print the state as JSON")
    d = sub.add_parser("down", help="stop what `dev up` started and remove its files")
    s = sub.add_parser("status", help="show what runs")
    s.add_argument("--json", action="store_true", help="print the state as JSON")
    for q in (u, d, s):
        q.add_argument(
            "--state-dir",
            metavar="DIR",
            help="where configs, logs, disks and the process list live "
            f"(default: ${STATE_ENV} or {DEFAULT_STATE})",
        )
    return p


async def run(args: argparse.Namespace) -> None:
    root = state_dir(args.state_dir)
    out = sys.stdout.write
    if args.dev_command == "up":
        state = await up(
            root,
            racks=args.racks,
            ipv6=args.ipv6,
            base_port=args.base_port,
            disk_size=parse_size(args.disk_size, "--disk-size"),
        )
        if args.json:
            out(json.dumps(state.to_json(with_passwords=False)) + "\n")
            return
        size = human(Path(state.nodes[0].image).stat().st_size)
        out(
            f"dev: up in {root}: {len(state.processes)} processes, {state.racks} "
            f"rack{'s' if state.racks != 1 else ''}, "
            f"{size} sample disks\n"
        )
        out("".join(f"  {line}\n" for line in describe(state)))
    elif args.dev_command == "down":
        stopped, gone = await down(root)
        note = f" ({gone} had already exited)" if gone else ""
        out(f"dev: stopped {stopped} processes{note} and removed them from {root}\n")
    else:
        found = load(root)
        if found is None:
            raise DevError(f"nothing runs: no dev topology in {root}")
        rows = await asyncio.to_thread(_status_rows, found)
        if args.json:
            out(json.dumps({**found.to_json(with_passwords=False), "status": rows}) + "\n")
        else:
            for r in rows:
                extra = " ".join(
                    f"{k}={r[k]}"
                    for k in ("routes", "leafnodes", "connections", "streams")
                    if r.get(k)
                )
                mark = "running" if r["running"] else "EXITED "
                url = r.get("url", "")
                out(f"{r['name']:<22} pid {r['pid']:<8} {mark} {url} {extra}".rstrip() + "\n")
        dead = [r["name"] for r in rows if not r["running"]]
        if dead:
            raise DevError(
                f"{len(dead)} of {len(rows)} processes exited ({', '.join(dead)}); "
                f"see {root / 'logs'}, then `nbd-nats dev down`"
            )
