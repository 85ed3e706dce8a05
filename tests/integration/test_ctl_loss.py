"""The ctl plane reports; it never decides a transfer. Losing its server mid-transfer
leaves the transfer's result standing: exit 0, the target exact, at most one line saying
what could not be published."""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

from tests.cli import start_cli
from tests.images import MiB, holds, make_image, sha256_file, throttled_nbd
from tests.nats_server import NatsServer
from tests.waits import wait_for

WARNING = "nbd-nats: warning: the ctl plane was lost; the transfer's ctl event was not published"


def test_losing_the_ctl_server_mid_transfer_keeps_the_result(
    tmp_path: Path, start_nats: Callable[..., NatsServer]
) -> None:
    """Before: the target was exact, yet both ends exited 1 with a traceback (draining
    the ctl connection raised ConnectionReconnectingError)."""
    data, ctl = start_nats(), start_nats()
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    want = make_image(src, 48 * MiB, [(0, 48 * MiB)])
    common = ("--id", "ctl-loss", "--data-url", data.url, "--ctl-url", ctl.url, "--json")
    with throttled_nbd(src, tmp_path / "slow.sock", read_bps=16 * MiB) as (_, uri):
        recv = start_cli("recv", str(dst), *common)
        send = start_cli("send", uri, *common)
        wait_for(holds(dst), "the transfer", timeout=30)
        ctl.proc.send_signal(signal.SIGKILL)
        ctl.proc.wait(10)
        s_out, s_err = send.communicate(timeout=60)
        r_out, r_err = recv.communicate(timeout=60)
    for name, proc, err in (("send", send, s_err), ("recv", recv, r_err)):
        text = err.decode()
        assert proc.returncode == 0, f"{name}: {text}"
        assert "Traceback" not in text, f"{name}: {text}"
        lines = [line for line in text.splitlines() if line.strip()]
        assert lines == [WARNING], f"{name}: {lines}"
    assert sha256_file(dst) == want
    assert b'"digest"' in s_out and b'"digest"' in r_out
