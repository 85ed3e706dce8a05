"""No byte lost or wrong under drops, corruption and crashes.

Drops and corruption come from the core's test-only fault injector (``NBDNATS_FAULTS``):
real NATS loses messages only in situations a test cannot make happen on demand, and never
damages them. Crashes are real SIGKILLs.
"""

from __future__ import annotations

import contextlib
import re
import signal
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

from tests.cli import finish_json, run_cli, start_cli
from tests.images import MiB, holds, make_image, sha256_file, throttled_nbd
from tests.waits import wait_for

CHUNK = "256K"


def content_digest(path: Path) -> str:
    """What a transfer of the image at ``path`` must report, computed without one."""
    proc = run_cli("digest", str(path), "--algo", "blk64k-xxh3-128")
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout.decode().split()[0]


def transfer(
    tmp_path: Path,
    nats_url: str,
    *,
    size: int = 64 * MiB,
    send_faults: str = "",
    recv_faults: str = "",
    extra: tuple[str, ...] = (),
) -> tuple[dict[str, object], dict[str, object], str, Path]:
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    want = make_image(src, size, [(0, size // 2), (size // 2 + MiB, size // 4)])
    common = ("--id", "rel", "--data-url", nats_url, "--json", *extra)
    recv = start_cli("recv", str(dst), *common, env={"NBDNATS_FAULTS": recv_faults})
    send = start_cli(
        "send", str(src), *common, "--chunk-size", CHUNK, env={"NBDNATS_FAULTS": send_faults}
    )
    return finish_json(send), finish_json(recv), want, dst


def test_dropped_chunks_are_retransmitted(tmp_path: Path, nats_url: str) -> None:
    sent, got, want, dst = transfer(tmp_path, nats_url, send_faults="drop_chunk=0.01,seed=3")
    assert sha256_file(dst) == want
    assert sent["digest"] == got["digest"]
    assert int(sent["retransmits"]) > 0  # type: ignore[call-overload]


def test_dropped_acks_lose_nothing(tmp_path: Path, nats_url: str) -> None:
    sent, got, want, dst = transfer(tmp_path, nats_url, recv_faults="drop_ack=0.2,seed=5")
    assert sha256_file(dst) == want
    assert sent["digest"] == got["digest"]


def test_drops_both_ways_and_corrupt_chunks_still_deliver_the_image(
    tmp_path: Path, nats_url: str
) -> None:
    sent, got, want, dst = transfer(
        tmp_path,
        nats_url,
        send_faults="drop_chunk=0.02,corrupt_chunk=0.02,seed=11",
        recv_faults="drop_ack=0.05,seed=12",
    )
    assert sha256_file(dst) == want
    assert sent["digest"] == got["digest"]
    assert int(got["corrupt_frames"]) > 0  # type: ignore[call-overload]


def test_a_chunk_damaged_every_time_aborts_naming_its_offset(tmp_path: Path, nats_url: str) -> None:
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    make_image(src, 4 * MiB, [(0, 4 * MiB)])
    common = ("--id", "bad", "--data-url", nats_url)
    recv = start_cli("recv", str(dst), *common)
    send = start_cli("send", str(src), *common, env={"NBDNATS_FAULTS": "corrupt_chunk=1"})
    _, s_err = send.communicate(timeout=120)
    _, r_err = recv.communicate(timeout=120)
    assert send.returncode == 1 and recv.returncode == 1
    assert re.search(r"frame \d+ at offset \d+ arrived damaged 8 times", r_err.decode())
    assert "arrived damaged" in s_err.decode()  # the sender is told why
    assert dst.read_bytes() == bytes(4 * MiB)  # nothing damaged was ever written


RATE = 16 * MiB  # a throttled source: the transfer takes seconds, so it can be cut
CHECKPOINT = 2  # a journal record's kind (ext/src/journal.rs)


def checkpoints(journal: Path) -> int:
    """How many complete checkpoint records the receiver's journal holds: records are
    ``u32 length (kind + body), u8 kind, body, u64 checksum``, appended."""
    try:
        data = journal.read_bytes()
    except FileNotFoundError:
        return 0
    count, at = 0, 0
    while at + 5 <= len(data):
        (length,) = struct.unpack_from("<I", data, at)
        end = at + 4 + length + 8
        if end > len(data):
            break
        count += data[at + 4] == CHECKPOINT
        at = end
    return count


@contextlib.contextmanager
def throttled_transfer(
    tmp_path: Path, size: int, common: tuple[str, ...]
) -> Iterator[tuple[str, str, subprocess.Popen[bytes], subprocess.Popen[bytes]]]:
    """src.img, ``size`` bytes of data, sent through a throttled qemu-nbd into dst.img, both
    ends given ``common``: the image's sha256, the source URI, the sender and the receiver."""
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    want = make_image(src, size, [(0, size)])
    with throttled_nbd(src, tmp_path / "src.sock", read_bps=RATE) as (_, uri):
        recv = start_cli("recv", str(dst), *common)
        send = start_cli("send", uri, *common)
        yield want, uri, send, recv


def test_receiver_killed_and_resumed_from_its_journal(tmp_path: Path, nats_url: str) -> None:
    """SIGKILL the receiver mid-transfer; `recv --resume` continues from its journal and the
    sender, which kept the transfer open, carries on with it."""
    size = 160 * MiB
    dst = tmp_path / "dst.img"
    common = ("--id", "crash-r", "--data-url", nats_url, "--json")
    with throttled_transfer(tmp_path, size, common) as (want, _, send, recv):
        journal = tmp_path / "state" / "journals" / "recv-crash-r.journal"
        wait_for(lambda: checkpoints(journal) >= 1, "the journal's first checkpoint", 60)
        recv.send_signal(signal.SIGKILL)
        recv.communicate()
        # Without --resume the journal is not silently discarded.
        again = start_cli("recv", str(dst), *common)
        _, err = again.communicate(timeout=60)
        assert again.returncode == 2 and "add --resume" in err.decode()
        resumed = start_cli("recv", str(dst), *common, "--resume")
        sent, got = finish_json(send), finish_json(resumed)
    assert sha256_file(dst) == want
    # The resumed receiver rebuilt the digest of the part written before it died.
    assert sent["digest"] == got["digest"] == content_digest(tmp_path / "src.img")
    assert int(sent["resumes"]) >= 1  # type: ignore[call-overload]
    resent = int(sent["sent_bytes"]) - size  # type: ignore[call-overload]
    print(f"resent after receiver crash: {resent / MiB:.1f} MiB")
    # At most one window plus one checkpoint interval (5 s at this rate) is sent twice.
    assert 0 <= resent <= 32 * MiB + 5 * RATE + 4 * MiB, resent
    assert not list((tmp_path / "state" / "journals").glob("*")), "journal left behind"


def test_sender_killed_and_taken_over(tmp_path: Path, nats_url: str) -> None:
    """SIGKILL the sender mid-transfer; `send --resume` takes over from what the running
    receiver holds, re-reading (not re-sending) the prefix to rebuild the whole digest."""
    size = 96 * MiB
    dst = tmp_path / "dst.img"
    common = ("--id", "crash-s", "--data-url", nats_url, "--json")
    with throttled_transfer(tmp_path, size, common) as (want, uri, send, recv):
        wait_for(holds(dst, 32 * MiB), "32 MiB written", 60)
        send.send_signal(signal.SIGKILL)
        send.communicate()
        taken = start_cli("send", uri, *common, "--resume")
        sent, got = finish_json(taken), finish_json(recv)
    assert sha256_file(dst) == want
    # The new sender rebuilt the digest of the prefix it did not send.
    assert sent["digest"] == got["digest"] == content_digest(tmp_path / "src.img")
    assert sent["resumes"] == 1
    # The prefix (32 MiB written before the kill, less what was in flight) was not sent again.
    assert int(sent["sent_bytes"]) <= size - 24 * MiB, sent  # type: ignore[call-overload]


def test_second_sender_without_resume_is_refused(tmp_path: Path, nats_url: str) -> None:
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    common = ("--id", "twice", "--data-url", nats_url)
    with throttled_transfer(tmp_path, 64 * MiB, common) as (_, _, send, recv):
        wait_for(holds(dst, 1), "the first write", 60)
        second = start_cli("send", str(src), *common)  # qemu-nbd serves one client
        _, err = second.communicate(timeout=60)
        for p in (send, recv):
            p.kill()
            p.communicate()
    assert second.returncode == 1
    assert "already in progress" in err.decode() and "--resume" in err.decode()


def test_resume_of_a_stream_is_refused(nats_url: str) -> None:
    proc = start_cli("recv", "-", "--id", "s", "--data-url", nats_url, "--resume")
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2 and "cannot be resumed" in err.decode()


def test_resume_without_journal_is_refused(tmp_path: Path, nats_url: str) -> None:
    proc = start_cli(
        "recv", str(tmp_path / "x.img"), "--id", "none", "--data-url", nats_url, "--resume"
    )
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2 and "nothing to resume" in err.decode()
