"""The ``nbd-nats`` command as the tests run it: in the test's environment, with its output
captured, and its one-line errors and ``--json`` reports read back."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent
NBD_NATS = str(BIN / "nbd-nats")

# Every process ``start_cli`` starts, so that a fixture can kill the ones a failed test left.
started: list[subprocess.Popen[bytes]] = []

# A shell starts background jobs with SIGINT ignored, and children inherit that: a suite
# run in the background would hand it to every nbd-nats it starts, which then (rightly)
# ignores Ctrl-C. Restore the interactive default so the CLI's SIGINT handling is tested.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


# The nats tools' variables, which nbd-nats honours too (after its own): a developer's
# would point the tests' processes at their server or login.
NATS_TOOLS_ENV = ("NATS_URL", "NATS_CREDS", "NATS_NKEY", "NATS_CERT", "NATS_KEY", "NATS_CA")


def cli_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    keep = {"NBDNATS_STATE_DIR"}
    env = {
        k: v
        for k, v in os.environ.items()
        if (not k.startswith("NBDNATS_") or k in keep) and k not in NATS_TOOLS_ENV
    }
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
    proc = subprocess.Popen(
        [NBD_NATS, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, **kw
    )  # type: ignore[call-overload]
    started.append(proc)
    return proc


def finish_json(proc: subprocess.Popen[bytes], timeout: float = 180) -> dict[str, object]:
    """Wait for a ``--json`` run to end, assert it exited 0, and return its report: the last
    line of stdout (of stderr when stdout carried the data)."""
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err.decode()
    text = out.decode().strip() or err.decode().strip()
    return json.loads(text.splitlines()[-1])  # type: ignore[no-any-return]


def one_line_error(proc: subprocess.CompletedProcess[bytes]) -> str:
    """Assert the process failed with exactly one 'nbd-nats: error:' line and no traceback."""
    err = proc.stderr.decode()
    assert proc.returncode != 0, f"expected failure, got 0; stderr={err!r}"
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line, got {lines!r}"
    assert lines[0].startswith("nbd-nats: error: "), lines[0]
    return lines[0]
