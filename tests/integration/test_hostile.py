"""Hostile input on a live transfer's own subjects: counted, reported, never written.

An outsider who may publish on `data.blk.<id>.c` sniffs a genuine frame, then sends
garbage, a wrong version, a replay, frames outside the disk, far-future sequence numbers
and a frame of another session — all with valid checksums where a checksum applies.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import msgspec
import nats
from nats.aio.client import Client

from nbdnats import _core, subjects
from nbdnats.schemas import TransferEvent
from tests.cli import start_cli
from tests.images import MiB, holds, make_image, sha256_file, throttled_nbd
from tests.waits import until

SIZE = 48 * MiB
HOSTILE_KINDS = 8  # messages `attack` publishes


async def attack(url: str, tid: str) -> list[TransferEvent]:
    nc = await nats.connect(url)
    try:
        return await _attack(nc, tid)
    finally:
        await nc.close()


async def _attack(nc: Client, tid: str) -> list[TransferEvent]:
    events: list[TransferEvent] = []

    async def on_event(msg) -> None:  # type: ignore[no-untyped-def]
        events.append(msgspec.json.decode(msg.data, type=TransferEvent))

    await nc.subscribe(subjects.data_events(tid), cb=on_event)
    chunks = subjects.transfer(tid)[1]
    sniff = await nc.subscribe(chunks)
    genuine = (await sniff.next_msg(timeout=30)).data
    await sniff.unsubscribe()
    session = int.from_bytes(genuine[4:8], "little")
    seq = int.from_bytes(genuine[8:16], "little")
    pay = b"\xee" * 4096
    hostile = [
        b"garbage" * 100,
        b"NF" + bytes([9]) + genuine[3:],  # another protocol version
        genuine,  # a replay of a frame already taken
        _core.encode_frame(seq + 2, SIZE + 4096, pay, session=session),  # outside the disk
        _core.encode_frame(seq + 3, SIZE - 100, pay, session=session),  # runs past the end
        _core.encode_frame(seq + 1_000_000, 0, pay, session=session),  # far beyond any window
        _core.encode_frame(seq + 2, 0, pay, session=session ^ 0xFFFF),  # another session
        _core.encode_frame(seq + 2, 0, pay, session=session, kind=2, length=1 << 40),  # huge zero
    ]
    assert len(hostile) == HOSTILE_KINDS
    for frame in hostile:
        await nc.publish(chunks, frame)
    await nc.flush()
    done = lambda: any(e.role == "recv" and e.state == "done" for e in events)  # noqa: E731
    await until(done, "the receiver's done event", 120)
    return events


def test_hostile_frames_are_counted_and_never_written(tmp_path: Path, nats_url: str) -> None:
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    want = make_image(src, SIZE, [(0, SIZE)])
    common = ("--id", "victim", "--data-url", nats_url, "--json")
    with throttled_nbd(src, tmp_path / "src.sock", read_bps=16 * MiB) as (_, uri):
        recv = start_cli("recv", str(dst), *common)
        send = start_cli("send", uri, *common)
        try:
            events = asyncio.run(attack(nats_url, "victim"))
        except TimeoutError as e:
            # Say what each end said (a hang or a failure), not only that nothing came.
            for p in (send, recv):
                p.kill()
            ends = {
                n: p.communicate()[1].decode()[-2000:] for n, p in (("send", send), ("recv", recv))
            }
            raise AssertionError(f"{e}; the ends said: {ends}") from None
        _, s_err = send.communicate(timeout=120)
        r_out, r_err = recv.communicate(timeout=120)
    assert send.returncode == 0, s_err.decode()
    assert recv.returncode == 0, r_err.decode()
    assert sha256_file(dst) == want
    got = json.loads(r_out.decode().strip().splitlines()[-1])
    # Every hostile message is counted. Forged frames aimed just ahead of the sender are
    # duplicates if the sender got there first, bad otherwise; the rest are always bad.
    assert got["bad_frames"] + got["duplicate_frames"] >= HOSTILE_KINDS, got
    assert got["bad_frames"] >= 4 and got["duplicate_frames"] >= 1, got
    done = [e for e in events if e.role == "recv" and e.state == "done"]
    assert done and done[0].bad_frames == got["bad_frames"]  # reported in events too


def test_garbage_does_not_keep_a_dead_transfer_open(tmp_path: Path, nats_url: str) -> None:
    """The sender dies; an outsider keeps publishing on the transfer's subject. The receiver
    still gives up after --timeout: only genuine frames count as signs of life."""
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    make_image(src, SIZE, [(0, SIZE)])
    common = ("--id", "ghost", "--data-url", nats_url)
    with throttled_nbd(src, tmp_path / "src.sock", read_bps=8 * MiB) as (_, uri):
        recv = start_cli("recv", str(dst), *common, "--timeout", "3")
        send = start_cli("send", uri, *common)

        async def haunt() -> int | None:
            nc = await nats.connect(nats_url)
            # The sender dies mid-transfer: once the receiver has written a first part.
            await until(holds(dst, MiB), "the first writes", 60)
            send.kill()
            for _ in range(150):  # 30 s of garbage at most, or until the receiver gives up
                await nc.publish(subjects.transfer("ghost")[1], b"boo" * 50)
                if recv.poll() is not None:
                    break
                await asyncio.sleep(0.2)  # the garbage's rate, not a wait
            await nc.close()
            return recv.poll()

        gave_up = asyncio.run(haunt())
        _, err = recv.communicate(timeout=30)
    assert gave_up == 1, "the receiver was kept waiting by garbage"
    assert "the sender went quiet for 3s" in err.decode()
