"""Losing a NATS server mid-transfer: clients reconnect (to another node of the cluster,
or to the same server when it comes back) and the transfer finishes with equal digests."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import (
    MiB,
    allocated,
    make_image,
    sha256_file,
    start_cli,
    throttled_nbd,
    wait_for,
)

SIZE = 96 * MiB
RATE = 16 * MiB  # a throttled source: about six seconds, so a server can die in the middle


def under_way(dst: Path) -> None:
    """Wait until the receiver has written a first part (a sixth) of the six-second copy."""
    wait_for(lambda: dst.exists() and allocated(dst) >= SIZE // 6, "the first writes", 120)
    assert allocated(dst) < SIZE, "the copy ended before a server could die in its middle"


def finish(proc: subprocess.Popen[bytes]) -> dict[str, object]:
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err.decode()
    return json.loads(out.decode().strip().splitlines()[-1])  # type: ignore[no-any-return]


@pytest.mark.parametrize("victim", ["sender's", "receiver's"])
def test_a_transfer_survives_its_cluster_node_being_killed(
    tmp_path: Path, nats_cluster, victim: str
) -> None:  # type: ignore[no-untyped-def]
    n1, _, n3 = nats_cluster()
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    want = make_image(src, SIZE, [(0, SIZE)])
    with throttled_nbd(src, tmp_path / "src.sock", read_bps=RATE) as (_, uri):
        # Each side is given only its own node; the others it learns from the cluster.
        recv = start_cli("recv", str(dst), "--id", "fo", "--data-url", n3.url, "--json")
        send = start_cli("send", uri, "--id", "fo", "--data-url", n1.url, "--json")
        under_way(dst)
        (n1 if victim == "sender's" else n3).proc.send_signal(signal.SIGKILL)
        sent, got = finish(send), finish(recv)
    assert sha256_file(dst) == want
    assert sent["digest"] == got["digest"]


def test_a_transfer_survives_its_only_server_restarting(tmp_path: Path, start_nats) -> None:  # type: ignore[no-untyped-def]
    server = start_nats()
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    want = make_image(src, SIZE, [(0, SIZE)])
    with throttled_nbd(src, tmp_path / "src.sock", read_bps=RATE) as (_, uri):
        recv = start_cli("recv", str(dst), "--id", "rs", "--data-url", server.url, "--json")
        send = start_cli("send", uri, "--id", "rs", "--data-url", server.url, "--json")
        under_way(dst)
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait()
        time.sleep(1.0)  # the outage under test: a second without a server, not a wait
        start_nats(port=server.port)  # the same address comes back
        sent, got = finish(send), finish(recv)
    assert sha256_file(dst) == want
    assert sent["digest"] == got["digest"]
