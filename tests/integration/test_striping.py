"""Striping (``--streams N``): one transfer split into N sub-streams over the servers of the
data URL list, byte-exact, with the digest a single stream reports; losing a server, the
sender or the receiver mid-transfer loses nothing; a receiver that cannot take sub-streams
gets one; bad counts are refused in one line.

Where the bytes went comes from each nats-server's monitoring endpoint (``/connz``): what
the clients connected to it published (``in_bytes``), closed connections included. Durations
come from the transfer's own progress samples, never from the test's wall clock."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import select
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import nats
import pytest

import nbdnats
from nbdnats import subjects
from nbdnats.errors import SchemaError
from nbdnats.schemas import Reply, SendCommand, decode, encode
from tests.cli import NBD_NATS, cli_env, finish_json, one_line_error, run_cli, start_cli
from tests.ctl import AgentProc, ctl, ok, schema_before
from tests.images import MiB, allocated, holds, make_image, sha256_file
from tests.nats_server import NatsServer
from tests.waits import wait_for

STRIPE = 64 * MiB  # the core's STRIPE_SIZE
SIZE = 6 * STRIPE  # two stripes for each of three sub-streams
# Data in every stripe, the same amount in each, with holes around it: zero ranges travel as
# payload-less frames, so each sub-stream carries a third of the data bytes.
DATA = [(i * STRIPE + (i % 4) * 4 * MiB, 40 * MiB) for i in range(SIZE // STRIPE)]
OLD = {"NBDNATS_FAULTS": "old_peer=1"}
WARNING = "the receiver does not support --streams (or its target is a stream)"


def content_digest(path: Path) -> str:
    proc = run_cli("digest", str(path), "--algo", "blk64k-xxh3-128")
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout.decode().split()[0]


def data_url(servers: list[NatsServer]) -> str:
    return ",".join(s.url for s in servers)


def published(server: NatsServer) -> int:
    """The bytes every client of ``server`` has published into it so far, closed
    connections included (routes to the other servers are not clients)."""
    conns = server.monitoring("connz?state=all&limit=100000").get("connections") or []
    return sum(int(c["in_bytes"]) for c in conns)


@contextlib.contextmanager
def carried(servers: list[NatsServer]) -> Iterator[list[int]]:
    """What the clients of each server published while the block ran (filled in at its end)."""
    before = [published(s) for s in servers]
    out: list[int] = []
    yield out
    out += [published(s) - b for s, b in zip(servers, before, strict=True)]


class Percent:
    """``--progress=FD`` through a pipe: wait until the command has written ``N/100``."""

    def __init__(self) -> None:
        self.read, self.write = os.pipe()
        self.flag = f"--progress={self.write}"
        self._seen = b""

    def started(self) -> None:
        """The command has its own copy of the write end now."""
        os.close(self.write)

    def wait(self, pct: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.read], [], [], 0.1)
            if not ready:
                continue
            chunk = os.read(self.read, 4096)
            if not chunk:
                raise AssertionError(f"the command ended before {pct}%: {self._seen!r}")
            self._seen += chunk
            done = [int(x.split(b"/")[0]) for x in self._seen.split(b"\n") if b"/" in x]
            if done and max(done) >= pct:
                return
        raise TimeoutError(f"no {pct}% within {timeout} s: {self._seen[-200:]!r}")

    def close(self) -> None:
        os.close(self.read)


def report_of(proc: subprocess.CompletedProcess[bytes]) -> dict[str, Any]:
    """The ``--json`` line of a run whose stdout carried the image (so it went to stderr)."""
    lines = [x for x in proc.stderr.decode().splitlines() if x.startswith("{")]
    return json.loads(lines[-1])  # type: ignore[no-any-return]


def warnings_of(stderr: bytes) -> list[str]:
    return [x for x in stderr.decode().splitlines() if x.startswith("nbd-nats: warning:")]


# -- spread, digest ---------------------------------------------------------------------------


def test_3_streams_spread_the_bytes_over_3_servers_and_keep_the_digest(
    tmp_path: Path, nats_cluster: Callable[[], list[NatsServer]]
) -> None:
    servers = nats_cluster()
    src = tmp_path / "src.img"
    want = make_image(src, SIZE, DATA)
    reports: dict[int, dict[str, Any]] = {}
    spread: dict[int, list[int]] = {}
    for n in (3, 1):
        dst = tmp_path / f"dst{n}.img"
        args = ("--data-url", data_url(servers), "--id", f"spread{n}", "--json")
        with carried(servers) as spread[n]:
            proc = run_cli("copy", str(src), str(dst), *args, "--streams", str(n))
        assert proc.returncode == 0, proc.stderr.decode()
        reports[n] = json.loads(proc.stdout)
        assert sha256_file(dst) == want
    striped, single = reports[3], reports[1]
    payload = striped["data_bytes"]
    shares = [c / payload for c in spread[3]]
    print(f"3 streams: {[f'{s:.1%}' for s in shares]} of {payload / MiB:.0f} MiB per server")
    print(f"1 stream: {[f'{c / payload:.1%}' for c in spread[1]]}")
    assert striped["streams"] == striped["sender"]["streams"] == 3, striped
    assert all(0.20 <= s <= 0.47 for s in shares), shares
    # The control: one stream puts it all through one server.
    assert single["streams"] == single["sender"]["streams"] == 1, single
    assert max(spread[1]) >= 0.9 * single["data_bytes"], spread[1]
    # One digest for the whole, the one a single stream and `nbd-nats digest` give.
    digest = content_digest(src)
    assert striped["digest"] == striped["sender"]["digest"] == single["digest"] == digest


def test_an_image_smaller_than_its_stripes_is_copied(tmp_path: Path) -> None:
    """Fewer stripes than sub-streams asked for (here 1 MiB and a bit, in 3)."""
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    want = make_image(src, MiB + 4096, [(0, 4096), (MiB, 4096)])
    proc = run_cli("copy", str(src), str(dst), "--streams", "3", "--json")
    assert proc.returncode == 0, proc.stderr.decode()
    report = json.loads(proc.stdout)
    assert sha256_file(dst) == want
    assert report["digest"] == content_digest(src)
    assert 1 <= report["streams"] <= 3, report


# -- losing a server, the sender, the receiver ------------------------------------------------


def test_one_server_killed_mid_transfer_loses_nothing(
    tmp_path: Path, nats_cluster: Callable[[], list[NatsServer]]
) -> None:
    servers = nats_cluster()
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    want = make_image(src, SIZE, DATA)
    progress = Percent()
    try:
        # 240 MiB of data at 48 MiB/s: five seconds, so a server can die in the middle.
        copy = start_cli(
            *("copy", str(src), str(dst), "--data-url", data_url(servers), "--json"),
            *("--streams", "3", "--rate", "48M", progress.flag),
            pass_fds=(progress.write,),
        )
        progress.started()
        progress.wait(30)
        servers[1].proc.send_signal(signal.SIGKILL)
        report = finish_json(copy)
    finally:
        progress.close()
    assert sha256_file(dst) == want
    assert report["streams"] == 3, report
    assert report["digest"] == report["sender"]["digest"] == content_digest(src)  # type: ignore[index]


def test_a_killed_sender_resumes_with_as_many_streams_and_no_other_number(
    tmp_path: Path, nats_cluster: Callable[[], list[NatsServer]]
) -> None:
    servers = nats_cluster()
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    want = make_image(src, SIZE, DATA)
    common = ("--id", "sres", "--data-url", data_url(servers), "--json")
    recv = start_cli("recv", str(dst), *common)
    progress = Percent()
    try:
        send = start_cli(
            "send", str(src), *common, "--streams", "3", "--rate", "48M", progress.flag,
            pass_fds=(progress.write,),
        )  # fmt: skip
        progress.started()
        progress.wait(30)
        send.send_signal(signal.SIGKILL)
        send.communicate()
    finally:
        progress.close()
    # Another number of streams would cut the image into other stripes than the receiver's.
    other = run_cli("send", str(src), *common, "--streams", "2", "--resume", timeout=60)
    line = one_line_error(other)
    print(line)
    assert "--streams" in line and "3" in line, line
    taken = start_cli("send", str(src), *common, "--streams", "3", "--resume")
    sent, got = finish_json(taken), finish_json(recv)
    assert sha256_file(dst) == want
    assert sent["streams"] == got["streams"] == 3, (sent, got)
    assert int(sent["resumes"]) >= 1, sent  # type: ignore[call-overload]
    # Resumed: what the receiver held was not sent again.
    assert int(sent["sent_bytes"]) < 0.9 * int(got["data_bytes"]), sent  # type: ignore[call-overload]
    assert sent["digest"] == got["digest"] == content_digest(src)


async def _foreign_opens(url: str, tid: str) -> list[dict[str, Any]]:
    """What another publisher on a striped transfer's own open subject is told: a fresh
    open, a "resume" with a key not of the transfer's chain, a probe, and garbage."""
    nc = await nats.connect(url)
    try:
        base = {"v": nbdnats._core.PROTOCOL_VERSION, "size": SIZE, "chunk_size": 1 << 20}
        asks = [
            {**base, "key": "ab" * 32},
            {**base, "key": "cd" * 32, "resume": True, "stripes": {"count": 3, "size": STRIPE}},
            {"v": nbdnats._core.PROTOCOL_VERSION, "probe": True},
        ]
        payloads = [json.dumps(a).encode() for a in asks] + [b"-x; rm -rf /"]
        open_subject = subjects.transfer(tid)[0]
        return [json.loads((await nc.request(open_subject, p, timeout=10)).data) for p in payloads]
    finally:
        await nc.close()


def test_others_asking_a_striped_transfer_are_refused_and_change_nothing(
    tmp_path: Path, nats_cluster: Callable[[], list[NatsServer]]
) -> None:
    """Once the receiver runs a transfer striped, its own open subject answers only the
    transfer's sender: anyone else who may publish there is refused (busy, or a bad
    request) and the sub-streams go on to the right bytes."""
    servers = nats_cluster()
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    want = make_image(src, SIZE, DATA)
    common = ("--id", "fore", "--data-url", data_url(servers), "--json")
    recv = start_cli("recv", str(dst), *common)
    progress = Percent()
    try:
        send = start_cli(
            "send", str(src), *common, "--streams", "3", "--rate", "48M", progress.flag,
            pass_fds=(progress.write,),
        )  # fmt: skip
        progress.started()
        progress.wait(10)
        replies = asyncio.run(_foreign_opens(servers[0].url, "fore"))
    finally:
        progress.close()
    assert all(r.get("ok") is False for r in replies), replies
    assert [r.get("code") for r in replies[:3]] == ["busy"] * 3, replies
    sent, got = finish_json(send), finish_json(recv)
    assert sha256_file(dst) == want
    assert sent["streams"] == got["streams"] == 3, (sent, got)
    assert sent["digest"] == got["digest"] == content_digest(src)


def test_a_killed_sender_resumes_after_some_streams_have_finished(
    tmp_path: Path, start_nats: Callable[..., NatsServer]
) -> None:
    """All the data in stripe 0, holes in the others: sub-streams 1 and 2 have only ZERO
    frames to send, which no cap holds back, and are done within moments of starting, while
    sub-stream 0 takes four seconds (128 MiB at a third of 96 MiB/s). The sender is killed
    once 40 MiB of stripe 0 are written; the resumed one finishes sub-stream 0 and the
    whole, and the finished ones again without sending them."""
    url = start_nats().url
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    want = make_image(src, SIZE, [(0, STRIPE), (3 * STRIPE, STRIPE)])  # stripe 0 of 3
    common = ("--id", "sfin", "--data-url", url, "--json")
    recv = start_cli("recv", str(dst), *common)
    send = start_cli("send", str(src), *common, "--streams", "3", "--rate", "96M")
    wait_for(holds(dst, 40 * MiB), "40 MiB of stripe 0", 60)
    send.send_signal(signal.SIGKILL)
    send.communicate()
    assert allocated(dst) < 2 * STRIPE, "the copy ended before the sender was killed"
    taken = start_cli("send", str(src), *common, "--streams", "3", "--resume")
    sent, got = finish_json(taken), finish_json(recv)
    assert sha256_file(dst) == want
    assert sent["streams"] == got["streams"] == 3, (sent, got)
    assert int(sent["sent_bytes"]) < 2 * STRIPE, sent  # type: ignore[call-overload]
    assert sent["digest"] == got["digest"] == content_digest(src)


def journals(state: Path, tid: str, n: int) -> list[Path]:
    return [state / "journals" / f"recv-{subjects.stripe_id(tid, k)}.journal" for k in range(n)]


def has_checkpoint(path: Path) -> bool:
    """A checkpoint record follows the header (the header alone is a few hundred bytes)."""
    return path.exists() and path.stat().st_size > 1024


def test_a_killed_receiver_resumes_every_stream_from_its_journal(
    tmp_path: Path, state_dir: Path, nats_cluster: Callable[[], list[NatsServer]]
) -> None:
    servers = nats_cluster()
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    want = make_image(src, SIZE, DATA)
    common = ("--id", "rres", "--data-url", data_url(servers), "--json", "--timeout", "30")
    recv = start_cli("recv", str(dst), *common)
    # 240 MiB of data at 24 MiB/s: ten seconds; each sub-stream's journal checkpoints at 5.
    send = start_cli("send", str(src), *common, "--streams", "3", "--rate", "24M")
    children = journals(state_dir, "rres", 3)
    wait_for(lambda: all(map(has_checkpoint, children)), "every sub-stream's checkpoint", 60)
    recv.send_signal(signal.SIGKILL)
    recv.communicate()
    resumed = start_cli("recv", str(dst), *common, "--resume")
    sent, got = finish_json(send), finish_json(resumed)
    assert sha256_file(dst) == want
    assert sent["streams"] == got["streams"] == 3, (sent, got)
    assert int(sent["resumes"]) >= 1, sent  # type: ignore[call-overload]
    assert sent["digest"] == got["digest"] == content_digest(src)
    assert not list((state_dir / "journals").glob("*")), "journals left behind"


def test_journals_lists_a_striped_transfer_and_discard_removes_all_it_left(
    tmp_path: Path, state_dir: Path, nats_cluster: Callable[[], list[NatsServer]]
) -> None:
    """Both ends killed mid-transfer: the transfer and its sub-streams are listed; one
    ``--discard`` of the transfer's id removes every journal, key and record of it, and a
    ``--resume`` then has nothing to continue."""
    servers = nats_cluster()
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    make_image(src, SIZE, DATA)
    common = ("--id", "dres", "--data-url", data_url(servers), "--json", "--timeout", "30")
    recv = start_cli("recv", str(dst), *common)
    send = start_cli("send", str(src), *common, "--streams", "3", "--rate", "24M")
    children = journals(state_dir, "dres", 3)
    wait_for(lambda: all(map(has_checkpoint, children)), "every sub-stream's checkpoint", 60)
    for proc in (send, recv):
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    listed = run_cli("journals", "--json")
    assert listed.returncode == 0, listed.stderr
    ids = {e["id"] for e in json.loads(listed.stdout)}
    assert {"dres", "dres-s0", "dres-s1", "dres-s2"} <= ids, ids
    gone = run_cli("journals", "--discard", "dres")
    assert gone.returncode == 0, gone.stderr
    assert not list((state_dir / "journals").glob("*")), "left behind after --discard"
    again = run_cli("send", str(src), *common, "--streams", "3", "--resume")
    assert again.returncode != 0
    assert "no key of its sender" in one_line_error(again)


# -- negotiated down --------------------------------------------------------------------------


def test_an_older_receiver_gets_one_stream_and_the_sender_says_so(
    tmp_path: Path, start_nats: Callable[..., NatsServer]
) -> None:
    url = start_nats().url
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    want = make_image(src, 2 * STRIPE, [(0, 2 * STRIPE)])
    common = ("--id", "old", "--data-url", url, "--json", "--timeout", "20")
    recv = start_cli("recv", str(dst), *common, env=OLD)
    send = run_cli("send", str(src), *common, "--streams", "2")
    assert send.returncode == 0, send.stderr.decode()
    got = finish_json(recv)
    sent = json.loads(send.stdout.decode().splitlines()[-1])
    assert sent["streams"] == got["streams"] == 1, (sent, got)
    assert warnings_of(send.stderr) == [
        f"nbd-nats: warning: transfer old: {WARNING}; sending it as one stream"
    ], send.stderr.decode()
    assert sha256_file(dst) == want
    assert sent["digest"] == got["digest"] == content_digest(src)


def test_a_stream_target_is_written_as_one_stream(tmp_path: Path) -> None:
    src = tmp_path / "src.img"
    want = make_image(src, 2 * STRIPE, [(0, STRIPE), (STRIPE + MiB, 8 * MiB)])
    proc = run_cli("copy", str(src), "-", "--streams", "3", "--json")
    assert proc.returncode == 0, proc.stderr.decode()
    assert hashlib.sha256(proc.stdout).hexdigest() == want
    report = report_of(proc)
    assert report["streams"] == report["sender"]["streams"] == 1, report
    assert len(warnings_of(proc.stderr)) == 1 and WARNING in proc.stderr.decode()


def test_a_source_read_in_order_is_sent_as_one_stream(tmp_path: Path) -> None:
    image = os.urandom(2 * STRIPE)
    dst = tmp_path / "dst.img"
    size = str(len(image))
    proc = run_cli("copy", "-", str(dst), "--size", size, "--streams", "2", "--json", input=image)
    assert proc.returncode == 0, proc.stderr.decode()
    report = json.loads(proc.stdout)
    assert report["streams"] == report["sender"]["streams"] == 1, report
    assert sha256_file(dst) == hashlib.sha256(image).hexdigest()
    assert warnings_of(proc.stderr) == [
        f"nbd-nats: warning: transfer {report['id']}: its source is read in order (stdin, a "
        "pipe or a socket); sending it as one stream"
    ]


# -- rate caps --------------------------------------------------------------------------------


async def _sampled(url: str, src: Path, dst: Path) -> tuple[list[tuple[float, int]], Any]:
    """Send ``src`` into ``dst`` at 40 MiB/s in 2 streams, sampling the sender's own stats
    every 50 ms as (seconds since the handshake, sent_bytes); the samples and the end's stats."""
    planes = await nbdnats.Planes.connect(url)
    try:
        recv = await nbdnats.start_recv(str(dst), transfer_id="rs", planes=planes)
        send = await nbdnats.start_send(
            str(src), transfer_id="rs", planes=planes, rate=40 * MiB, streams=2
        )
        samples = [(s.seconds, s.sent_bytes) async for s in send.progress(interval=0.05)]
        stats = await send.wait()
        await recv.wait()
        return samples, stats
    finally:
        await planes.close()


def test_a_rate_cap_holds_for_the_streams_together(
    tmp_path: Path, start_nats: Callable[..., NatsServer]
) -> None:
    url = start_nats().url
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    size = 2 * STRIPE
    want = make_image(src, size, [(0, size)])
    samples, stats = asyncio.run(_sampled(url, src, dst))
    # 128 MiB at 40 MiB/s: 3.2 s until the last byte is sent, by the sender's own clock,
    # whatever the number of streams (each runs at its share of the cap).
    all_sent = next(t for t, sent in samples if sent >= size)
    print(f"128 MiB at 40 MiB/s in 2 streams: all sent at {all_sent:.2f} s")
    assert 3.2 * 0.85 <= all_sent <= 3.2 * 1.15, all_sent
    assert stats.streams == 2
    assert sha256_file(dst) == want


# -- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["0", "9", "-1", "x"])
@pytest.mark.parametrize(
    "command",
    [["send", "a.img", "--id", "x"], ["copy", "a.img", "b.img"], ["ctl", "copy", "a:x", "b:y"]],
    ids=["send", "copy", "ctl-copy"],
)
def test_a_bad_number_of_streams_exits_2_with_one_line(command: list[str], value: str) -> None:
    proc = run_cli(*command, "--streams", value, timeout=30)
    line = one_line_error(proc)
    assert proc.returncode == 2
    assert "--streams" in line and repr(value) in line and "1 to 8" in line, line


@pytest.mark.parametrize(
    "command", [["send", "a.img"], ["copy", "a.img", "b.img"]], ids=["send", "copy"]
)
def test_an_id_too_long_for_its_streams_exits_2_with_one_line(command: list[str]) -> None:
    """Its sub-streams' ids would be longer than a subject token; refused before anything
    connects (no server here)."""
    proc = run_cli(*command, "--id", "x" * 62, "--streams", "2", timeout=30)
    line = one_line_error(proc)
    assert proc.returncode == 2
    assert "at most 61 characters" in line and "--streams 1" in line, line


# -- through agents ---------------------------------------------------------------------------


def test_ctl_copy_runs_striped_between_agents(
    tmp_path: Path, start_nats: Callable[..., NatsServer], start_agent: Callable[..., AgentProc]
) -> None:
    url = start_nats(jetstream=True).url
    disks = tmp_path / "disks"
    disks.mkdir()
    src, dst = disks / "src.img", disks / "dst.img"
    want = make_image(src, 2 * STRIPE, [(0, 40 * MiB), (STRIPE + MiB, 40 * MiB)])
    for node in ("a", "b"):
        start_agent(node, url, "--allow", str(disks))
    out = ok(ctl(url, "--json", "copy", f"a:{src}", f"b:{dst}", "--streams", "2"))
    doc = json.loads(out.splitlines()[-1])
    assert doc["sender"]["streams"] == doc["receiver"]["streams"] == 2, doc
    assert sha256_file(dst) == want
    assert doc["sender"]["digest"] == doc["receiver"]["digest"] == content_digest(src)
    # An id too long to be striped is refused before any agent is asked.
    long = ctl(url, "copy", f"a:{src}", f"b:{dst}", "--streams", "2", "--id", "y" * 62)
    assert long.returncode == 2 and "at most 61 characters" in one_line_error(long)


async def _copy_from_an_older_agent(url: str, *args: str) -> tuple[int, str]:
    """``ctl copy`` whose sending node "old" is an agent from before ``--streams``: it
    decodes the send command as such an agent does (``TransferOptions`` without
    ``streams``, unknown fields refused) and answers what it would."""
    older = schema_before(SendCommand, "streams")
    nc = await nats.connect(url)

    async def old_agent(msg: Any) -> None:
        try:
            decode(older, msg.data, "send command")
            reply = Reply(ok=False, code="error", error="the old agent read the command")
        except SchemaError as e:
            reply = Reply(ok=False, code=e.code, error=str(e))
        await msg.respond(encode(reply))

    try:
        await nc.subscribe(subjects.ctl_command("old", "send"), cb=old_agent)
        await nc.flush()
        proc = await asyncio.create_subprocess_exec(
            NBD_NATS, "ctl", "--ctl-url", url, *args,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env(),
        )  # fmt: skip
        _, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode is not None
        return proc.returncode, err.decode()
    finally:
        await nc.close()


def test_ctl_copy_in_streams_from_an_agent_from_before_them_fails_in_one_line(
    tmp_path: Path, start_nats: Callable[..., NatsServer], start_agent: Callable[..., AgentProc]
) -> None:
    url = start_nats(jetstream=True).url
    start_agent("b", url, "--allow", str(tmp_path))
    copy = ("copy", "old:/x.img", f"b:{tmp_path}/dst.img")
    rc, err = asyncio.run(_copy_from_an_older_agent(url, *copy, "--id", "c1", "--streams", "2"))
    lines = [x for x in err.splitlines() if x.strip()]
    assert rc != 0 and len(lines) == 1, err
    assert lines[0] == (
        "nbd-nats: error: old: its agent does not support --streams (an nbd-nats from "
        "before striping): upgrade it, or copy without --streams"
    ), lines
    # Without --streams the command reads to it as before (it would run the copy).
    rc, err = asyncio.run(_copy_from_an_older_agent(url, *copy, "--id", "c2"))
    assert "the old agent read the command" in err, err
