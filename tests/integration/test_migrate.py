"""``nbd-nats migrate`` against real QEMU, through NATS (the core's bridge and an embedded
nats-server) and ``--direct`` (the baseline): the test guest (bench/vm.py,
scripts/guest.sh) keeps writing an increasing counter to its disk while it is migrated.

KVM when /dev/kvm can run a guest, TCG otherwise ($NBDNATS_TEST_ACCEL overrides).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import msgspec
import nats
import pytest

from bench import vm
from nbdnats import _core, subjects
from nbdnats.embedded import EmbeddedServer, free_port
from nbdnats.errors import MigrationError, MigrationTimeout, UsageError
from nbdnats.migration import run as migrate
from nbdnats.migration.disks import PREFIX, ours
from nbdnats.migration.paths import NatsPath
from nbdnats.migration.remote import AgentPath
from nbdnats.planes import Planes
from nbdnats.schemas import QmpCommand, encode
from tests.cli import one_line_error, run_cli, start_cli
from tests.ctl import AgentProc
from tests.nats_server import NatsServer
from tests.waits import until, wait_for

MiB = 1 << 20
DISK = 64 * MiB


@pytest.fixture(scope="session")
def guest() -> tuple[Path, Path]:
    """Build (or find cached) the guest once; a failure here fails the tests, no skip."""
    return vm.guest_files()


@pytest.fixture
def vms(guest: tuple[Path, Path], tmp_path: Path) -> Iterator[Callable[..., vm.VM]]:
    """Start test-guest VMs in tmp_path; every one is stopped at teardown."""
    started: list[vm.VM] = []

    def start(
        name: str,
        size: int = DISK,
        data_mib: int = 0,
        incoming: bool = False,
        paused: bool = False,
    ) -> vm.VM:
        disk = vm.make_disk(tmp_path / f"{name}.qcow2", size, data_mib)
        machine = vm.VM(name, tmp_path, disk, incoming=incoming, paused=paused)
        started.append(machine)
        return machine.start()

    yield start
    for machine in started:
        if machine.proc and machine.proc.poll() is None:
            machine.proc.kill()
            machine.proc.wait(10)


async def migrate_via(mode: str, source: vm.VM, dest: vm.VM, **kw: Any) -> migrate.MigrationReport:
    """``migrate.migrate`` on the direct path, or through an embedded nats-server."""
    if mode == "direct":
        return await migrate.migrate(source.qmp, dest.qmp, **kw)
    async with EmbeddedServer() as url:
        planes = await Planes.connect(url, url, "migrate-test")
        try:
            path = NatsPath(planes, "t1", timeout=float(kw.get("timeout") or 60))
            return await migrate.migrate(source.qmp, dest.qmp, path=path, **kw)
        finally:
            await planes.close()


def our_leftovers(source: vm.VM) -> list[str]:
    """Nodes or jobs nbd-nats left in the source QEMU."""
    nodes = [n["node-name"] for n in source.command("query-named-block-nodes", flat=True)]
    jobs = [j["device"] for j in source.command("query-block-jobs")]
    return [x for x in nodes + jobs if x.startswith(PREFIX)]


def capability(machine: vm.VM, name: str) -> bool:
    caps = machine.command("query-migrate-capabilities")
    return any(c["capability"] == name and c["state"] for c in caps)


def qmp_args(source: str, dest: str) -> list[str]:
    return ["--src-qmp", source, "--dst-qmp", dest]


def ctl(url: str, *args: str) -> list[str]:
    return ["ctl", "--ctl-url", url, *args]


def slow_to_mirror(vms: Callable[..., vm.VM]) -> tuple[vm.VM, vm.VM]:
    """A running source with 32 MiB of data, and a destination waiting for it: at a capped
    mirror speed the mirror runs for seconds, long enough to break something meanwhile."""
    source = vms("src", data_mib=32)
    source.wait_counter(0)
    return source, vms("dst", incoming=True)


def assert_source_runs_on(source: vm.VM) -> None:
    """Rolled back: the source VM runs, its guest goes on counting, and nothing of ours
    is left in it."""
    assert source.status() == "running"
    assert our_leftovers(source) == []
    assert not capability(source, "pause-before-switchover")
    printed = source.last_counter()
    source.wait_counter(printed + 3, timeout=120)


def wait_for_mirroring(running: subprocess.Popen[bytes]) -> None:
    """Read the migrating process's state lines until it says it mirrors."""
    assert running.stderr is not None
    deadline = time.monotonic() + 60
    lines = []
    while time.monotonic() < deadline:
        line = running.stderr.readline().decode()
        lines.append(line)
        if not line or "mirroring" in line:
            break
    assert lines and "mirroring" in lines[-1], lines


@pytest.mark.parametrize("mode", ["nats", "nats-return-path", "direct"])
def test_migrate_while_the_guest_writes(
    mode: str,
    vms: Callable[..., vm.VM],
    tmp_path: Path,
    start_nats: Callable[..., NatsServer],
) -> None:
    """nats: every byte between the QEMUs through the core and a nats-server, the result
    reported as a ctl event; with QEMU's return path on, the migration stream carries
    bytes both ways; direct: the sockets joined, the baseline."""
    source = vms("src", data_mib=8)
    before = source.wait_counter(10)
    dest = vms("dst", incoming=True, paused=True)
    url = start_nats(jetstream=True).url
    path = ["--direct"] if mode == "direct" else ["--data-url", url, "--node", "hv1"]
    path += ["--return-path"] if mode == "nats-return-path" else []
    mode = mode.removesuffix("-return-path")
    # The events stream exists (a controller or agent made it); the migration reports there.
    assert run_cli(*ctl(url, "nodes")).returncode == 0

    sockets = qmp_args(source.qmp, dest.qmp)
    proc = run_cli("migrate", *path, *sockets, "--json", "--timeout", "30", timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()
    report = json.loads(proc.stdout)
    assert report["mode"] == mode and report["disks"] == 1
    events = run_cli(*ctl(url, "--json", "events", "--all", "--no-follow"))
    stored = [json.loads(line) for line in events.stdout.decode().splitlines()]
    if mode == "nats":
        (ev,) = [e for e in stored if e["subject"] == "ctl.evt.hv1.migration"]
        assert ev["data"]["state"] == "done" and ev["data"]["mode"] == "nats"
        assert ev["data"]["disk_bytes"] == report["disk_bytes"]
        assert ev["data"]["downtime_ms"] == report["downtime_ms"]
    else:
        assert stored == []  # no NATS on the direct path
    assert report["disk_bytes"] >= DISK  # the whole disk went through the mirror
    assert report["ram_bytes"] > 0 and report["downtime_ms"] > 0
    assert report["total_seconds"] > 0 and report["paused_ms"] > 0

    assert source.status() == "postmigrate"
    assert dest.status() == "running"
    assert not capability(source, "pause-before-switchover")  # restored

    # Everything the source printed was printed before the switchover (it is stopped now).
    last_on_source = source.last_counter()
    assert last_on_source > before
    # The same guest goes on counting on the destination, from where it stopped.
    dest.wait_counter(last_on_source + 10, timeout=120)
    on_dest = dest.counters()
    assert on_dest[0] > last_on_source and on_dest[0] <= last_on_source + 2, on_dest[:3]
    assert on_dest == list(range(on_dest[0], on_dest[0] + len(on_dest)))

    # Stop the guest, then every write it saw acknowledged, on either host, is on the disk.
    dest.command("stop")
    last = dest.last_counter()
    dest.stop()
    records = vm.disk_records(dest.disk, tmp_path)
    assert max(records.values()) >= last >= last_on_source
    assert vm.missing_writes(records, last) == []


def test_destination_disk_of_another_size_is_refused_and_the_source_runs_on(
    vms: Callable[..., vm.VM],
) -> None:
    source = vms("src")
    source.wait_counter(0)
    dest = vms("dst", size=DISK // 2, incoming=True)

    proc = run_cli("migrate", "--direct", *qmp_args(source.qmp, dest.qmp), "--quiet")
    line = one_line_error(proc)
    assert proc.returncode == 2
    assert "disk" in line and str(DISK // 2) in line and str(DISK) in line, line
    assert_source_runs_on(source)


@pytest.mark.parametrize("mode", ["nats", "direct"])
def test_destination_killed_mid_mirror(mode: str, vms: Callable[..., vm.VM]) -> None:
    # The mirror copies at 4 MiB/s: the destination is killed in the middle of it.
    source, dest = slow_to_mirror(vms)
    killed_at: list[int] = []

    def on_progress(p: migrate.Progress) -> None:
        if p.state == migrate.State.MIRRORING and p.disk_done > 0 and not killed_at:
            assert dest.proc is not None
            dest.proc.kill()
            killed_at.append(p.disk_done)

    with pytest.raises(MigrationError) as caught:
        asyncio.run(
            migrate_via(
                mode, source, dest, timeout=20, mirror_speed=4 * MiB, on_progress=on_progress
            )
        )
    assert killed_at and killed_at[0] < DISK, killed_at
    assert not isinstance(caught.value, UsageError)
    message = str(caught.value)
    assert "mirroring" in message and "rolled back" in message, message

    assert_source_runs_on(source)


@pytest.mark.parametrize("mode", ["nats", "direct"])
def test_stalled_stream_times_out(mode: str, vms: Callable[..., vm.VM]) -> None:
    # The destination QEMU is frozen (SIGSTOP) mid-mirror: the mirror stops moving, and
    # after --timeout without progress the migration fails and rolls back. It is thawed
    # when the rollback starts, as a network that comes back would be.
    source, dest = slow_to_mirror(vms)
    assert dest.proc is not None
    frozen: list[float] = []

    def on_progress(p: migrate.Progress) -> None:
        assert dest.proc is not None
        if p.state == migrate.State.MIRRORING and p.disk_done > 0 and not frozen:
            os.kill(dest.proc.pid, signal.SIGSTOP)
            frozen.append(time.monotonic())
        elif p.state == migrate.State.ROLLING_BACK and frozen:
            os.kill(dest.proc.pid, signal.SIGCONT)

    with pytest.raises(MigrationTimeout) as caught:
        asyncio.run(
            migrate_via(
                mode, source, dest, timeout=2, mirror_speed=4 * MiB, on_progress=on_progress
            )
        )
    message = str(caught.value)
    assert "mirroring the disks made no progress for 2 s" in message, message
    assert "rolled back" in message, message
    assert frozen
    assert dest.proc.wait(60) == 0  # told to quit once thawed
    assert_source_runs_on(source)


@pytest.mark.parametrize("mode", ["nats", "direct"])
def test_cancel_from_another_invocation(mode: str, vms: Callable[..., vm.VM]) -> None:
    source, dest = slow_to_mirror(vms)
    direct = ["--direct"] if mode == "direct" else []
    sockets = qmp_args(source.qmp, dest.qmp)
    running = start_cli("migrate", *direct, *sockets, "--id", "mig1", "--mirror-speed", "2M")
    wait_for_mirroring(running)

    proc = run_cli("migrate", "--cancel", "--id", "mig1", timeout=90)
    assert proc.returncode == 0, proc.stderr.decode()
    assert "cancelled migration mig1" in proc.stderr.decode()
    # The migrating process was told to stop (SIGTERM), rolled back, and exited with 143.
    assert running.wait(60) == 128 + signal.SIGTERM
    assert dest.proc is not None and dest.proc.wait(60) == 0  # quit, not killed
    assert_source_runs_on(source)


def test_cancel_after_the_migrating_process_was_killed(vms: Callable[..., vm.VM]) -> None:
    # A SIGKILLed nbd-nats leaves its mirror job, NBD node and capabilities in the source
    # and a waiting destination; --cancel --id finds the sockets in its record and rolls
    # all of it back through QMP.
    source, dest = slow_to_mirror(vms)
    sockets = qmp_args(source.qmp, dest.qmp)
    running = start_cli("migrate", "--direct", *sockets, "--id", "mig2", "--mirror-speed", "2M")
    wait_for_mirroring(running)
    running.kill()
    running.wait(10)
    assert our_leftovers(source) != []  # what the killed process left
    assert capability(source, "pause-before-switchover")

    proc = run_cli("migrate", "--cancel", "--id", "mig2", timeout=90)
    assert proc.returncode == 0, proc.stderr.decode()
    assert "the destination was stopped" in proc.stderr.decode()
    assert dest.proc is not None and dest.proc.wait(60) == 0
    assert_source_runs_on(source)


def test_direct_takes_no_data_url() -> None:
    url = "nats://127.0.0.1:1"
    proc = run_cli("migrate", "--direct", "--data-url", url, *qmp_args("/x/a", "/x/b"))
    line = one_line_error(proc)
    assert proc.returncode == 2 and "drop --data-url" in line


def test_unreachable_data_plane_is_one_line(vms: Callable[..., vm.VM]) -> None:
    source = vms("src")
    dest = vms("dst", incoming=True)
    url = f"nats://127.0.0.1:{free_port()}"
    proc = run_cli("migrate", "--data-url", url, *qmp_args(source.qmp, dest.qmp))
    line = one_line_error(proc)
    assert proc.returncode == 1 and "cannot connect" in line
    assert source.status() == "running" and dest.status() == "inmigrate"  # untouched


def test_cancel_with_nothing_to_cancel() -> None:
    proc = run_cli("migrate", "--cancel", "--id", "nothing-here")
    line = one_line_error(proc)
    assert proc.returncode == 2 and "no running migration nothing-here" in line


def test_unreachable_qmp_socket_is_a_usage_error(tmp_path: Path) -> None:
    sockets = qmp_args(str(tmp_path / "none.qmp"), str(tmp_path / "none2.qmp"))
    proc = run_cli("migrate", "--direct", *sockets)
    line = one_line_error(proc)
    assert proc.returncode == 2 and "source QMP socket" in line


def test_guest_image_is_built_once_and_reused(guest: tuple[Path, Path]) -> None:
    kernel, initrd = guest
    assert kernel.stat().st_size > 1 * MiB and initrd.stat().st_size > 100_000
    start = time.monotonic()
    again = subprocess.run(
        [str(vm.ROOT / "scripts" / "guest.sh")], capture_output=True, text=True, check=True
    )
    assert Path(again.stdout.strip()) == kernel.parent
    assert time.monotonic() - start < 30


def test_ctl_migrate_between_agents(
    vms: Callable[..., vm.VM],
    tmp_path: Path,
    start_nats: Callable[..., NatsServer],
    start_agent: Callable[..., AgentProc],
) -> None:
    """``nbd-nats ctl migrate a:vm1 b``: each agent talks only to its own QEMU's QMP
    socket; the destination's agent relays the few QMP commands a destination needs; the
    disks and the RAM cross NATS; each state and the end are ctl events."""
    source = vms("src", data_mib=8)
    before = source.wait_counter(10)
    dest = vms("dst", incoming=True, paused=True)
    url = start_nats(jetstream=True).url
    start_agent("hv-a", url, "--vm", f"vm1={source.qmp}")
    start_agent("hv-b", url, "--vm", f"vm1={dest.qmp}")

    m1 = ["--id", "m1", "--timeout", "30", "--return-path"]
    proc = run_cli(*ctl(url, "migrate", "hv-a:vm1", "hv-b", *m1), timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()
    err = proc.stderr.decode()
    assert "migration m1: mirroring" in err and "migrated vm1 hv-a -> hv-b" in err
    assert source.status() == "postmigrate"
    assert dest.status() == "running"
    last_on_source = source.last_counter()
    assert last_on_source > before
    dest.wait_counter(last_on_source + 10, timeout=120)
    on_dest = dest.counters()
    assert on_dest[0] > last_on_source and on_dest[0] <= last_on_source + 2, on_dest[:3]
    dest.command("stop")
    last = dest.last_counter()
    dest.stop()
    records = vm.disk_records(dest.disk, tmp_path)
    assert vm.missing_writes(records, last) == []

    states = [json.loads(line)["data"]["state"] for line in _states(url, "--json").splitlines()]
    assert states[0] == "connecting" or states[0] == "inspecting"
    assert states[-1] == "done" and "switchover" in states


def test_ctl_migrate_refuses_unknown_vms_and_running_destinations(
    vms: Callable[..., vm.VM],
    start_nats: Callable[..., NatsServer],
    start_agent: Callable[..., AgentProc],
) -> None:
    """An unknown VM is refused; a destination's agent relays QMP only for a QEMU that
    waits for an incoming migration, and only the commands such a destination needs."""
    source = vms("src")
    dest = vms("dst", incoming=True)
    url = start_nats(jetstream=True).url
    start_agent("hv-a", url, "--vm", f"vm1={source.qmp}")
    start_agent("hv-b", url, "--vm", f"vm1={dest.qmp}")
    err = one_line_error(run_cli(*ctl(url, "migrate", "hv-a:nope", "hv-b")))
    assert "no VM 'nope' on hv-a (its agent knows: vm1" in err

    async def relay(node: str, command: str, **arguments: Any) -> dict[str, Any]:
        nc = await nats.connect(url)
        try:
            msg = QmpCommand(migration_id="x1", vm="vm1", command=command, arguments=arguments)
            resp = await nc.request(subjects.ctl_command(node, "qmp"), encode(msg), timeout=20)
            return dict(msgspec.json.decode(resp.data))
        finally:
            await nc.close()

    # The running source is nobody's destination: no session, its monitor stays free.
    reply = asyncio.run(relay("hv-a", "query-status"))
    assert reply["code"] == "denied" and "is running, not waiting" in reply["error"]
    assert source.status() == "running"
    for command, args in [
        ("human-monitor-command", {"command-line": "info registers"}),
        ("blockdev-add", {"driver": "file", "filename": "/etc/shadow", "node-name": "x"}),
        ("nbd-server-start", {"addr": {"type": "inet", "data": {"host": "0.0.0.0", "port": "1"}}}),
        ("migrate-incoming", {"uri": "tcp:0.0.0.0:4444"}),
        ("migrate-set-capabilities", {"capabilities": [{"capability": "x-colo", "state": True}]}),
        ("cont", {}),
        ("nbd-server-stop", {}),
    ]:
        reply = asyncio.run(relay("hv-b", command, **args))
        assert reply["ok"] is False and reply["code"] == "denied", (command, reply)
    assert asyncio.run(relay("hv-b", "query-status"))["result"]["status"] == "inmigrate"
    # quit is allowed while it only waits: a migration's rollback needs it.
    assert asyncio.run(relay("hv-b", "quit"))["ok"] is True
    assert dest.proc is not None and dest.proc.wait(60) == 0


def test_ctl_migrate_timeout_reaches_the_destination_receivers(
    vms: Callable[..., vm.VM],
    start_nats: Callable[..., NatsServer],
    start_agent: Callable[..., AgentProc],
) -> None:
    """The source's agent asks the destination's for receivers with the migration's stream
    timeout (``ctl migrate --timeout``), then never sends: the destination's receiver gives
    up after that timeout, not after the default."""
    dest = vms("dst", incoming=True)
    server = start_nats(jetstream=True)
    start_agent("hv-b", server.url, "--vm", f"vm1={dest.qmp}")
    asked = 6.0  # well under the default: the wait shows whose timeout it was
    assert asked < _core.DEFAULT_TIMEOUT / 2
    opens, _, _ = subjects.transfer(subjects.migration_ram_id("m4"))

    async def wait_for_the_receiver() -> float:
        planes = await Planes.connect(server.url, server.url, "hv-a")
        path = AgentPath(planes, "hv-b", "vm1", "m4", timeout=asked)
        try:
            await path.start_receivers(await path.listen(), {})
            started = time.monotonic()
            await until(lambda: server.has_subscription(opens), "the receiver listening")
            await until(
                lambda: not server.has_subscription(opens), "the receiver giving up", asked + 20
            )
            return time.monotonic() - started
        finally:
            await path.close()
            await planes.close()

    waited = asyncio.run(wait_for_the_receiver())
    assert asked - 1 < waited < asked + 10, waited


def test_ctl_cancel_rolls_a_migration_back(
    vms: Callable[..., vm.VM],
    start_nats: Callable[..., NatsServer],
    start_agent: Callable[..., AgentProc],
) -> None:
    source, dest = slow_to_mirror(vms)
    url = start_nats(jetstream=True).url
    a = start_agent("hv-a", url, "--vm", f"vm1={source.qmp}")
    start_agent("hv-b", url, "--vm", f"vm1={dest.qmp}")
    running = start_cli(
        *ctl(url, "migrate", "hv-a:vm1", "hv-b", "--id", "m2", "--mirror-speed", "2M")
    )
    wait_for(lambda: "migrate m2" in a.text() and "mirroring" in _states(url), "mirroring", 60)
    assert run_cli(*ctl(url, "cancel", "m2")).returncode == 0
    _, err = running.communicate(timeout=60)
    assert running.returncode == 1 and "cancelled" in err.decode(), err.decode()
    assert dest.proc is not None and dest.proc.wait(60) == 0  # quit through its agent
    wait_for(lambda: "migrate m2 cancelled" in a.text(), "the agent's report", 60)
    assert_source_runs_on(source)


def _states(url: str, *options: str) -> str:
    """The migration events stored so far, one a line."""
    out = run_cli(*ctl(url, *options, "events", "--all", "--no-follow", "--kind", "migration"))
    return out.stdout.decode()


def test_ctl_migrate_survives_the_destination_agent_dying(
    vms: Callable[..., vm.VM],
    start_nats: Callable[..., NatsServer],
    start_agent: Callable[..., AgentProc],
) -> None:
    """The destination's agent is killed mid-mirror: the source's agent notices within
    seconds, rolls the source back (it runs on, nothing of ours left) and says what it
    could not undo on the other side."""
    source, dest = slow_to_mirror(vms)
    url = start_nats(jetstream=True).url
    start_agent("hv-a", url, "--vm", f"vm1={source.qmp}")
    b = start_agent("hv-b", url, "--vm", f"vm1={dest.qmp}")
    m3 = ["--id", "m3", "--mirror-speed", "2M", "--timeout", "60"]
    running = start_cli(*ctl(url, "migrate", "hv-a:vm1", "hv-b", *m3))
    wait_for(lambda: "state=mirroring" in _states(url), "mirroring", 60)
    b.proc.kill()
    b.proc.wait()
    _, err = running.communicate(timeout=90)
    assert running.returncode == 1, err.decode()
    assert "went away" in err.decode() or "no agent answers" in err.decode(), err.decode()
    assert_source_runs_on(source)


def test_migrate_rate_sets_qemus_limits_and_a_rollback_restores_them(
    vms: Callable[..., vm.VM],
) -> None:
    """A cap over NATS: QEMU's max-bandwidth takes it and the one disk's mirror job its
    whole share, so QEMU never makes data faster than the streams may carry it; a new cap
    (``ctl rate``'s path) changes both and the streams'; a rollback restores the old
    max-bandwidth."""
    source, dest = slow_to_mirror(vms)
    before = source.command("query-migrate-parameters")["max-bandwidth"]

    async def main() -> list[tuple[int, list[int], list[int | None]]]:
        control = migrate.RateControl()
        mirroring = asyncio.Event()

        def on_progress(p: migrate.Progress) -> None:
            if p.state == migrate.State.MIRRORING:
                mirroring.set()

        async def limits() -> tuple[int, list[int], list[int | None]]:
            assert control.run is not None
            src = control.run.src
            params = await src.cmd("query-migrate-parameters")
            jobs = [j for j in await src.cmd("query-block-jobs") if ours(j)]
            path = cast(NatsPath, control.run.path)
            streams = [h.stats().rate_limit for h in path.disk_senders]
            return params["max-bandwidth"], [j["speed"] for j in jobs], streams

        task = asyncio.create_task(
            migrate_via(
                "nats", source, dest, rate=2 * MiB, control=control, on_progress=on_progress
            )
        )
        await asyncio.wait_for(mirroring.wait(), 120)
        seen = [await limits()]
        await control.set_rate(4 * MiB)
        seen.append(await limits())
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return seen

    seen = asyncio.run(main())
    assert seen == [(2 * MiB, [2 * MiB], [2 * MiB]), (4 * MiB, [4 * MiB], [4 * MiB])]
    assert source.command("query-migrate-parameters")["max-bandwidth"] == before
    assert_source_runs_on(source)
