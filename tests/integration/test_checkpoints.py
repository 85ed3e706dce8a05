"""Checkpoints (nbdnats.backup) against real QEMU, qemu-img, qemu-io, qemu-nbd and
nbdinfo: frozen views that equal the disk at the checkpoint's instant, dirty bitmaps that
cover every write since the last committed checkpoint, and no write lost when a run fails,
is killed, or the VM crashes.

The counter guest (bench/vm.py) proves the views frozen while a guest writes; the other VM
cases use a QEMU that never starts its guest (-S) and write through its monitor's qemu-io,
which is quicker under TCG and writes exactly where the test says.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bench import vm
from nbdnats.backup import Checkpoint, offline_checkpoint, vm_checkpoint
from nbdnats.errors import EndpointError, UsageError
from tests.waits import until, wait_for

MiB = 1 << 20
KiB = 1 << 10
DISK = 64 * MiB
BACKEND = "/machine/peripheral/vda/virtio-backend"
FIRST = "first backup of this disk"


class Failed(Exception):
    """What a test raises inside a checkpoint to leave it without commit."""


@pytest.fixture(scope="session")
def guest() -> tuple[Path, Path]:
    return vm.guest_files()


class Qemu:
    """A QEMU with one virtio disk (id vda, node disk0) that never runs its guest."""

    def __init__(self, dir: Path, disk: Path, fmt: str = "qcow2") -> None:
        self.dir, self.disk, self.fmt = dir, disk, fmt
        self.qmp = str(dir / "bare.qmp")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Qemu:
        Path(self.qmp).unlink(missing_ok=True)
        a = [vm.QEMU, "-machine", "q35", "-accel", "tcg", "-nodefaults", "-display", "none"]
        a += ["-S", "-qmp", f"unix:{self.qmp},server=on,wait=off"]
        a += ["-blockdev", f"driver=file,filename={self.disk},node-name=file0"]
        a += ["-blockdev", f"driver={self.fmt},file=file0,node-name=disk0"]
        a += ["-device", "virtio-blk-pci,drive=disk0,id=vda"]
        with (self.dir / "bare.log").open("ab") as log:
            self.proc = subprocess.Popen(a, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        wait_for(lambda: Path(self.qmp).exists(), "QEMU's QMP socket", 20)
        # The socket exists before QEMU has opened its disks (and marked their persistent
        # bitmaps in use): QMP answers only once startup is done, so ask it something.
        asyncio.run(self.cmd("query-status"))
        return self

    async def cmd(self, name: str, **args: Any) -> Any:
        return await vm.qmp_command(self.qmp, name, **args)

    async def write(self, offset: int, length: int, pattern: int) -> None:
        line = f'qemu-io -d {BACKEND} "write -P {pattern} {offset} {length}"'
        out = await self.cmd("human-monitor-command", **{"command-line": line})
        assert out == "" or "wrote" in out, out

    def quit(self) -> None:
        assert self.proc is not None
        # QEMU may close the monitor before the client's own goodbye: its exit is the answer.
        with contextlib.suppress(EOFError, ConnectionError):
            asyncio.run(self.cmd("quit"))
        self.proc.wait(20)

    def crash(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(20)


@pytest.fixture
def bare(tmp_path: Path) -> Iterator[Callable[..., Qemu]]:
    started: list[Qemu] = []

    def start(fmt: str = "qcow2") -> Qemu:
        disk = tmp_path / f"disk.{fmt}"
        subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(disk), str(DISK)], check=True)
        q = Qemu(tmp_path, disk, fmt)
        started.append(q)
        return q.start()

    yield start
    for q in started:
        if q.proc and q.proc.poll() is None:
            q.proc.kill()
            q.proc.wait(10)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_view(uri: str, out: Path) -> Path:
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", uri, str(out)], check=True)
    return out


def copy_paused(disk: Path, out: Path) -> Path:
    """The disk of a stopped VM, read beside it (QEMU flushes its disks when it stops)."""
    subprocess.run(
        ["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", str(disk), str(out)],
        check=True,
    )
    return out


def dirty(uri: str, bitmap: str) -> list[tuple[int, int]]:
    """The dirty ranges of ``bitmap`` as its export reports them: [(offset, length)]."""
    out = subprocess.run(
        ["nbdinfo", "--json", f"--map=qemu:dirty-bitmap:{bitmap}", uri],
        check=True,
        capture_output=True,
    ).stdout
    return [(e["offset"], e["length"]) for e in json.loads(out) if e["type"] & 1]


def covered(ranges: list[tuple[int, int]], offset: int, length: int) -> bool:
    return any(o <= offset and offset + length <= o + n for o, n in ranges)


def changed_sectors(a: Path, b: Path) -> list[int]:
    x, y = a.read_bytes(), b.read_bytes()
    return [i for i in range(0, len(x), 512) if x[i : i + 512] != y[i : i + 512]]


async def node_bitmaps(qmp: str) -> dict[str, dict[str, Any]]:
    for n in await vm.qmp_command(qmp, "query-named-block-nodes", flat=True):
        if n["node-name"] == "disk0":
            return {b["name"]: b for b in n.get("dirty-bitmaps", [])}
    raise AssertionError("no node disk0")


async def leftovers(qmp: str) -> list[str]:
    """Exports, jobs and nodes of a checkpoint still in the VM."""
    exports = [e["id"] for e in await vm.qmp_command(qmp, "query-block-exports")]
    jobs = [j["device"] for j in await vm.qmp_command(qmp, "query-block-jobs")]
    nodes = [n["node-name"] for n in await vm.qmp_command(qmp, "query-named-block-nodes")]
    return [x for x in exports + jobs + nodes if x.startswith("nbdnats-")]


async def no_nbd_server(qmp: str, work: Path) -> bool:
    """Nobody's NBD server runs in the VM: a fresh one starts (and is stopped again)."""
    addr = {"type": "unix", "data": {"path": str(work / "probe.sock")}}
    await vm.qmp_command(qmp, "nbd-server-start", addr=addr)
    await vm.qmp_command(qmp, "nbd-server-stop")
    return True


async def full(qmp: str, work: Path) -> str:
    """A committed full checkpoint; its name."""
    async with await vm_checkpoint(qmp, "vm1", since=None, workdir=work) as cp:
        assert cp.reason == FIRST and cp.since is None
        await cp.commit()
    return cp.name


def test_vm_full_then_incremental_views_are_frozen_while_the_guest_writes(
    guest: tuple[Path, Path], tmp_path: Path
) -> None:
    machine = vm.VM("vm1", tmp_path, vm.make_disk(tmp_path / "vm1.qcow2", DISK))
    machine.start()
    work = tmp_path / "ckpt"

    async def qmp(name: str) -> None:
        await vm.qmp_command(machine.qmp, name)

    async def writes_go_on() -> None:
        seen = machine.last_counter()
        await until(lambda: machine.last_counter() > seen + 3, "guest writes", 120)

    async def checkpoint(since: str | None, ref: Path) -> Checkpoint:
        """A checkpoint taken while the guest is stopped, beside a copy of its disk."""
        await qmp("stop")
        copy_paused(machine.disk, ref)
        cp = await vm_checkpoint(machine.qmp, "vm1", since=since, workdir=work)
        await qmp("cont")
        return cp

    async def scenario() -> None:
        await until(lambda: machine.last_counter() > 2, "the guest counting", 120)
        async with await checkpoint(None, tmp_path / "ref1.raw") as cp1:
            (view,) = cp1.disks
            assert (cp1.reason, cp1.since, view.bitmap) == (FIRST, None, None)
            assert (view.disk, view.size) == ("vm1/vda", DISK)
            await writes_go_on()
            assert sha256(read_view(view.uri, tmp_path / "v1.raw")) == sha256(tmp_path / "ref1.raw")
            await cp1.commit()
        await writes_go_on()
        async with await checkpoint(cp1.name, tmp_path / "ref2.raw") as cp2:
            (view,) = cp2.disks
            assert (cp2.reason, cp2.since, view.bitmap) == ("", cp1.name, cp1.name)
            await writes_go_on()
            assert sha256(read_view(view.uri, tmp_path / "v2.raw")) == sha256(tmp_path / "ref2.raw")
            # Every sector that changed between the two views is in cp1's dirty ranges.
            ranges = dirty(view.uri, cp1.name)
            changed = changed_sectors(tmp_path / "ref1.raw", tmp_path / "ref2.raw")
            assert changed and ranges
            assert all(covered(ranges, s, 512) for s in changed)
            await cp2.commit()
        bitmaps = await node_bitmaps(machine.qmp)
        assert list(bitmaps) == [cp2.name]
        assert bitmaps[cp2.name]["recording"] and bitmaps[cp2.name]["persistent"]
        assert await leftovers(machine.qmp) == []

    try:
        asyncio.run(scenario())
    finally:
        machine.stop()


def test_vm_checkpoint_left_without_commit_rolls_back_and_loses_no_write(
    bare: Callable[..., Qemu], tmp_path: Path
) -> None:
    q = bare()
    work = tmp_path / "ckpt"

    async def scenario() -> None:
        cp2 = await full(q.qmp, work)
        await q.write(4 * MiB, 64 * KiB, 0x11)
        with pytest.raises(Failed):
            async with await vm_checkpoint(q.qmp, "vm1", since=cp2, workdir=work) as cp3:
                assert cp3.reason == "" and cp3.disks[0].bitmap == cp2
                await q.write(8 * MiB, 64 * KiB, 0x22)  # while the view is exported
                raise Failed
        bitmaps = await node_bitmaps(q.qmp)
        assert list(bitmaps) == [cp2] and bitmaps[cp2]["recording"]
        assert await leftovers(q.qmp) == [] and await no_nbd_server(q.qmp, work)
        assert list(work.iterdir()) == []
        # cp2 still has the write before the failed run and the one during it.
        async with await vm_checkpoint(q.qmp, "vm1", since=cp2, workdir=work) as cp4:
            assert cp4.reason == ""
            assert dirty(cp4.disks[0].uri, cp2) == [(4 * MiB, 64 * KiB), (8 * MiB, 64 * KiB)]

    asyncio.run(scenario())


def test_vm_checkpoint_cancelled_rolls_back(bare: Callable[..., Qemu], tmp_path: Path) -> None:
    q = bare()
    work = tmp_path / "ckpt"

    async def scenario() -> None:
        cp1 = await full(q.qmp, work)
        await q.write(6 * MiB, 64 * KiB, 0x55)
        exported = asyncio.Event()

        async def backup() -> None:
            async with await vm_checkpoint(q.qmp, "vm1", since=cp1, workdir=work):
                exported.set()
                await asyncio.Event().wait()

        task = asyncio.create_task(backup())
        await exported.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        bitmaps = await node_bitmaps(q.qmp)
        assert list(bitmaps) == [cp1] and bitmaps[cp1]["recording"]
        assert bitmaps[cp1]["count"] == 64 * KiB
        assert await leftovers(q.qmp) == []

    asyncio.run(scenario())


def test_vm_running_an_nbd_server_of_its_own_is_refused_and_rolled_back(
    bare: Callable[..., Qemu], tmp_path: Path
) -> None:
    q = bare()
    work = tmp_path / "ckpt"

    async def scenario() -> None:
        cp1 = await full(q.qmp, work)
        addr = {"type": "unix", "data": {"path": str(tmp_path / "theirs.sock")}}
        await q.cmd("nbd-server-start", addr=addr)
        with pytest.raises(EndpointError) as e:
            await vm_checkpoint(q.qmp, "vm1", since=cp1, workdir=work)
        assert "already runs an NBD server" in str(e.value) and "\n" not in str(e.value)
        bitmaps = await node_bitmaps(q.qmp)
        assert list(bitmaps) == [cp1] and bitmaps[cp1]["recording"]
        assert await leftovers(q.qmp) == [] and list(work.iterdir()) == []
        await q.cmd("nbd-server-stop")  # theirs was left alone

    asyncio.run(scenario())


KILLED_RUN = """
import asyncio, sys, time
from pathlib import Path
from nbdnats.backup import vm_checkpoint

async def main():
    cp = await vm_checkpoint(sys.argv[1], "vm1", since=sys.argv[2], workdir=Path(sys.argv[3]))
    print(cp.disks[0].uri, flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


def test_vm_checkpoint_after_a_killed_run_recovers_and_stays_incremental(
    bare: Callable[..., Qemu], tmp_path: Path
) -> None:
    q = bare()
    work = tmp_path / "ckpt"
    cp1 = asyncio.run(full(q.qmp, work))
    asyncio.run(q.write(1 * MiB, 64 * KiB, 0x11))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    with subprocess.Popen(
        [sys.executable, "-c", KILLED_RUN, q.qmp, cp1, str(work)],
        stdout=subprocess.PIPE,
        env=env,
    ) as run:
        try:
            assert run.stdout is not None
            assert run.stdout.readline().startswith(b"nbd+unix:///")
        finally:
            run.send_signal(signal.SIGKILL)
            run.wait(10)

    async def scenario() -> None:
        assert await leftovers(q.qmp) != []
        assert len(await node_bitmaps(q.qmp)) == 2  # cp1 stopped, the killed run's new one
        await q.write(2 * MiB, 64 * KiB, 0x22)  # lands in the killed run's bitmap only
        async with await vm_checkpoint(q.qmp, "vm1", since=cp1, workdir=work) as cp:
            assert cp.reason == ""
            assert dirty(cp.disks[0].uri, cp1) == [(1 * MiB, 64 * KiB), (2 * MiB, 64 * KiB)]
            await cp.commit()
        assert list(await node_bitmaps(q.qmp)) == [cp.name]
        assert await leftovers(q.qmp) == []

    asyncio.run(scenario())


def test_vm_clean_restart_keeps_the_checkpoint_and_a_crash_makes_the_next_run_full(
    bare: Callable[..., Qemu], tmp_path: Path
) -> None:
    q = bare()
    work = tmp_path / "ckpt"
    cp1 = asyncio.run(full(q.qmp, work))
    q.quit()
    q.start()

    async def incremental() -> str:
        await q.write(0, 64 * KiB, 0x33)
        async with await vm_checkpoint(q.qmp, "vm1", since=cp1, workdir=work) as cp:
            assert cp.reason == ""
            assert dirty(cp.disks[0].uri, cp1) == [(0, 64 * KiB)]
            await cp.commit()
        return cp.name

    cp2 = asyncio.run(incremental())
    q.quit()  # cp2 is stored in the image...
    q.start()  # ...loaded, and marked in use there
    q.crash()
    q.start()

    async def after_crash() -> None:
        assert (await node_bitmaps(q.qmp))[cp2]["inconsistent"]
        async with await vm_checkpoint(q.qmp, "vm1", since=cp2, workdir=work) as cp:
            reason = f"bitmap {cp2} on vm1/vda is inconsistent: the VM stopped uncleanly"
            assert (cp.reason, cp.since, cp.disks[0].bitmap) == (reason, None, None)
            await cp.commit()
        assert list(await node_bitmaps(q.qmp)) == [cp.name]

    asyncio.run(after_crash())


def test_vm_raw_disk_is_refused_with_a_hint(bare: Callable[..., Qemu], tmp_path: Path) -> None:
    q = bare("raw")
    with pytest.raises(UsageError) as e:
        asyncio.run(vm_checkpoint(q.qmp, "vm1", since=None, workdir=tmp_path / "ckpt"))
    assert "disk vm1/vda is raw" in str(e.value) and "qemu-img convert -O qcow2" in str(e.value)
    assert "\n" not in str(e.value)


def image_bitmaps(path: Path) -> dict[str, list[str]]:
    out = subprocess.run(
        ["qemu-img", "info", "--output=json", str(path)], check=True, capture_output=True
    ).stdout
    data = json.loads(out)["format-specific"]["data"]
    return {b["name"]: b["flags"] for b in data.get("bitmaps", [])}


def qemu_io(path: Path, command: str) -> None:
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", command, str(path)], check=True)


def test_offline_full_incremental_and_rollback(tmp_path: Path) -> None:
    image = vm.make_disk(tmp_path / "off.qcow2", DISK, data_mib=1)
    work = tmp_path / "ckpt"

    async def scenario() -> None:
        async with await offline_checkpoint(str(image), "db", since=None, workdir=work) as cp1:
            (view,) = cp1.disks
            assert (cp1.reason, view.disk, view.bitmap, view.size) == (FIRST, "db", None, DISK)
            ref = copy_paused(image, tmp_path / "ref1.raw")
            assert sha256(read_view(view.uri, tmp_path / "v1.raw")) == sha256(ref)
            await cp1.commit()
        assert image_bitmaps(image) == {cp1.name: ["auto"]}
        qemu_io(image, f"write -P 0x44 {3 * MiB} {64 * KiB}")
        qemu_io(image, f"write -P 0x45 {40 * MiB} {128 * KiB}")
        with pytest.raises(Failed):
            async with await offline_checkpoint(str(image), "db", since=cp1.name, workdir=work):
                raise Failed
        assert image_bitmaps(image) == {cp1.name: ["auto"]}
        assert list(work.iterdir()) == []
        async with await offline_checkpoint(str(image), "db", since=cp1.name, workdir=work) as cp2:
            (view,) = cp2.disks
            assert (cp2.reason, view.bitmap) == ("", cp1.name)
            assert dirty(view.uri, cp1.name) == [(3 * MiB, 64 * KiB), (40 * MiB, 128 * KiB)]
            ref = copy_paused(image, tmp_path / "ref2.raw")
            assert sha256(read_view(view.uri, tmp_path / "v2.raw")) == sha256(ref)
            await cp2.commit()
        assert image_bitmaps(image) == {cp2.name: ["auto"]}

    asyncio.run(scenario())


def test_offline_raw_image_is_refused_with_a_hint(tmp_path: Path) -> None:
    raw = tmp_path / "disk.raw"
    raw.write_bytes(b"\0" * MiB)
    with pytest.raises(UsageError) as e:
        asyncio.run(offline_checkpoint(str(raw), "db", since=None, workdir=tmp_path / "w"))
    assert "disk db is raw" in str(e.value) and "qemu-img convert -O qcow2" in str(e.value)


def test_offline_image_closed_uncleanly_makes_the_next_run_full(tmp_path: Path) -> None:
    image = vm.make_disk(tmp_path / "off.qcow2", DISK)
    work = tmp_path / "ckpt"

    async def first() -> str:
        async with await offline_checkpoint(str(image), "db", since=None, workdir=work) as cp:
            await cp.commit()
        return cp.name

    cp1 = asyncio.run(first())
    # A writer killed with the image open leaves the bitmap flagged in-use.
    killed = subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write 0 64k", "-c", "sigraise 9", str(image)],
        capture_output=True,
    )
    assert killed.returncode == -signal.SIGKILL
    assert "in-use" in image_bitmaps(image)[cp1]

    async def after() -> None:
        async with await offline_checkpoint(str(image), "db", since=cp1, workdir=work) as cp:
            reason = f"bitmap {cp1} on db is inconsistent: the image was not closed cleanly"
            assert (cp.reason, cp.since, cp.disks[0].bitmap) == (reason, None, None)
            await cp.commit()
        assert image_bitmaps(image) == {cp.name: ["auto"]}

    asyncio.run(after())


KILLED_OFFLINE_RUN = """
import asyncio, sys
from pathlib import Path
from nbdnats.backup import offline_checkpoint

async def main():
    cp = await offline_checkpoint(sys.argv[1], "db", since=sys.argv[2], workdir=Path(sys.argv[3]))
    print(cp.disks[0].uri, flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


def test_offline_checkpoint_after_a_killed_run_stops_its_qemu_nbd_and_stays_incremental(
    tmp_path: Path,
) -> None:
    image = vm.make_disk(tmp_path / "off.qcow2", DISK)
    work = tmp_path / "ckpt"

    async def first() -> str:
        async with await offline_checkpoint(str(image), "db", since=None, workdir=work) as cp:
            await cp.commit()
        return cp.name

    cp1 = asyncio.run(first())
    qemu_io(image, f"write -P 0x46 {5 * MiB} {64 * KiB}")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    with subprocess.Popen(
        [sys.executable, "-c", KILLED_OFFLINE_RUN, str(image), cp1, str(work)],
        stdout=subprocess.PIPE,
        env=env,
    ) as run:
        try:
            assert run.stdout is not None
            assert run.stdout.readline().startswith(b"nbd+unix:///")
        finally:
            run.send_signal(signal.SIGKILL)
            run.wait(10)

    async def after() -> None:
        # Its qemu-nbd still holds the image; the next run stops it and merges its bitmap.
        async with await offline_checkpoint(str(image), "db", since=cp1, workdir=work) as cp:
            assert cp.reason == ""
            assert dirty(cp.disks[0].uri, cp1) == [(5 * MiB, 64 * KiB)]
            await cp.commit()
        assert image_bitmaps(image) == {cp.name: ["auto"]}
        assert list(work.iterdir()) == []

    asyncio.run(after())
