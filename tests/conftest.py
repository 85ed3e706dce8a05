"""Fixtures that start real programs: nats-server (from the wheel) and qemu-nbd.

Each is started on a random port or a fresh unix socket and killed at teardown.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.request import urlopen

import pytest

from nbdnats.embedded import EmbeddedServer, free_port, nats_server_binary

BIN = Path(sys.executable).parent
NBD_NATS = str(BIN / "nbd-nats")
MiB = 1024 * 1024


def wait_for(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.02)
    raise TimeoutError(f"{what} did not come up within {timeout}s")


async def until(check: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """``wait_for`` for a test running an event loop: polls without blocking it."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen within {timeout}s")
        await asyncio.sleep(0.02)


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


@dataclass
class NatsServer:
    url: str
    proc: subprocess.Popen[bytes]
    port: int
    monitor: int = 0

    def monitoring(self, endpoint: str) -> dict[str, Any]:
        """The JSON of a monitoring endpoint: ``varz``, ``connz``, ``subsz``..."""
        url = f"http://127.0.0.1:{self.monitor}/{endpoint}"
        return json.load(urlopen(url, timeout=2))  # type: ignore[no-any-return]

    def subscriptions(self) -> int:
        """How many subscriptions the server holds (its monitoring endpoint)."""
        return int(self.monitoring("subsz")["num_subscriptions"])

    def has_subscription(self, subject: str) -> bool:
        """Whether some client has subscribed to exactly ``subject``: a receiver listening
        on its transfer's open subject is ready for a sender."""
        # The server leaves the list out when it is empty.
        subs = self.monitoring("subsz?subs=1&limit=100000").get("subscriptions_list", [])
        return any(s["subject"] == subject for s in subs)

    def connections(self) -> int:
        return int(self.monitoring("connz")["num_connections"])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture
def start_nats(tmp_path: Path) -> Iterator[Callable[..., NatsServer]]:
    """Start nats-servers with the embedded default's config, or a changed max_payload."""
    servers: list[NatsServer] = []

    def start(
        max_payload: int = 8 * MiB, host: str = "127.0.0.1", port: int = 0, jetstream: bool = False
    ) -> NatsServer:
        cfg = EmbeddedServer(host, max_payload=max_payload, jetstream=jetstream)
        cfg.port = port or free_port(host)
        conf = tmp_path / f"nats-{cfg.port}.conf"
        monitor = free_port()
        conf.write_text(cfg.config(tmp_path / "js") + f'http: "127.0.0.1:{monitor}"\n')
        log = (tmp_path / f"nats-{cfg.port}.log").open("wb")
        proc = subprocess.Popen([nats_server_binary(), "-c", str(conf)], stdout=log, stderr=log)
        log.close()
        server = NatsServer(cfg.url, proc, cfg.port, monitor)
        servers.append(server)
        wait_for(lambda: port_open(host, cfg.port), "nats-server")
        return server

    yield start
    for s in servers:
        s.stop()


@pytest.fixture
def nats_cluster(tmp_path: Path) -> Iterator[Callable[[], list[NatsServer]]]:
    """Start a 3-node nats-server cluster (routes on loopback); waits until it is meshed."""
    servers: list[NatsServer] = []

    def start() -> list[NatsServer]:
        ports = [free_port() for _ in range(3)]
        routes = [free_port() for _ in range(3)]
        monitors = [free_port() for _ in range(3)]
        for i in range(3):
            others = ", ".join(f"nats-route://127.0.0.1:{routes[j]}" for j in range(3) if j != i)
            conf = tmp_path / f"node{i}.conf"
            conf.write_text(
                f'server_name: n{i}\nlisten: "127.0.0.1:{ports[i]}"\n'
                f'http: "127.0.0.1:{monitors[i]}"\nmax_payload: {8 * MiB}\n'
                f'cluster {{ name: test, listen: "127.0.0.1:{routes[i]}", routes: [{others}] }}\n'
            )
            log = (tmp_path / f"node{i}.log").open("wb")
            proc = subprocess.Popen([nats_server_binary(), "-c", str(conf)], stdout=log, stderr=log)
            log.close()
            servers.append(NatsServer(f"nats://127.0.0.1:{ports[i]}", proc, ports[i], monitors[i]))

        def meshed() -> bool:
            try:
                return all(
                    json.load(urlopen(f"http://127.0.0.1:{m}/routez", timeout=1))["num_routes"] >= 2
                    for m in monitors
                )
            except OSError:
                return False

        wait_for(meshed, "the cluster's routes", timeout=20)
        return servers

    yield start
    for s in servers:
        s.stop()


@pytest.fixture
def nats_url(start_nats: Callable[..., NatsServer]) -> str:
    return start_nats().url


@pytest.fixture
def qemu_nbd(tmp_path: Path) -> Iterator[Callable[..., str]]:
    """Serve an image with qemu-nbd on a unix socket; returns its NBD URI."""
    procs: list[subprocess.Popen[bytes]] = []

    def serve(image: Path, fmt: str = "raw", read_only: bool = False, *extra: str) -> str:
        sock = tmp_path / f"nbd-{len(procs)}.sock"
        args = ["qemu-nbd", "--persistent", "--shared=8", "-x", "disk", "-k", str(sock)]
        # --discard=unmap lets write-zeroes punch holes, as a sparse target wants.
        args += ["--read-only"] if read_only else ["--discard=unmap"]
        args += [*extra]
        if fmt:
            args += ["-f", fmt]
        args.append(str(image))
        procs.append(subprocess.Popen(args, stderr=subprocess.PIPE))
        wait_for(sock.exists, "qemu-nbd")
        return f"nbd+unix:///disk?socket={sock}"

    yield serve
    for p in procs:
        p.terminate()
        p.wait(10)
        if p.stderr:
            p.stderr.close()


@contextlib.contextmanager
def throttled_nbd(
    image: Path, sock: Path, *, read_bps: int = 0, write_bps: int = 0
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """qemu-nbd serving ``image`` through a QEMU throttle group: a really slow disk.
    Read-only unless a write limit is given. Yields the process and the NBD URI."""
    limits = ",".join(f"x-bps-{k}={v}" for k, v in (("read", read_bps), ("write", write_bps)) if v)
    args = ["qemu-nbd", "--persistent", "-x", "disk", "-k", str(sock)]
    args += [] if write_bps else ["--read-only"]
    args += ["--object", f"throttle-group,id=tg,{limits}", "--image-opts"]
    args.append(f"driver=throttle,throttle-group=tg,file.driver=file,file.filename={image}")
    proc = subprocess.Popen(args)
    try:
        wait_for(sock.exists, "qemu-nbd")
        yield proc, f"nbd+unix:///disk?socket={sock}"
    finally:
        proc.kill()
        proc.wait()


def make_image(path: Path, size: int, data: list[tuple[int, int]], seed: int = 1) -> str:
    """A sparse image of ``size`` bytes with random data at ``(offset, length)``; its sha256."""
    with path.open("wb") as f:
        f.truncate(size)
        rnd = __import__("random").Random(seed)
        for offset, length in data:
            f.seek(offset)
            f.write(rnd.randbytes(length))
    return sha256_file(path)


def sha256_file(path: Path, size: int | None = None) -> str:
    h = hashlib.sha256()
    left = size if size is not None else path.stat().st_size
    with path.open("rb") as f:
        while left > 0:
            block = f.read(min(left, 4 * MiB))
            if not block:
                break
            h.update(block)
            left -= len(block)
    return h.hexdigest()


def sha256_nbd(uri: str) -> str:
    """The sha256 of what an NBD export serves, read by nbdcopy (a different client)."""
    out = subprocess.run(["nbdcopy", uri, "-"], capture_output=True, check=True).stdout
    return hashlib.sha256(out).hexdigest()


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def holds(path: Path, least: int = 1) -> Callable[[], bool]:
    """A check for ``wait_for``/``until``: ``path`` exists and has at least ``least`` bytes
    allocated (data written, not just a size set)."""
    return lambda: path.exists() and allocated(path) >= least


@pytest.fixture(autouse=True)
def state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test's journals go to its own state dir, never the user's."""
    path = tmp_path / "state"
    monkeypatch.setenv("NBDNATS_STATE_DIR", str(path))
    return path


def cli_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    keep = {"NBDNATS_STATE_DIR"}
    env = {k: v for k, v in os.environ.items() if not k.startswith("NBDNATS_") or k in keep}
    env.update(extra or {})
    return env


def run_cli(
    *args: str, input: bytes | None = None, timeout: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [NBD_NATS, *args], input=input, capture_output=True, timeout=timeout, env=cli_env(env)
    )


def finish_json(proc: subprocess.Popen[bytes], timeout: float = 180) -> dict[str, object]:
    """Wait for a ``--json`` run to end, assert it exited 0, and return its report: the last
    line of stdout (of stderr when stdout carried the data)."""
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err.decode()
    text = out.decode().strip() or err.decode().strip()
    return json.loads(text.splitlines()[-1])  # type: ignore[no-any-return]


_started: list[subprocess.Popen[bytes]] = []

# A shell starts background jobs with SIGINT ignored, and children inherit that: a suite
# run in the background would hand it to every nbd-nats it starts, which then (rightly)
# ignores Ctrl-C. Restore the interactive default so the CLI's SIGINT handling is tested.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def start_cli(*args: str, **kw: object) -> subprocess.Popen[bytes]:
    env = cli_env(kw.pop("env", None))  # type: ignore[arg-type]
    proc = subprocess.Popen(
        [NBD_NATS, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, **kw
    )  # type: ignore[call-overload]
    _started.append(proc)
    return proc


@pytest.fixture(autouse=True)
def _no_stray_processes() -> Iterator[None]:
    """A test that fails half-way must not leave its nbd-nats processes running."""
    yield
    while _started:
        proc = _started.pop()
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def one_line_error(proc: subprocess.CompletedProcess[bytes]) -> str:
    """Assert the process failed with exactly one 'nbd-nats: error:' line and no traceback."""
    err = proc.stderr.decode()
    assert proc.returncode != 0, f"expected failure, got 0; stderr={err!r}"
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line, got {lines!r}"
    assert lines[0].startswith("nbd-nats: error: "), lines[0]
    return lines[0]


@dataclass
class AgentProc:
    node: str
    proc: subprocess.Popen[bytes]
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, as an init system stops it; the exit code."""
        if self.proc.poll() is None:
            self.proc.terminate()
        return self.proc.wait(timeout)


@pytest.fixture
def start_agent(tmp_path: Path) -> Iterator[Callable[..., AgentProc]]:
    """Start ``nbd-nats agent`` processes; each is up once it logs that it is."""
    agents: list[AgentProc] = []

    def start(node: str, url: str, *args: str, env: dict[str, str] | None = None) -> AgentProc:
        log = tmp_path / f"agent-{node}-{len(agents)}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [NBD_NATS, "agent", "--node", node, "--ctl-url", url, "--data-url", url, *args],
                stdout=out,
                stderr=out,
                env=cli_env(env),
            )
        agent = AgentProc(node, proc, log)
        agents.append(agent)
        wait_for(lambda: " up on " in agent.text() or proc.poll() is not None, f"agent {node}")
        assert proc.poll() is None, agent.text()
        return agent

    yield start
    for a in agents:
        if a.proc.poll() is None:
            a.proc.kill()
            a.proc.wait()


async def ctl_ask(url: str, subject: str, payload: bytes, timeout: float = 20) -> dict[str, object]:
    """One raw request on the ctl plane (a crafted message, as an attacker would send it);
    the reply decoded."""
    import msgspec
    import nats

    nc = await nats.connect(url)
    try:
        msg = await nc.request(subject, payload, timeout=timeout)
        return dict(msgspec.json.decode(msg.data))
    finally:
        await nc.close()


def ctl_request(url: str, subject: str, payload: bytes, timeout: float = 20) -> dict[str, object]:
    """``ctl_ask`` from synchronous code."""
    return asyncio.run(ctl_ask(url, subject, payload, timeout))
