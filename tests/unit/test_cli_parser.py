"""The command line's parser: the documented options, global options after the action,
-V, how URLs and login files default from the environment, and a light start for data
commands."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from msgspec.structs import replace

from nbdnats import __version__
from nbdnats.cli.main import build_parser, main
from nbdnats.cli.options import progress_argv
from nbdnats.cli.output import PercentLines, ends_text
from nbdnats.errors import UsageError
from nbdnats.planes import DEFAULT_URL, Login, resolve_urls, urls_given
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
        "         'nbdnats.metal.approval', 'cryptography', 'qemu.qmp') if m in sys.modules]\n"
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


def test_ctl_global_options_are_taken_after_the_action_too() -> None:
    """As the nats CLI: `ctl nodes --json --ctl-url U` is `ctl --json --ctl-url U nodes`;
    a value given before the action is kept, and given both before and after, the later
    one wins."""
    p = build_parser()
    shown = ("ctl_url", "json", "creds", "nkey", "tlscert", "tlskey", "tlsca")

    def parsed(*argv: str) -> tuple[object, ...]:
        a = p.parse_args(["ctl", *argv])
        return tuple(getattr(a, k) for k in shown)

    login = ["--nkey", "n.nk", "--tlscert", "c.pem", "--tlskey", "c.key", "--tlsca", "ca.pem"]
    want = ("nats://u:1", True, None, "n.nk", "c.pem", "c.key", "ca.pem")
    assert parsed("--json", "--ctl-url", "nats://u:1", *login, "nodes") == want
    assert parsed("nodes", "--json", "--ctl-url", "nats://u:1", *login) == want
    assert parsed("--ctl-url", "nats://u:1", "nodes", "--json", *login) == want
    assert parsed("nodes") == (None, False, None, None, None, None, None)
    assert parsed("--ctl-url", "nats://a:1", "nodes", "--ctl-url", "nats://b:2")[0] == (
        "nats://b:2"
    )
    a = p.parse_args(["ctl", "copy", "a:x", "b:/y", "--creds", "u.creds", "--json"])
    assert (a.src, a.dst, a.creds, a.json) == ("a:x", "b:/y", "u.creds", True)
    a = p.parse_args(["ctl", "--json", "events", "--since", "10m", "--ctl-url", "nats://e:3"])
    assert (a.json, a.since, a.ctl_url) == (True, "10m", "nats://e:3")


def test_ctl_action_help_lists_the_global_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["ctl", "nodes", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "global options (before or after ACTION)" in out
    for flag in ("--ctl-url", "--json", "--creds", "--nkey", "--tlscert", "--tlskey", "--tlsca"):
        assert flag in out, flag


@pytest.mark.parametrize("command", ["send", "recv", "copy", "agent", "migrate", "ctl"])
def test_tls_options_on_every_command_that_connects(command: str) -> None:
    p = build_parser()
    ends = {"send": ["x", "--id", "t"], "recv": ["x", "--id", "t"], "copy": ["x", "y"]}
    argv = [command, *ends.get(command, [])]
    tls = ["--tlscert", "c.pem", "--tlskey", "c.key", "--tlsca", "ca.pem"]
    a = p.parse_args([*argv, *tls, *(["nodes"] if command == "ctl" else [])])
    assert (a.tlscert, a.tlskey, a.tlsca) == ("c.pem", "c.key", "ca.pem")


@pytest.mark.parametrize("flag", ["-V", "--version"])
def test_version_short_and_long(flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([flag])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"nbd-nats {__version__}\n"


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No NBDNATS_* URL or login variable (conftest already removes the NATS_* ones)."""
    for name in ("DATA_URL", "CTL_URL", "CREDS", "NKEY"):
        monkeypatch.delenv(f"NBDNATS_{name}", raising=False)
    return monkeypatch


def test_urls_option_then_ours_then_nats_url_then_default(clean_env: pytest.MonkeyPatch) -> None:
    env = clean_env
    assert resolve_urls(None, None) == (DEFAULT_URL, DEFAULT_URL)
    assert not urls_given(None, None)
    env.setenv("NATS_URL", "nats://n:1")
    assert urls_given(None, None)
    assert resolve_urls(None, None) == ("nats://n:1", "nats://n:1")
    env.setenv("NBDNATS_DATA_URL", "nats://d:2")
    assert resolve_urls(None, None) == ("nats://d:2", "nats://d:2")
    env.setenv("NBDNATS_CTL_URL", "nats://c:3")
    assert resolve_urls(None, None) == ("nats://d:2", "nats://c:3")
    assert resolve_urls("nats://o:4", "nats://p:5") == ("nats://o:4", "nats://p:5")
    env.delenv("NBDNATS_DATA_URL")
    env.delenv("NBDNATS_CTL_URL")
    # The controller names only the ctl plane: it too falls back to $NATS_URL.
    assert resolve_urls(None, None)[1] == "nats://n:1"


def test_login_option_then_ours_then_the_nats_tools_env(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    env = clean_env
    files = {n: tmp_path / n for n in ("a.creds", "b.creds", "c.nk", "d.nk")}
    for f in files.values():
        f.write_text("x\n")
    a, b, c, d = (str(f) for f in files.values())
    assert Login.resolve() == Login()
    env.setenv("NATS_NKEY", d)
    assert Login.resolve() == Login(nkey=d)
    env.setenv("NATS_CREDS", b)
    with pytest.raises(UsageError, match=r"give \$NATS_CREDS or \$NATS_NKEY, not both"):
        Login.resolve()
    # Ours, as a pair, come before the nats tools': NBDNATS_NKEY hides NATS_CREDS.
    env.setenv("NBDNATS_NKEY", c)
    assert Login.resolve() == Login(nkey=c)
    env.setenv("NBDNATS_CREDS", a)
    with pytest.raises(UsageError, match=r"give \$NBDNATS_CREDS or \$NBDNATS_NKEY"):
        Login.resolve()
    # An option hides every variable.
    assert Login.resolve(creds=b) == Login(creds=b)
    env.setenv("NBDNATS_CREDS", str(tmp_path / "missing.creds"))
    env.delenv("NBDNATS_NKEY")
    with pytest.raises(UsageError, match=r"cannot read \$NBDNATS_CREDS .*missing.creds"):
        Login.resolve()


def test_tls_files_option_then_nats_env(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Each TLS file on its own: the option, else $NATS_CERT/$NATS_KEY/$NATS_CA (the
    files' contents are checked by tests/integration/test_tls.py)."""
    env = clean_env
    env.setenv("NATS_CERT", str(tmp_path / "none.pem"))
    with pytest.raises(UsageError, match=r"cannot read \$NATS_CERT .*none.pem"):
        Login.resolve()
    with pytest.raises(UsageError, match=r"cannot read --tlscert /nonexistent/c\.pem"):
        Login.resolve(tls_cert="/nonexistent/c.pem")
    key = tmp_path / "k.pem"
    key.write_text("x\n")
    env.delenv("NATS_CERT")
    env.setenv("NATS_KEY", str(key))
    with pytest.raises(UsageError, match="give --tlscert and --tlskey together"):
        Login.resolve()


def test_compress_is_a_senders_option_with_the_cores_default() -> None:
    p = build_parser()
    assert p.parse_args(["send", "x", "--id", "t", "--compress", "lz4"]).compress == "lz4"
    assert p.parse_args(["copy", "a", "b"]).compress is None  # the core's DEFAULT_COMPRESS
    with pytest.raises(SystemExit):
        p.parse_args(["recv", "-", "--id", "t", "--compress", "zstd"])
    with pytest.raises(SystemExit):
        p.parse_args(["send", "x", "--id", "t", "--compress", "gzip"])
    ctl = p.parse_args(["ctl", "copy", "a:x", "b:y", "--compress", "off"])
    assert ctl.compress == "off"


def test_streams_is_a_senders_option_from_1_to_the_cores_maximum(
    capsys: pytest.CaptureFixture[str],
) -> None:
    p = build_parser()
    assert p.parse_args(["send", "x", "--id", "t", "--streams", "3"]).streams == 3
    assert p.parse_args(["copy", "a", "b"]).streams == 1
    assert p.parse_args(["ctl", "copy", "a:x", "b:y", "--streams", "8"]).streams == 8
    for bad in ("0", "9", "-1", "x", "1.5", ""):
        with pytest.raises(SystemExit):
            p.parse_args(["copy", "a", "b", f"--streams={bad}"])
        assert f"argument --streams: {bad!r} is not a number of streams" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        p.parse_args(["recv", "-", "--id", "t", "--streams", "2"])  # the receiver never asks
