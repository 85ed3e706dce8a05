"""The restic repositories the backup tests keep, and a backup through agents slow enough to
interrupt."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

from tests.cli import start_cli
from tests.ctl import AgentProc
from tests.images import MiB, slow_disk

RESTIC_ENV = {"RESTIC_PASSWORD": "agent-secret"}


def restic(repo: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, **RESTIC_ENV, "RESTIC_REPOSITORY": str(repo)}
    return subprocess.run(["restic", *args], env=env, capture_output=True, check=True)


@contextlib.contextmanager
def slow_backup(
    url: str,
    start_agent: Callable[..., AgentProc],
    tmp_path: Path,
    transfer_id: str,
    *args: str,
    size: int = 48 * MiB,
) -> Iterator[tuple[AgentProc, AgentProc, subprocess.Popen[bytes], Path]]:
    """A ``ctl backup`` slow enough to interrupt: agent a serves a 48 MiB disk read at 2 MiB/s
    (24 s: room for a loaded machine to act before it ends), agent b stores it into a new
    restic repository. ``args`` go to ``ctl backup``; a test that waits for the backup to
    end asks for a smaller ``size``. Yields both agents, the running ``ctl backup`` and the
    repository."""
    disks = tmp_path / "disks"
    disks.mkdir()
    repo = tmp_path / "repo"
    restic(repo, "init", "-q")
    with slow_disk(disks / "slow.raw", size, read_bps=2 * MiB) as (uri, _):
        a = start_agent("a", url, "--allow", str(disks))
        b = start_agent("b", url, "--allow", str(repo), env=RESTIC_ENV)
        backup = ("backup", f"a:{uri}", "b", "--restic", str(repo), "--id", transfer_id, *args)
        yield a, b, start_cli("ctl", "--ctl-url", url, *backup), repo
