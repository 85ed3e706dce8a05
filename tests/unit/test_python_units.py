"""Pure-Python pieces: subjects, sizes, error mapping, schemas, option checks."""

from __future__ import annotations

import subprocess
import sys

import msgspec
import pytest

from nbdnats import errors, subjects
from nbdnats.cli.main import build_parser
from nbdnats.planes import resolve_urls
from nbdnats.schemas import TransferEvent
from nbdnats.transfer import check_options
from nbdnats.units import human, parse_size


def test_transfer_subjects() -> None:
    assert subjects.transfer("vm42-disk0") == (
        "data.cmd.vm42-disk0.open",
        "data.blk.vm42-disk0.c",
        "data.blk.vm42-disk0.a",
    )
    assert subjects.blocks("t1") == "data.blk.t1.>"
    assert subjects.data_event("t1", "progress") == "data.evt.t1.progress"
    assert subjects.ctl_event("node-a", "transfer") == "ctl.evt.node-a.transfer"
    assert subjects.ctl_command("node-a", "copy") == "ctl.cmd.node-a.copy"
    assert subjects.ctl_query("node-a", "nodes") == "ctl.qry.node-a.nodes"


@pytest.mark.parametrize("bad", ["a.b", "a b", "*", ">", "", "x" * 65, "é"])
def test_tokens_reject_subject_syntax(bad: str) -> None:
    with pytest.raises(errors.UsageError, match="subject token"):
        subjects.transfer(bad)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("4096", 4096),
        ("4K", 4096),
        ("4KiB", 4096),
        ("1M", 1 << 20),
        ("1.5G", 3 << 29),
        ("2mb", 2 << 20),
    ],
)
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("bad", ["", "x", "1.5", "-1", "4Q"])
def test_parse_size_rejects(bad: str) -> None:
    with pytest.raises(errors.UsageError):
        parse_size(bad)


def test_human() -> None:
    assert human(512) == "512 B"
    assert human(1536) == "1.5 KiB"
    assert human(3 << 30) == "3.0 GiB"


def test_error_codes_map_to_classes() -> None:
    assert isinstance(errors.from_code("target_too_small", "m"), errors.TargetTooSmallError)
    assert isinstance(errors.from_code("target_too_small", "m"), errors.EndpointError)
    assert isinstance(errors.from_code("busy", "m"), errors.TransferError)
    assert isinstance(errors.from_code("cancelled", "m"), errors.TransferCancelled)
    unknown = errors.from_code("aborted", "the sender gave up")
    assert isinstance(unknown, errors.RemoteError) and str(unknown) == "the sender gave up"


def test_event_schema_round_trip_and_rejects_bad_types() -> None:
    ev = TransferEvent(transfer_id="t", node="n", role="send", state="done", size=5)
    back = msgspec.json.decode(msgspec.json.encode(ev), type=TransferEvent)
    assert back == ev and back.v == 1
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(
            b'{"transfer_id":1,"node":"n","role":"r","state":"s"}', type=TransferEvent
        )


def test_check_options() -> None:
    check_options(window=1 << 20, timeout=0, chunk_size=1 << 20)
    for kw in ({"window": 1}, {"window": 1 << 30}, {"timeout": -1.0}, {"chunk_size": 1000}):
        args = {"window": 1 << 20, "timeout": 1.0, **kw}
        with pytest.raises(errors.UsageError):
            check_options(**args)  # type: ignore[arg-type]


def test_urls_default_and_split(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NBDNATS_DATA_URL", raising=False)
    monkeypatch.delenv("NBDNATS_CTL_URL", raising=False)
    assert resolve_urls(None, None) == ("nats://127.0.0.1:4222", "nats://127.0.0.1:4222")
    assert resolve_urls("nats://d:1", None) == ("nats://d:1", "nats://d:1")
    monkeypatch.setenv("NBDNATS_CTL_URL", "nats://c:2")
    assert resolve_urls("nats://d:1", None) == ("nats://d:1", "nats://c:2")


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


def test_every_exported_name_resolves() -> None:
    """The package loads most names on first use; each one in __all__ must load."""
    import nbdnats

    missing = [n for n in nbdnats.__all__ if getattr(nbdnats, n, None) is None]
    assert missing == []
