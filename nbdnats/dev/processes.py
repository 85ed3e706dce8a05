"""The topology's processes: started in sessions of their own, known by pid and command
line (so a recycled pid is not taken for one of them), stopped by signal."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Sequence
from pathlib import Path

from nbdnats.dev.topology import Proc

STOP_TIMEOUT = 10.0


def spawn(argv: list[str], log: Path, env: dict[str, str]) -> int:
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


def tail(path: str, lines: int = 3) -> str:
    try:
        text = Path(path).read_text(errors="replace").strip().splitlines()
    except OSError:
        return "no log"
    return " / ".join(text[-lines:]) or "no output"


async def stop(procs: Sequence[Proc]) -> tuple[int, int]:
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
