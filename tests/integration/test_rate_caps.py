"""Rate caps: ``--rate`` holds a transfer to its cap, a new cap takes effect within a second
(``Transfer.set_rate``, ``ctl rate``), and bad values are refused in one line.

Durations come from the transfer's own clock (``seconds`` of its stats and reports, from
the handshake to the end), never from the test's wall clock."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

import nbdnats
from tests.cli import one_line_error, run_cli, start_cli
from tests.ctl import ctl, ok
from tests.images import MiB, make_image, sha256_file


async def _sampled(
    url: str, src: Path, dst: Path, rate: int, then: tuple[int, int] | None = None
) -> tuple[list[tuple[float, int, int]], float]:
    """Send ``src`` into ``dst`` at ``rate``, sampling the sender's own stats every 50 ms
    as (seconds since the handshake, done_bytes, sent_bytes). ``then``: once that many
    bytes are done, set that rate; returns when it was set (0.0: never)."""
    planes = await nbdnats.Planes.connect(url)
    try:
        recv = await nbdnats.start_recv(str(dst), transfer_id="r1", planes=planes)
        send = await nbdnats.start_send(str(src), transfer_id="r1", planes=planes, rate=rate)
        samples: list[tuple[float, int, int]] = []
        changed = 0.0
        async for s in send.progress(interval=0.05):
            samples.append((s.seconds, s.done_bytes, s.sent_bytes))
            if then is not None and not changed and s.done_bytes >= then[0]:
                send.set_rate(then[1])
                changed = send.stats().seconds
                assert send.stats().rate_limit == then[1]
        await send.wait()
        await recv.wait()
        return samples, changed
    finally:
        await planes.close()


def test_256M_at_50M_are_sent_in_5_seconds(tmp_path: Path, start_nats) -> None:  # type: ignore[no-untyped-def]
    url = start_nats().url
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    want = make_image(src, 256 * MiB, [(n * 32 * MiB, 32 * MiB) for n in range(8)])
    samples, _ = asyncio.run(_sampled(url, src, dst, 50 * MiB))
    # 256 MiB at 50 MiB/s: 5.12 s from the handshake until the last byte is sent, by the
    # sender's own clock (the bucket lets it one chunk ahead of the cap; the receiver's
    # flush after that is not the cap's).
    all_sent = next(t for t, _, sent in samples if sent >= 256 * MiB)
    assert 5.12 * 0.9 <= all_sent <= 5.12 * 1.1, all_sent
    assert sha256_file(dst) == want


def test_copy_rate_reaches_the_sender_and_its_report(tmp_path: Path, start_nats) -> None:  # type: ignore[no-untyped-def]
    url = start_nats().url
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    want = make_image(src, 8 * MiB, [(0, 8 * MiB)])
    proc = run_cli("copy", str(src), str(dst), "--data-url", url, "--rate", "8M/s", "--json")
    assert proc.returncode == 0, proc.stderr.decode()
    sender = json.loads(proc.stdout)["sender"]
    assert sender["rate_limit"] == 8 * MiB
    assert sender["seconds"] >= 0.9 * 7 / 8, sender  # the first chunk goes at once
    assert sha256_file(dst) == want


def _slope(samples: list[tuple[float, int]], start: float, end: float) -> float:
    """Bytes per second between the samples nearest after ``start`` and before ``end``."""
    inside = [s for s in samples if start <= s[0] <= end]
    (t0, d0), (t1, d1) = inside[0], inside[-1]
    return (d1 - d0) / (t1 - t0)


def test_a_new_cap_shows_in_the_progress_within_a_second(tmp_path: Path, start_nats) -> None:  # type: ignore[no-untyped-def]
    url = start_nats().url
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    want = make_image(src, 64 * MiB, [(0, 64 * MiB)])
    slow, fast = 8 * MiB, 32 * MiB
    sampled, changed = asyncio.run(_sampled(url, src, dst, slow, then=(12 * MiB, fast)))
    assert sha256_file(dst) == want
    samples = [(t, done) for t, done, _ in sampled]
    before = _slope(samples, 0.5, changed)
    assert slow * 0.8 <= before <= slow * 1.2, before
    # In the second after the change the transfer already moves at the new cap (at the
    # old one it would have moved 8 MiB), and then holds to it.
    first_second = _slope(samples, changed, changed + 1.0)
    assert first_second >= 0.7 * fast, first_second
    after = _slope(samples, changed + 0.5, samples[-2][0])
    assert fast * 0.8 <= after <= fast * 1.2, after


@pytest.mark.parametrize(
    ("command", "value"),
    [
        (["copy", "a.img", "b.img"], "0"),
        (["copy", "a.img", "b.img"], "-1M"),
        (["send", "a.img", "--id", "x"], "fast"),
        (["send", "a.img", "--id", "x"], "2T"),
        (["migrate", "--src-qmp", "s", "--dst-qmp", "d"], "0"),
        (["ctl", "copy", "a:x", "b:y"], "1.5"),
    ],
)
def test_a_bad_rate_exits_2_with_one_line(command: list[str], value: str) -> None:
    proc = run_cli(*command, f"--rate={value}")
    line = one_line_error(proc)
    assert proc.returncode == 2
    assert "--rate" in line and value in line, line


def test_ctl_rate_of_an_unknown_transfer_fails_clearly(start_nats, start_agent) -> None:  # type: ignore[no-untyped-def]
    url = start_nats(jetstream=True).url
    start_agent("a", url)
    proc = ctl(url, "rate", "nosuch", "10M")
    line = one_line_error(proc)
    assert "no node runs the sending end of transfer nosuch" in line, line
    bad = ctl(url, "rate", "nosuch", "0")
    assert bad.returncode == 2 and "is not a rate cap" in one_line_error(bad)


def test_ctl_rate_lifts_the_cap_of_a_running_ctl_copy(
    tmp_path: Path, start_nats, start_agent
) -> None:  # type: ignore[no-untyped-def]
    url = start_nats(jetstream=True).url
    disks = tmp_path / "disks"
    disks.mkdir()
    src, dst = disks / "src.img", disks / "dst.img"
    want = make_image(src, 32 * MiB, [(0, 32 * MiB)])
    start_agent("a", url, "--allow", str(disks))
    start_agent("b", url, "--allow", str(disks))
    # 32 MiB at 2 MiB/s would take 16 s; the copy waits for its end.
    copy = start_cli(
        "ctl",
        "--ctl-url",
        url,
        "--json",
        "copy",
        f"a:{src}",
        f"b:{dst}",
        "--id",
        "capped",
        "--rate",
        "2M",
    )
    # Once the sending end runs, its agent takes the new cap; the receiver's refuses it.
    for _ in range(200):
        out = ctl(url, "rate", "capped", "off")
        if out.returncode == 0:
            break
    assert "rate of capped on a: no cap" in ok(out)
    stdout, stderr = copy.communicate(timeout=120)
    assert copy.returncode == 0, stderr.decode()
    report = json.loads(stdout)
    sender = report["sender"]
    assert sender.get("rate_limit", 0) == 0  # no cap: left out of the event
    assert sender["seconds"] < 8, sender
    assert sha256_file(dst) == want
