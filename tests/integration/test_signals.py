"""Signals end nbd-nats: at once, with one line, and with nothing left running.

Ctrl-C on a terminal and a shell's or systemd's stop signal go to the whole process group,
the embedded nats-server of ``copy`` included; a SIGKILLed ``copy`` gets no chance to stop
its server at all.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.cli import start_cli
from tests.images import MiB, allocated, make_image, throttled_nbd
from tests.nats_server import NatsServer
from tests.waits import wait_for


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # pid (comm) state ppid ...: comm may hold spaces, so split after its ')'.
    pid_, _, rest = text.partition(" (")
    comm, _, fields = rest.rpartition(") ")
    return [pid_, comm, *fields.split()]


def alive(pid: int) -> bool:
    """Running (a zombie that no one reaps does not count: it holds nothing)."""
    st = _stat(pid)
    return st is not None and st[2] != "Z"


def children(pid: int, name: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            st = _stat(int(entry.name))
            if st is not None and st[1] == name and st[3] == str(pid) and st[2] != "Z":
                found.append(int(entry.name))
    return found


def embedded_server(proc: subprocess.Popen[bytes]) -> int:
    """The pid of ``copy``'s embedded nats-server, once it runs."""
    servers: list[int] = []

    def started() -> bool:
        servers[:] = children(proc.pid, "nats-server")
        return bool(servers) or proc.poll() is not None

    wait_for(started, "the embedded nats-server")
    assert servers, proc.communicate()[1].decode()
    return servers[0]


@pytest.fixture
def slow_copy(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A 64 MiB source read at 8 MiB/s: a copy that runs for seconds."""
    src = tmp_path / "src.img"
    make_image(src, 64 * MiB, [(0, 64 * MiB)])
    with throttled_nbd(src, tmp_path / "slow.sock", read_bps=8 * MiB) as (_, uri):
        yield uri, tmp_path / "dst.img"


def running(dst: Path) -> bool:
    return dst.exists() and allocated(dst) > 0


@pytest.mark.parametrize(
    ("sig", "code", "word"),
    [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")],
)
def test_a_signal_to_the_process_group_ends_copy_with_one_line(
    slow_copy: tuple[str, Path], sig: signal.Signals, code: int, word: str
) -> None:
    """Before: the embedded server died with the group first; copy then reconnected
    forever or ended in a 54-line traceback from draining the lost ctl connection."""
    uri, dst = slow_copy
    proc = start_cli("copy", uri, str(dst), start_new_session=True)
    server = embedded_server(proc)
    wait_for(lambda: running(dst) or proc.poll() is not None, "the copy")
    os.killpg(proc.pid, sig)
    _, err = proc.communicate(timeout=30)
    lines = [line for line in err.decode().splitlines() if line.strip()]
    assert proc.returncode == code, err.decode()
    assert lines == [f"nbd-nats: {word}"], err.decode()
    assert not alive(server)
    assert not children(proc.pid, "nats-server")


def test_sigkilled_copy_leaves_no_nats_server(slow_copy: tuple[str, Path]) -> None:
    """Before: the embedded server outlived a SIGKILLed copy, for good."""
    uri, dst = slow_copy
    proc = start_cli("copy", uri, str(dst))
    server = embedded_server(proc)
    wait_for(lambda: running(dst) or proc.poll() is not None, "the copy")
    proc.kill()
    proc.communicate(timeout=30)
    try:
        wait_for(lambda: not alive(server), "the embedded server's end", timeout=10)
    finally:
        if alive(server):
            os.kill(server, signal.SIGKILL)


def idle_recv_whose_server_died(
    tmp_path: Path, server: NatsServer, timeout: str
) -> subprocess.Popen[bytes]:
    """A receiver with ``--timeout`` ``timeout``, listening for its sender, once its only
    server has died."""
    args = ("--id", "idle", "--data-url", server.url, "--timeout", timeout)
    proc = start_cli("recv", str(tmp_path / "o.img"), *args)
    wait_for(lambda: server.has_subscription("data.cmd.idle.open"), "the receiver")
    server.proc.kill()
    server.proc.wait(10)
    return proc


def test_idle_recv_whose_only_server_died_ends_within_its_timeout(
    tmp_path: Path, start_nats: Callable[..., NatsServer]
) -> None:
    """Its --timeout holds when the server is gone: the process does not wait for ever on
    a connection that reconnects for ever. (Needs the core's bounded waits too.)"""
    timeout = 5  # short: the test waits it out; that it is a bound is what it checks
    proc = idle_recv_whose_server_died(tmp_path, start_nats(), str(timeout))
    started = time.monotonic()
    _, err = proc.communicate(timeout=60)
    took = time.monotonic() - started
    lines = [line for line in err.decode().splitlines() if line.strip()]
    assert proc.returncode == 1, err.decode()
    assert len(lines) == 1 and lines[0].startswith("nbd-nats: error: "), lines
    assert took < timeout + 15, took  # the timeout, and the bounded shutdown


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_ends_an_idle_recv_whose_only_server_died(
    tmp_path: Path, start_nats: Callable[..., NatsServer], sig: signal.Signals, code: int
) -> None:
    proc = idle_recv_whose_server_died(tmp_path, start_nats(), "0")
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    lines = [line for line in err.decode().splitlines() if line.strip()]
    assert proc.returncode == code, err.decode()
    assert len(lines) == 1 and "Traceback" not in err.decode(), lines
