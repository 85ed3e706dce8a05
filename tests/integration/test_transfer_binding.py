"""A transfer belongs to the sender that opened it.

The adversary is a real NATS client on the same server, able to read and publish a
transfer's subjects (the worst case of loose permissions): it watches the sender's open,
replays it, and tries to resume the transfer as its own. The sender and receiver are the
real command line.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import nats
from nats.aio.msg import Msg

from nbdnats import subjects
from tests.cli import start_cli
from tests.images import MiB, holds, make_image, sha256_file, throttled_nbd
from tests.nats_server import NatsServer
from tests.waits import until, wait_for

SIZE = 64 * MiB
RATE = 16 * MiB


def finish(proc: subprocess.Popen[bytes], timeout: float = 180) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out.decode(), err.decode()


async def hijack(
    url: str, tid: str, started: asyncio.Event, running: Callable[[], bool]
) -> list[dict[str, object]]:
    """Watch the sender's open, then, once the transfer runs, try to take it over."""
    open_subject = subjects.transfer(tid)[0]
    nc = await nats.connect(url)
    seen: list[bytes] = []

    async def keep(msg: Msg) -> None:
        seen.append(msg.data)

    sub = await nc.subscribe(open_subject, cb=keep)
    started.set()
    try:

        def senders() -> list[dict[str, object]]:  # not the receiver's own probe
            return [o for o in map(json.loads, seen) if not o.get("probe")]

        await until(lambda: bool(senders()), "the sender's open", 15)
        original = senders()[0]
        await sub.unsubscribe()
        await until(running, "the transfer's first write", 30)
        tries = [
            {**original, "resume": True, "key": "ab" * 32},  # a key of our own
            {**original, "resume": True, "key": ""},
            {**original, "probe": True},
            # Replays of the sender's own open get the answer it got: nothing new.
            {**original, "resume": True},
            original,
        ]
        replies = []
        for t in tries:
            msg = await nc.request(open_subject, json.dumps(t).encode(), timeout=5)
            replies.append(json.loads(msg.data))
        return replies
    finally:
        await nc.close()


def test_another_client_cannot_take_over_a_running_transfer(
    tmp_path: Path, start_nats: Callable[..., NatsServer]
) -> None:
    server = start_nats()
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    want = make_image(src, SIZE, [(0, SIZE)])
    common = ("--id", "mine", "--data-url", server.url, "--json")

    async def scenario(uri: str) -> tuple[list[dict[str, object]], tuple[int, str, str]]:
        started = asyncio.Event()
        attack = asyncio.create_task(hijack(server.url, "mine", started, holds(dst)))
        await started.wait()
        recv = start_cli("recv", str(dst), *common)
        send = start_cli("send", uri, *common)
        replies = await attack
        loop = asyncio.get_running_loop()
        sent = await loop.run_in_executor(None, finish, send)
        got = await loop.run_in_executor(None, finish, recv)
        assert got[0] == 0, got[2]
        return replies, sent

    with throttled_nbd(src, tmp_path / "src.sock", read_bps=RATE) as (_, uri):
        replies, (s_rc, s_out, s_err) = asyncio.run(scenario(uri))
    assert s_rc == 0, s_err
    assert sha256_file(dst) == want
    for r in replies[:3]:
        assert r["ok"] is False and r["code"] == "busy", r
        assert "only its own sender may take it over" in str(r["message"])
    assert replies[3] == replies[4] and replies[3]["ok"] is True
    assert replies[3]["resume_seq"] == 0  # the first answer, repeated: no new session
    assert json.loads(s_out.splitlines()[-1])["resumes"] == 0


def test_a_sender_whose_first_reply_was_lost_is_still_served(tmp_path: Path, start_nats) -> None:  # type: ignore[no-untyped-def]
    """The receiver is paused (SIGSTOP) just as the sender arrives: the sender's opens pile
    up, the first is answered after the sender stopped waiting for it, and the repeats
    must get the same answer instead of 'already in progress'."""
    server: NatsServer = start_nats()
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    want = make_image(src, 8 * MiB, [(0, 8 * MiB)])
    common = ("--id", "paused", "--data-url", server.url)
    recv = start_cli("recv", str(dst), *common)
    # The receiver listens once its open and chunk subscriptions are on the server.
    wait_for(lambda: server.subscriptions() >= 2, "the receiver's subscriptions", 30)
    recv.send_signal(signal.SIGSTOP)
    try:
        send = start_cli("send", str(src), *common)
        time.sleep(4)  # the pause itself: the length of the outage under test
    finally:
        recv.send_signal(signal.SIGCONT)
    (s_rc, _, s_err), (r_rc, _, r_err) = finish(send), finish(recv)
    assert (s_rc, r_rc) == (0, 0), (s_err, r_err)
    assert sha256_file(dst) == want


def test_a_receiver_that_cannot_keep_a_journal_tells_the_sender_at_once(
    tmp_path: Path, start_nats: Callable[..., NatsServer]
) -> None:
    server = start_nats()
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    make_image(src, 4 * MiB, [(0, 4 * MiB)])
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    common = ("--id", "nojournal", "--data-url", server.url, "--timeout", "60")
    recv = start_cli("recv", str(dst), *common, "--state-dir", str(not_a_dir / "state"))
    began = time.monotonic()
    send = start_cli("send", str(src), *common)
    (s_rc, _, s_err), (r_rc, _, r_err) = finish(send), finish(recv)
    took = time.monotonic() - began
    assert s_rc == 1 and r_rc == 1
    assert "journal" in r_err and "Not a directory" in r_err
    assert "journal" in s_err and "Not a directory" in s_err
    assert "--resume" not in s_err
    assert took < 30, f"the sender waited {took:.0f} s"
