"""The test guest of the live-migration tests and benchmark, as real QEMU processes.

``scripts/guest.sh`` builds the guest (a Debian kernel and a busybox initramfs); its /init
writes an increasing counter n to sector ``n % SLOTS`` of its virtio disk (O_DIRECT and
fsync) and prints ``COUNTER n`` on the serial console only after the write was
acknowledged. So the serial log says which writes the guest saw acknowledged, and the disk
must hold each of them.

Used by ``tests/integration/test_migrate.py`` and ``bench/migrate.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient

ROOT = Path(__file__).resolve().parent.parent
QEMU = "qemu-system-x86_64"
MiB = 1 << 20
# Records on the disk: one 512-byte sector each, at n % SLOTS (the guest's counter_slots).
SLOTS = 2048
SECTOR = 512
PAUSE = 0.03
MEMORY_MIB = 96
RECORD = re.compile(rb"NBDNATS-COUNTER (\d{12})\n")
COUNTER = re.compile(r"^COUNTER (\d+)\r?$", re.MULTILINE)
ACCEL_ENV = "NBDNATS_TEST_ACCEL"


@functools.cache
def guest_files() -> tuple[Path, Path]:
    """(kernel, initrd) of the test guest, built once and cached by scripts/guest.sh."""
    proc = subprocess.run(
        [str(ROOT / "scripts" / "guest.sh")], capture_output=True, text=True, timeout=600
    )
    if proc.returncode != 0:
        raise RuntimeError(f"scripts/guest.sh failed:\n{proc.stderr}")
    out = Path(proc.stdout.strip().splitlines()[-1])
    return out / "vmlinuz", out / "initrd.img"


@functools.cache
def accel() -> str:
    """``kvm`` when /dev/kvm can run a plain qemu64 CPU with every feature it asks for,
    else ``tcg`` (emulation). Nested or restricted KVM often opens fine but cannot run a
    guest; ``enforce`` makes QEMU say so at start. $NBDNATS_TEST_ACCEL overrides."""
    if forced := os.environ.get(ACCEL_ENV):
        return forced
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "tcg"
    probe = [QEMU, "-accel", "kvm", "-machine", "q35", "-cpu", "qemu64,enforce"]
    probe += ["-nodefaults", "-display", "none", "-S", "-qmp", "stdio"]
    try:
        proc = subprocess.run(
            probe,
            input=b'{"execute": "qmp_capabilities"}\n{"execute": "quit"}\n',
            capture_output=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "tcg"
    return "kvm" if proc.returncode == 0 else "tcg"


def make_disk(path: Path, size: int, data_mib: int = 0) -> Path:
    """A qcow2 image; with ``data_mib``, that much pattern data from 2 MiB on (past the
    counter records), so that a mirror has something to copy."""
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)], check=True)
    if data_mib:
        cmd = f"write -P 0x5a {2 * MiB} {data_mib * MiB}"
        subprocess.run(
            ["qemu-io", "-f", "qcow2", "-c", cmd, str(path)], check=True, capture_output=True
        )
    return path


@dataclass
class VM:
    """One QEMU process running the test guest."""

    name: str
    dir: Path
    disk: Path
    incoming: bool = False
    paused: bool = False
    # A second QMP socket (``monitor``) for a test to act on the VM while a tool it drives
    # holds the first one (QEMU serves one client per monitor).
    second_monitor: bool = False
    # More qcow2 disks, attached as vdb, vdc, ... (the guest writes only to vda).
    extra_disks: list[Path] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    argv: list[str] = field(default_factory=list)

    @property
    def qmp(self) -> str:
        return str(self.dir / f"{self.name}.qmp")

    @property
    def monitor(self) -> str:
        return str(self.dir / f"{self.name}-test.qmp")

    @property
    def serial(self) -> Path:
        return self.dir / f"{self.name}.serial"

    @property
    def log(self) -> Path:
        return self.dir / f"{self.name}.log"

    def start(self) -> VM:
        kernel, initrd = guest_files()
        cmdline = f"console=ttyS0 loglevel=1 panic=-1 counter_slots={SLOTS} counter_sleep={PAUSE}"
        a = [QEMU, "-name", self.name, "-machine", "q35", "-accel", accel(), "-smp", "1"]
        a += ["-m", str(MEMORY_MIB), "-nodefaults", "-no-user-config", "-display", "none"]
        a += ["-no-reboot", "-kernel", str(kernel), "-initrd", str(initrd), "-append", cmdline]
        a += ["-serial", f"file:{self.serial}", "-qmp", f"unix:{self.qmp},server=on,wait=off"]
        a += ["-blockdev", f"driver=file,filename={self.disk},node-name=file0"]
        a += ["-blockdev", "driver=qcow2,file=file0,node-name=disk0"]
        a += ["-device", "virtio-blk-pci,drive=disk0,id=vda"]
        for n, extra in enumerate(self.extra_disks, 1):
            a += ["-blockdev", f"driver=file,filename={extra},node-name=file{n}"]
            a += ["-blockdev", f"driver=qcow2,file=file{n},node-name=disk{n}"]
            a += ["-device", f"virtio-blk-pci,drive=disk{n},id=vd{chr(ord('a') + n)}"]
        if self.incoming:
            a += ["-incoming", "defer"]
        if self.paused:
            a += ["-S"]
        if self.second_monitor:
            a += ["-qmp", f"unix:{self.monitor},server=on,wait=off"]
        self.argv = a
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(a, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        self.wait(lambda: Path(self.qmp).exists(), "its QMP socket", 20)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait(self, check: Any, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if not self.alive():
                raise RuntimeError(f"{self.name} QEMU exited: {self.log.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: {what} not within {timeout:g} s")
            time.sleep(0.05)

    def counters(self) -> list[int]:
        """Every COUNTER the guest printed on this VM's console, in order."""
        if not self.serial.exists():
            return []
        text = self.serial.read_bytes().decode(errors="replace")
        return [int(n) for n in COUNTER.findall(text)]

    def last_counter(self) -> int:
        seen = self.counters()
        return seen[-1] if seen else 0

    def wait_counter(self, above: int, timeout: float = 60) -> int:
        """Wait until the guest printed a COUNTER above ``above``; returns the last one."""
        self.wait(lambda: self.last_counter() > above, f"a COUNTER above {above}", timeout)
        return self.last_counter()

    def command(self, name: str, **args: Any) -> Any:
        """One QMP command on a connection of its own (QEMU serves one client at a time:
        never while nbd-nats migrate holds the socket)."""
        return asyncio.run(qmp_command(self.qmp, name, **args))

    def status(self) -> str:
        return str(self.command("query-status")["status"])

    def stop(self) -> None:
        """Quit through QMP, or kill."""
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(Exception):
            self.command("quit")
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


async def qmp_command(socket: str, name: str, **args: Any) -> Any:
    client = QMPClient("test")
    await asyncio.wait_for(client.connect(socket), 10)
    try:
        return await asyncio.wait_for(client.execute(name, args or None), 30)
    finally:
        await client.disconnect()


def disk_records(disk: Path, work: Path) -> dict[int, int]:
    """{sector: counter} of the records on a qcow2 disk (read through qemu-img)."""
    raw = work / (disk.name + ".raw")
    subprocess.run(
        [
            "qemu-img",
            "dd",
            "-f",
            "qcow2",
            "-O",
            "raw",
            f"if={disk}",
            f"of={raw}",
            f"bs={SECTOR}",
            f"count={SLOTS}",
        ],
        check=True,
        capture_output=True,
    )
    data = raw.read_bytes()
    raw.unlink()
    records = {}
    for slot in range(SLOTS):
        m = RECORD.match(data, slot * SECTOR)
        if m:
            records[slot] = int(m.group(1))
    return records


def missing_writes(records: dict[int, int], last: int) -> list[int]:
    """The acknowledged writes (every n <= ``last`` whose sector was not overwritten by a
    later one) that the disk does not hold."""
    first = max(1, last - SLOTS + 1)
    return [n for n in range(first, last + 1) if records.get(n % SLOTS) != n]
