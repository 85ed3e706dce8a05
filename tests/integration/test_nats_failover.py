"""Losing a NATS server mid-transfer: clients reconnect (to another node of the cluster,
or to the same server when it comes back) and the transfer finishes with equal digests."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cli import finish_json, start_cli
from tests.images import MiB, allocated, holds, make_image, sha256_file, throttled_nbd
from tests.waits import wait_for

SIZE = 96 * MiB
RATE = 16 * MiB  # a throttled source: about six seconds, so a server can die in the middle


@contextlib.contextmanager
def under_way(
    tmp_path: Path, tid: str, recv_url: str, send_url: str
) -> Iterator[tuple[subprocess.Popen[bytes], subprocess.Popen[bytes], str]]:
    """A six-second copy into dst.img, its receiver and sender each given one server, once
    the receiver has written a first part (a sixth): the sender, the receiver and the
    sha256 of the image."""
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    want = make_image(src, SIZE, [(0, SIZE)])
    with throttled_nbd(src, tmp_path / "src.sock", read_bps=RATE) as (_, uri):
        recv = start_cli("recv", str(dst), "--id", tid, "--data-url", recv_url, "--json")
        send = start_cli("send", uri, "--id", tid, "--data-url", send_url, "--json")
        wait_for(holds(dst, SIZE // 6), "the first writes", 120)
        assert allocated(dst) < SIZE, "the copy ended before a server could die in its middle"
        yield send, recv, want


@pytest.mark.parametrize("victim", ["sender's", "receiver's"])
def test_a_transfer_survives_its_cluster_node_being_killed(
    tmp_path: Path, nats_cluster, victim: str
) -> None:  # type: ignore[no-untyped-def]
    n1, _, n3 = nats_cluster()
    # Each side is given only its own node; the others it learns from the cluster.
    with under_way(tmp_path, "fo", recv_url=n3.url, send_url=n1.url) as (send, recv, want):
        (n1 if victim == "sender's" else n3).proc.send_signal(signal.SIGKILL)
        sent, got = finish_json(send), finish_json(recv)
    assert sha256_file(tmp_path / "dst.img") == want
    assert sent["digest"] == got["digest"]


def test_a_transfer_survives_its_only_server_restarting(tmp_path: Path, start_nats) -> None:  # type: ignore[no-untyped-def]
    server = start_nats()
    with under_way(tmp_path, "rs", recv_url=server.url, send_url=server.url) as (send, recv, want):
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait()
        time.sleep(1.0)  # the outage under test: a second without a server, not a wait
        start_nats(port=server.port)  # the same address comes back
        sent, got = finish_json(send), finish_json(recv)
    assert sha256_file(tmp_path / "dst.img") == want
    assert sent["digest"] == got["digest"]
