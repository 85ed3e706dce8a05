"""The command line's parser: the documented options, and a light start for data commands."""

from __future__ import annotations

import os
import subprocess
import sys

from msgspec.structs import replace

from nbdnats.cli.main import build_parser
from nbdnats.cli.options import progress_argv
from nbdnats.cli.output import PercentLines, ends_text
from nbdnats.schemas import TransferEvent


def test_cli_parses_documented_options() -> None:
    p = build_parser()
    a = p.parse_args(
        [
            "send",
            "x.img",
            "--id",
            "t",
            "--chunk-size",
            "1M",
            "--window",
            "16M",
            "--timeout",
            "5",
            "--verify",
            "--json",
            "--data-url",
            "nats://a:1,nats://b:2",
        ]
    )
    assert (a.chunk_size, a.window, a.timeout, a.verify, a.json) == (
        1 << 20,
        16 << 20,
        5.0,
        True,
        True,
    )
    a = p.parse_args(["recv", "-", "--id", "t", "--target-is-zero"])
    assert a.target_is_zero and a.dst == "-"
    a = p.parse_args(["copy", "a", "b"])
    assert a.transfer_id is None


def test_data_commands_do_not_import_the_control_plane() -> None:
    """`send`/`recv`/`copy` start without the agent's, controller's and migration's
    dependencies: each of those imports costs start-up time and memory on every transfer."""
    probe = (
        "import contextlib, io, sys\n"
        "from nbdnats.cli import main as cli\n"
        "with contextlib.redirect_stdout(io.StringIO()) as help, contextlib.suppress(SystemExit):\n"
        "    cli.main(['send', '--help'])\n"
        "heavy = [m for m in ('nbdnats.ctl.controller', 'nbdnats.ctl.agent',\n"
        "         'nbdnats.migration.run', 'nbdnats.dev.topology', 'nbdnats.ctl.events',\n"
        "         'nbdnats.approval', 'cryptography', 'qemu.qmp') if m in sys.modules]\n"
        "print('--chunk-size' in help.getvalue(), heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[0] == "True []", out.stdout + out.stderr
    full = build_parser()
    assert {"agent", "ctl", "migrate", "dev", "approve", "digest"} <= set(
        full._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    )


def test_progress_takes_an_fd_only_with_equals() -> None:
    """``--progress=FD`` as nbdcopy; a bare ``--progress`` leaves the next word alone."""
    p = build_parser()
    a = p.parse_args(progress_argv(["copy", "--progress", "a", "b"]))
    assert (a.progress, a.progress_fd, a.src, a.dst) == (True, None, "a", "b")
    a = p.parse_args(progress_argv(["send", "a", "--id", "t", "--progress=2"]))
    assert (a.progress, a.progress_fd, a.src) == (False, 2, "a")
    assert progress_argv(["recv", "--", "--progress=2"]) == ["recv", "--", "--progress=2"]


def test_ctl_progress_line_has_percent_rate_eta() -> None:
    send = TransferEvent(transfer_id="t", node="a", role="send", state="running", size=8 << 20)
    assert ends_text({"send": replace(send, size=0, state="accepted")}) == "a send accepted"
    recv = TransferEvent(
        transfer_id="t",
        node="b",
        role="recv",
        state="running",
        size=8 << 20,
        done_bytes=2 << 20,
        seconds=1.0,
    )
    assert ends_text({"send": send, "recv": recv}) == (
        "[######------------------]  25.0%  2.0 MiB / 8.0 MiB  2.1 MB/s  ETA 0:03  a -> b"
    )


def test_percent_lines_grow_from_the_handshake_to_100() -> None:
    """``--progress=FD`` lines as nbdcopy writes them: whole percents, each once, growing."""
    r, w = os.pipe()
    lines = PercentLines(w)
    ev = TransferEvent(transfer_id="t", node="b", role="recv", state="waiting", size=0)
    for state, size, done in [
        ("waiting", 0, 0),
        ("running", 0, 0),
        ("running", 400, 0),
        ("running", 400, 2),
        ("running", 400, 5),
        ("running", 400, 3),
        ("running", 400, 400),
        ("done", 400, 400),
    ]:
        lines(replace(ev, state=state, size=size, done_bytes=done))
    os.close(w)
    with os.fdopen(r) as f:
        assert f.read() == "0/100\n1/100\n99/100\n100/100\n"
