"""A process that leaves while the core still has outcomes to deliver exits cleanly.

The core delivers each outcome from one of its own threads by taking the GIL. If that
happens while CPython finalizes, the process aborts ("Fatal Python error: PyGILState_Release:
thread state ... must be current when releasing", exit 134): a copy that had finished and
said so once ended like that. The window is narrow, so each run leaves at a different moment
of the digests it started; before the fix about one run in ten at these delays aborted."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from tests.cli import cli_env

SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    from nbdnats import _core
    from nbdnats._bridge import core_call

    async def main(path: str, delay: float) -> None:
        for _ in range(8):
            core_call(lambda done: _core.image_digest(path, done, allow_local_file=True))
        await asyncio.sleep(delay)  # then leave, digests running or being delivered

    asyncio.run(main(sys.argv[1], float(sys.argv[2])))
    print("bye")
    """
)


def test_leaving_while_the_core_delivers_outcomes_never_aborts(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    with image.open("wb") as f:
        f.write(bytes(range(256)) * (256 * 1024))  # 64 MiB: each digest takes a moment
    script = tmp_path / "leave.py"
    script.write_text(SCRIPT)
    for run in range(16):
        delay = 0.05 + 0.03 * run
        proc = subprocess.run(
            [sys.executable, str(script), str(image), f"{delay:.2f}"],
            capture_output=True,
            env=cli_env(None),
            timeout=60,
        )
        err = proc.stderr.decode(errors="replace")
        assert proc.returncode == 0 and proc.stdout == b"bye\n", (delay, proc.returncode, err)
        assert "Fatal Python error" not in err
