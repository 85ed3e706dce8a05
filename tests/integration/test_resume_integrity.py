"""A resumed transfer never says "verified" for a target that differs from the source.

The receiver is killed for real (SIGKILL) mid-transfer; the target is then changed behind
its back, as an operator or another program might, and the transfer is resumed.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

from tests.cli import run_cli, start_cli
from tests.images import MiB, make_image, sha256_file, throttled_nbd
from tests.waits import wait_for

SIZE = 96 * MiB
RATE = 16 * MiB  # a throttled source: about six seconds, so the receiver can die mid-way


def finish(
    proc: subprocess.Popen[bytes], timeout: float = 180
) -> tuple[int, dict[str, object], str]:
    out, err = proc.communicate(timeout=timeout)
    text = out.decode().strip()
    report = json.loads(text.splitlines()[-1]) if text else {}
    return proc.returncode, report, err.decode()


def journal(state: Path, transfer_id: str) -> Path:
    return state / "journals" / f"recv-{transfer_id}.journal"


def has_checkpoint(path: Path) -> bool:
    """A checkpoint record follows the header (the header alone is a few hundred bytes)."""
    return path.exists() and path.stat().st_size > 1024


@contextlib.contextmanager
def interrupted(
    tmp_path: Path, state: Path, nats_url: str, tid: str
) -> Iterator[tuple[subprocess.Popen[bytes], str, Path, tuple[str, ...]]]:
    """A throttled transfer whose receiver is SIGKILLed after a checkpoint; the sender runs
    on. Yields the sender, the source's sha256, the target and the common options."""
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    want = make_image(src, SIZE, [(0, SIZE)])
    common = ("--id", tid, "--data-url", nats_url, "--json", "--verify")
    with throttled_nbd(src, tmp_path / "src.sock", read_bps=RATE) as (_, uri):
        recv = start_cli("recv", str(dst), *common)
        send = start_cli("send", uri, *common)
        wait_for(lambda: has_checkpoint(journal(state, tid)), "a journal checkpoint", timeout=60)
        recv.send_signal(signal.SIGKILL)
        recv.communicate()
        yield send, want, dst, common


def test_resume_after_the_target_was_overwritten_sends_the_changed_part_again(
    tmp_path: Path, state_dir: Path, nats_url: str
) -> None:
    with interrupted(tmp_path, state_dir, nats_url, "over") as (send, want, dst, common):
        with dst.open("r+b") as f:  # someone writes into what the journal says is written
            f.seek(MiB)
            f.write(b"\xff" * MiB)
        resumed = start_cli("recv", str(dst), *common, "--resume")
        (s_rc, sent, s_err), (r_rc, got, r_err) = finish(send), finish(resumed)
    assert (s_rc, r_rc) == (0, 0), (s_err, r_err)
    assert sha256_file(dst) == want
    assert got["verified"] is True and sent["digest"] == got["digest"]
    # The receiver's digest of the prefix comes from re-reading it: the repaired target's.
    digest = run_cli("digest", str(tmp_path / "src.img"), "--algo", "blk64k-xxh3-128")
    assert got["digest"] == digest.stdout.decode().split()[0]


def test_resume_after_the_target_was_emptied_writes_it_again(
    tmp_path: Path, state_dir: Path, nats_url: str
) -> None:
    """Truncated to nothing (same file): everything the journal claimed is gone."""
    with interrupted(tmp_path, state_dir, nats_url, "emptied") as (send, want, dst, common):
        os.truncate(dst, 0)
        resumed = start_cli("recv", str(dst), *common, "--resume")
        (s_rc, _, s_err), (r_rc, got, r_err) = finish(send), finish(resumed)
    assert (s_rc, r_rc) == (0, 0), (s_err, r_err)
    assert sha256_file(dst) == want and got["verified"] is True


def test_resume_into_a_replaced_target_is_refused(
    tmp_path: Path, state_dir: Path, nats_url: str
) -> None:
    """Deleted and created anew: not the file the journal describes; nothing is written."""
    with interrupted(tmp_path, state_dir, nats_url, "replaced") as (send, _, dst, common):
        dst.unlink()
        dst.write_bytes(b"")
        resumed = start_cli("recv", str(dst), *common, "--resume")
        r_rc, _, r_err = finish(resumed)
        send.kill()
        send.communicate()
    assert r_rc == 2
    assert "was replaced or recreated" in r_err and "journals --discard" in r_err
    assert len(r_err.strip().splitlines()) == 1
    assert dst.stat().st_size == 0


def test_verify_after_resume_rereads_the_whole_target(
    tmp_path: Path, state_dir: Path, nats_url: str
) -> None:
    """A byte of the part written before the crash is changed after the resumed receiver
    has checked it: --verify at the end still finds it, and nobody reports success."""
    path = journal(state_dir, "late")
    with interrupted(tmp_path, state_dir, nats_url, "late") as (send, _, dst, common):
        before = path.stat().st_size
        resumed = start_cli("recv", str(dst), *common, "--resume")
        # The resumed receiver has checked the target and accepted the sender once it
        # records the sender's next key in the journal.
        wait_for(lambda: path.stat().st_size != before, "the resumed receiver to continue", 60)
        with dst.open("r+b") as f:
            f.write(b"\x01")
        (s_rc, _, s_err), (r_rc, _, r_err) = finish(send), finish(resumed)
    assert s_rc == 1 and r_rc == 1
    assert "verify: the target differs" in r_err and "verify: the target differs" in s_err


def test_a_failure_that_cannot_be_resumed_leaves_no_journal(
    tmp_path: Path, state_dir: Path
) -> None:
    """Short stdin: a stream cannot be read again from its middle, so no journal stays."""
    dst = tmp_path / "dst.img"
    proc = run_cli("copy", "-", str(dst), "--size", "8M", input=os.urandom(4 * MiB))
    assert proc.returncode == 1, proc.stderr.decode()
    assert not list((state_dir / "journals").glob("*")), "journal left behind"
    assert "--resume" not in proc.stderr.decode()


def test_a_receiver_whose_sender_vanished_keeps_its_journal_and_says_how_to_resume(
    tmp_path: Path, state_dir: Path, nats_url: str
) -> None:
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    make_image(src, SIZE, [(0, SIZE)])
    common = ("--id", "gone", "--data-url", nats_url, "--timeout", "5")
    with throttled_nbd(src, tmp_path / "src.sock", read_bps=RATE) as (_, uri):
        recv = start_cli("recv", str(dst), *common)
        send = start_cli("send", uri, *common)
        wait_for(lambda: has_checkpoint(journal(state_dir, "gone")), "a checkpoint", timeout=60)
        send.send_signal(signal.SIGKILL)
        send.communicate()
        rc, _, err = finish(recv)
    assert rc == 1
    assert "run the same recv with --resume" in err
    assert journal(state_dir, "gone").exists()
