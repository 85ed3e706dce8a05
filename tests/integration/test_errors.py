"""Bad input: one line saying what failed and what to do, a non-zero exit, nothing lost."""

from __future__ import annotations

import contextlib
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from nbdnats import subjects
from nbdnats.embedded import free_port
from tests.cli import NBD_NATS, cli_env, one_line_error, run_cli, start_cli
from tests.images import MiB, holds, make_image, sha256_file, throttled_nbd
from tests.waits import wait_for


@pytest.fixture
def src(tmp_path: Path) -> Path:
    path = tmp_path / "src.img"
    make_image(path, 4 * MiB, [(0, MiB)])
    return path


def test_a_malformed_nbd_uri_writes_no_target(tmp_path: Path) -> None:
    line = one_line_error(run_cli("copy", "nbd://bad:host:x/", str(tmp_path / "out.img")))
    assert "unable to parse URI" in line
    assert not (tmp_path / "out.img").exists()


def test_a_missing_nbd_socket_cannot_be_connected(tmp_path: Path) -> None:
    uri = f"nbd+unix:///disk?socket={tmp_path}/missing.sock"
    proc = run_cli("copy", uri, str(tmp_path / "out.img"))
    assert one_line_error(proc) == (
        f"nbd-nats: error: cannot connect to NBD source {uri}: nbd_aio_connect_uri: connect: "
        f"No such file or directory; is the NBD server running at socket {tmp_path}/missing.sock?"
    )
    assert proc.returncode == 1


def test_a_refused_nbd_connection_asks_whether_the_server_runs(tmp_path: Path, src: Path) -> None:
    sock = tmp_path / "stale.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(sock))  # bound, never listening: a server that died left it
    stale.close()
    line = one_line_error(run_cli("copy", str(src), f"nbd+unix:///disk?socket={sock}"))
    assert line.endswith(f"Connection refused; is the NBD server running at socket {sock}?")
    port = free_port()
    line = one_line_error(run_cli("digest", f"nbd://127.0.0.1:{port}/disk"))
    assert line.endswith(f"Connection refused; is the NBD server running at 127.0.0.1:{port}?")
    line = one_line_error(run_cli("digest", "nbd://nosuchhost.invalid/disk"))
    assert "getaddrinfo" in line and line.endswith("; check the host name in the URI")


def test_an_unknown_export_lists_the_servers_exports(tmp_path: Path, src: Path, qemu_nbd) -> None:
    uri = qemu_nbd(src, read_only=True).replace("///disk?", "///dsik?")
    proc = run_cli("copy", uri, str(tmp_path / "out.img"))
    assert one_line_error(proc) == (
        f"nbd-nats: error: cannot connect to NBD source {uri}: nbd_poll: handshake: server has "
        "no export named 'dsik': No such file or directory; the server's exports are disk"
    )
    assert proc.returncode == 1 and not (tmp_path / "out.img").exists()


@pytest.mark.parametrize(
    "spec", ["nbd+unx:///disk?socket=/run/x.sock", "nbds+unx:///disk", "ftp://host/disk.img"]
)
def test_an_unknown_uri_scheme_names_the_supported_ones(
    tmp_path: Path, src: Path, spec: str
) -> None:
    scheme = spec.split("://")[0]
    nbd = "nbd://, nbds://, nbd+unix://, nbds+unix://, nbd+vsock://, nbds+vsock://"
    proc = run_cli("copy", spec, str(tmp_path / "out.img"))
    assert one_line_error(proc) == (
        f"nbd-nats: error: unknown scheme '{scheme}' in URI {spec}: "
        f"use {nbd}, -, pipe:PATH, or a file path"
    )
    assert proc.returncode == 2 and not (tmp_path / "out.img").exists()
    proc = run_cli("copy", str(src), spec)
    assert one_line_error(proc) == (
        f"nbd-nats: error: unknown scheme '{scheme}' in URI {spec}: "
        f"use {nbd}, -, pipe:PATH, unix:PATH, null:, or a file path"
    )
    assert proc.returncode == 2


def test_a_password_in_an_unknown_uri_is_not_shown(tmp_path: Path) -> None:
    line = one_line_error(run_cli("digest", "ftp://alice:hunter2@host/disk.img"))
    assert "ftp://alice:***@host/disk.img" in line and "hunter2" not in line


def test_a_file_named_like_a_uri_is_still_a_file(tmp_path: Path, src: Path) -> None:
    """`ftp://img` relative to the working directory is the file img in a directory
    `ftp:`: a path that exists is opened, whatever it looks like."""
    (tmp_path / "ftp:").mkdir()
    (tmp_path / "ftp:" / "img").write_bytes(src.read_bytes())
    (tmp_path / "a:b").write_bytes(src.read_bytes())
    for spec in ("ftp://img", "./a:b", f"{tmp_path}/ftp://img"):
        proc = subprocess.run(
            [NBD_NATS, "copy", spec, "out.img"], cwd=tmp_path, capture_output=True, env=cli_env()
        )
        assert proc.returncode == 0, proc.stderr.decode()
        assert sha256_file(tmp_path / "out.img") == sha256_file(src)


def test_missing_source_file_creates_no_target(tmp_path: Path) -> None:
    proc = run_cli("copy", str(tmp_path / "nope.img"), str(tmp_path / "out.img"))
    assert "does not exist" in one_line_error(proc)
    assert proc.returncode == 1
    assert not (tmp_path / "out.img").exists()


def test_a_missing_target_directory_is_named(tmp_path: Path, src: Path) -> None:
    line = one_line_error(run_cli("copy", str(src), str(tmp_path / "no" / "out.img")))
    assert "target directory" in line and "does not exist" in line


def test_a_directory_as_source_is_refused(tmp_path: Path) -> None:
    assert "is a directory" in one_line_error(run_cli("copy", str(tmp_path), str(tmp_path / "o")))


def test_target_smaller_than_source_is_left_untouched(tmp_path: Path, src: Path, qemu_nbd) -> None:
    dst = tmp_path / "small.img"
    before = make_image(dst, 2 * MiB, [(0, 2 * MiB)], seed=5)
    proc = run_cli("copy", str(src), qemu_nbd(dst))
    line = one_line_error(proc)
    assert proc.returncode == 1
    assert "holds 2097152 bytes but the source has 4194304" in line
    assert "qemu-img resize" in line
    assert sha256_file(dst) == before


def test_read_only_nbd_target(tmp_path: Path, src: Path, qemu_nbd) -> None:
    dst = tmp_path / "ro.img"
    make_image(dst, 4 * MiB, [])
    assert "read-only" in one_line_error(run_cli("copy", str(src), qemu_nbd(dst, read_only=True)))


def test_an_unreachable_data_server_names_its_url_and_option(src: Path) -> None:
    proc = run_cli("send", str(src), "--id", "x", "--data-url", "nats://127.0.0.1:1")
    line = one_line_error(proc)
    assert proc.returncode == 1
    assert "cannot connect to NATS at nats://127.0.0.1:1" in line and "--data-url" in line


def test_an_unreachable_ctl_server_is_named_as_such(src: Path, nats_url: str) -> None:
    proc = run_cli(
        "send", str(src), "--id", "x", "--data-url", nats_url, "--ctl-url", "nats://127.0.0.1:1"
    )
    assert "ctl NATS server at nats://127.0.0.1:1" in one_line_error(proc)


def test_an_unreachable_url_from_the_environment_is_named(src: Path) -> None:
    proc = run_cli("send", str(src), "--id", "x", env={"NBDNATS_DATA_URL": "nats://127.0.0.1:1"})
    assert "nats://127.0.0.1:1" in one_line_error(proc)


def test_chunk_above_max_payload_is_refused(tmp_path: Path, src: Path, start_nats) -> None:
    server = start_nats(max_payload=MiB)
    proc = run_cli(
        "copy", str(src), str(tmp_path / "o.img"), "--chunk-size", "4M", "--data-url", server.url
    )
    line = one_line_error(proc)
    assert proc.returncode == 2
    assert "max_payload of 1048576" in line and "--chunk-size 1044480 or less" in line


@pytest.mark.parametrize("bad", ["a.b", "a b", "*", ">", "x" * 65, ""])
def test_a_transfer_id_with_subject_syntax_is_a_usage_error(src: Path, bad: str) -> None:
    proc = run_cli("send", str(src), "--id", bad)
    assert "invalid transfer id" in one_line_error(proc)
    assert proc.returncode == 2


@pytest.mark.parametrize(
    ("args", "text"),
    [
        (["--window", "1G"], "--window"),
        (["--window", "lots"], "argument --window: 'lots' is not a size"),
        (["--timeout", "-1"], "--timeout"),
        (["--chunk-size", "5000"], "multiple of 4096"),
        (["--size", "5"], "--size applies only to streams"),
    ],
)
def test_out_of_range_options_are_usage_errors_and_write_nothing(
    tmp_path: Path, src: Path, args: list[str], text: str
) -> None:
    proc = run_cli("copy", str(src), str(tmp_path / "o.img"), *args)
    assert text in one_line_error(proc)
    assert proc.returncode == 2
    assert not (tmp_path / "o.img").exists()


def test_stdin_needs_size(tmp_path: Path) -> None:
    proc = run_cli("copy", "-", str(tmp_path / "o.img"), input=b"x" * 100)
    assert "--size" in one_line_error(proc)


def test_stdin_shorter_than_size_fails(tmp_path: Path) -> None:
    proc = run_cli("copy", "-", str(tmp_path / "o.img"), "--size", "2M", input=b"x" * MiB)
    assert "stdin ended after 1048576 bytes but --size says 2097152" in one_line_error(proc)


def test_stdin_longer_than_size_fails(tmp_path: Path) -> None:
    proc = run_cli("copy", "-", str(tmp_path / "o.img"), "--size", "1M", input=b"x" * (MiB + 1))
    assert "more than the 1048576 bytes" in one_line_error(proc)


def test_missing_arguments_are_usage_errors() -> None:
    proc = run_cli("send")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr.decode()
    assert "the following arguments are required" in proc.stderr.decode()


def test_second_receiver_for_the_same_id(tmp_path: Path, start_nats) -> None:  # type: ignore[no-untyped-def]
    server = start_nats()
    nats_url = server.url
    first = start_cli("recv", str(tmp_path / "a.img"), "--id", "dup", "--data-url", nats_url)
    try:
        # The first receiver answers on the open subject once it has subscribed there.
        open_subject = subjects.transfer("dup")[0]
        wait_for(lambda: server.has_subscription(open_subject), "the first receiver", 60)
        proc = run_cli("recv", str(tmp_path / "b.img"), "--id", "dup", "--data-url", nats_url)
        assert "another receiver already serves transfer dup" in one_line_error(proc)
        assert first.poll() is None  # the first one is unharmed
    finally:
        first.terminate()
        first.communicate(timeout=10)


def test_sender_without_receiver_times_out(src: Path, nats_url: str) -> None:
    proc = run_cli("send", str(src), "--id", "lonely", "--data-url", nats_url, "--timeout", "1")
    line = one_line_error(proc)
    assert "no receiver for transfer lonely answered within 1s" in line
    assert "nbd-nats recv" in line


def test_receiver_without_sender_times_out(tmp_path: Path, nats_url: str) -> None:
    proc = run_cli(
        "recv", str(tmp_path / "o.img"), "--id", "lonely", "--data-url", nats_url, "--timeout", "1"
    )
    assert "no sender for transfer lonely appeared" in one_line_error(proc)
    assert not (tmp_path / "o.img").exists()


@contextlib.contextmanager
def mid_transfer(
    tmp_path: Path, nats_url: str, tid: str
) -> Iterator[tuple[subprocess.Popen[bytes], ...]]:
    """A throttled 8-second transfer ``tid`` from qemu-nbd into dst.img, once the receiver
    has written a first part: the qemu-nbd, sender and receiver processes."""
    src = tmp_path / "src.img"
    make_image(src, 64 * MiB, [(0, 64 * MiB)])
    with throttled_nbd(src, tmp_path / "slow.sock", read_bps=8 * MiB) as (nbd, uri):
        recv = start_cli("recv", str(tmp_path / "dst.img"), "--id", tid, "--data-url", nats_url)
        send = start_cli("send", uri, "--id", tid, "--data-url", nats_url)
        wait_for(holds(tmp_path / "dst.img", 4 * MiB), "the first writes", 60)
        yield nbd, send, recv


def test_source_lost_mid_transfer_fails_both_ends(tmp_path: Path, nats_url: str) -> None:
    """qemu-nbd killed while a (throttled) copy runs: sender fails, receiver is told why."""
    with mid_transfer(tmp_path, nats_url, "cut") as (nbd, send, recv):
        nbd.kill()
        _, s_err = send.communicate(timeout=60)
        _, r_err = recv.communicate(timeout=60)
    assert send.returncode == 1 and recv.returncode == 1
    assert "NBD" in s_err.decode()
    assert "the sender gave up" in r_err.decode()
    assert "Traceback" not in s_err.decode() + r_err.decode()


@pytest.mark.parametrize(
    ("sig", "code", "word"), [(2, 130, "interrupted"), (15, 143, "terminated")]
)
def test_signal_cancels_and_tells_the_peer(
    tmp_path: Path, nats_url: str, sig: int, code: int, word: str
) -> None:
    """Ctrl-C or SIGTERM on the receiver: it exits at once and the sender learns why."""
    with mid_transfer(tmp_path, nats_url, "sig") as (_, send, recv):
        recv.send_signal(sig)
        _, r_err = recv.communicate(timeout=30)
        _, s_err = send.communicate(timeout=30)
    assert recv.returncode == code, r_err.decode()
    assert word in r_err.decode()
    assert send.returncode == 1
    assert "peer: transfer cancelled" in s_err.decode()
