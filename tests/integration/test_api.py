"""The Python API a controller uses: typed stats, events, progress, cancellation."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path

import msgspec
import nats
import pytest

import nbdnats
from nbdnats import subjects
from nbdnats.embedded import EmbeddedServer
from nbdnats.schemas import TransferEvent
from tests.images import MiB, make_image, sha256_file, throttled_nbd
from tests.waits import until


@contextlib.contextmanager
def throttled_source(tmp_path: Path, image: Path, bps: int) -> Iterator[str]:
    with throttled_nbd(image, tmp_path / "slow-src.sock", read_bps=bps) as (_, uri):
        yield uri


def test_copy_returns_stats_and_publishes_events(tmp_path: Path) -> None:
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    want = make_image(src, 16 * MiB, [(0, 4 * MiB)])
    seen: list[nbdnats.TransferStats] = []

    async def main() -> tuple[nbdnats.TransferStats, list[TransferEvent], list[TransferEvent]]:
        async with EmbeddedServer() as url:
            watcher = await nats.connect(url)
            data_events: list[TransferEvent] = []
            ctl_events: list[TransferEvent] = []

            async def on_data(msg):  # type: ignore[no-untyped-def]
                data_events.append(msgspec.json.decode(msg.data, type=TransferEvent))

            async def on_ctl(msg):  # type: ignore[no-untyped-def]
                ctl_events.append(msgspec.json.decode(msg.data, type=TransferEvent))

            await watcher.subscribe(subjects.data_events("api1"), cb=on_data)
            await watcher.subscribe(subjects.ctl_events("transfer"), cb=on_ctl)
            await watcher.flush()
            stats = await nbdnats.copy(
                str(src),
                str(dst),
                transfer_id="api1",
                data_url=url,
                node="n1",
                on_progress=seen.append,
                verify=True,
            )
            # Events are published as things happen; wait until the last ones arrived.
            await until(
                lambda: (
                    len(ctl_events) >= 2
                    and {e.role for e in data_events if e.state == "done"} == {"send", "recv"}
                ),
                "the done events",
            )
            await watcher.close()
            return stats, data_events, ctl_events

    stats, data_events, ctl_events = asyncio.run(main())
    assert sha256_file(dst) == want
    assert isinstance(stats, nbdnats.TransferStats)
    assert (stats.transfer_id, stats.state, stats.size) == ("api1", "done", 16 * MiB)
    assert stats.verified and stats.digest and stats.digest.startswith("blk64k-xxh3-128:")
    assert seen and seen[-1].done_bytes == 16 * MiB
    done = [e for e in data_events if e.state == "done"]
    assert {e.role for e in done} == {"send", "recv"}
    assert all(e.digest == stats.digest for e in done)
    assert {e.node for e in ctl_events} == {"n1"} and len(ctl_events) == 2


def test_transfer_does_not_block_the_event_loop(tmp_path: Path) -> None:
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    want = make_image(src, 16 * MiB, [(0, 16 * MiB)])
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)  # the tick under test: runs only if the loop is free
            ticks += 1

    async def main() -> None:
        with throttled_source(tmp_path, src, 8 * MiB) as uri:
            t = asyncio.create_task(ticker())
            await nbdnats.copy(uri, str(dst), chunk_size=MiB)
            t.cancel()

    asyncio.run(main())
    assert sha256_file(dst) == want
    assert ticks >= 20, ticks  # a ~2 s copy; a blocked loop would tick ~0 times


def test_cancel_stops_both_ends(tmp_path: Path) -> None:
    src = tmp_path / "src.img"
    make_image(src, 64 * MiB, [(0, 64 * MiB)])

    async def main() -> tuple[BaseException | None, BaseException | None, str]:
        async with EmbeddedServer() as url:
            planes = await nbdnats.Planes.connect(url)
            try:
                with throttled_source(tmp_path, src, 4 * MiB) as uri:
                    recv = await nbdnats.start_recv(
                        str(tmp_path / "dst.img"), transfer_id="c1", planes=planes
                    )
                    send = await nbdnats.start_send(uri, transfer_id="c1", planes=planes)
                    recv_task = asyncio.create_task(recv.wait())
                    send_task = asyncio.create_task(send.wait())
                    # Mid-transfer (16 s at 4 MiB/s): the receiver has written something.
                    await until(lambda: recv.stats().done_bytes >= MiB, "the first writes", 60)
                    recv_task.cancel()
                    results = await asyncio.gather(recv_task, send_task, return_exceptions=True)
                    return results[0], results[1], recv.stats().state  # type: ignore[return-value]
            finally:
                await planes.close()

    recv_result, send_result, recv_state = asyncio.run(main())
    assert isinstance(recv_result, asyncio.CancelledError)
    assert recv_state == "failed"
    assert isinstance(send_result, nbdnats.NbdNatsError)
    assert "peer" in str(send_result) and "cancelled" in str(send_result)


def test_progress_yields_growing_figures_while_the_transfer_runs(tmp_path: Path) -> None:
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    want = make_image(src, 24 * MiB, [(0, 24 * MiB)])

    async def main() -> list[int]:
        async with EmbeddedServer() as url:
            planes = await nbdnats.Planes.connect(url)
            try:
                with throttled_source(tmp_path, src, 12 * MiB) as uri:
                    recv = await nbdnats.start_recv(str(dst), transfer_id="p1", planes=planes)
                    send = await nbdnats.start_send(
                        uri, transfer_id="p1", planes=planes, chunk_size=MiB
                    )
                    seen = [s.done_bytes async for s in send.progress(interval=0.1)]
                    await send.wait()
                    await recv.wait()
                    return seen
            finally:
                await planes.close()

    seen = asyncio.run(main())
    assert sha256_file(dst) == want
    assert len(seen) >= 5
    assert seen == sorted(seen)
    assert 0 < max(seen) <= 24 * MiB


def test_api_errors_are_typed(tmp_path: Path) -> None:
    async def main() -> None:
        await nbdnats.copy(str(tmp_path / "missing.img"), str(tmp_path / "out.img"))

    with pytest.raises(nbdnats.EndpointError, match="does not exist"):
        asyncio.run(main())
    with pytest.raises(nbdnats.UsageError, match="invalid transfer id"):
        subjects.transfer("bad.id")
