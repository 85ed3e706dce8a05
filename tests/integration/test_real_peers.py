"""Real NBD peers with demands of their own: block size constraints (nbdkit's
blocksize-policy filter, qemu-nbd's compress driver), TLS with a pre-shared key, the null
device, and servers that fail, die, stop or are slow. nbdkit's checkwrite filter is the
oracle: it fails any write whose bytes differ from what it serves."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from nbdnats.errors import EndpointError
from tests.cli import one_line_error, run_cli, start_cli
from tests.images import MiB, make_image, sha256_file
from tests.waits import wait_for

# Data that starts and ends inside 64 KiB blocks, and a hole between.
LAYOUT = [(0, 100_000), (MiB + 4096, 300_000), (5 * MiB, 4096), (8 * MiB - 70_000, 70_000)]
# The blocksize-policy filter refusing (EINVAL) anything that is not 64 KiB aligned, or
# longer than 256 KiB: its parameters go after the plugin, as nbdkit wants.
POLICY = "--filter=blocksize-policy"
STRICT_64K = [
    "blocksize-minimum=64K",
    "blocksize-preferred=64K",
    "blocksize-maximum=256K",
    "blocksize-error-policy=error",
]

Nbdkit = Callable[..., tuple[subprocess.Popen[bytes], str]]


@pytest.fixture
def nbdkit(tmp_path: Path) -> Iterator[Nbdkit]:
    """Start ``nbdkit ARGS`` on a fresh unix socket; returns the process and its URI."""
    procs: list[subprocess.Popen[bytes]] = []

    def serve(*args: str, user: str = "") -> tuple[subprocess.Popen[bytes], str]:
        sock = tmp_path / f"nbdkit-{len(procs)}.sock"
        # nbdkit writes its pid file once it listens; the socket file exists a moment
        # earlier (bind before listen), when a connect is still refused.
        pidfile = tmp_path / f"nbdkit-{len(procs)}.pid"
        proc = subprocess.Popen(["nbdkit", "-f", "-P", str(pidfile), "-U", str(sock), *args])
        procs.append(proc)
        wait_for(lambda: pidfile.exists() or proc.poll() is not None, "nbdkit")
        assert proc.poll() is None, f"nbdkit {args} did not start"
        scheme = "nbds+unix" if any(a.startswith("--tls") for a in args) else "nbd+unix"
        return proc, f"{scheme}://{user}/?socket={sock}"

    yield serve
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGCONT)
            p.terminate()
        p.wait(10)


def ok(proc: subprocess.CompletedProcess[bytes]) -> str:
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stderr.decode()


def read_back(uri: str, out: Path) -> str:
    """What an NBD export holds, read by nbd-nats itself into a file; its sha256."""
    ok(run_cli("copy", uri, str(out)))
    return sha256_file(out)


@pytest.fixture
def src(tmp_path: Path) -> tuple[Path, str]:
    path = tmp_path / "src.img"
    return path, make_image(path, 8 * MiB, LAYOUT)


def test_copy_to_target_with_64k_minimum_block_size(tmp_path: Path, src, nbdkit) -> None:
    path, want = src
    _, uri = nbdkit(POLICY, "memory", "8M", *STRICT_64K)
    # Junk first, so the holes must really be zeroed (partly inside 64 KiB blocks).
    junk = tmp_path / "junk.img"
    make_image(junk, 8 * MiB, [(0, 8 * MiB)], seed=9)
    subprocess.run(["nbdcopy", str(junk), uri], check=True)
    ok(run_cli("copy", str(path), uri, "--verify"))
    assert read_back(uri, tmp_path / "back.img") == want


def test_partial_blocks_whose_rest_never_comes_are_read_modify_written(
    tmp_path: Path, src, nbdkit
) -> None:
    """With --target-is-zero the zero frames are not written: the data's partial blocks
    wait for a rest that never comes, then are read, patched and written."""
    path, want = src
    _, uri = nbdkit(POLICY, "memory", "8M", *STRICT_64K)
    ok(run_cli("copy", str(path), uri, "--target-is-zero", "--verify"))
    assert read_back(uri, tmp_path / "back.img") == want


def test_copy_from_source_with_64k_minimum_block_size(tmp_path: Path, src, nbdkit) -> None:
    path, want = src
    _, uri = nbdkit("--readonly", POLICY, "file", str(path), *STRICT_64K)
    out = tmp_path / "out.img"
    ok(run_cli("copy", uri, str(out)))
    assert sha256_file(out) == want
    digest = run_cli("digest", uri)
    assert f"sha256:{want}" in digest.stdout.decode(), digest.stderr.decode()


def test_checkwrite_oracle_behind_64k_block_size(tmp_path: Path, src, nbdkit) -> None:
    """checkwrite turns every write, zeroing and trim into a comparison with what it
    serves: the copy succeeds only if every byte written is the source's."""
    path, _ = src
    _, same = nbdkit(POLICY, "--filter=checkwrite", "file", str(path), *STRICT_64K)
    ok(run_cli("copy", str(path), same))
    # The oracle bites: a different image fails with EIO, and nothing claims success.
    other = tmp_path / "other.img"
    make_image(other, 8 * MiB, LAYOUT, seed=2)
    proc = run_cli("copy", str(other), same)
    line = one_line_error(proc)
    assert "Input/output error" in line and "NBD target" in line
    assert b"copied" not in proc.stdout + proc.stderr


def test_write_error_fails_the_copy(tmp_path: Path, src, nbdkit) -> None:
    """Every write fails with EIO (reads work, so the read-modify-writes get as far as
    their write): a non-zero exit naming the error, never a success."""
    path, _ = src
    _, uri = nbdkit(
        POLICY,
        "--filter=error",
        "memory",
        "8M",
        *STRICT_64K,
        "error-pwrite=EIO",
        "error-pwrite-rate=100%",
    )
    proc = run_cli("copy", str(path), uri)
    line = one_line_error(proc)
    assert proc.returncode == 1
    assert "Input/output error" in line and "NBD target" in line


def test_export_size_not_a_multiple_of_the_minimum_block(tmp_path: Path, nbdkit) -> None:
    """The last 1000 bytes are a partial 64 KiB block: asked for as they are. A server that
    takes them (error policy 'allow') gets every byte; one that refuses them is reported."""
    size = MiB + 1000
    path = tmp_path / "odd.img"
    want = make_image(path, size, [(0, size)])
    lenient = [a for a in STRICT_64K if not a.startswith("blocksize-error")]
    _, uri = nbdkit(POLICY, "memory", str(size), *lenient, "blocksize-error-policy=allow")
    ok(run_cli("copy", str(path), uri))
    assert read_back(uri, tmp_path / "back.img") == want

    _, strict = nbdkit(POLICY, "memory", str(size), *STRICT_64K)
    line = one_line_error(run_cli("copy", str(path), strict))
    assert "not a multiple of its minimum block size 65536" in line
    assert "last 1000 bytes" in line


def test_qemu_nbd_target_with_64k_alignment(tmp_path: Path, src) -> None:
    """qemu-nbd serving a raw file through blkdebug's align=65536: QEMU advertises a
    64 KiB minimum block size, as it does for a compressing or 64K-sector device."""
    path, want = src
    dst = tmp_path / "dst.img"
    make_image(dst, 8 * MiB, [(0, 8 * MiB)], seed=9)
    sock = tmp_path / "q.sock"
    opts = f"driver=blkdebug,align=65536,image.driver=file,image.filename={dst}"
    proc = subprocess.Popen(["qemu-nbd", "-x", "disk", "-k", str(sock), "--image-opts", opts])
    try:
        wait_for(sock.exists, "qemu-nbd")
        ok(run_cli("copy", str(path), f"nbd+unix:///disk?socket={sock}", "--verify"))
    finally:
        proc.terminate()
        proc.wait(10)
    assert sha256_file(dst) == want


def test_qemu_nbd_compress_target(tmp_path: Path, src) -> None:
    """qemu-nbd's compress driver asks for 64 KiB blocks, and each qcow2 cluster can be
    written only once: the parts of a block that frames split are gathered and written
    together, never read-modify-written twice."""
    path, _ = src
    dst = tmp_path / "dst.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(dst), "8M"], check=True)
    sock = tmp_path / "q.sock"
    opts = f"driver=compress,file.driver=qcow2,file.file.driver=file,file.file.filename={dst}"
    proc = subprocess.Popen(["qemu-nbd", "-x", "disk", "-k", str(sock), "--image-opts", opts])
    try:
        wait_for(sock.exists, "qemu-nbd")
        ok(run_cli("copy", str(path), f"nbd+unix:///disk?socket={sock}"))
    finally:
        proc.terminate()
        proc.wait(10)
    subprocess.run(["qemu-img", "compare", "-q", str(path), str(dst)], check=True)


def psk_file(tmp_path: Path, user: str) -> Path:
    keys = tmp_path / "keys.psk"
    keys.write_text(f"{user}:{secrets.token_hex(32)}\n")
    keys.chmod(0o600)
    return keys


def test_tls_psk_copy_both_ways(tmp_path: Path, src, nbdkit) -> None:
    path, want = src
    keys = psk_file(tmp_path, "alice")
    _, uri = nbdkit("--tls=require", f"--tls-psk={keys}", "memory", "8M", user="alice@")
    uri += f"&tls-psk-file={keys}"
    ok(run_cli("copy", str(path), uri))
    assert read_back(uri, tmp_path / "back.img") == want
    assert f"sha256:{want}" in run_cli("digest", uri).stdout.decode()
    # Without the key the server lets nobody in.
    plain = uri.split("&tls-psk-file=")[0]
    assert "cannot connect to NBD source" in one_line_error(run_cli("digest", plain))


def test_an_unknown_export_lists_at_most_ten_of_the_servers_exports(tmp_path: Path, nbdkit) -> None:
    names = [f"disk-{i:02d}" for i in range(12)]
    strict = ["exportname-strict=true", "exportname-list=explicit"]
    _, base = nbdkit(
        "--filter=exportname", "memory", "1M", *strict, *(f"exportname={n}" for n in names)
    )
    uri = base.replace("/?socket=", "/disk-99?socket=")
    proc = run_cli("copy", uri, str(tmp_path / "out.img"))
    shown = ", ".join(names[:10])
    assert one_line_error(proc).endswith(
        f"server has no export named 'disk-99': No such file or directory; "
        f"the server's exports are {shown}, … (2 more)"
    )
    assert proc.returncode == 1
    # A server that will not list them: the line says what to check.
    _, base = nbdkit(
        "--filter=exportname",
        "memory",
        "1M",
        "exportname-strict=true",
        "exportname-list=error",
        "exportname=a",
    )
    uri = base.replace("/?socket=", "/b?socket=")
    line = one_line_error(run_cli("digest", uri))
    assert line.endswith(
        "no export named 'b': No such file or directory; check the export name (the URI's path)"
    )


def test_tls_mismatches_say_which_side_wants_what(tmp_path: Path, nbdkit) -> None:
    keys = psk_file(tmp_path, "alice")
    _, tls_uri = nbdkit("--tls=require", f"--tls-psk={keys}", "memory", "1M", user="alice@")
    plain = tls_uri.replace("nbds+unix://alice@", "nbd+unix://")
    line = one_line_error(run_cli("digest", plain))
    assert line.endswith(
        "server requires TLS encryption first: Operation not supported; the server requires "
        "TLS: use nbds:// or nbds+unix:// with tls-psk-file= or tls-certificates="
    )
    other = tmp_path / "other.psk"
    other.write_text(f"alice:{secrets.token_hex(32)}\n")
    other.chmod(0o600)
    for wrong in (
        f"{tls_uri}&tls-psk-file={other}",
        f"{tls_uri.replace('alice@', 'bob@')}&tls-psk-file={keys}",
    ):
        line = one_line_error(run_cli("digest", wrong))
        assert line.endswith(
            "; check the URI's TLS parameters (tls-psk-file=, the user name, "
            "tls-certificates=) against the server's"
        ), line
    _, no_tls = nbdkit("memory", "1M")
    line = one_line_error(
        run_cli(
            "digest", no_tls.replace("nbd+unix://", "nbds+unix://alice@") + f"&tls-psk-file={keys}"
        )
    )
    assert line.endswith(
        "; the server does not offer TLS: use nbd:// or nbd+unix://, or start the server with TLS"
    )


def test_tls_psk_file_only_where_the_local_user_named_it(tmp_path: Path, nbdkit) -> None:
    """The building blocks the agent uses for endpoints from ctl messages do not let a URI
    read a local file unless asked; the local user's entry points do."""
    keys = psk_file(tmp_path, "alice")
    _, uri = nbdkit("--tls=require", f"--tls-psk={keys}", "memory", "1M", user="alice@")
    uri += f"&tls-psk-file={keys}"
    from nbdnats.transfer import image_digest

    with pytest.raises(EndpointError, match=r"tls-psk-file.*never one from a ctl message"):
        asyncio.run(image_digest(uri))
    digest, size = asyncio.run(image_digest(uri, allow_local_file=True))
    assert size == MiB and digest.startswith("sha256:")


def test_dev_null_target_discards(src) -> None:
    path, _ = src
    ok(run_cli("copy", str(path), "/dev/null"))
    proc = run_cli("copy", str(path), "/dev/null", "--verify")
    assert proc.returncode != 0
    assert "cannot be read back" in proc.stderr.decode()


def test_source_server_killed_mid_copy(tmp_path: Path, nbdkit) -> None:
    path = tmp_path / "big.img"
    make_image(path, 48 * MiB, [(0, 48 * MiB)])
    server, uri = nbdkit("--filter=delay", "file", str(path), "delay-read=1")
    out = tmp_path / "out.img"
    proc = start_cli("copy", uri, str(out))
    wait_for(out.exists, "the copy's start", timeout=30)
    server.kill()
    start = time.monotonic()
    _, err = proc.communicate(timeout=60)
    assert time.monotonic() - start < 30
    assert proc.returncode == 1
    assert f"NBD source {uri}" in err.decode()


def test_stopped_source_server_times_out(tmp_path: Path, nbdkit) -> None:
    """A source that stops answering (SIGSTOP: no EOF, no error) is given up on after
    --timeout, instead of being waited for forever."""
    path = tmp_path / "big.img"
    make_image(path, 48 * MiB, [(0, 48 * MiB)])
    server, uri = nbdkit("--filter=delay", "file", str(path), "delay-read=1")
    out = tmp_path / "out.img"
    proc = start_cli("copy", uri, str(out), "--timeout", "5")
    wait_for(out.exists, "the copy's start", timeout=30)
    os.kill(server.pid, signal.SIGSTOP)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert f"NBD source {uri}" in err.decode() and "answered none" in err.decode()


def test_source_server_stopped_before_the_handshake_times_out(tmp_path: Path, nbdkit) -> None:
    """The socket accepts (the kernel's backlog) but nobody speaks NBD: --timeout ends it."""
    server, uri = nbdkit("memory", "1M")
    os.kill(server.pid, signal.SIGSTOP)
    start = time.monotonic()
    proc = run_cli("copy", uri, str(tmp_path / "out.img"), "--timeout", "4", timeout=60)
    assert time.monotonic() - start < 30
    line = one_line_error(proc)
    assert f"cannot connect to NBD source {uri}" in line
    assert "did not finish the NBD handshake in 4 s" in line


def test_slow_source_is_not_a_timeout(tmp_path: Path, src, nbdkit) -> None:
    """Each read takes 2 s (nbdkit's delay filter): slow, not dead, with default settings."""
    path, want = src
    _, uri = nbdkit("--readonly", "--filter=delay", "file", str(path), "delay-read=2")
    out = tmp_path / "out.img"
    ok(run_cli("copy", uri, str(out)))
    assert sha256_file(out) == want
