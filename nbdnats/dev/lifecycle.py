"""``dev up``, ``dev down`` and ``dev status``: bring the topology up in order, wait until
each part is ready, stop exactly what was started, and say what runs."""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import nats

from nbdnats.dev.accounts import write_accounts
from nbdnats.dev.config import CONFIGS, STREAMS, config_of, control_dir, server_env
from nbdnats.dev.processes import running, spawn, stop, tail
from nbdnats.dev.tls import make_tls
from nbdnats.dev.topology import (
    CLUSTER_SIZE,
    MAX_RACKS,
    Node,
    Proc,
    Server,
    State,
    load,
    plan,
    remove_created,
    save,
    url_host,
)
from nbdnats.embedded import free_port, nats_server_binary
from nbdnats.errors import DevError, UsageError

READY_TIMEOUT = 30.0
# sun_path holds 108 bytes with its terminating zero.
SOCKET_PATH_MAX = 107


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
        remove_created(root)  # a stale record: nothing of it runs any more
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
    save(state)  # from here on `down` can clean up whatever happens
    try:
        make_tls(control, root)
        confs = root / "nats"
        confs.mkdir(exist_ok=True)
        for name in CONFIGS:
            shutil.copyfile(control / name, confs / name)
        write_accounts(confs, racks)
        logs = root / "logs"
        for server in state.servers:
            argv = [nats_server, "-c", str(confs / config_of(server))]
            log = logs / f"nats-{server.name}.log"
            pid = spawn(argv, log, server_env(state, server))
            state.processes.append(Proc(f"nats-{server.name}", pid, argv, str(log)))
            save(state)
        for i, node in enumerate(state.nodes, 1):
            _sample_disk(Path(node.image), disk_size, seed=i)
            argv = [qemu_nbd, "--persistent", "--shared=8", "--discard=unmap", "-f", "raw"]
            argv += ["-x", "disk", "-k", node.socket, node.image]
            log = logs / f"qemu-nbd-{node.name}.log"
            state.processes.append(
                Proc(f"qemu-nbd-{node.name}", spawn(argv, log, {}), argv, str(log))
            )
            save(state)
        await _wait_ready(state)
        await _create_streams(state, control / STREAMS)
        for node in state.nodes:
            state.processes.append(_start_agent(state, node, logs))
            save(state)
        await _wait_agents(state)
    except BaseException:
        await stop(state.processes)
        remove_created(root)
        raise
    return state


def _start_agent(state: State, node: Node, logs: Path) -> Proc:
    """The node's agent, logged in as the node on both planes (credentials in its
    environment, not its command line)."""
    argv = [sys.executable, "-m", "nbdnats.cli.main", "agent", "--node", node.name]
    argv += ["--allow", node.directory, "--export", f"disk={node.nbd}"]
    argv += ["--state-dir", str(Path(node.directory) / "state")]
    argv += ["--metrics-addr", f"{url_host(state.host)}:{node.metrics_port}"]
    env = {
        "NBDNATS_CTL_URL": state.cluster_url("ctl", node.name),
        "NBDNATS_DATA_URL": state.cluster_url("data", node.name),
    }
    log = logs / f"agent-{node.name}.log"
    return Proc(f"agent-{node.name}", spawn(argv, log, env), argv, str(log))


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


async def down(root: Path) -> tuple[int, int]:
    state = load(root)
    if state is None:
        raise DevError(
            f"nothing to stop: no dev topology in {root} (start one with `nbd-nats dev up`)"
        )
    # Agents first, so they can drain and announce that they stop while the servers run.
    agents = [p for p in state.processes if p.name.startswith("agent-")]
    a = await stop(agents)
    rest = await stop([p for p in state.processes if p not in agents])
    remove_created(root)
    return a[0] + rest[0], a[1] + rest[1]


def status(state: State) -> list[dict[str, Any]]:
    """A row per recorded process: whether it runs and, for a server, what its monitoring
    port says (connections, routes, leafnodes, streams)."""
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


# --- readiness: a server is ready when its routes (or its leafnode link) are up ----------


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
                raise DevError(f"{proc.name} exited at start: {tail(proc.log)}")
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


async def _wait_agents(state: State) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    for proc in [p for p in state.processes if p.name.startswith("agent-")]:
        while " up on " not in Path(proc.log).read_text(errors="replace"):
            if not running(proc):
                raise DevError(f"{proc.name} exited at start: {tail(proc.log)}")
            if time.monotonic() > deadline:
                raise DevError(f"{proc.name} not up within {READY_TIMEOUT:.0f} s: see {proc.log}")
            await asyncio.sleep(0.1)
