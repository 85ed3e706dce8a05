"""Leaving the events early is quiet: a script that stops reading ``Controller.events()``
and a ``nbd-nats ctl events | head -5`` pipeline end with nothing on stderr."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

from tests.cli import NBD_NATS, cli_env
from tests.ctl import AgentProc
from tests.nats_server import NatsServer


def test_leaving_controller_events_early_then_closing_prints_nothing(
    start_nats: Callable[..., NatsServer], start_agent: Callable[..., AgentProc], tmp_path: Path
) -> None:
    url = start_nats(jetstream=True).url
    start_agent("a", url, "--announce-interval", "0.2")
    script = tmp_path / "early.py"
    script.write_text(
        textwrap.dedent(f"""
        import asyncio
        from nbdnats import Controller

        async def main() -> None:
            c = await Controller.connect({url!r})
            async for ev in c.events(since_seq=1):
                print(ev.seq, ev.node, ev.kind)
                break
            await c.close()

        asyncio.run(asyncio.wait_for(main(), 60))
        """)
    )
    run = subprocess.run(
        [sys.executable, str(script)], capture_output=True, timeout=120, env=cli_env()
    )
    assert run.stderr.decode() == ""
    assert run.returncode == 0
    assert " a announce" in run.stdout.decode()


def test_ctl_events_into_head_exits_quietly(
    start_nats: Callable[..., NatsServer], start_agent: Callable[..., AgentProc]
) -> None:
    url = start_nats(jetstream=True).url
    start_agent("a", url, "--announce-interval", "0.2")
    events = subprocess.Popen(
        [NBD_NATS, "ctl", "--ctl-url", url, "events", "--all"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=cli_env(),
    )
    assert events.stdout is not None
    head = subprocess.Popen(["head", "-5"], stdin=events.stdout, stdout=subprocess.PIPE)
    events.stdout.close()  # head holds the only reader now
    try:
        lines, _ = head.communicate(timeout=60)
        _, err = events.communicate(timeout=60)
    finally:
        for p in (events, head):
            if p.poll() is None:
                p.kill()
                p.wait()
    assert len(lines.splitlines()) == 5
    text = err.decode()
    assert "BrokenPipe" not in text and "Traceback" not in text, text
    assert text == ""
    # As coreutils and the nats CLI: a reader that went away ends the writer by SIGPIPE.
    assert events.returncode in (128 + signal.SIGPIPE, -signal.SIGPIPE)
