"""Type stubs of the Rust core (``ext/``); checked against the module by stubtest."""

from collections.abc import Callable
from typing import final

__all__ = [
    "CONTENT_ALGORITHM",
    "DEFAULT_CHUNK",
    "DEFAULT_COMPRESS",
    "MAX_STREAMS",
    "STRIPE_SIZE",
    "DEFAULT_TIMEOUT",
    "DEFAULT_WINDOW",
    "DIGEST_ALGORITHMS",
    "ERROR_CODES",
    "HEADER_LEN",
    "MAX_CHUNK",
    "MAX_RATE",
    "MAX_WINDOW",
    "MIN_CHUNK",
    "MIN_WINDOW",
    "PROTOCOL_VERSION",
    "STATS_FIELDS",
    "DataConnection",
    "JournalEntry",
    "Stats",
    "Transfer",
    "__version__",
    "checksum_of",
    "connect",
    "decode_frame",
    "discard_journal",
    "encode_frame",
    "image_digest",
    "is_zero",
    "list_journals",
    "merge_extents",
    "shutdown",
    "start_bridge",
    "start_recv",
    "start_send",
]

__version__: str
PROTOCOL_VERSION: int
HEADER_LEN: int
DEFAULT_WINDOW: int
MAX_WINDOW: int
MIN_WINDOW: int
DEFAULT_TIMEOUT: float
DEFAULT_CHUNK: int
MIN_CHUNK: int
MAX_CHUNK: int
# The highest rate cap a transfer takes, in bytes/s.
MAX_RATE: int
# Every code a core failure carries (``nbdnats.errors`` maps each to its own class).
ERROR_CODES: tuple[str, ...]
# The attributes of a ``Stats``, in order.
STATS_FIELDS: tuple[str, ...]
# The content digest's name (``blk64k-xxh3-128``): what a transfer reports as its digest.
CONTENT_ALGORITHM: str
# ``--compress`` when not given (``off``, ``zstd``, ``lz4`` or ``auto``).
DEFAULT_COMPRESS: str
MAX_STREAMS: int
"""The most sub-streams one transfer is striped over (``streams``)."""
STRIPE_SIZE: int
"""Bytes of a stripe segment: segment ``i`` of a disk travels in sub-stream ``i % streams``."""
# What ``image_digest`` computes: ``sha256`` and the content digest.
DIGEST_ALGORITHMS: tuple[str, ...]

# done(True, value) on success, done(False, (code, message, from_peer)) on failure (from_peer:
# the peer reported it); called from a core thread.
_Done = Callable[[bool, object], None]

@final
class DataConnection:
    @property
    def servers(self) -> str: ...
    @property
    def max_payload(self) -> int: ...
    def publish(self, subject: str, payload: bytes) -> None: ...
    def flush(self, done: _Done) -> None: ...

@final
class Stats:
    @property
    def transfer_id(self) -> str: ...
    @property
    def role(self) -> str: ...
    @property
    def state(self) -> str: ...
    @property
    def size(self) -> int: ...
    @property
    def done_bytes(self) -> int: ...
    @property
    def data_bytes(self) -> int: ...
    @property
    def zero_bytes(self) -> int: ...
    @property
    def frames(self) -> int: ...
    @property
    def bad_frames(self) -> int: ...
    @property
    def duplicate_frames(self) -> int: ...
    @property
    def corrupt_frames(self) -> int: ...
    @property
    def retransmits(self) -> int: ...
    @property
    def resumes(self) -> int: ...
    @property
    def sent_bytes(self) -> int: ...
    @property
    def chunk_size(self) -> int: ...
    @property
    def window(self) -> int: ...
    @property
    def dirty_bytes(self) -> int:
        """Bytes the source's dirty bitmap marked changed (0 unless a dirty transfer)."""
    @property
    def rate_limit(self) -> int:
        """The sender's rate cap in bytes/s (0: none)."""
    @property
    def streams(self) -> int:
        """Sub-streams the transfer ran as (1 for one; 0 before it started)."""
    @property
    def wire_bytes(self) -> int:
        """Payload bytes on the wire (compressed where that paid); the sender's include
        retransmissions, the receiver's count each frame it took in once."""
    @property
    def seconds(self) -> float: ...
    @property
    def digest(self) -> str | None: ...
    @property
    def verified(self) -> bool: ...
    @property
    def mb_per_s(self) -> float: ...

@final
class Transfer:
    def cancel(self, resumable: bool = True) -> None:
        """Stop the transfer. ``resumable``: an interruption (``cancelled``; the receiver's
        journal and the sender's key stay for ``--resume``); otherwise for good
        (``abandoned``): both ends drop what a resume would need."""
    def set_rate(self, bytes_per_s: int) -> None:
        """Cap the sending end at ``bytes_per_s`` (0: none) from now on; applies within
        0.1 s. ``ValueError`` above ``MAX_RATE``."""
    def stats(self) -> Stats: ...
    @property
    def transfer_id(self) -> str: ...

def shutdown() -> None:
    """Stop delivering outcomes to Python and wait (at most 5 s) for those under way:
    ``nbdnats._bridge`` registers it with ``atexit``."""

def connect(
    servers: str,
    name: str,
    done: _Done,
    *,
    creds: str | None = None,
    nkey: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    tls_ca: str | None = None,
) -> None:
    """Connect to the data plane, logged in with the credentials of the first server URL
    that carries any (``user:password@``, ``token@``), or with ``creds`` (a ``.creds``
    file) or ``nkey`` (a file holding an NKey seed); ``tls_cert`` and ``tls_key`` present
    a client certificate and ``tls_ca`` verifies servers instead of the system's CAs.
    ``servers`` of the connection shows the list with passwords and tokens masked."""

def start_send(
    conn: DataConnection,
    src: str,
    transfer_id: str,
    subjects_: tuple[str, str, str],
    done: _Done,
    *,
    size: int | None = None,
    chunk_size: int | None = None,
    window: int = ...,
    timeout_s: float = ...,
    verify: bool = False,
    resume: bool = False,
    state_dir: str | None = None,
    allow_local_file: bool = False,
    dirty_bitmap: str | None = None,
    rate: int | None = None,
    compress: str | None = None,
    streams: int = 1,
    stripe_transfers: list[tuple[str, tuple[str, str, str]]] | None = None,
) -> Transfer:
    """``dirty_bitmap``: a dirty transfer; ``src`` must be an NBD export offering
    ``qemu:dirty-bitmap:NAME``, and only the ranges it marks changed are sent. ``rate``: a
    cap in bytes/s on the data frames sent (``None`` or 0: none; see ``Transfer.set_rate``).
    ``compress``: ``off``, ``zstd``, ``lz4`` or ``auto`` (None: ``DEFAULT_COMPRESS``).
    ``streams``: ask the receiver to stripe the transfer over that many sub-streams (1 to
    ``MAX_STREAMS``), named by ``stripe_transfers`` (id and subjects of each, at least
    ``streams`` of them); a receiver that cannot (an older one, a stream target) takes one
    stream, and ``Stats.streams`` says which it was. A source read in order (``-``, a pipe
    or socket) is sent as one stream."""

def start_recv(
    conn: DataConnection,
    dst: str,
    transfer_id: str,
    subjects_: tuple[str, str, str],
    done: _Done,
    *,
    window: int = ...,
    timeout_s: float = ...,
    verify: bool = False,
    target_is_zero: bool = False,
    state_dir: str | None = None,
    resume: bool = False,
    return_subjects: tuple[str, str, str] | None = None,
    expect_sha256: str | None = None,
    allow_local_file: bool = False,
    base: str | None = None,
    stripe_transfers: list[tuple[str, tuple[str, str, str]]] | None = None,
) -> Transfer:
    """``base``: ``dst`` is a stream (``-``, ``pipe:PATH``) that gets this previous image
    (a file or ``pipe:PATH``, read once) with a dirty transfer's ranges merged in.
    ``stripe_transfers``: the sub-streams (id and subjects of each) this end runs when the
    sender asks to stripe the transfer; ``None``: it takes one stream whatever is asked."""

def start_bridge(
    conn: DataConnection,
    kind: str,
    listen: str,
    transfer_id: str,
    subjects_: tuple[str, str, str],
    done: _Done,
    *,
    window: int = ...,
    timeout_s: float = ...,
    size: int | None = None,
    chunk_size: int | None = None,
    return_subjects: tuple[str, str, str] | None = None,
    rate: int | None = None,
) -> Transfer:
    """Listen on the unix socket ``listen`` for one client and push what it writes as a
    stream of writes: ``kind`` "nbd" (an NBD export of ``size`` bytes; each write is
    answered once the receiver wrote it) or "stream" (a byte stream; with
    ``return_subjects`` what comes back on them is written into the same connection).
    The socket exists when this returns and is removed once the client is connected.
    ``rate``: a cap in bytes/s on what is pushed, as for ``start_send``."""

def image_digest(
    src: str,
    done: _Done,
    *,
    length: int | None = None,
    size: int | None = None,
    allow_local_file: bool = False,
    algo: str = "sha256",
) -> None:
    """The ``algo`` digest (one of ``DIGEST_ALGORITHMS``) of the first ``length`` bytes of
    ``src`` (default: all of it): ``done(True, ("<algo>:<hex>", length))``. Holes are hashed
    without being read.
    ``allow_local_file`` (also on ``start_send``/``start_recv``): an NBD URI may name local
    files (``tls-psk-file=``); only for endpoints the local user gave, never a message's."""

@final
class JournalEntry:
    """One file of a state dir's ``journals`` folder: a receiver's journal (``role``
    "recv"), a sender's key ("send"), or a file that is neither or cannot be read
    (``error`` says why)."""

    @property
    def file(self) -> str: ...
    @property
    def role(self) -> str | None: ...
    @property
    def transfer_id(self) -> str | None: ...
    @property
    def target(self) -> str | None: ...
    @property
    def size(self) -> int | None: ...
    @property
    def done_bytes(self) -> int | None: ...
    @property
    def modified(self) -> float | None: ...
    @property
    def running(self) -> bool: ...
    @property
    def error(self) -> str | None: ...

def list_journals(state_dir: str, done: _Done) -> None:
    """Every file in ``state_dir``'s ``journals`` folder, by name:
    ``done(True, [JournalEntry, ...])``; none if there is no such folder."""

def discard_journal(state_dir: str, transfer_id: str, done: _Done) -> None:
    """Remove transfer ``transfer_id``'s journal (refused with ``busy`` while a receiver
    runs on it) and sender key: ``done(True, [path, ...])``; ``usage`` for an invalid id
    or when there is neither."""

# Micro-benchmark entry points (bench/micro): the per-chunk hot paths.
def checksum_of(payload: bytes) -> int: ...
def is_zero(data: bytes) -> bool: ...
def encode_frame(
    seq: int,
    offset: int,
    payload: bytes,
    session: int = 1,
    kind: int = 1,
    length: int | None = None,
) -> bytes: ...
def decode_frame(frame: bytes) -> tuple[int, int, int, int]: ...
def merge_extents(
    start: int, end: int, entries: list[tuple[int, int]]
) -> list[tuple[int, int, bool]]: ...
