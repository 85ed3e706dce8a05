"""The controller-facing transfer API: ``await send(...)``, ``recv(...)``, ``copy(...)``.

Each returns the final ``TransferStats``; none blocks the event loop (the core works on its
own threads without the GIL). Cancelling the awaiting task cancels the transfer, tells the
peer, waits for the core to let go of its resources, then re-raises ``CancelledError``.
Progress arrives through ``on_progress`` or by iterating ``TransferHandle.progress()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, NamedTuple

from nbdnats import _core, formats, subjects
from nbdnats._bridge import Done, core_call
from nbdnats.embedded import EmbeddedServer
from nbdnats.errors import TransferCancelled, TransferTimeout, UsageError
from nbdnats.planes import Login, Planes, urls_given
from nbdnats.schemas import Compress, TransferEvent, encode, from_stats
from nbdnats.units import MAX_RATE, MAX_SIZE, MAX_TIMEOUT

TransferStats = _core.Stats
ProgressCallback = Callable[[TransferStats], None]

DEFAULT_TIMEOUT = _core.DEFAULT_TIMEOUT
PROGRESS_INTERVAL = 0.25
# The core's states before the handshake: the peer has not answered yet, the size may be 0.
WAITING_STATES = frozenset({"connecting", "waiting"})
# How long copy lets one end finish failing by itself after the other failed.
PEER_GRACE = 5.0
EVENT_INTERVAL = 1.0
CANCEL_TIMEOUT = 15.0  # how long a cancelled transfer may take to tell its peer and stop

log = logging.getLogger(__name__)


class CopyStats(NamedTuple):
    """Both ends of a ``copy_ends``: each keeps its own counters (only the sender
    retransmits and counts ``sent_bytes``; only the receiver counts bad, duplicate and
    corrupt frames)."""

    sender: TransferStats
    receiver: TransferStats


def _check_size(n: int | None, what: str) -> None:
    if n is not None and not 0 <= n <= MAX_SIZE:
        raise UsageError(f"{what} {n} must be from 0 to 2^63 - 1 bytes")


def check_rate(rate: int | None, what: str = "--rate") -> None:
    """A rate cap in bytes/s: ``None`` (none), or 1 to ``MAX_RATE``."""
    if rate is not None and not 0 < rate <= MAX_RATE:
        raise UsageError(
            f"{what} {rate} must be from 1 to {MAX_RATE} bytes/s (1 TiB/s); leave it out for no cap"
        )


def check_streams(streams: int, transfer_id: str | None = None) -> None:
    """``--streams``: a whole number from 1 to ``_core.MAX_STREAMS``; more than 1 only for a
    transfer id whose children's ids are tokens too (``subjects.stripe_transfers``)."""
    if isinstance(streams, bool) or not isinstance(streams, int):
        raise UsageError(f"--streams {streams!r} must be a whole number of streams")
    if not 1 <= streams <= _core.MAX_STREAMS:
        raise UsageError(
            f"--streams {streams} must be from 1 to {_core.MAX_STREAMS} "
            "(the sub-streams one transfer is split into)"
        )
    if streams > 1 and transfer_id is not None and len(transfer_id) > subjects.MAX_STRIPED_ID:
        raise UsageError(
            f"--streams {streams} needs a transfer id of at most {subjects.MAX_STRIPED_ID} "
            f"characters (its sub-streams are ID-s0, ID-s1, ...), not {len(transfer_id)}: "
            "give a shorter --id or --streams 1"
        )


def check_options(
    *,
    window: int,
    timeout: float,
    chunk_size: int | None = None,
    size: int | None = None,
    rate: int | None = None,
) -> None:
    """Reject bad numbers before anything connects (the core checks them again)."""
    check_rate(rate)
    if not _core.MIN_WINDOW <= window <= _core.MAX_WINDOW:
        raise UsageError(
            f"--window {window} must be between {_core.MIN_WINDOW} and {_core.MAX_WINDOW} bytes "
            "(the window must stay below nats-server's 64 MiB max_pending)"
        )
    if not (math.isfinite(timeout) and 0 <= timeout <= MAX_TIMEOUT):
        raise UsageError(
            f"--timeout {timeout} must be 0 (wait forever) or a number of seconds up to "
            f"{MAX_TIMEOUT:.0f} (7 days)"
        )
    if chunk_size is not None and (
        not _core.MIN_CHUNK <= chunk_size <= _core.MAX_CHUNK or chunk_size % 4096
    ):
        raise UsageError(
            f"--chunk-size {chunk_size} must be a multiple of 4096 between "
            f"{_core.MIN_CHUNK} and {_core.MAX_CHUNK}"
        )
    _check_size(size, "--size")


# QEMU's limit on a bitmap name (BDRV_BITMAP_MAX_NAME_SIZE).
MAX_BITMAP_NAME = 1023


def check_bitmap_name(name: str) -> str:
    """A dirty bitmap's name as QEMU allows it (1 to 1023 bytes, no '/'), printable and not
    starting with '-' (it reaches qemu-nbd's argv and an NBD meta context); returned."""
    size = len(name.encode("utf-8", "surrogatepass"))
    if (
        not 1 <= size <= MAX_BITMAP_NAME
        or "/" in name
        or name.startswith("-")
        or not name.isprintable()
    ):
        raise UsageError(
            f"--dirty-bitmap {name!r}: a bitmap name is 1 to {MAX_BITMAP_NAME} bytes of "
            "printable characters, without '/' and not starting with '-'"
        )
    return name


def check_dirty(dirty_bitmap: str | None, *, resume: bool) -> None:
    """A dirty transfer's options, checked before anything starts: a valid bitmap name, and
    no ``resume`` (its bitmap still marks every change: it is simply run again)."""
    if dirty_bitmap is None:
        return
    check_bitmap_name(dirty_bitmap)
    if resume:
        raise UsageError(
            "a dirty-bitmap transfer cannot be resumed: its bitmap still marks every change "
            "since the last backup, so run it again whole (without --resume)"
        )


def event_of(stats: TransferStats, node: str, **extra: Any) -> TransferEvent:
    return from_stats(TransferEvent, stats, node=node, **extra)


class TransferHandle:
    """A running transfer: poll ``stats()``, iterate ``progress()``, ``cancel()``, await it."""

    def __init__(
        self,
        core: _core.Transfer,
        outcome: asyncio.Future[object],
        planes: Planes,
        fmt: str | None = None,
    ) -> None:
        self._core = core
        self._outcome = outcome
        self._planes = planes
        # The endpoint's image format (``formats.format_of``): None for an NBD URI or a stream.
        self.format = fmt
        self._last_event = 0.0
        # An agent publishes its own ctl events (with the job's op and tool); a standalone
        # send/recv reports its end here.
        self.ctl_events = True
        # The sub-streams a sender asked for (``start_send(streams=)``) and, when it knows
        # already that it runs one stream, why; else the receiver may not agree to them.
        # ``_check_streams`` says so once.
        self.streams_asked = 1
        self.one_stream_because: str | None = None
        self._streams_told = False

    @property
    def transfer_id(self) -> str:
        return self._core.transfer_id

    def stats(self) -> TransferStats:
        return self._core.stats()

    def cancel(self, *, resumable: bool = False) -> None:
        """Stop the transfer for good: it fails with ``TransferAbandoned`` at both ends and
        neither keeps anything to resume it. ``resumable=True`` interrupts it instead, as a
        signal or cancelling the task that awaits ``wait()`` does (``TransferCancelled``):
        the receiver keeps its journal and the sender its key for ``resume``."""
        self._core.cancel(resumable)

    def set_rate(self, rate: int | None) -> None:
        """Cap this transfer's sending end at ``rate`` bytes/s from now on (``None``: no
        cap); a frame waiting for the old cap sees the new one within 0.1 s. On a
        receiving end it only shows in the stats (the sender paces the transfer)."""
        check_rate(rate, "rate")
        self._core.set_rate(rate or 0)

    def done(self) -> bool:
        return self._outcome.done()

    def _publish(self, kind: str, event: TransferEvent) -> None:
        self._planes.data.publish(subjects.data_event(self.transfer_id, kind), encode(event))

    def _check_streams(self, stats: TransferStats) -> None:
        """Say once when a sender asked for sub-streams and runs as one: known once data
        moves (the receiver has answered and the sub-streams, if any, have started)."""
        if self._streams_told or self.streams_asked <= 1:
            return
        if stats.state == "done" or (stats.state == "running" and stats.done_bytes > 0):
            self._streams_told = True
            if stats.streams <= 1:
                why = self.one_stream_because or (
                    "the receiver does not support --streams (or its target is a stream)"
                )
                log.warning("transfer %s: %s; sending it as one stream", self.transfer_id, why)

    def _tick(self, on_progress: ProgressCallback | None) -> None:
        stats = self.stats()
        self._check_streams(stats)
        if on_progress is not None:
            on_progress(stats)
        now = time.monotonic()
        if stats.state == "running" and now - self._last_event >= EVENT_INTERVAL:
            self._last_event = now
            self._publish("progress", event_of(stats, self._planes.node))

    async def progress(self, interval: float = PROGRESS_INTERVAL) -> AsyncIterator[TransferStats]:
        """Yield stats every ``interval`` seconds from the handshake (so ``size`` is the
        image's, never a 0 of a peer not yet there) until the transfer ends. A transfer that
        succeeded ends with its final stats (``done_bytes == size``); one that failed just
        ends (``await`` the handle for its error)."""
        while not self._outcome.done():
            stats = self.stats()
            if stats.state not in WAITING_STATES:
                yield stats
            await asyncio.wait({self._outcome}, timeout=interval)
        if not self._outcome.cancelled() and self._outcome.exception() is None:
            result = self._outcome.result()
            assert isinstance(result, _core.Stats)
            yield result

    async def wait(self, on_progress: ProgressCallback | None = None) -> TransferStats:
        """Wait for the end, reporting progress; raise the transfer's error if it failed."""
        try:
            while not self._outcome.done():
                self._tick(on_progress)
                await asyncio.wait({self._outcome}, timeout=PROGRESS_INTERVAL)
        except asyncio.CancelledError:
            self.cancel(resumable=True)  # an interruption (a signal, a cancelled task)
            # The core tells the peer and lets go of the endpoints; bounded, so a core stuck
            # on a server that is gone cannot keep a cancelled caller waiting.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._outcome), CANCEL_TIMEOUT)
            raise
        try:
            result = self._outcome.result()
        except Exception as e:
            self._publish(
                "error",
                event_of(
                    self.stats(),
                    self._planes.node,
                    error_code=getattr(e, "code", "error"),
                    error=str(e),
                    from_peer=getattr(e, "from_peer", False),
                ),
            )
            raise
        assert isinstance(result, _core.Stats)
        self._check_streams(result)
        if on_progress is not None:
            on_progress(result)
        self._publish("done", event_of(result, self._planes.node))
        if self.ctl_events:
            await self._ctl_event(result)
        return result

    async def _ctl_event(self, stats: TransferStats) -> None:
        # The transfer's result stands whatever becomes of the ctl plane.
        subject = subjects.ctl_event(self._planes.node, "transfer")
        payload = encode(event_of(stats, self._planes.node))
        await self._planes.ctl_publish(subject, payload, "the transfer's ctl event")


Subjects = tuple[str, str, str]
CoreStart = Callable[[Subjects, Subjects | None, Done], _core.Transfer]


async def _start(
    planes: Planes,
    transfer_id: str,
    return_id: str | None,
    begin: CoreStart,
    served: formats.Served | None = None,
) -> TransferHandle:
    """What every ``start_*`` shares once its options are checked: the transfer's subjects
    (and those of the transfer that comes back, if any), the core call, the handle. A
    ``served`` endpoint (a qemu-nbd) is stopped when the core has let go of it: the
    handle's outcome is known only once it is."""
    subs = subjects.transfer(transfer_id)
    back = subjects.transfer(return_id) if return_id else None
    try:
        core, outcome = core_call(lambda done: begin(subs, back, done))
    except BaseException:
        if served is not None:
            await served.close()
        raise
    if served is None:
        return TransferHandle(core, outcome, planes)
    return TransferHandle(
        core, asyncio.ensure_future(_then_close(outcome, served)), planes, served.format
    )


async def _then_close(outcome: asyncio.Future[object], served: formats.Served) -> object:
    try:
        return await outcome
    finally:
        await served.close()


async def image_digest(
    src: str,
    *,
    length: int | None = None,
    size: int | None = None,
    allow_local_file: bool = False,
    raw: bool = False,
    algo: str = "sha256",
) -> tuple[str, int]:
    """The digest of an image's contents (``"<algo>:<hex>"``) and the bytes hashed, whatever
    serves it; holes are not read. ``algo``: ``"sha256"`` (what ``sha256sum`` prints for
    the raw disk; approvals name images by it) or ``_core.CONTENT_ALGORITHM``
    (``"blk64k-xxh3-128"``: what a transfer of the image reports as its digest).
    ``allow_local_file``: ``src`` comes from the local user, so an NBD URI may name local
    files (``tls-psk-file=``); leave it False for an endpoint that came in a message.
    ``raw`` as for ``start_send``."""
    _check_size(length, "digest length")
    _check_size(size, "digest size")
    served = await formats.serve(src, target=False, raw=raw)
    try:
        result = await core_call(
            lambda done: _core.image_digest(
                served.endpoint,
                done,
                length=length,
                size=size,
                allow_local_file=allow_local_file,
                algo=algo,
            )
        )[1]
    finally:
        await served.close()
    assert isinstance(result, tuple)
    digest, hashed = result
    return str(digest), int(hashed)


def resolve_state_dir(state_dir: str | None = None) -> Path:
    """Where receivers keep their journals: the argument, ``$NBDNATS_STATE_DIR``,
    ``$XDG_STATE_HOME/nbdnats``, or ``~/.local/state/nbdnats``."""
    if state_dir:
        return Path(state_dir)
    if env := os.environ.get("NBDNATS_STATE_DIR"):
        return Path(env)
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "nbdnats"


async def journals(state_dir: str | None = None) -> list[_core.JournalEntry]:
    """What interrupted transfers left in the state dir (``resolve_state_dir``): each
    receiver's journal (transfer id, target, size, bytes written, last write, whether a
    receiver still runs on it) and each sender's key, by file name. A file that is neither
    or cannot be read is listed with its ``error``."""
    path = str(resolve_state_dir(state_dir))
    result = await core_call(lambda done: _core.list_journals(path, done))[1]
    assert isinstance(result, list)
    return result


async def discard_journal(transfer_id: str, state_dir: str | None = None) -> list[str]:
    """Remove what interrupted transfer ``transfer_id`` left in the state dir (its journal
    and sender key, and those of its sub-streams when it was striped), so nothing resumes
    it; the files removed. ``BusyError`` while a receiver still runs on a journal,
    ``UsageError`` for a bad id or when there is none."""
    subjects.check_token(transfer_id, "transfer id")
    path = str(resolve_state_dir(state_dir))

    async def discard(tid: str) -> list[str]:
        result = await core_call(lambda done: _core.discard_journal(path, tid, done))[1]
        assert isinstance(result, list)
        return [str(p) for p in result]

    removed: list[str] = []
    for child, _ in subjects.stripe_transfers(transfer_id) or []:
        with contextlib.suppress(UsageError):  # this sub-stream left nothing
            removed += await discard(child)
    try:
        return await discard(transfer_id) + removed
    except UsageError:
        if removed:
            return removed
        raise


async def start_send(
    src: str,
    *,
    transfer_id: str,
    planes: Planes,
    size: int | None = None,
    chunk_size: int | None = None,
    window: int = _core.DEFAULT_WINDOW,
    timeout: float = DEFAULT_TIMEOUT,
    verify: bool = False,
    resume: bool = False,
    state_dir: str | None = None,
    allow_local_file: bool = False,
    raw: bool = False,
    dirty_bitmap: str | None = None,
    rate: int | None = None,
    compress: Compress | None = None,
    streams: int = 1,
) -> TransferHandle:
    """``state_dir``: where the sender keeps the key that binds the transfer to it (see
    ``resolve_state_dir``); only a sender holding it can ``resume`` the transfer.
    ``allow_local_file`` as for ``image_digest`` (also on ``start_recv``). A file whose
    header names an image format (qcow2, vmdk, ...: ``nbdnats.formats``) is read through
    a private read-only qemu-nbd, unless ``raw``: then its bytes are sent as they are
    (also on ``start_recv``, where such a file is written through a writable one).
    ``dirty_bitmap``: send only what that dirty bitmap of ``src`` marks changed (an NBD
    export offering ``qemu:dirty-bitmap:NAME``, or an image file holding the bitmap); the
    receiver's target must hold the previous image, or it merges a ``base``.
    ``rate``: cap the data frames sent at that many bytes/s (``None``: no cap; change it
    with ``TransferHandle.set_rate``).
    ``compress``: ``off``, ``zstd``, ``lz4`` or ``auto`` (None: ``_core.DEFAULT_COMPRESS``);
    a data frame is sent compressed only where that saves a tenth, and an explicit codec
    the receiver cannot decompress fails the transfer.
    ``streams``: split the transfer into that many sub-streams (1 to ``_core.MAX_STREAMS``),
    each on its own data connection, preferring another server of the data URL list; the
    receiver may agree to one only (``stats().streams`` says, and a warning is logged once).
    A resume must ask for the number the transfer started with."""
    check_options(window=window, timeout=timeout, chunk_size=chunk_size, size=size, rate=rate)
    check_streams(streams, transfer_id)
    check_dirty(dirty_bitmap, resume=resume)
    stripes = subjects.stripe_transfers(transfer_id)
    served = await formats.serve(src, target=False, raw=raw, bitmap=dirty_bitmap)
    handle = await _start(
        planes,
        transfer_id,
        None,
        lambda subs, _, done: _core.start_send(
            planes.data,
            served.endpoint,
            transfer_id,
            subs,
            done,
            size=size,
            chunk_size=chunk_size,
            window=window,
            timeout_s=timeout,
            verify=verify,
            resume=resume,
            state_dir=str(resolve_state_dir(state_dir)),
            allow_local_file=allow_local_file,
            dirty_bitmap=dirty_bitmap,
            rate=rate,
            compress=compress,
            streams=streams,
            stripe_transfers=stripes,
        ),
        served,
    )
    handle.streams_asked = streams
    if src == "-" or src.startswith(("pipe:", "unix:")):
        handle.one_stream_because = "its source is read in order (stdin, a pipe or a socket)"
    elif dirty_bitmap is not None:
        handle.one_stream_because = "a dirty-bitmap transfer writes its ranges in order"
    return handle


async def start_recv(
    dst: str,
    *,
    transfer_id: str,
    planes: Planes,
    window: int = _core.DEFAULT_WINDOW,
    timeout: float = DEFAULT_TIMEOUT,
    verify: bool = False,
    target_is_zero: bool = False,
    resume: bool = False,
    state_dir: str | None = None,
    return_id: str | None = None,
    expect_sha256: str | None = None,
    allow_local_file: bool = False,
    raw: bool = False,
    base: str | None = None,
) -> TransferHandle:
    """``return_id`` (a ``unix:PATH`` target only): what the other end of that connection
    writes back is sent home as transfer ``return_id`` (a migration's return path).
    ``expect_sha256`` (``sha256:<hex>``): the image must hash to this as it is written; if
    it does not, both ends of the target are wiped and the transfer fails.
    ``base`` (a file, ``/proc/self/fd/N`` or ``pipe:PATH``, read once in order): ``dst`` is
    a stream (``-``, ``pipe:PATH``) that gets this previous image with a dirty transfer's
    ranges merged in; the digest reported is the merged image's content digest. A base
    that is shorter or longer than the image fails the transfer. Only a dirty transfer
    (``dirty_bitmap``) is accepted with a base.
    A sender's sub-streams (``start_send(streams=)``) are agreed to where the target allows
    writing them side by side: a file, device or NBD export, not a stream, and not with
    ``expect_sha256`` or ``base``; elsewhere the transfer runs as one stream."""
    check_options(window=window, timeout=timeout)
    if base is not None and not (dst == "-" or dst.startswith("pipe:")):
        raise UsageError(
            f"--base merges into a stream: the target must be '-' or 'pipe:PATH', not {dst}"
        )
    if base is not None and not base.removeprefix("pipe:"):
        raise UsageError("--base needs a file or pipe path")
    served = await formats.serve(dst, target=True, raw=raw, resume=resume)
    # Offered always: the sender asks for sub-streams, and the core agrees where it can.
    stripes = subjects.stripe_transfers(transfer_id)
    return await _start(
        planes,
        transfer_id,
        return_id,
        lambda subs, back, done: _core.start_recv(
            planes.data,
            served.endpoint,
            transfer_id,
            subs,
            done,
            window=window,
            timeout_s=timeout,
            verify=verify,
            target_is_zero=target_is_zero,
            state_dir=str(resolve_state_dir(state_dir)),
            resume=resume,
            return_subjects=back,
            expect_sha256=expect_sha256,
            allow_local_file=allow_local_file,
            base=base,
            stripe_transfers=stripes,
        ),
        served,
    )


async def start_bridge(
    kind: str,
    listen: str,
    *,
    transfer_id: str,
    planes: Planes,
    size: int | None = None,
    chunk_size: int | None = None,
    window: int = _core.DEFAULT_WINDOW,
    timeout: float = DEFAULT_TIMEOUT,
    return_id: str | None = None,
    rate: int | None = None,
) -> TransferHandle:
    """Serve the unix socket ``listen`` for one local producer and send what it writes:
    ``kind`` "nbd" (an NBD export of ``size`` bytes, e.g. for QEMU's mirror) or "stream"
    (a byte stream, e.g. QEMU's migration). The receiver is an ordinary ``start_recv``
    (an NBD export, or ``unix:PATH``). The socket exists when this returns. With
    ``return_id`` ("stream" only), transfer ``return_id`` is received back into the same
    connection: the stream is full-duplex. ``rate`` caps what is pushed, as for
    ``start_send``."""
    check_options(window=window, timeout=timeout, chunk_size=chunk_size, size=size, rate=rate)
    return await _start(
        planes,
        transfer_id,
        return_id,
        lambda subs, back, done: _core.start_bridge(
            planes.data,
            kind,
            listen,
            transfer_id,
            subs,
            done,
            size=size,
            chunk_size=chunk_size,
            window=window,
            timeout_s=timeout,
            return_subjects=back,
            rate=rate,
        ),
    )


@contextlib.asynccontextmanager
async def _planes(
    planes: Planes | None,
    data_url: str | None,
    ctl_url: str | None,
    node: str | None,
    login: Login | None,
) -> AsyncIterator[Planes]:
    if planes is not None:
        yield planes
        return
    own = await Planes.connect(data_url, ctl_url, node, login)
    try:
        yield own
    finally:
        await own.close()


async def _one(
    start: Callable[..., Awaitable[TransferHandle]],
    endpoint: str,
    transfer_id: str,
    planes: Planes | None,
    where: tuple[str | None, str | None, str | None, Login | None],
    on_progress: ProgressCallback | None,
    options: dict[str, Any],
) -> TransferStats:
    """One end of a transfer on the given planes, or on connections of its own; the
    endpoint came from the local user, so it may name local files unless told otherwise."""
    options.setdefault("allow_local_file", True)
    subjects.check_token(transfer_id, "transfer id")
    async with _planes(planes, *where) as p:
        handle = await start(endpoint, transfer_id=transfer_id, planes=p, **options)
        return await handle.wait(on_progress)


async def send(
    src: str,
    *,
    transfer_id: str,
    planes: Planes | None = None,
    data_url: str | None = None,
    ctl_url: str | None = None,
    node: str | None = None,
    login: Login | None = None,
    on_progress: ProgressCallback | None = None,
    **options: Any,
) -> TransferStats:
    """Send ``src`` (NBD URI, file, device or ``-``) as transfer ``transfer_id``.

    ``send``, ``recv`` and ``copy`` take their endpoints from the local user, so an NBD URI
    may name local files (``tls-psk-file=``) unless ``allow_local_file=False`` is passed;
    the ``start_*`` calls and ``image_digest`` (which the agent uses for endpoints that came
    in a message) allow it only when asked."""
    # Before anything connects.
    check_streams(options.get("streams", 1), subjects.check_token(transfer_id, "transfer id"))
    return await _one(
        start_send, src, transfer_id, planes, (data_url, ctl_url, node, login), on_progress, options
    )


async def recv(
    dst: str,
    *,
    transfer_id: str,
    planes: Planes | None = None,
    data_url: str | None = None,
    ctl_url: str | None = None,
    node: str | None = None,
    login: Login | None = None,
    on_progress: ProgressCallback | None = None,
    **options: Any,
) -> TransferStats:
    """Receive transfer ``transfer_id`` into ``dst`` (NBD URI, file, device, ``-``, ``null:``);
    ``allow_local_file`` as for ``send``."""
    return await _one(
        start_recv, dst, transfer_id, planes, (data_url, ctl_url, node, login), on_progress, options
    )


async def copy_ends(
    src: str,
    dst: str,
    *,
    transfer_id: str | None = None,
    data_url: str | None = None,
    ctl_url: str | None = None,
    node: str | None = None,
    login: Login | None = None,
    on_progress: ProgressCallback | None = None,
    size: int | None = None,
    chunk_size: int | None = None,
    window: int = _core.DEFAULT_WINDOW,
    timeout: float = DEFAULT_TIMEOUT,
    verify: bool = False,
    target_is_zero: bool = False,
    resume: bool = False,
    state_dir: str | None = None,
    allow_local_file: bool = True,
    raw: bool = False,
    dirty_bitmap: str | None = None,
    base: str | None = None,
    rate: int | None = None,
    compress: Compress | None = None,
    streams: int = 1,
) -> CopyStats:
    """``copy``, returning both ends' final stats. ``allow_local_file``, ``raw``,
    ``dirty_bitmap``, ``rate``, ``compress`` and ``streams`` as for ``start_send``; ``base``
    as for ``start_recv``."""
    transfer_id = subjects.check_token(transfer_id or subjects.new_id(), "transfer id")
    check_options(window=window, timeout=timeout, chunk_size=chunk_size, size=size, rate=rate)
    check_streams(streams, transfer_id)
    check_dirty(dirty_bitmap, resume=resume)
    # What either end would refuse (an image format without qemu-nbd) before any starts.
    formats.check(src, raw=raw)
    formats.check(dst, raw=raw, target=True)
    async with contextlib.AsyncExitStack() as stack:
        if not urls_given(data_url, ctl_url):
            data_url = await stack.enter_async_context(EmbeddedServer())
        planes = await Planes.connect(data_url, ctl_url, node, login)
        stack.push_async_callback(planes.close)
        both: dict[str, Any] = {
            "transfer_id": transfer_id,
            "planes": planes,
            "window": window,
            "timeout": timeout,
            "verify": verify,
            "resume": resume,
            "state_dir": state_dir,
            "allow_local_file": allow_local_file,
            "raw": raw,
        }
        receiver = await start_recv(dst, target_is_zero=target_is_zero, base=base, **both)
        try:
            sender = await start_send(
                src,
                size=size,
                chunk_size=chunk_size,
                dirty_bitmap=dirty_bitmap,
                rate=rate,
                compress=compress,
                streams=streams,
                **both,
            )
        except BaseException:
            receiver.cancel()  # and let go of its target (and its qemu-nbd) before failing
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(receiver.wait(), CANCEL_TIMEOUT)
            raise
        return await _both(sender, receiver, on_progress)
    raise AssertionError("unreachable")  # pragma: no cover  (mypy: the stack may swallow)


async def copy(
    src: str,
    dst: str,
    *,
    transfer_id: str | None = None,
    data_url: str | None = None,
    ctl_url: str | None = None,
    node: str | None = None,
    login: Login | None = None,
    on_progress: ProgressCallback | None = None,
    size: int | None = None,
    chunk_size: int | None = None,
    window: int = _core.DEFAULT_WINDOW,
    timeout: float = DEFAULT_TIMEOUT,
    verify: bool = False,
    target_is_zero: bool = False,
    resume: bool = False,
    state_dir: str | None = None,
    allow_local_file: bool = True,
    raw: bool = False,
    dirty_bitmap: str | None = None,
    base: str | None = None,
    rate: int | None = None,
    compress: Compress | None = None,
    streams: int = 1,
) -> TransferStats:
    """Both ends in one process. Without any NATS URL, through an embedded nats-server.
    Returns the receiver's stats (what landed in ``dst``); ``copy_ends`` returns both.
    ``allow_local_file``, ``raw``, ``compress`` and ``streams`` as for ``send``."""
    ends = await copy_ends(
        src,
        dst,
        transfer_id=transfer_id,
        data_url=data_url,
        ctl_url=ctl_url,
        node=node,
        login=login,
        on_progress=on_progress,
        size=size,
        chunk_size=chunk_size,
        window=window,
        timeout=timeout,
        verify=verify,
        target_is_zero=target_is_zero,
        resume=resume,
        state_dir=state_dir,
        allow_local_file=allow_local_file,
        raw=raw,
        dirty_bitmap=dirty_bitmap,
        base=base,
        rate=rate,
        compress=compress,
        streams=streams,
    )
    return ends.receiver


async def _both(
    sender: TransferHandle, receiver: TransferHandle, on_progress: ProgressCallback | None
) -> CopyStats:
    """Wait for both ends; when one fails, stop the other and raise the first cause.

    The end that failed tells its peer (ABORT, or an error ack), and the peer then fails
    with the same cause: a receiver whose sender's source failed removes its journal, one
    whose transfer was interrupted keeps it. So the peer gets ``PEER_GRACE`` seconds to end
    by itself before it is cancelled (which would make any failure look interrupted)."""
    tasks = {
        asyncio.create_task(sender.wait(on_progress)): sender,
        asyncio.create_task(receiver.wait()): receiver,
    }
    try:
        pending: set[asyncio.Task[TransferStats]] = set(tasks)
        first_error: BaseException | None = None
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                err = t.exception()
                if err is not None and first_error is None:
                    first_error = err
                    # A usage error (a bad URI, a missing file) ends an end before it
                    # met its peer: nobody tells the other one, so it is not waited for.
                    if pending and not isinstance(err, UsageError):
                        _, pending = await asyncio.wait(pending, timeout=PEER_GRACE)
                    for other in pending:
                        tasks[other].cancel()
        if first_error is not None:
            # The first failure is the cause and the peer's a consequence (its echo, its
            # cancellation) — except that a cancellation or a timeout is usually the wait
            # for an end that failed otherwise: then that other failure is the cause.
            causes = [t.exception() for t in tasks if t.exception() is not None]
            real = [e for e in causes if not isinstance(e, TransferCancelled | TransferTimeout)]
            if isinstance(first_error, TransferCancelled | TransferTimeout) and real:
                raise real[0]  # type: ignore[misc]
            raise first_error
        ends = {h: t.result() for t, h in tasks.items()}
        return CopyStats(sender=ends[sender], receiver=ends[receiver])
    except asyncio.CancelledError:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
