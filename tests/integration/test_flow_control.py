"""Flow control against a really slow target: qemu-nbd behind a QEMU throttle group."""

from __future__ import annotations

import time
from pathlib import Path

from nbdnats import subjects
from tests.cli import start_cli
from tests.images import MiB, make_image, sha256_file, throttled_nbd
from tests.waits import wait_for

WINDOW = 8 * MiB
TARGET_BPS = 16 * MiB  # an unthrottled copy here runs at hundreds of MB/s: >10x faster


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def test_slow_receiver_loses_nothing_and_memory_stays_bounded(tmp_path: Path, start_nats) -> None:  # type: ignore[no-untyped-def]
    server = start_nats()
    nats_url = server.url
    src = tmp_path / "src.img"
    want = make_image(src, 128 * MiB, [(0, 128 * MiB)])
    dst = tmp_path / "dst.img"
    make_image(dst, 128 * MiB, [])
    with throttled_nbd(dst, tmp_path / "slow.sock", write_bps=TARGET_BPS) as (_, uri):
        recv = start_cli(
            "recv", uri, "--id", "slow", "--data-url", nats_url, "--window", str(WINDOW)
        )
        # Idle receiver: interpreter, runtime and connections loaded, listening.
        ready = subjects.transfer("slow")[0]
        wait_for(lambda: server.has_subscription(ready), "the receiver", 60)
        recv_base = rss(recv.pid)
        conns = server.connections()
        send = start_cli(
            "send", str(src), "--id", "slow", "--data-url", nats_url, "--window", str(WINDOW)
        )
        # The sender's base: interpreter and runtime loaded, connected.
        wait_for(lambda: server.connections() > conns or send.poll() is not None, "sender", 60)
        send_base = rss(send.pid)
        peaks = {"recv": 0, "send": 0}
        while recv.poll() is None or send.poll() is None:
            for name, proc in (("recv", recv), ("send", send)):
                if proc.poll() is None:
                    peaks[name] = max(peaks[name], rss(proc.pid))
            time.sleep(0.05)  # the sampling interval of the peaks, not a wait
        _, r_err = recv.communicate()
        _, s_err = send.communicate()
    assert recv.returncode == 0, r_err.decode()
    assert send.returncode == 0, s_err.decode()
    assert sha256_file(dst) == want  # nothing lost, nothing cut off as a slow consumer
    growth = {k: (peaks[k] - b) // MiB for k, b in (("recv", recv_base), ("send", send_base))}
    print(f"rss growth MiB: {growth}")
    # Memory follows the window, not the 128 MiB image.
    assert peaks["recv"] - recv_base <= WINDOW + 64 * MiB, (peaks, recv_base)
    assert peaks["send"] - send_base <= WINDOW + 64 * MiB, (peaks, send_base)
