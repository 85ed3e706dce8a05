"""nbdnats: block devices streamed over NATS.

``send``/``recv``/``copy`` move a disk as a block stream on the data plane; the core
(``nbdnats._core``, Rust) owns the data connection and NBD I/O, Python owns the ctl plane:
``Controller`` drives the node agents (``nbd-nats agent``) that run those streams.
"""

from nbdnats._core import __version__
from nbdnats.controller import Controller, OperationResult
from nbdnats.errors import (
    ApprovalError,
    BusyError,
    ConflictError,
    EndpointError,
    IntegrityError,
    NatsError,
    NbdNatsError,
    PolicyError,
    ProtocolError,
    RefusedError,
    RemoteError,
    SchemaError,
    TargetTooSmallError,
    TransferCancelled,
    TransferError,
    TransferTimeout,
    UsageError,
)
from nbdnats.planes import Planes
from nbdnats.schemas import Tool, TransferOptions
from nbdnats.transfer import (
    TransferHandle,
    TransferStats,
    copy,
    image_digest,
    recv,
    send,
    start_recv,
    start_send,
)

__all__ = [
    "ApprovalError",
    "BusyError",
    "ConflictError",
    "Controller",
    "EndpointError",
    "IntegrityError",
    "NatsError",
    "NbdNatsError",
    "OperationResult",
    "Planes",
    "PolicyError",
    "ProtocolError",
    "RefusedError",
    "RemoteError",
    "SchemaError",
    "TargetTooSmallError",
    "Tool",
    "TransferCancelled",
    "TransferError",
    "TransferHandle",
    "TransferOptions",
    "TransferStats",
    "TransferTimeout",
    "UsageError",
    "__version__",
    "copy",
    "image_digest",
    "recv",
    "send",
    "start_recv",
    "start_send",
]
