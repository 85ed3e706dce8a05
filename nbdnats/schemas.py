"""Message schemas of the ctl plane and of transfer events, versioned msgspec Structs.

The data plane's own handshake and frames are binary/JSON defined by the core
(``docs/protocol.md``); everything Python publishes is defined here, once.
"""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec

SCHEMA_VERSION = 1


class TransferEvent(msgspec.Struct, kw_only=True, omit_defaults=True):
    """``data.evt.<transfer>.{progress,done,error}`` and ``ctl.evt.<node>.transfer``."""

    v: int = SCHEMA_VERSION
    transfer_id: str
    node: str
    role: str
    state: str
    size: int = 0
    done_bytes: int = 0
    data_bytes: int = 0
    zero_bytes: int = 0
    seconds: float = 0.0
    mb_per_s: float = 0.0
    digest: str | None = None
    verified: bool = False
    bad_frames: int = 0
    duplicate_frames: int = 0
    corrupt_frames: int = 0
    retransmits: int = 0
    resumes: int = 0
    sent_bytes: int = 0
    error_code: str | None = None
    error: str | None = None


class Report(msgspec.Struct, kw_only=True):
    """The one line ``--json`` prints when a transfer ends."""

    id: str
    role: str
    size: int
    data_bytes: int
    zero_bytes: int
    seconds: float
    mb_per_s: float
    digest: str | None
    verified: bool
    chunk_size: int
    window: int
    frames: int
    bad_frames: int
    duplicate_frames: int
    corrupt_frames: int
    retransmits: int
    resumes: int
    sent_bytes: int


encode = msgspec.json.encode

S = TypeVar("S", bound=msgspec.Struct)


def from_stats(cls: type[S], stats: object, **fields: Any) -> S:
    """Build ``cls`` from a core ``Stats``: every field of ``cls`` that ``stats`` has, by
    name, then ``fields`` on top."""
    taken = {f: getattr(stats, f) for f in cls.__struct_fields__ if hasattr(stats, f)}
    return cls(**{**taken, **fields})
