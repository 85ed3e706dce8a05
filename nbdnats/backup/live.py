"""Checkpoints of a running QEMU VM over QMP: dirty bitmaps and fleecing.

A run (docs/incremental.md, "Checkpoints"):

1. Recover from a run that was killed: remove its exports, NBD server, backup jobs and
   fleecing nodes (all named ``nbdnats-ckpt-*``); merge every other bitmap of ours into
   ``since`` and remove it, and restart ``since``.
2. Decide: incremental when ``since`` is on every disk, consistent and free; otherwise
   full, and our stale ``since`` goes.
3. One ``transaction``, per disk: add the new persistent bitmap, stop ``since`` (QEMU will
   not export an enabled bitmap read-only), and freeze a view (fleecing).
4. ``nbd-server-start`` on a private unix socket, ``block-export-add`` per view, read-only,
   with ``since`` as ``qemu:dirty-bitmap:<since>``.

Fleecing is the classic form: a temporary qcow2 overlay whose backing is the live disk,
and a ``blockdev-backup sync=none`` into it. The backup job puts QEMU's copy-before-write
filter above the disk, so old data is copied into the overlay before the guest overwrites
it; the overlay reads the rest through to the disk. The newer copy-before-write +
snapshot-access nodes would need the filter inserted above a disk a device already uses
(a ``blockdev-reopen`` of the device's chain); the job does that insertion itself, inside
the transaction, and removes it when cancelled.

The QMP connection is held only while a step runs (QEMU serves one monitor client at a
time), so the VM's monitor is free while the views are read.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nbdnats.backup.views import (
    OURS,
    RAW_HINT,
    Bitmap,
    Checkpoint,
    DiskView,
    check_since,
    decide,
    new_name,
    stale,
)
from nbdnats.errors import EndpointError, MigrationError, QmpCommandError, UsageError
from nbdnats.migration.disks import disk_name
from nbdnats.migration.qmp import POLL_INTERVAL, Qmp

UNCLEAN = "the VM stopped uncleanly"
VM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# sun_path holds 108 bytes with its terminating NUL.
MAX_SOCKET_PATH = 107
# Each step of a run (one QMP connection), cleanup included.
TIMEOUT = 60.0
# Creating one fleecing overlay with qemu-img.
CREATE_TIMEOUT = 30.0


def _view(i: int) -> str:
    return f"{OURS}view-{i}"


def _file(i: int) -> str:
    return f"{OURS}file-{i}"


def _job(i: int) -> str:
    return f"{OURS}job-{i}"


def _filter(i: int) -> str:
    """The job's copy-before-write filter above the disk (it goes with the job)."""
    return f"{OURS}cbw-{i}"


def _export(i: int) -> str:
    return f"{OURS}export-{i}"


@dataclass(frozen=True)
class VmDisk:
    name: str  # "<vm>/<qdev id or node-name>"
    node: str  # the format node that holds the bitmaps
    size: int


def vm_disks(vm: str, block: list[dict[str, Any]]) -> list[VmDisk]:
    """``query-block`` → the VM's writable disks (inserted, not read-only, not removable
    media); every one must be qcow2 to keep a persistent bitmap."""
    disks = []
    for b in block:
        inserted = b.get("inserted")
        if not inserted or inserted.get("ro") or b.get("removable"):
            continue
        node = str(inserted["node-name"])
        key = disk_name(str(b.get("qdev") or b.get("device") or ""))
        name = f"{vm}/{key if key and '/' not in key else node}"
        driver = inserted.get("drv")
        if driver != "qcow2":
            hint = (
                RAW_HINT
                if driver == "raw"
                else "checkpoints need a qcow2 image on top (a running block job's filter? "
                "let the job finish)"
            )
            raise UsageError(f"disk {name} is {driver}: {hint}")
        disks.append(VmDisk(name, node, int(inserted["image"]["virtual-size"])))
    if not disks:
        raise UsageError(f"VM {vm} has no writable disk to checkpoint")
    return disks


def node_bitmaps(nodes: list[dict[str, Any]], node: str) -> list[Bitmap]:
    """``query-named-block-nodes`` → the dirty bitmaps of one node."""
    for n in nodes:
        if n.get("node-name") == node:
            return [
                Bitmap(
                    str(b["name"]),
                    bool(b.get("recording")),
                    bool(b.get("busy")),
                    bool(b.get("inconsistent")),
                )
                for b in n.get("dirty-bitmaps", [])
            ]
    return []


def action(kind: str, **data: Any) -> dict[str, Any]:
    return {"type": kind, "data": data}


@contextlib.asynccontextmanager
async def monitor(socket: str, vm: str, timeout: float) -> AsyncIterator[Qmp]:
    qmp = Qmp(vm, socket, asyncio.Event())
    await qmp.connect(timeout)
    try:
        yield qmp
    finally:
        await qmp.close()


async def _bitmaps(qmp: Qmp, disks: list[VmDisk]) -> dict[str, list[Bitmap]]:
    nodes = await qmp.cmd("query-named-block-nodes", flat=True)
    return {d.name: node_bitmaps(nodes, d.node) for d in disks}


async def _poll_gone(qmp: Qmp, command: str, key: str) -> None:
    """Wait until ``command`` lists nothing of ours under ``key`` (the caller bounds it)."""
    while any(str(x.get(key, "")).startswith(OURS) for x in await qmp.cmd(command)):
        await asyncio.sleep(POLL_INTERVAL)


async def take_down(qmp: Qmp, server: bool) -> None:
    """Remove every export, backup job and fleecing node of ours, and the NBD server when
    it is ours (``server``). Each step tolerates what is already gone."""
    for export in await qmp.cmd("query-block-exports"):
        if str(export.get("id", "")).startswith(OURS):
            with contextlib.suppress(QmpCommandError):
                await qmp.cmd("block-export-del", id=export["id"], mode="hard")
    await _poll_gone(qmp, "query-block-exports", "id")
    if server:
        with contextlib.suppress(QmpCommandError):
            await qmp.cmd("nbd-server-stop")
    for job in await qmp.cmd("query-block-jobs"):
        if str(job.get("device", "")).startswith(OURS):
            with contextlib.suppress(QmpCommandError):
                await qmp.cmd("block-job-cancel", device=job["device"], force=True)
    await _poll_gone(qmp, "query-block-jobs", "device")
    names = [str(n.get("node-name", "")) for n in await qmp.cmd("query-named-block-nodes")]
    # Overlays before the files under them.
    for prefix in (f"{OURS}view-", f"{OURS}file-"):
        for name in names:
            if name.startswith(prefix):
                with contextlib.suppress(QmpCommandError):
                    await qmp.cmd("blockdev-del", **{"node-name": name})


async def recover(qmp: Qmp, disks: list[VmDisk], since: str | None) -> None:
    """What a killed run left in bitmaps: merge ours into ``since``, remove them, and
    restart ``since`` (one transaction)."""
    actions = []
    for d, bitmaps in zip(disks, (await _bitmaps(qmp, disks)).values(), strict=True):
        merge, remove = stale(since, bitmaps)
        if merge:
            actions.append(
                action("block-dirty-bitmap-merge", node=d.node, target=since, bitmaps=merge)
            )
        actions += [
            action("block-dirty-bitmap-remove", node=d.node, name=n) for n in merge + remove
        ]
        target = next((b for b in bitmaps if b.name == since), None)
        if target and not target.recording and not target.inconsistent and not target.busy:
            actions.append(action("block-dirty-bitmap-enable", node=d.node, name=since))
    if actions:
        await qmp.cmd("transaction", actions=actions)


class VmCheckpoint(Checkpoint):
    def __init__(
        self,
        name: str,
        since: str | None,
        reason: str,
        *,
        socket: str,
        vm: str,
        workdir: Path,
        timeout: float,
        disks: list[VmDisk],
    ) -> None:
        super().__init__(name, since, reason)
        self.socket, self.vm, self.workdir, self.timeout = socket, vm, workdir, timeout
        self.vm_disks = disks
        self.nbd_socket = workdir / f"{vm}.ckpt.sock"
        self.server = False  # this run started the VM's NBD server

    def overlay(self, i: int) -> Path:
        return self.workdir / f"{self.vm}.fleece-{i}.qcow2"

    @contextlib.asynccontextmanager
    async def step(self, doing: str) -> AsyncIterator[Qmp]:
        """One bounded step on a fresh monitor connection; a failure says what to do."""
        try:
            async with (
                asyncio.timeout(self.timeout),
                monitor(self.socket, self.vm, self.timeout) as qmp,
            ):
                yield qmp
        except TimeoutError:
            raise EndpointError(
                f"checkpoint {self.name} of VM {self.vm}: {doing} took over "
                f"{self.timeout:g} s: check the VM's QMP socket {self.socket}; the next "
                "checkpoint cleans up what is left"
            ) from None
        except MigrationError as e:
            raise EndpointError(
                f"checkpoint {self.name} of VM {self.vm}: {doing}: {e}; the next checkpoint "
                "cleans up what is left"
            ) from None

    async def open(self) -> None:
        """Freeze the views and export them (the caller rolls back if this fails)."""
        incremental = self.since is not None
        for i, d in enumerate(self.vm_disks):
            await _create_overlay(self.overlay(i), d.size)
        async with self.step("freezing the disks") as qmp:
            for i, d in enumerate(self.vm_disks):
                await qmp.cmd(
                    "blockdev-add",
                    driver="file",
                    filename=str(self.overlay(i)),
                    **{"node-name": _file(i)},
                )
                await qmp.cmd(
                    "blockdev-add",
                    driver="qcow2",
                    file=_file(i),
                    backing=d.node,
                    **{"node-name": _view(i)},
                )
            actions = []
            for i, d in enumerate(self.vm_disks):
                actions.append(
                    action("block-dirty-bitmap-add", node=d.node, name=self.name, persistent=True)
                )
                if incremental:
                    actions.append(
                        action("block-dirty-bitmap-disable", node=d.node, name=self.since)
                    )
                actions.append(
                    action(
                        "blockdev-backup",
                        device=d.node,
                        target=_view(i),
                        sync="none",
                        **{"job-id": _job(i), "filter-node-name": _filter(i)},
                    )
                )
            await qmp.cmd("transaction", actions=actions)
            await self._serve(qmp)
            for i, d in enumerate(self.vm_disks):
                args: dict[str, Any] = {
                    "type": "nbd",
                    "id": _export(i),
                    "node-name": _view(i),
                    "name": _export(i),
                    "writable": False,
                }
                if incremental:
                    args["bitmaps"] = [{"node": d.node, "name": self.since}]
                await qmp.cmd("block-export-add", **args)
                self.disks.append(
                    DiskView(
                        d.name,
                        f"nbd+unix:///{_export(i)}?socket={self.nbd_socket}",
                        self.since,
                        d.size,
                    )
                )

    async def _serve(self, qmp: Qmp) -> None:
        addr = {"type": "unix", "data": {"path": str(self.nbd_socket)}}
        try:
            await qmp.cmd("nbd-server-start", addr=addr)
        except QmpCommandError as e:
            if "already running" not in str(e) or not self.nbd_socket.exists():
                raise EndpointError(
                    f"VM {self.vm} already runs an NBD server (a migration or another "
                    "backup?): let it finish, or stop it with nbd-server-stop"
                ) from None
            # Ours: a run killed between starting it and exporting left it.
            await qmp.cmd("nbd-server-stop")
            await qmp.cmd("nbd-server-start", addr=addr)
        self.server = True

    async def _close(self) -> None:
        async with self.step("removing the exports") as qmp:
            await take_down(qmp, self.server)
        self.server = False
        for i in range(len(self.vm_disks)):
            self.overlay(i).unlink(missing_ok=True)
        self.nbd_socket.unlink(missing_ok=True)

    async def _retire(self) -> None:
        if self.since is None:
            return
        async with self.step(f"removing bitmap {self.since}") as qmp:
            bitmaps = await _bitmaps(qmp, self.vm_disks)
            actions = [
                action("block-dirty-bitmap-remove", node=d.node, name=self.since)
                for d in self.vm_disks
                if any(b.name == self.since for b in bitmaps[d.name])
            ]
            if actions:
                await qmp.cmd("transaction", actions=actions)

    async def _roll_back(self) -> None:
        async with self.step(f"rolling back to bitmap {self.since}") as qmp:
            bitmaps = await _bitmaps(qmp, self.vm_disks)
            actions = []
            for d in self.vm_disks:
                names = {b.name for b in bitmaps[d.name]}
                if self.since in names and self.name in names:
                    actions.append(
                        action(
                            "block-dirty-bitmap-merge",
                            node=d.node,
                            target=self.since,
                            bitmaps=[self.name],
                        )
                    )
                if self.since in names:
                    actions.append(
                        action("block-dirty-bitmap-enable", node=d.node, name=self.since)
                    )
                if self.name in names:
                    actions.append(action("block-dirty-bitmap-remove", node=d.node, name=self.name))
            if actions:
                await qmp.cmd("transaction", actions=actions)


async def _create_overlay(path: Path, size: int) -> None:
    proc = await asyncio.create_subprocess_exec(
        "qemu-img",
        "create",
        "-q",
        "-f",
        "qcow2",
        str(path),
        str(size),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(CREATE_TIMEOUT):
            _, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise EndpointError(f"qemu-img create {path} took over {CREATE_TIMEOUT:g} s") from None
    if proc.returncode != 0:
        line = err.decode(errors="replace").strip().splitlines()[-1:] or ["failed"]
        raise EndpointError(f"cannot create the fleecing overlay {path}: {line[0]}")


async def vm_checkpoint(
    qmp_socket: str, vm: str, *, since: str | None, workdir: Path, timeout: float = TIMEOUT
) -> VmCheckpoint:
    if not VM_NAME.fullmatch(vm):
        raise UsageError(f"VM name {vm!r}: use letters, digits, '.', '_' or '-' (up to 64)")
    check_since(since)
    workdir.mkdir(parents=True, exist_ok=True)
    probe = VmCheckpoint(
        new_name(), since, "", socket=qmp_socket, vm=vm, workdir=workdir, timeout=timeout, disks=[]
    )
    if len(str(probe.nbd_socket).encode()) > MAX_SOCKET_PATH:
        raise UsageError(
            f"work directory {workdir} is too long for a unix socket: use a shorter one"
        )
    async with probe.step("finding the disks and their checkpoints") as qmp:
        # Our exports mean our server: a killed run left both. Its backup jobs' filters sit
        # above the disks until they go.
        ours = any(
            str(e.get("id", "")).startswith(OURS) for e in await qmp.cmd("query-block-exports")
        )
        await take_down(qmp, ours)
        disks = vm_disks(vm, await qmp.cmd("query-block"))
        await recover(qmp, disks, since)
        bitmaps = await _bitmaps(qmp, disks)
        reason = decide(since, bitmaps, UNCLEAN)
        if reason and since is not None:
            # Our stale (or inconsistent) ``since`` goes; a busy one is someone's job's.
            drop = [
                action("block-dirty-bitmap-remove", node=d.node, name=since)
                for d in disks
                if any(b.name == since and not b.busy for b in bitmaps[d.name])
            ]
            if drop:
                await qmp.cmd("transaction", actions=drop)
    for i in range(len(disks)):
        probe.overlay(i).unlink(missing_ok=True)
    cp = VmCheckpoint(
        probe.name,
        since,
        reason,
        socket=qmp_socket,
        vm=vm,
        workdir=workdir,
        timeout=timeout,
        disks=disks,
    )
    try:
        await cp.open()
    except BaseException:
        # The cause matters more than a failed cleanup, which the next run redoes.
        with contextlib.suppress(Exception):
            await cp.__aexit__(None, None, None)
        raise
    return cp
