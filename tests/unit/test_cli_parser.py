"""The command line's parser: the documented options, and a light start for data commands."""

from __future__ import annotations

import subprocess
import sys

from nbdnats.cli.main import build_parser


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
