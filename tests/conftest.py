"""Fixtures that start real programs: nats-server (from the wheel) and qemu-nbd.

Each is started on a random port or a fresh unix socket and killed at teardown. Only fixtures
and hooks live here; the helpers tests import stand in modules named by their subject:
``tests.waits``, ``tests.nats_server``, ``tests.images``, ``tests.cli``, ``tests.ctl`` and
``tests.backups``.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.request import urlopen

import pytest

from nbdnats.embedded import EmbeddedServer, free_port, nats_server_binary
from tests.cli import NATS_TOOLS_ENV, NBD_NATS, cli_env, started
from tests.ctl import AgentProc
from tests.images import MiB
from tests.metal_images import InstallerBase, installer_base
from tests.metal_vm import MetalVm
from tests.nats_server import NatsServer, port_open
from tests.waits import wait_for


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


@pytest.fixture(autouse=True)
def state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test's journals go to its own state dir, never the user's."""
    path = tmp_path / "state"
    monkeypatch.setenv("NBDNATS_STATE_DIR", str(path))
    return path


@pytest.fixture(autouse=True)
def _no_nats_tools_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The nats tools' variables (NATS_URL...) of whoever runs the tests stay out of them."""
    for name in NATS_TOOLS_ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(autouse=True)
def _no_stray_processes() -> Iterator[None]:
    """A test that fails half-way must not leave its nbd-nats processes running."""
    yield
    while started:
        proc = started.pop()
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


@pytest.fixture
def start_agent(tmp_path: Path) -> Iterator[Callable[..., AgentProc]]:
    """Start ``nbd-nats agent`` processes; each is up once it logs that it is."""
    agents: list[AgentProc] = []

    def start(
        node: str, url: str, *args: str, env: dict[str, str] | None = None, netns: str = ""
    ) -> AgentProc:
        """``netns``: run it in that network namespace (``ip netns exec`` execs it)."""
        log = tmp_path / f"agent-{node}-{len(agents)}.log"
        prefix = ["ip", "netns", "exec", netns] if netns else []
        with log.open("wb") as out:
            argv = [NBD_NATS, "agent", "--node", node, "--ctl-url", url, "--data-url", url, *args]
            proc = subprocess.Popen(
                [*prefix, *argv],
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


# -- bare metal: the installer image and QEMU machines ---------------------------------------


@pytest.fixture(scope="session")
def installer() -> InstallerBase:
    """The installer's base image: built once per run, cached by its inputs across runs."""
    return installer_base()


@pytest.fixture
def machines(tmp_path: Path) -> Iterator[Callable[..., MetalVm]]:
    """Start QEMU machines (tests/metal_vm.py); stop them and their TPMs at teardown."""
    started: list[MetalVm] = []

    def start(name: str, **kw: object) -> MetalVm:
        vm = MetalVm(tmp_path / name, **kw)  # type: ignore[arg-type]
        started.append(vm)
        vm.start()
        return vm

    yield start
    for vm in reversed(started):
        vm.stop()
        if vm.tpm is not None:
            vm.tpm.stop()
