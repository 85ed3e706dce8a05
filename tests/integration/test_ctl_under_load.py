"""The ctl plane is never starved: while uncapped transfers saturate the nats-server that
carries both planes, an agent still answers ctl queries within a bound set by its own idle
round trip. The queried agent is itself one end of one of the transfers, so its event loop
serves queries while its core moves bytes and it publishes progress events.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from nbdnats.ctl.controller import Controller
from tests.cli import start_cli
from tests.ctl import AgentProc
from tests.images import MiB, sha256_file
from tests.nats_server import NatsServer

SIZE = 384 * MiB
COPIES = 2  # `nbd-nats copy` processes beside the agents' transfer
IDLE_SAMPLES = 300
MIN_LOADED_SAMPLES = 200
# Generous on purpose: the loaded tail on a 2-core machine is CPU scheduling (the copies,
# the server and the agents share two cores), not queueing in the server; bench/ctl_load.py
# measures it.
RATIO = 20
FLOOR_MS = 200.0


def p99(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=100, method="inclusive")[98]


async def round_trips(
    controller: Controller, node: str, *, count: int = 0, until: Callable[[], bool] | None = None
) -> list[float]:
    """Milliseconds of ``count`` info queries to ``node`` one after another, or of as many
    as are answered before ``until()`` holds."""
    out: list[float] = []
    while (until is None and len(out) < count) or (until is not None and not until()):
        start = time.perf_counter()
        info = await controller.info(node)
        out.append((time.perf_counter() - start) * 1000)
        assert info.node == node and info.state == "up"
    return out


def test_ctl_queries_stay_prompt_while_transfers_saturate_the_server(
    start_nats: Callable[..., NatsServer],
    start_agent: Callable[..., AgentProc],
    tmp_path: Path,
) -> None:
    server = start_nats(jetstream=True)
    disks = tmp_path / "disks"
    disks.mkdir()
    src = disks / "vm1.raw"
    with src.open("wb") as f:  # incompressible and without holes: every byte is sent
        for _ in range(SIZE // (16 * MiB)):
            f.write(os.urandom(16 * MiB))
    want = sha256_file(src)
    start_agent("a", server.url, "--allow", str(disks), "--export", f"vm1={src}")
    start_agent("b", server.url, "--allow", str(disks))

    async def measure() -> tuple[list[float], list[float], list[subprocess.Popen[bytes]]]:
        async with await Controller.connect(server.url) as controller:
            await round_trips(controller, "a", count=20)  # connections and caches warm
            idle = await round_trips(controller, "a", count=IDLE_SAMPLES)
            loads = [
                start_cli(
                    "ctl", "--ctl-url", server.url, "copy", "a:vm1", f"b:{disks / 'by-agents.raw'}"
                )
            ]
            loads += [
                start_cli(
                    "copy", str(src), str(disks / f"copy{i}.raw"), "--data-url", server.url, "-q"
                )
                for i in range(COPIES)
            ]
            loaded = await round_trips(
                controller, "a", until=lambda: all(p.poll() is not None for p in loads)
            )
            return idle, loaded, loads

    idle, loaded, loads = asyncio.run(measure())
    for proc in loads:
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err.decode()
    for target in ("by-agents.raw", *(f"copy{i}.raw" for i in range(COPIES))):
        assert sha256_file(disks / target) == want, target

    idle_p99, loaded_p99 = p99(idle), p99(loaded)
    bound = max(RATIO * idle_p99, FLOOR_MS)
    print(
        f"\nctl info round trip, ms: idle p50 {statistics.median(idle):.2f} p99 "
        f"{idle_p99:.2f}; loaded p50 {statistics.median(loaded):.2f} p99 {loaded_p99:.2f} "
        f"max {max(loaded):.2f} ({len(loaded)} samples); bound {bound:.0f}"
    )
    varz = server.monitoring("varz")
    assert varz["slow_consumers"] == 0, varz["slow_consumers"]
    assert len(loaded) >= MIN_LOADED_SAMPLES, f"the load ended after {len(loaded)} samples"
    assert loaded_p99 <= bound, (idle_p99, loaded_p99)
