"""The exception tree. Every failure the user can cause or meet is one of these.

    NbdNatsError                  base: one line says what failed and what to do
     +-- UsageError               a bad argument, URI, id or option          (code "usage")
     +-- EndpointError            a source/target cannot be opened, read or written
     |    +-- TargetTooSmallError the target is smaller than the source
     +-- NatsError                a NATS server is unreachable or refused us
     +-- TransferError            the transfer could not complete
     |    +-- TransferTimeout     the peer did not appear or went quiet
     |    +-- BusyError           another receiver already serves the id
     |    +-- ProtocolError       the peer broke the protocol
     |    +-- RemoteError         the peer failed and said why
     +-- IntegrityError           checksum, digest or verify mismatch
     +-- TransferCancelled        the transfer was cancelled (interrupted: resumable)
     |    +-- TransferAbandoned   cancelled for good: nothing kept to resume it (code "abandoned")
     +-- RefusedError             an agent refused a command before acting  (code "refused")
     |    +-- SchemaError         not a valid message, unknown op or version (code "schema")
     |    +-- PolicyError         outside the agent's allow-list or role     (code "denied")
     |    +-- ApprovalError       a provisioning approval is missing or bad  (code "approval")
     |    +-- AttestationError    a TPM's identity or quote failed a check   (code "attestation")
     |    +-- ConflictError       an idempotency key reused for another command (code "conflict")
     +-- MigrationError           a live migration failed (the source VM keeps running
     |    |                       when it failed before switchover)
     |    +-- MigrationTimeout    a migration step made no progress within the timeout
     |    +-- QmpCommandError     a QEMU answered a QMP command with an error
     |                           (``error_class`` holds QEMU's class; code "migration")
     +-- DevError                 the dev topology could not be made, started or found (code "dev")

The core reports failures as ``(code, message, from_peer)``; ``from_code`` maps a code to its
class (every code of ``_core.ERROR_CODES`` has its own).
"""

from __future__ import annotations


class NbdNatsError(Exception):
    """Base of every nbdnats error; ``str(err)`` is a one-line message for the user.
    ``from_peer``: the other end of a transfer failed and reported this (its message then
    starts "peer: "), so this end's failure is a consequence."""

    code = "error"
    from_peer = False


class UsageError(NbdNatsError):
    code = "usage"


class EndpointError(NbdNatsError):
    code = "endpoint"


class TargetTooSmallError(EndpointError):
    code = "target_too_small"


class NatsError(NbdNatsError):
    code = "nats"


class TransferError(NbdNatsError):
    code = "transfer"


class TransferTimeout(TransferError):
    code = "timeout"


class BusyError(TransferError):
    code = "busy"


class ProtocolError(TransferError):
    code = "protocol"


class RemoteError(TransferError):
    code = "remote"


class IntegrityError(NbdNatsError):
    code = "integrity"


class TransferCancelled(NbdNatsError):
    code = "cancelled"


class TransferAbandoned(TransferCancelled):
    code = "abandoned"


class RefusedError(NbdNatsError):
    code = "refused"


class SchemaError(RefusedError):
    code = "schema"


class PolicyError(RefusedError):
    code = "denied"


class ApprovalError(RefusedError):
    code = "approval"


class AttestationError(RefusedError):
    """An installer's TPM evidence failed a check: EK certificate chain, attestation key,
    credential activation, quote signature, nonce, event log or golden PCR values."""

    code = "attestation"


class ConflictError(RefusedError):
    code = "conflict"


class MigrationError(NbdNatsError):
    code = "migration"


class MigrationTimeout(MigrationError):
    code = "migration_timeout"


class QmpCommandError(MigrationError):
    """QEMU answered a command with an error; ``error_class`` is QEMU's (``GenericError``,
    ``DeviceNotFound``, ...), so callers can tell "already gone" from a real failure."""

    def __init__(self, message: str, error_class: str) -> None:
        super().__init__(message)
        self.error_class = error_class


class DevError(NbdNatsError):
    code = "dev"


_BY_CODE: dict[str, type[NbdNatsError]] = {
    cls.code: cls
    for cls in (
        UsageError,
        EndpointError,
        TargetTooSmallError,
        NatsError,
        TransferTimeout,
        BusyError,
        ProtocolError,
        IntegrityError,
        TransferCancelled,
        TransferAbandoned,
        RefusedError,
        SchemaError,
        PolicyError,
        ApprovalError,
        AttestationError,
        ConflictError,
        MigrationError,
        MigrationTimeout,
        DevError,
    )
}


def from_code(code: str, message: str, *, from_peer: bool = False) -> NbdNatsError:
    """The exception for a core failure; unknown codes (a peer's own) become RemoteError."""
    err = _BY_CODE.get(code, RemoteError)(message)
    err.from_peer = from_peer
    return err
