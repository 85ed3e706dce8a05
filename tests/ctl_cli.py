"""The ctl command line, as the ctl tests drive it: commands, their output, stored events,
and the restic repositories the backup tests keep."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from tests.conftest import run_cli

RESTIC_ENV = {"RESTIC_PASSWORD": "agent-secret"}


def ctl(url: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
    return run_cli("ctl", "--ctl-url", url, *args, timeout=timeout)


def ok(proc: subprocess.CompletedProcess[bytes]) -> str:
    """A command's stdout, once it has exited 0."""
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout.decode()


def stored_events(url: str, kind: str) -> list[dict[str, object]]:
    """The ctl events of ``kind`` that JetStream holds, oldest first."""
    out = ok(ctl(url, "--json", "events", "--all", "--no-follow", "--kind", kind))
    return [json.loads(x)["data"] for x in out.splitlines()]


def restic(repo: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, **RESTIC_ENV, "RESTIC_REPOSITORY": str(repo)}
    return subprocess.run(["restic", *args], env=env, capture_output=True, check=True)
