"""Checkpoints of a qcow2 image no process has open: ``qemu-img bitmap`` changes the
bitmaps, a private read-only ``qemu-nbd`` exports the view.

Nothing writes to the image while ``qemu-nbd`` holds it (its read-only open still takes
the image lock that keeps writers out), so the image itself is the frozen view. Each
``qemu-img bitmap`` call opens and closes the image; the order of the calls keeps every
write covered should a run be killed between two of them: add the new bitmap before
stopping ``since``, merge before removing, and the next run merges what is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

from nbdnats.backup.views import (
    RAW_HINT,
    Bitmap,
    Checkpoint,
    DiskView,
    check_since,
    decide,
    new_name,
    stale,
)
from nbdnats.errors import EndpointError, UsageError
from nbdnats.migration.record import alive

UNCLEAN = "the image was not closed cleanly"
# One qemu-img call; qemu-nbd's socket to appear, and qemu-nbd to exit once told to.
TOOL_TIMEOUT = 60.0
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
EXPORT = "nbdnats-ckpt-offline"
# sun_path holds 108 bytes with its terminating NUL.
MAX_SOCKET_PATH = 107
POLL = 0.05


async def _run(disk: str, argv: list[str]) -> str:
    """Run a qemu tool (argv, no shell), bounded; its stdout, or one line of its error."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL
    )
    try:
        async with asyncio.timeout(TOOL_TIMEOUT):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise EndpointError(
            f"disk {disk}: {argv[0]} {argv[1]} took over {TOOL_TIMEOUT:g} s"
        ) from None
    if proc.returncode != 0:
        lines = err.decode(errors="replace").strip().splitlines() or ["failed"]
        raise EndpointError(
            f"disk {disk}: {argv[0]} {argv[1]}: {lines[-1]} (is the image in use by another "
            "process? stop it first, or checkpoint the running VM instead)"
        )
    return out.decode(errors="replace")


def image_bitmaps(info: dict[str, Any]) -> list[Bitmap]:
    """``qemu-img info --output=json`` → the image's bitmaps; an image closed uncleanly
    leaves them flagged ``in-use``: inconsistent."""
    data = info.get("format-specific", {}).get("data", {})
    return [
        Bitmap(str(b["name"]), "auto" in b.get("flags", []), False, "in-use" in b.get("flags", []))
        for b in data.get("bitmaps", [])
    ]


async def _end(pid: int) -> None:
    """Stop a qemu-nbd that is not our child (a killed run's): TERM, then KILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        for _ in range(int(STOP_TIMEOUT / POLL)):
            if not alive(pid):
                return
            await asyncio.sleep(POLL)


class OfflineCheckpoint(Checkpoint):
    def __init__(
        self, name: str, since: str | None, reason: str, *, path: str, disk: str, workdir: Path
    ) -> None:
        super().__init__(name, since, reason)
        self.path, self.disk = path, disk
        stem = "offline-" + hashlib.sha256(path.encode()).hexdigest()[:12]
        self.socket = workdir / f"{stem}.sock"
        self.pidfile = workdir / f"{stem}.pid"
        self.proc: asyncio.subprocess.Process | None = None

    async def bitmap(self, *ops: str, name: str) -> None:
        await _run(self.disk, ["qemu-img", "bitmap", *ops, "-f", "qcow2", self.path, name])

    async def bitmaps(self) -> list[Bitmap]:
        out = await _run(self.disk, ["qemu-img", "info", "--output=json", "-f", "qcow2", self.path])
        return image_bitmaps(json.loads(out))

    async def end_leftover(self) -> None:
        """A killed run's qemu-nbd still holds the image: stop it."""
        with contextlib.suppress(OSError, ValueError):
            pid = int(self.pidfile.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if cmdline and cmdline[0].endswith(b"qemu-nbd") and self.path.encode() in cmdline:
                await _end(pid)
        self.pidfile.unlink(missing_ok=True)
        self.socket.unlink(missing_ok=True)

    async def open(self) -> None:
        await self.bitmap("--add", name=self.name)
        if self.since is not None:
            await self.bitmap("--disable", name=self.since)
        argv = ["qemu-nbd", "--read-only", "-f", "qcow2", "--persistent", "--shared=16"]
        argv += ["-x", EXPORT, "--socket", str(self.socket), "--pid-file", str(self.pidfile)]
        if self.since is not None:
            argv += ["-B", self.since]
        self.proc = await asyncio.create_subprocess_exec(
            *argv,
            self.path,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for _ in range(int(START_TIMEOUT / POLL)):
            if self.socket.exists() or self.proc.returncode is not None:
                break
            await asyncio.sleep(POLL)
        if not self.socket.exists():
            err = b""
            if self.proc.returncode is not None and self.proc.stderr:
                err = await self.proc.stderr.read()
            why = (err.decode(errors="replace").strip().splitlines() or ["no socket"])[-1]
            raise EndpointError(
                f"disk {self.disk}: qemu-nbd did not start within {START_TIMEOUT:g} s: {why}"
            )
        size = int(
            json.loads(
                await _run(
                    self.disk, ["qemu-img", "info", "--output=json", "-U", "-f", "qcow2", self.path]
                )
            )["virtual-size"]
        )
        self.disks.append(
            DiskView(self.disk, f"nbd+unix:///{EXPORT}?socket={self.socket}", self.since, size)
        )

    async def _close(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.returncode is None:
            proc.terminate()
            try:
                async with asyncio.timeout(STOP_TIMEOUT):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()
        self.pidfile.unlink(missing_ok=True)
        self.socket.unlink(missing_ok=True)

    async def _retire(self) -> None:
        if self.since is not None:
            await self.bitmap("--remove", name=self.since)

    async def _roll_back(self) -> None:
        names = {b.name for b in await self.bitmaps()}
        if self.since is not None and self.since in names:
            if self.name in names:
                await self.bitmap("--merge", self.name, "--enable", name=self.since)
            else:
                await self.bitmap("--enable", name=self.since)
        if self.name in names:
            await self.bitmap("--remove", name=self.name)


async def offline_checkpoint(
    path: str, disk: str, *, since: str | None, workdir: Path
) -> OfflineCheckpoint:
    image = Path(path).absolute()
    if not image.is_file():
        raise UsageError(f"disk {disk}: {path} is not a file: give the qcow2 image's path")
    check_since(since)
    workdir.mkdir(parents=True, exist_ok=True)
    probe = OfflineCheckpoint(new_name(), since, "", path=str(image), disk=disk, workdir=workdir)
    if len(str(probe.socket).encode()) > MAX_SOCKET_PATH:
        raise UsageError(
            f"work directory {workdir} is too long for a unix socket: use a shorter one"
        )
    await probe.end_leftover()
    out = await _run(disk, ["qemu-img", "info", "--output=json", str(image)])
    fmt = json.loads(out).get("format")
    if fmt != "qcow2":
        raise UsageError(
            f"disk {disk} is {fmt}: " + (RAW_HINT if fmt == "raw" else "use a qcow2 image")
        )
    merge, remove = stale(since, await probe.bitmaps())
    for name in merge:
        await probe.bitmap("--merge", name, name=str(since))
    for name in merge + remove:
        await probe.bitmap("--remove", name=name)
    bitmaps = await probe.bitmaps()
    target = next((b for b in bitmaps if b.name == since), None)
    reason = decide(since, {disk: bitmaps}, UNCLEAN)
    if target is not None and reason:
        await probe.bitmap("--remove", name=target.name)
    elif target is not None and not target.recording:
        await probe.bitmap("--enable", name=target.name)
    cp = OfflineCheckpoint(probe.name, since, reason, path=str(image), disk=disk, workdir=workdir)
    try:
        await cp.open()
    except BaseException:
        with contextlib.suppress(Exception):
            await cp.__aexit__(None, None, None)
        raise
    return cp
