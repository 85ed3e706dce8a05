"""``nbd-nats journals``: what interrupted transfers left, and which ends leave nothing.

Real nats-server, real ``send``/``recv`` processes, a throttled real qemu-nbd source so a
transfer can be cut half-way, the way an operator's would be.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

import nbdnats
from tests.cli import one_line_error, run_cli, start_cli
from tests.images import MiB, make_image, throttled_nbd
from tests.waits import until, wait_for

SIZE = 96 * MiB
RATE = 4 * MiB  # about 24 s: time to look at a running transfer (CLI starts are slow) and cut it


def journal(state: Path, tid: str) -> Path:
    return state / "journals" / f"recv-{tid}.journal"


def has_checkpoint(path: Path) -> bool:
    """A checkpoint record follows the header (the header alone is a few hundred bytes)."""
    return path.exists() and path.stat().st_size > 1024


def listed(state: Path) -> list[dict[str, object]]:
    proc = run_cli("journals", "--state-dir", str(state), "--json")
    assert proc.returncode == 0, proc.stderr.decode()
    rows = json.loads(proc.stdout)
    assert isinstance(rows, list)
    return rows


@contextlib.contextmanager
def running(
    tmp_path: Path, nats_url: str, tid: str, *extra: str
) -> Iterator[tuple[subprocess.Popen[bytes], subprocess.Popen[bytes], Path, tuple[str, ...]]]:
    """A throttled send/recv past the receiver's first checkpoint: sender, receiver, target
    and the options both were given."""
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    make_image(src, SIZE, [(0, SIZE)])
    common = ("--id", tid, "--data-url", nats_url, *extra)
    with throttled_nbd(src, tmp_path / "src.sock", read_bps=RATE) as (_, uri):
        recv = start_cli("recv", str(dst), *common)
        send = start_cli("send", uri, *common)
        state = tmp_path / "state"
        wait_for(lambda: has_checkpoint(journal(state, tid)), "a journal checkpoint", 60)
        yield send, recv, dst, common


def test_an_interrupted_transfer_is_listed_then_discarded(
    tmp_path: Path, state_dir: Path, nats_url: str
) -> None:
    with running(tmp_path, nats_url, "cut1") as (send, recv, dst, common):
        # While its receiver runs, the journal is listed as running and not discarded.
        rows = listed(state_dir)
        mine = [r for r in rows if r["id"] == "cut1" and r["role"] == "recv"]
        assert len(mine) == 1 and mine[0]["running"] is True, rows
        busy = run_cli("journals", "--discard", "cut1")
        assert busy.returncode == 1 and "still running" in one_line_error(busy)
        recv.send_signal(signal.SIGTERM)  # an interruption: resumable
        _, r_err = recv.communicate(timeout=60)
        _, s_err = send.communicate(timeout=60)
    assert recv.returncode == 143, r_err.decode()
    assert send.returncode == 1 and "peer: transfer cancelled" in s_err.decode()

    rows = listed(state_dir)
    by_role = {r["role"]: r for r in rows if r["id"] == "cut1"}
    rx = by_role["recv"]
    assert rx["target"] == str(dst) and rx["size"] == SIZE and rx["running"] is False
    assert 0 < rx["done_bytes"] < SIZE  # type: ignore[operator]
    assert rx["error"] is None and 0 <= rx["age_s"] < 120  # type: ignore[operator]
    assert "send" in by_role  # the sender kept its key for send --resume
    table = run_cli("journals")
    assert table.returncode == 0
    line = next(
        x for x in table.stdout.decode().splitlines() if x.startswith("cut1 ") and "recv" in x
    )
    assert str(dst) in line and "%" in line, table.stdout.decode()

    gone = run_cli("journals", "--discard", "cut1")
    assert gone.returncode == 0, gone.stderr.decode()
    assert "recv-cut1.journal" in gone.stderr.decode() and "send-cut1.key" in gone.stderr.decode()
    assert listed(state_dir) == []
    resumed = run_cli("recv", str(dst), *common, "--resume")
    assert resumed.returncode == 2 and "nothing to resume" in one_line_error(resumed)


def test_discard_of_an_unknown_or_bad_id_is_one_line_and_touches_nothing(
    tmp_path: Path, state_dir: Path
) -> None:
    (state_dir / "journals").mkdir(parents=True)
    outside = tmp_path / "x"
    outside.write_text("keep me")
    (state_dir / "journals" / "recv-..").mkdir()  # nothing a bad id names is reached
    unknown = run_cli("journals", "--discard", "nope", "--state-dir", str(state_dir))
    assert unknown.returncode == 2
    assert str(state_dir) in one_line_error(unknown) and "nope" in one_line_error(unknown)
    for bad in ("../x", "-rf", "a/b", "..", "x" * 65):
        proc = run_cli("journals", f"--discard={bad}", "--state-dir", str(state_dir))
        assert proc.returncode == 2, (bad, proc.stderr.decode())
        assert "invalid transfer id" in one_line_error(proc), bad
    assert outside.read_text() == "keep me"


def test_a_damaged_or_foreign_file_is_listed_as_unreadable(state_dir: Path) -> None:
    folder = state_dir / "journals"
    folder.mkdir(parents=True)
    (folder / "recv-junk.journal").write_bytes(b"\x00garbage" * 50)
    (folder / "notes.txt").write_text("not ours")
    (folder / "send-k1.key").write_text("zz 1\n")  # a damaged sender key
    rows = {r["file"]: r for r in listed(state_dir)}
    assert set(rows) == {"recv-junk.journal", "notes.txt", "send-k1.key"}
    assert all(r["error"] for r in rows.values()), rows
    assert rows["recv-junk.journal"]["id"] == "junk"
    table = run_cli("journals")
    out = table.stdout.decode()
    assert table.returncode == 0 and "unreadable" in out
    assert "notes.txt" in out and "recv-junk.journal" in out and "damaged" in out


def test_no_journals_says_so_naming_the_state_dir(state_dir: Path) -> None:
    proc = run_cli("journals")
    assert proc.returncode == 0 and proc.stdout == b""
    assert str(state_dir) in proc.stderr.decode()
    assert listed(state_dir) == []


def test_a_failure_after_resume_that_cannot_be_repaired_leaves_no_journal(
    tmp_path: Path, state_dir: Path, nats_url: str
) -> None:
    """The target changes under a resumed receiver: --verify fails at both ends
    (integrity), and neither the journal nor the sender's key is left to resume."""
    path = journal(state_dir, "late")
    with running(tmp_path, nats_url, "late", "--verify") as (send, recv, dst, common):
        recv.send_signal(signal.SIGKILL)
        recv.communicate()
        before = path.stat().st_size
        resumed = start_cli("recv", str(dst), *common, "--resume")
        wait_for(lambda: path.stat().st_size != before, "the resumed receiver to continue", 60)
        with dst.open("r+b") as f:
            f.write(b"\x01")
        _, s_err = send.communicate(timeout=180)
        _, r_err = resumed.communicate(timeout=180)
    assert send.returncode == 1 and resumed.returncode == 1, s_err.decode()
    assert "verify: the target differs" in r_err.decode()
    assert listed(state_dir) == []


@pytest.mark.parametrize("end", ["recv", "send"])
def test_a_transfer_cancelled_for_good_leaves_nothing_to_resume(
    tmp_path: Path, state_dir: Path, nats_url: str, end: str
) -> None:
    """``TransferHandle.cancel()`` at either end (what ``ctl cancel`` does): both ends fail
    ``TransferAbandoned``; the receiver's journal and the sender's key are gone."""
    src = tmp_path / "src.img"
    make_image(src, SIZE, [(0, SIZE)])
    state = str(state_dir)

    async def main() -> list[BaseException | None]:
        planes = await nbdnats.Planes.connect(nats_url)
        try:
            with throttled_nbd(src, tmp_path / "src.sock", read_bps=RATE) as (_, uri):
                recv = await nbdnats.start_recv(
                    str(tmp_path / "dst.img"), transfer_id="doomed", planes=planes, state_dir=state
                )
                send = await nbdnats.start_send(
                    uri, transfer_id="doomed", planes=planes, state_dir=state
                )
                waits = [asyncio.create_task(h.wait()) for h in (recv, send)]
                await until(
                    lambda: has_checkpoint(journal(state_dir, "doomed")), "a checkpoint", 60
                )
                (recv if end == "recv" else send).cancel()
                results = await asyncio.gather(*waits, return_exceptions=True)
                return [r if isinstance(r, BaseException) else None for r in results]
        finally:
            await planes.close()

    r_err, s_err = asyncio.run(main())
    assert isinstance(r_err, nbdnats.TransferAbandoned), r_err
    assert isinstance(s_err, nbdnats.TransferAbandoned), s_err
    assert "cancelled for good" in str(r_err)
    assert listed(state_dir) == []
