"""nbdnats: block devices streamed over NATS.

``send``/``recv``/``copy`` move a disk as a block stream on the data plane; the core
(``nbdnats._core``, Rust) owns the data connection and NBD I/O, Python owns the ctl plane:
``Controller`` drives the node agents (``nbd-nats agent``) that run those streams.

The names below are loaded on first use, so ``nbd-nats send`` does not import the
controller's and agent's dependencies it never touches.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from nbdnats._core import __version__
from nbdnats.errors import (
    ApprovalError,
    AttestationError,
    BusyError,
    ConflictError,
    DevError,
    EndpointError,
    IntegrityError,
    MigrationError,
    MigrationTimeout,
    NatsError,
    NbdNatsError,
    PolicyError,
    ProtocolError,
    QmpCommandError,
    RefusedError,
    RemoteError,
    SchemaError,
    TargetTooSmallError,
    TransferAbandoned,
    TransferCancelled,
    TransferError,
    TransferTimeout,
    UsageError,
)

if TYPE_CHECKING:
    from nbdnats.ctl.controller import Controller, OperationResult
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

_LAZY = {
    "Controller": "nbdnats.ctl.controller",
    "OperationResult": "nbdnats.ctl.controller",
    "Planes": "nbdnats.planes",
    "Tool": "nbdnats.schemas",
    "TransferOptions": "nbdnats.schemas",
    "TransferHandle": "nbdnats.transfer",
    "TransferStats": "nbdnats.transfer",
    "copy": "nbdnats.transfer",
    "image_digest": "nbdnats.transfer",
    "recv": "nbdnats.transfer",
    "send": "nbdnats.transfer",
    "start_recv": "nbdnats.transfer",
    "start_send": "nbdnats.transfer",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'nbdnats' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "ApprovalError",
    "AttestationError",
    "BusyError",
    "ConflictError",
    "Controller",
    "DevError",
    "EndpointError",
    "IntegrityError",
    "MigrationError",
    "MigrationTimeout",
    "NatsError",
    "NbdNatsError",
    "OperationResult",
    "Planes",
    "PolicyError",
    "ProtocolError",
    "QmpCommandError",
    "RefusedError",
    "RemoteError",
    "SchemaError",
    "TargetTooSmallError",
    "Tool",
    "TransferAbandoned",
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
