"""The record of a running migration, for ``nbd-nats migrate --cancel``.

While ``nbd-nats migrate`` runs, ``$STATE/migrations/ID.json`` names its process and its
QMP sockets: ``--cancel --id ID`` stops that process (which rolls back), or, when the
process is gone, rolls back what it left through the sockets it recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from nbdnats.errors import MigrationError, UsageError
from nbdnats.migration.qmp import CLEANUP_TIMEOUT, COMMAND_TIMEOUT, POLL_INTERVAL
from nbdnats.migration.run import abort
from nbdnats.transfer import resolve_state_dir

MIGRATIONS_DIR = "migrations"


def record_path(migration_id: str) -> Path:
    return resolve_state_dir() / MIGRATIONS_DIR / f"{migration_id}.json"


@contextlib.contextmanager
def recorded(migration_id: str, src_qmp: str, dst_qmp: str) -> Iterator[None]:
    """While a migration runs, $STATE/migrations/ID.json names its process."""
    path = record_path(migration_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        try:
            pid = int(json.loads(path.read_text())["pid"])
        except (ValueError, KeyError, OSError):
            pid = 0
        if pid and alive(pid):
            raise UsageError(f"migration {migration_id} is already running (pid {pid})")
    record = {"pid": os.getpid(), "src_qmp": src_qmp, "dst_qmp": dst_qmp}
    path.write_text(json.dumps(record) + "\n")
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


async def cancel(migration_id: str | None, src_qmp: str | None, dst_qmp: str | None) -> str:
    """``--cancel``: stop the migration ``migration_id`` started by another ``nbd-nats
    migrate`` (SIGTERM; it rolls back and exits), else roll back through the QMP sockets."""
    if migration_id:
        path = record_path(migration_id)
        record: dict[str, Any] = {}
        with contextlib.suppress(OSError, ValueError):
            record = json.loads(path.read_text())
        pid = int(record.get("pid", 0))
        if pid and alive(pid):
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + COMMAND_TIMEOUT + 4 * CLEANUP_TIMEOUT
            while alive(pid) and path.exists():
                if time.monotonic() > deadline:
                    raise MigrationError(f"migration {migration_id} (pid {pid}) did not stop")
                await asyncio.sleep(POLL_INTERVAL)
            return f"cancelled migration {migration_id}: process {pid} stopped and rolled back"
        src_qmp = src_qmp or record.get("src_qmp")
        dst_qmp = dst_qmp or record.get("dst_qmp")
        with contextlib.suppress(OSError):
            path.unlink()
    if not src_qmp:
        raise UsageError(
            f"no running migration {migration_id}: give --src-qmp to roll back through QMP"
            if migration_id
            else "--cancel needs --id of a running migration or --src-qmp"
        )
    problems = await abort(src_qmp, dst_qmp)
    if problems:
        raise MigrationError("cancel incomplete: " + "; ".join(problems))
    return "cancelled: nothing of a migration is left on the source" + (
        "; the destination was stopped" if dst_qmp else ""
    )
