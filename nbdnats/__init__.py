"""nbdnats: block devices streamed over NATS.

``send``/``recv``/``copy`` move a disk as a block stream on the data plane; the core
(``nbdnats._core``, Rust) owns the data connection and NBD I/O, Python owns the ctl plane.
"""

from nbdnats._core import __version__
from nbdnats.errors import (
    BusyError,
    EndpointError,
    IntegrityError,
    NatsError,
    NbdNatsError,
    ProtocolError,
    RemoteError,
    TargetTooSmallError,
    TransferCancelled,
    TransferError,
    TransferTimeout,
    UsageError,
)
from nbdnats.planes import Planes
from nbdnats.transfer import (
    TransferHandle,
    TransferStats,
    copy,
    recv,
    send,
    start_recv,
    start_send,
)

__all__ = [
    "BusyError",
    "EndpointError",
    "IntegrityError",
    "NatsError",
    "NbdNatsError",
    "Planes",
    "ProtocolError",
    "RemoteError",
    "TargetTooSmallError",
    "TransferCancelled",
    "TransferError",
    "TransferHandle",
    "TransferStats",
    "TransferTimeout",
    "UsageError",
    "__version__",
    "copy",
    "recv",
    "send",
    "start_recv",
    "start_send",
]
