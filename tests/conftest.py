"""Fixtures that start real programs: nats-server (from the wheel) and qemu-nbd.

Each is started on a random port or a fresh unix socket and killed at teardown.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

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

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture
def start_nats(tmp_path: Path) -> Iterator[Callable[..., NatsServer]]:
    """Start nats-servers with the embedded default's config, or a changed max_payload."""
    servers: list[NatsServer] = []

    def start(max_payload: int = 8 * MiB, host: str = "127.0.0.1") -> NatsServer:
        cfg = EmbeddedServer(host, max_payload=max_payload)
        cfg.port = free_port(host)
        conf = tmp_path / f"nats-{cfg.port}.conf"
        conf.write_text(cfg.config(tmp_path / "js"))
        log = (tmp_path / f"nats-{cfg.port}.log").open("wb")
        proc = subprocess.Popen([nats_server_binary(), "-c", str(conf)], stdout=log, stderr=log)
        log.close()
        server = NatsServer(cfg.url, proc, cfg.port)
        servers.append(server)
        wait_for(lambda: port_open(host, cfg.port), "nats-server")
        return server

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


def start_cli(*args: str, **kw: object) -> subprocess.Popen[bytes]:
    env = cli_env(kw.pop("env", None))  # type: ignore[arg-type]
    return subprocess.Popen(
        [NBD_NATS, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, **kw
    )  # type: ignore[call-overload]


def one_line_error(proc: subprocess.CompletedProcess[bytes]) -> str:
    """Assert the process failed with exactly one 'nbd-nats: error:' line and no traceback."""
    err = proc.stderr.decode()
    assert proc.returncode != 0, f"expected failure, got 0; stderr={err!r}"
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line, got {lines!r}"
    assert lines[0].startswith("nbd-nats: error: "), lines[0]
    return lines[0]
