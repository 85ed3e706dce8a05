"""What the commands say while they run and when they fail: the waiting line on a terminal,
the progress bar and ctl's progress line (percent, rate, ETA), ``--progress=FD`` lines as
nbdcopy writes them, ``TransferHandle.progress()`` from handshake to 100 %, and the JSON line
a ``--json`` run prints on failure."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import re
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import nbdnats
from tests.cli import NBD_NATS, cli_env, one_line_error, run_cli, start_cli
from tests.ctl import AgentProc
from tests.images import MiB, make_image, sha256_file, slow_disk
from tests.nats_server import NatsServer
from tests.waits import until

WAITING = re.compile(r"waiting for the receiver of lonely on (\S+), (\d+) s left")


def run_on_terminal(
    *args: str, timeout: float = 120, pass_fds: tuple[int, ...] = ()
) -> tuple[int, str, bytes]:
    """``nbd-nats ARGS`` with stderr on a pseudo-terminal (as a user's shell gives it) and
    stdout on a pipe: the exit code, what the terminal showed, stdout."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [NBD_NATS, *args],
        stdout=subprocess.PIPE,
        stderr=slave,
        env=cli_env(),
        pass_fds=pass_fds,
    )
    os.close(slave)
    shown = bytearray()

    def read() -> None:
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: every writer of the terminal is gone
                return
            if not chunk:
                return
            shown.extend(chunk)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        reader.join(timeout)
        os.close(master)
    return proc.returncode, shown.decode(errors="replace"), out


def screen(shown: str) -> list[str]:
    """The lines a terminal ends up showing: each line as its last redraw left it."""
    lines = shown.replace("\r\n", "\n").split("\n")
    return [line.rsplit("\r", 1)[-1].rstrip() for line in lines if line.strip()]


def test_a_sender_without_receiver_says_what_it_waits_for_on_a_terminal(
    start_nats: Callable[..., NatsServer], tmp_path: Path
) -> None:
    """Before: nothing at all until the timeout's error."""
    server = start_nats()
    src = tmp_path / "src.img"
    make_image(src, MiB, [(0, MiB)])
    url = server.url.replace("nats://", "nats://alice:hunter2@")
    rc, shown, _ = run_on_terminal(
        "send", str(src), "--id", "lonely", "--data-url", url, "--timeout", "4"
    )
    assert rc == 1, shown
    assert "hunter2" not in shown
    found = WAITING.findall(shown)
    assert found, shown
    assert {where for where, _ in found} == {server.url.replace("nats://", "nats://alice:***@")}
    left = [int(n) for _, n in found]
    assert left == sorted(left, reverse=True) and len(set(left)) >= 2, left
    assert left[0] <= 4
    assert "timeout" in shown.splitlines()[-1].lower() or "did not" in shown, shown


def test_no_waiting_line_when_stderr_is_not_a_terminal(
    start_nats: Callable[..., NatsServer], tmp_path: Path
) -> None:
    server = start_nats()
    src = tmp_path / "src.img"
    make_image(src, MiB, [(0, MiB)])
    done = run_cli("send", str(src), "--id", "lonely", "--data-url", server.url, "--timeout", "2")
    assert "waiting" not in one_line_error(done)
    assert done.returncode == 1 and done.stdout == b""


def test_json_failure_is_one_parsable_line_with_code_and_id(
    start_nats: Callable[..., NatsServer], tmp_path: Path
) -> None:
    """Before: with --json a failure printed nothing on stdout."""
    server = start_nats()
    src = tmp_path / "src.img"
    make_image(src, MiB, [(0, MiB)])
    done = run_cli(
        "send", str(src), "--id", "lonely", "--data-url", server.url, "--timeout", "2", "--json"
    )
    line = one_line_error(done)
    assert done.returncode == 1
    doc = json.loads(done.stdout)
    assert doc == {
        "error": line.removeprefix("nbd-nats: error: "),
        "code": "timeout",
        "id": "lonely",
    }

    # Bad usage the parser finds, and bad usage found once parsed: exit 2, code "usage".
    for argv in (
        ["send", "--id", "noSrc", "--json"],
        ["send", str(src), "--id", "noSrc", "--json", "--creds", str(tmp_path / "none")],
    ):
        bad = run_cli(*argv)
        line = one_line_error(bad)
        assert bad.returncode == 2
        doc = json.loads(bad.stdout)
        assert doc == {
            "error": line.removeprefix("nbd-nats: error: "),
            "code": "usage",
            "id": "noSrc",
        }
    # copy's own random id is named too; without --json stdout stays empty.
    bad = run_cli("copy", str(tmp_path / "missing.img"), str(tmp_path / "d.img"), "--json")
    doc = json.loads(bad.stdout)
    assert bad.returncode == 1 and doc["code"] == "endpoint" and doc["id"], doc
    bad = run_cli("copy", str(tmp_path / "missing.img"), str(tmp_path / "d.img"))
    assert bad.returncode == 1 and bad.stdout == b""


def test_ctl_json_failure_names_the_transfer(start_nats: Callable[..., NatsServer]) -> None:
    url = start_nats(jetstream=True).url
    done = run_cli("ctl", "--ctl-url", url, "--json", "copy", "nowhere:/x", "b:/y", "--id", "c9")
    line = one_line_error(done)
    doc = json.loads(done.stdout)
    assert doc["id"] == "c9" and doc["error"] == line.removeprefix("nbd-nats: error: ")
    assert doc["code"] and doc["code"] != "error", doc


def test_progress_fd_lines_grow_to_100(tmp_path: Path) -> None:
    """``--progress=FD``: ``N/100`` lines as nbdcopy writes them, growing, ending at 100."""
    dst = tmp_path / "dst.img"
    with slow_disk(tmp_path / "slow.raw", 8 * MiB, 4 * MiB) as (uri, digest):
        r, w = os.pipe()
        try:
            proc = start_cli("copy", uri, str(dst), f"--progress={w}", pass_fds=(w,))
        finally:
            os.close(w)
        with os.fdopen(r) as lines:
            text = lines.read()
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()
    assert sha256_file(dst) == digest
    assert re.fullmatch(r"(\d+/100\n)+", text), text
    pcts = [int(x.split("/")[0]) for x in text.splitlines()]
    assert pcts == sorted(set(pcts)) and pcts[-1] == 100 and len(pcts) >= 3, pcts


def test_progress_fd_must_be_open_for_writing(tmp_path: Path) -> None:
    src = tmp_path / "src.img"
    make_image(src, MiB, [(0, MiB)])
    for fd, said in (("97", "not open"), ("x", "not a file descriptor"), ("0", "reading only")):
        with open(os.devnull) as stdin:
            done = subprocess.run(
                [NBD_NATS, "copy", str(src), str(tmp_path / "d.img"), f"--progress={fd}"],
                stdin=stdin,
                capture_output=True,
                env=cli_env(),
            )
        assert done.returncode == 2
        line = one_line_error(done)
        assert "--progress=FD" in line and said in line, line
    # A bare --progress takes no value: the positional after it stays one.
    done = run_cli("copy", "--progress", str(src), str(tmp_path / "d.img"))
    assert done.returncode == 0, done.stderr.decode()
    assert "100.0%" in done.stderr.decode()  # drawn though stderr is a pipe


def test_bar_and_summary_use_the_same_units(tmp_path: Path) -> None:
    src = tmp_path / "src.img"
    make_image(src, 8 * MiB, [(0, 8 * MiB)])
    rc, shown, _ = run_on_terminal("copy", str(src), str(tmp_path / "d.img"), "--verify")
    assert rc == 0, shown
    bar, summary = screen(shown)[-2:]
    assert re.search(r"100\.0%  8\.0 MiB / 8\.0 MiB  [\d.]+ MB/s  ETA 0:00", bar), bar
    assert re.search(
        r"copied 8\.0 MiB .* [\d.]+ MB/s, blk64k-xxh3-128:[0-9a-f]{32}, verified$", summary
    ), summary


def test_ctl_copy_shows_percent_rate_eta_and_verified(
    start_nats: Callable[..., NatsServer],
    start_agent: Callable[..., AgentProc],
    tmp_path: Path,
) -> None:
    """Before: bytes per end only, and no "verified" in the summary of a --verify copy."""
    url = start_nats(jetstream=True).url
    with slow_disk(tmp_path / "slow.raw", 12 * MiB, 4 * MiB) as (uri, digest):
        start_agent("a", url, "--allow", str(tmp_path))
        start_agent("b", url, "--allow", str(tmp_path))
        r, w = os.pipe()
        try:
            rc, shown, _ = run_on_terminal(
                "ctl",
                "--ctl-url",
                url,
                "copy",
                f"a:{uri}",
                f"b:{tmp_path}/d.raw",
                "--verify",
                f"--progress={w}",
                "--progress",
                pass_fds=(w,),
            )
        finally:
            os.close(w)
        with os.fdopen(r) as lines:
            percents = [int(x.split("/")[0]) for x in lines.read().splitlines()]
    assert rc == 0, shown
    assert sha256_file(tmp_path / "d.raw") == digest
    assert re.search(
        r"\d+\.\d%  [\d.]+ \w?i?B / 12\.0 MiB  [\d.]+ MB/s  ETA \d+:\d\d  a -> b", shown
    ), shown
    summary = screen(shown)[-1]
    assert summary.startswith("copied ") and summary.endswith(", verified"), summary
    assert re.search(r"[\d.]+ MB/s", summary), summary
    # --progress=FD: the receiver's percent as N/100 lines, growing to 100.
    assert percents == sorted(set(percents)) and percents[-1] == 100, percents


def test_progress_starts_at_the_handshake_and_ends_at_100(tmp_path: Path) -> None:
    """Before: a receiver's first samples said size 0 (no sender yet), and the last one
    could stop short of the end."""
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    want = make_image(src, 6 * MiB, [(0, 6 * MiB)])

    async def main() -> tuple[list[nbdnats.TransferStats], list[nbdnats.TransferStats]]:
        from nbdnats.embedded import EmbeddedServer

        async with EmbeddedServer() as url:
            planes = await nbdnats.Planes.connect(url)
            try:
                recv = await nbdnats.start_recv(str(dst), transfer_id="p2", planes=planes)
                # Counted: progress() looks at the receiver while it waits for its sender.
                looks: list[str] = []
                stats = recv.stats

                def counted() -> nbdnats.TransferStats:
                    s = stats()
                    looks.append(s.state)
                    return s

                recv.stats = counted  # type: ignore[method-assign]
                got: list[nbdnats.TransferStats] = []
                watching = asyncio.ensure_future(_collect(recv, got))
                await until(lambda: looks.count("waiting") >= 3, "the receiver's samples")
                send = await nbdnats.start_send(str(src), transfer_id="p2", planes=planes)
                sent = [s async for s in send.progress(interval=0.05)]
                await send.wait()
                await recv.wait()
                await watching
                return got, sent
            finally:
                await planes.close()

    got, sent = asyncio.run(main())
    assert sha256_file(dst) == want
    for samples in (got, sent):
        assert samples, samples
        assert all(s.size == 6 * MiB for s in samples), [(s.state, s.size) for s in samples]
        assert samples[-1].done_bytes == samples[-1].size and samples[-1].state == "done"


async def _collect(handle: nbdnats.TransferHandle, into: list[nbdnats.TransferStats]) -> None:
    async for s in handle.progress(interval=0.05):
        into.append(s)


def test_migrate_and_digest_json_failures(tmp_path: Path) -> None:
    """Every command that takes --json says its failure as JSON too."""
    gone = str(tmp_path / "gone.sock")
    for argv, code, ident, status in (
        (
            ["migrate", "--src-qmp", gone, "--dst-qmp", gone, "--direct", "--id", "m1"],
            "usage",
            "m1",
            2,
        ),
        (["digest", str(tmp_path / "gone.img")], "endpoint", None, 1),
    ):
        done = run_cli(*argv, "--json")
        line = one_line_error(done)
        assert done.returncode == status
        doc = json.loads(done.stdout)
        assert doc == {"error": line.removeprefix("nbd-nats: error: "), "code": code, "id": ident}
    # Without --id, migrate names the random id it chose.
    done = run_cli("migrate", "--src-qmp", gone, "--dst-qmp", gone, "--direct", "--json")
    one_line_error(done)
    assert re.fullmatch(r"[A-Za-z0-9_-]{8,64}", json.loads(done.stdout)["id"] or ""), done.stdout


def test_a_receiver_without_sender_says_so_too(
    start_nats: Callable[..., NatsServer], tmp_path: Path
) -> None:
    server = start_nats()
    rc, shown, _ = run_on_terminal(
        "recv", str(tmp_path / "d.img"), "--id", "alone", "--data-url", server.url, "--timeout", "3"
    )
    assert rc == 1, shown
    found = re.findall(
        rf"waiting for the sender of alone on {re.escape(server.url)}, (\d+) s left", shown
    )
    assert found and int(found[0]) <= 3, shown
