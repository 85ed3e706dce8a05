"""Running the programs the bare-metal parts drive (tpm2-tools, ip, lldpcli, vtysh, gobgp):
an argv, never a shell; stdin closed; bounded in time; and never outliving its run, even
when the caller is cancelled. Each caller turns a failure into its own one-line error."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path


async def run_tool(
    argv: Sequence[str],
    *,
    timeout: float,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> tuple[int, bytes, bytes]:
    """(exit status, stdout, stderr) of ``argv``. Raises ``FileNotFoundError`` when the
    program is not installed and ``TimeoutError`` when it was killed after ``timeout``."""
    tool = shutil.which(argv[0])
    if tool is None:
        raise FileNotFoundError(argv[0])
    proc = await asyncio.create_subprocess_exec(
        tool,
        *argv[1:],
        cwd=cwd,
        env=dict(env) if env is not None else None,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    finally:  # timed out or cancelled: the program goes too
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await asyncio.shield(proc.wait())
    return proc.returncode or 0, out, err
