"""Numbers that once crashed: refused once, at the edge, with one line and exit 2 (CLI) or a
``schema`` reply (agent). Nothing out of range reaches the core, a sleep or a u64."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from nbdnats import subjects
from tests.cli import one_line_error, run_cli
from tests.ctl import AgentProc, ctl_request
from tests.images import MiB, make_image
from tests.nats_server import NatsServer

TOO_BIG = "is more than the largest size, 2^63 - 1 bytes"
NOT_SECONDS = "is not a number of seconds from 0 (no limit) to 604800 (7 days)"


@pytest.fixture
def src(tmp_path: Path) -> Path:
    path = tmp_path / "src.img"
    make_image(path, MiB, [(0, 4096)])
    return path


@pytest.mark.parametrize(
    ("args", "text"),
    [
        (["--size", "99999999999T"], f"argument --size: '99999999999T' {TOO_BIG}"),
        (["--size", str(2**64)], f"argument --size: '{2**64}' {TOO_BIG}"),
        (["--size", str(2**63)], f"argument --size: '{2**63}' {TOO_BIG}"),
        (["--size", "9" * 400], f"{TOO_BIG}"),
        (["--timeout", "inf"], f"argument --timeout: 'inf' {NOT_SECONDS}"),
        (["--timeout", "1e309"], f"argument --timeout: '1e309' {NOT_SECONDS}"),
        (["--timeout", "1e300"], f"argument --timeout: '1e300' {NOT_SECONDS}"),
        (["--timeout", "nan"], f"argument --timeout: 'nan' {NOT_SECONDS}"),
        (["--timeout", "-1"], f"argument --timeout: '-1' {NOT_SECONDS}"),
        (["--timeout", "604801"], f"argument --timeout: '604801' {NOT_SECONDS}"),
        (["--window", "99999999999T"], f"argument --window: '99999999999T' {TOO_BIG}"),
        (["--window", "9" * 400], f"{TOO_BIG}"),
        (["--window", "1T"], "--window 1099511627776 must be between 65536 and"),
        (["--chunk-size", "99999999999T"], f"argument --chunk-size: '99999999999T' {TOO_BIG}"),
    ],
)
def test_out_of_range_numbers_are_one_line_usage_errors(
    tmp_path: Path, args: list[str], text: str
) -> None:
    # stdin as the source: --size applies, and a nan timeout would wait for it forever.
    proc = run_cli("copy", "-", str(tmp_path / "o.img"), *args, input=b"", timeout=30)
    assert text in one_line_error(proc)
    assert proc.returncode == 2
    assert not (tmp_path / "o.img").exists()


@pytest.mark.parametrize("command", ["send", "recv"])
@pytest.mark.parametrize("value", ["nan", "inf", "1e309", "-1"])
def test_send_and_recv_refuse_a_timeout_out_of_range(
    src: Path, tmp_path: Path, nats_url: str, command: str, value: str
) -> None:
    end = str(src) if command == "send" else str(tmp_path / "o.img")
    args = ("--id", "t", "--data-url", nats_url, "--timeout", value)
    proc = run_cli(command, end, *args, timeout=30)
    assert f"argument --timeout: '{value}' {NOT_SECONDS}" in one_line_error(proc)
    assert proc.returncode == 2


def test_digest_length_beyond_any_size(src: Path) -> None:
    proc = run_cli("digest", str(src), "--length", "99999999999T", timeout=30)
    assert f"argument --length: '99999999999T' {TOO_BIG}" in one_line_error(proc)
    assert proc.returncode == 2


@pytest.mark.parametrize(
    "args",
    [
        ["ctl", "copy", "a:x", "b:y", "--timeout", "nan"],
        ["ctl", "copy", "a:x", "b:y", "--window", "99999999999T"],
        ["ctl", "restore", "n", "b:y", "--pipe", "cat", "--size", str(2**64)],
        ["ctl", "migrate", "a:vm", "b", "--timeout", "inf"],
        ["ctl", "migrate", "a:vm", "b", "--mirror-speed", "99999999999T"],
        ["ctl", "events", "--seq", "-1"],
        ["ctl", "events", "--count", str(2**64)],
        ["agent", "--announce-interval", "0"],
        ["agent", "--drain-timeout", "1e309"],
        ["migrate", "--timeout", "nan"],
    ],
)
def test_ctl_and_agent_options_out_of_range(args: list[str]) -> None:
    proc = run_cli(*args, timeout=30)
    assert "argument --" in one_line_error(proc)
    assert proc.returncode == 2


def test_agent_config_file_timeout_out_of_range(tmp_path: Path, nats_url: str) -> None:
    conf = tmp_path / "agent.toml"
    conf.write_text("drain_timeout = inf\n")
    proc = run_cli("agent", "--node", "a", "--ctl-url", nats_url, "--config", str(conf))
    assert "--config drain_timeout: 'inf' is not a number of seconds" in one_line_error(proc)
    assert proc.returncode == 2


def send_options(field: str, value: str) -> str:
    """A send command whose options set ``field`` to ``value``, written into the JSON as it
    is (unquoted); SRC stands for the source."""
    return f'{{"key": "k", "transfer_id": "t", "src": "SRC", "options": {{"{field}": {value}}}}}'


@pytest.mark.parametrize(
    ("op", "payload"),
    [
        ("send", send_options("timeout", "1e300")),
        ("send", send_options("timeout", "1e999")),  # JSON's way to say infinity
        ("send", send_options("timeout", "NaN")),
        ("send", send_options("timeout", "-1")),
        ("send", send_options("window", "18446744073709551616")),
        (
            "send",
            '{"key": "k", "transfer_id": "t", "tool": {"kind": "pipe", "command": ["cat"]},'
            ' "size": 18446744073709551616}',
        ),
        (
            "migrate",
            '{"key": "k", "transfer_id": "m", "vm": "v", "to_node": "b", "timeout": 1e300}',
        ),
        (
            "migrate",
            '{"key": "k", "transfer_id": "m", "vm": "v", "to_node": "b", "mirror_speed": -1}',
        ),
    ],
)
def test_agent_refuses_a_command_with_an_out_of_range_number(
    start_nats: Callable[..., NatsServer],
    start_agent: Callable[..., AgentProc],
    src: Path,
    op: str,
    payload: str,
) -> None:
    """Before: a timeout of 1e300 reached the core's Duration and panicked inside the
    agent, which never replied."""
    url = start_nats().url
    agent = start_agent("a", url, "--allow", str(src.parent))
    command = payload.replace("SRC", str(src)).encode()
    reply = ctl_request(url, subjects.ctl_command("a", op), command)
    assert reply["ok"] is False and reply["code"] == "schema", reply
    # The agent is still there and well.
    info = ctl_request(url, subjects.ctl_query("a", "info"), b"")
    assert info["state"] == "up"
    assert agent.proc.poll() is None and "Traceback" not in agent.text()
