"""What a checkpoint is, whatever holds the disk: its names, the view of each disk it
exports, and the decision between an incremental and a full run.

A checkpoint is a persistent dirty bitmap named ``nbdnats-<UTC time>-<6 hex>``: it records
every write since the checkpoint was taken. A run relative to checkpoint ``since`` adds a
new bitmap and stops ``since`` at the same instant as it freezes a read-only view of the
disk; ``since`` then holds exactly the changes between the two views, and is exported
beside the view. Committing the run removes ``since``; leaving it without commit merges
the new bitmap back into ``since`` and restarts it, so no write is ever forgotten.
"""

from __future__ import annotations

import abc
import asyncio
import enum
import re
import secrets
import time
from dataclasses import dataclass
from types import TracebackType

from nbdnats.errors import UsageError

# Every bitmap, node, job and export a checkpoint adds carries this prefix; a bitmap is
# ours when its whole name has the checkpoint form.
PREFIX = "nbdnats-"
CHECKPOINT = re.compile(r"nbdnats-\d{8}T\d{6}-[0-9a-f]{6}")
# Nodes, jobs and exports of a run (a fixed prefix, so a later run finds a killed one's).
OURS = PREFIX + "ckpt-"

FIRST = "first backup of this disk"
RAW_HINT = (
    "a raw image cannot keep a persistent dirty bitmap: convert it to qcow2 "
    "(qemu-img convert -O qcow2 DISK.raw DISK.qcow2) and attach that"
)


def new_name() -> str:
    """A fresh checkpoint name: ``nbdnats-<UTC yyyymmddThhmmss>-<6 hex>``."""
    return f"{PREFIX}{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"


def check_since(since: str | None) -> None:
    """``since`` must name a checkpoint of ours (it reaches QMP and qemu-img argv)."""
    if since is not None and not CHECKPOINT.fullmatch(since):
        raise UsageError(
            f"{since!r} is not a checkpoint name (nbdnats-YYYYMMDDTHHMMSS-xxxxxx): "
            "give the name a previous checkpoint reported"
        )


@dataclass(frozen=True)
class DiskView:
    disk: str  # VM: "<vm>/<qdev id or node-name>"; offline: the name given
    uri: str  # nbd+unix:///EXPORT?socket=PATH: frozen, read-only point-in-time view
    bitmap: str | None  # exported on uri as qemu:dirty-bitmap:<bitmap>; None = full run
    size: int


@dataclass(frozen=True)
class Bitmap:
    """One dirty bitmap of a disk as its holder reports it."""

    name: str
    recording: bool
    busy: bool = False
    inconsistent: bool = False


def decide(since: str | None, disks: dict[str, list[Bitmap]], unclean: str) -> str:
    """Why this run must be full, or "" when it can be incremental relative to ``since``:
    ``since`` is on every disk, consistent and free. ``unclean`` says what leaves a
    bitmap inconsistent (a VM that stopped uncleanly, an image not closed cleanly)."""
    if since is None:
        return FIRST
    for disk, bitmaps in disks.items():
        found = next((b for b in bitmaps if b.name == since), None)
        if found is None:
            return (
                f"bitmap {since} not on {disk}: it was removed, never made there, or lost "
                "when the VM stopped uncleanly before QEMU stored it"
            )
        if found.inconsistent:
            return f"bitmap {since} on {disk} is inconsistent: {unclean}"
        if found.busy:
            return f"bitmap {since} is in use by another job"
    return ""


def stale(since: str | None, bitmaps: list[Bitmap]) -> tuple[list[str], list[str]]:
    """What a killed run left on one disk: (bitmaps of ours to merge into ``since`` and
    remove, bitmaps of ours to remove only). A run killed after adding its new bitmap left
    writes in it that ``since`` lacks; when ``since`` cannot take them (absent or
    inconsistent) the next run is full anyway. Busy bitmaps belong to someone's job."""
    target = next((b for b in bitmaps if b.name == since), None)
    usable = target is not None and not target.inconsistent and not target.busy
    merge: list[str] = []
    remove: list[str] = []
    for b in bitmaps:
        if b.name == since or b.busy or not CHECKPOINT.fullmatch(b.name):
            continue
        (merge if usable and not b.inconsistent else remove).append(b.name)
    return merge, remove


class State(enum.Enum):
    OPEN = "open"  # the views are exported; commit() or leaving decides
    COMMITTED = "committed"
    ROLLED_BACK = "rolled back"


class Checkpoint(abc.ABC):
    """One checkpoint run: its disks' frozen views are exported until the context is left.

    ``commit()`` when the stream is stored: ``since`` is retired, the new bitmap stays.
    Leaving without commit rolls back: the new bitmap goes back into ``since``. The
    exports and what serves them are removed either way.
    """

    name: str
    since: str | None
    reason: str
    disks: list[DiskView]

    def __init__(self, name: str, since: str | None, reason: str) -> None:
        self.name = name
        self.since = since if not reason else None
        self.reason = reason
        self.disks = []
        self.state = State.OPEN

    def _require(self, state: State, doing: str) -> None:
        if self.state is not state:
            raise UsageError(f"checkpoint {self.name}: cannot {doing}: it is {self.state.value}")

    async def commit(self) -> None:
        """The stream is stored: take the views down and retire ``since``."""
        self._require(State.OPEN, "commit")
        await self._close()
        # Stored: from here nothing rolls back. Should retiring ``since`` fail, both
        # bitmaps stay and the next run relative to the new one merges the old one in:
        # a larger increment, never a lost write.
        self.state = State.COMMITTED
        await self._retire()

    async def __aenter__(self) -> Checkpoint:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.state is not State.OPEN:
            return
        # A second cancellation must not cut the rollback short: it runs to its end (every
        # step is bounded) and the cancellation is delivered afterwards.
        leaving = asyncio.ensure_future(self._leave())
        try:
            await asyncio.shield(leaving)
        except asyncio.CancelledError:
            await leaving
            raise

    async def _leave(self) -> None:
        try:
            await self._close()
        finally:
            await self._roll_back()
            self.state = State.ROLLED_BACK

    @abc.abstractmethod
    async def _close(self) -> None:
        """Remove the exports and what serves them (bounded in time)."""

    @abc.abstractmethod
    async def _retire(self) -> None:
        """Commit: remove ``since`` (nothing for a full run)."""

    @abc.abstractmethod
    async def _roll_back(self) -> None:
        """Merge the new bitmap into ``since``, re-enable it, remove the new one."""
