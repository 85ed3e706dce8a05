"""send and recv as separate processes (two hosts in production), either one first."""

from __future__ import annotations

import hashlib
import json
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from nbdnats import subjects
from tests.cli import start_cli
from tests.images import MiB, make_image, sha256_file
from tests.waits import wait_for


def finish(proc: subprocess.Popen[bytes], timeout: float = 120) -> tuple[int, bytes, bytes]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def test_a_receiver_started_first_gets_the_image(tmp_path: Path, start_nats, qemu_nbd) -> None:  # type: ignore[no-untyped-def]
    server = start_nats()
    nats_url = server.url
    src = tmp_path / "src.img"
    want = make_image(src, 24 * MiB, [(MiB, 6 * MiB)])
    dst = tmp_path / "dst.img"
    recv = start_cli("recv", str(dst), "--id", "vm42-disk0", "--data-url", nats_url, "--json")
    # First means listening: the receiver has subscribed to the transfer's open subject.
    ready = subjects.transfer("vm42-disk0")[0]
    wait_for(lambda: server.has_subscription(ready), "the receiver", 60)
    send = start_cli(
        "send",
        qemu_nbd(src, read_only=True),
        "--id",
        "vm42-disk0",
        "--data-url",
        nats_url,
        "--json",
    )
    rc_s, out_s, err_s = finish(send)
    rc_r, out_r, err_r = finish(recv)
    assert (rc_s, rc_r) == (0, 0), (err_s, err_r)
    sent, got = json.loads(out_s), json.loads(out_r)
    assert sent["digest"] == got["digest"]
    assert (sent["role"], got["role"]) == ("send", "recv")
    assert sha256_file(dst) == want


def test_sender_first_waits_for_receiver(tmp_path: Path, start_nats) -> None:  # type: ignore[no-untyped-def]
    server = start_nats()
    nats_url = server.url
    src = tmp_path / "src.img"
    want = make_image(src, 8 * MiB, [(0, 8 * MiB)])
    dst = tmp_path / "dst.img"
    send = start_cli(
        "send", str(src), "--id", "late", "--data-url", nats_url, "--timeout", "30", "--json"
    )
    # The sender keeps asking on data.cmd.late.open: wait until it has asked (unanswered)
    # at least twice, as the server counts messages in.
    asked = lambda: server.monitoring("varz")["in_msgs"] >= 2 or send.poll() is not None  # noqa: E731
    wait_for(asked, "the sender's open requests", 60)
    assert send.poll() is None
    recv = start_cli("recv", str(dst), "--id", "late", "--data-url", nats_url, "--json")
    assert finish(send)[0] == 0
    assert finish(recv)[0] == 0
    assert sha256_file(dst) == want


def test_separate_ctl_and_data_servers(tmp_path: Path, start_nats) -> None:
    """Both planes given separately: data on one server, ctl on another."""
    data, ctl = start_nats(), start_nats()
    src = tmp_path / "src.img"
    want = make_image(src, 4 * MiB, [(0, MiB)])
    dst = tmp_path / "dst.img"
    urls = ["--data-url", data.url, "--ctl-url", ctl.url]
    recv = start_cli("recv", str(dst), "--id", "planes", *urls)
    send = start_cli("send", str(src), "--id", "planes", *urls)
    assert finish(send)[0] == 0
    assert finish(recv)[0] == 0
    assert sha256_file(dst) == want


def test_server_list_with_a_dead_entry(tmp_path: Path, nats_url: str) -> None:
    """A comma-separated list as the nats tools take it; a dead server first is skipped."""
    src = tmp_path / "src.img"
    want = make_image(src, 2 * MiB, [(0, 2 * MiB)])
    dst = tmp_path / "dst.img"
    urls = f"nats://127.0.0.1:1,{nats_url}"
    recv = start_cli("recv", str(dst), "--id", "list", "--data-url", urls)
    send = start_cli("send", str(src), "--id", "list", "--data-url", urls)
    assert finish(send)[0] == 0, send.stderr
    assert finish(recv)[0] == 0
    assert sha256_file(dst) == want


def test_recv_to_stdout_pipes_into_a_consumer(tmp_path: Path, nats_url: str) -> None:
    """The backup shape: `nbd-nats recv - --id X | tool` gets the raw image in order."""
    src = tmp_path / "src.img"
    want = make_image(src, 12 * MiB, [(2 * MiB, MiB), (9 * MiB, 3 * MiB)])
    recv = start_cli("recv", "-", "--id", "pipe", "--data-url", nats_url, "--json")
    send = start_cli("send", str(src), "--id", "pipe", "--data-url", nats_url)
    with ThreadPoolExecutor(1) as pool:  # drain the pipe while the transfer runs
        reader = pool.submit(finish, recv)
        assert finish(send)[0] == 0
        rc, out, err = reader.result()
    assert rc == 0, err
    assert hashlib.sha256(out).hexdigest() == want
    assert json.loads(err.decode().strip().splitlines()[-1])["size"] == 12 * MiB


def test_stdin_sender_restores_a_stream(tmp_path: Path, nats_url: str, qemu_nbd) -> None:
    """The restore shape: `tool dump | nbd-nats send - --id X --size N`."""
    src = tmp_path / "src.img"
    want = make_image(src, 6 * MiB, [(0, 6 * MiB)])
    dst = tmp_path / "dst.img"
    subprocess.run(["truncate", "-s", "6M", str(dst)], check=True)
    recv = start_cli("recv", qemu_nbd(dst), "--id", "restore", "--data-url", nats_url)
    send = start_cli(
        "send",
        "-",
        "--id",
        "restore",
        "--size",
        "6M",
        "--data-url",
        nats_url,
        stdin=subprocess.PIPE,
    )
    _, err = send.communicate(src.read_bytes(), timeout=60)
    assert send.returncode == 0, err
    assert finish(recv)[0] == 0
    assert sha256_file(dst) == want
