"""The source's hold on an incremental backup's checkpoint.

A checkpoint is taken, its disks are sent, and it stays open (its frozen views exported,
the new bitmap recording) until the controller says whether every disk's snapshot was
stored: then it is committed, and the next run starts from it. Anything else rolls it back
(``Checkpoint`` merges what the new bitmap recorded into the one the run started from, so
no change is lost): a disk's transfer that failed, the controller saying not ok, or no word
from it within ``bound`` seconds after the sends ended (the transfer timeout: a controller
that died does not hold a VM's fleecing images for ever).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from types import TracebackType
from typing import Protocol

from nbdnats.errors import TransferError

log = logging.getLogger("nbdnats.backup.hold")


class Committable(Protocol):
    """What the hold needs of a ``checkpoints.Checkpoint`` (already entered)."""

    name: str

    async def commit(self) -> None: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


class Hold:
    """One checkpoint, held until ``confirm`` (or the bound) decides its end."""

    def __init__(
        self, checkpoint: Committable, transfer_id: str, bound: float, source: str = ""
    ) -> None:
        self.checkpoint = checkpoint
        self.transfer_id = transfer_id
        self.source = source  # what it is of (a VM's monitor, an image's path)
        self.bound = bound
        self._verdict: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.ended: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.task: asyncio.Task[None] | None = None

    def confirm(self, ok: bool) -> None:
        """The controller's word: every snapshot stored (``ok``), or not."""
        if not self._verdict.done():
            self._verdict.set_result(ok)

    async def outcome(self) -> str:
        """ "committed", or raises why it was rolled back."""
        return await asyncio.shield(self.ended)

    def start(self, sends: list[Awaitable[bool]]) -> None:
        """Hold until the sends (each True when its disk was sent) and the verdict end it."""
        self.task = asyncio.create_task(self._run(sends))

    async def _run(self, sends: list[Awaitable[bool]]) -> None:
        why = ""
        try:
            why = await self._decide(sends)
        except asyncio.CancelledError:
            why = "the agent stopped before the backup ended"
            raise
        finally:
            await self._end(why)

    async def _decide(self, sends: list[Awaitable[bool]]) -> str:
        # The sends end first either way (a "not ok" comes with them cancelled): the views
        # they read are removed only once nothing reads them.
        sent = await asyncio.gather(*sends)
        if self._verdict.done() and not self._verdict.result():
            return "the controller reported that a snapshot was not stored"
        if not all(sent):
            return "a disk's transfer failed"
        try:
            ok = await asyncio.wait_for(asyncio.shield(self._verdict), self.bound or None)
        except TimeoutError:
            return f"no word from the controller within {self.bound:.0f} s of the sends' end"
        return "" if ok else "the controller reported that a snapshot was not stored"

    async def _end(self, why: str) -> None:
        """Commit (``why`` empty) or roll back, and leave the checkpoint either way."""
        try:
            if not why:
                await self.checkpoint.commit()
        except Exception as e:
            why = f"its commit failed: {e}"
        finally:
            try:
                await self.checkpoint.__aexit__(None, None, None)
            except Exception as e:  # the views' cleanup; the bitmaps are decided already
                log.warning("checkpoint %s: cleanup failed: %s", self.checkpoint.name, e)
        if not self.ended.done():
            if why:
                log.info("checkpoint %s rolled back: %s", self.checkpoint.name, why)
                self.ended.set_exception(
                    TransferError(
                        f"checkpoint {self.checkpoint.name} of backup {self.transfer_id} was "
                        f"rolled back ({why}): the next backup sends these changes again"
                    )
                )
                self.ended.exception()  # retrieved: whoever asks later re-raises it
            else:
                log.info("checkpoint %s committed", self.checkpoint.name)
                self.ended.set_result("committed")
