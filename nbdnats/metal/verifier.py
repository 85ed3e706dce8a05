"""The controller's side of attestation: enrollments it keeps, and the checks of an
installer's evidence (``nbdnats.metal.attest`` parses and verifies the TPM structures).

Enrollment (``nbd-nats ctl enroll NODE --ek-ca FILE``) stores, under the node's name, the
attestation key (AK) an installer proved to hold in the TPM whose endorsement key (EK)
certificate chains to a configured CA. Each attested provision then asks for a quote with a
fresh nonce and accepts it only if the enrolled AK signed it, it answers that nonce, the event
log replays to the quoted PCR digest, and the PCR values equal the golden ones recorded for the
installer image. Anything else is refused before the installer is told to write.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import msgspec
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from nbdnats import subjects
from nbdnats.errors import AttestationError, UsageError
from nbdnats.metal import attest
from nbdnats.schemas import QuoteReply, TpmIdentity
from nbdnats.transfer import resolve_state_dir


class Enrollment(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One enrolled installer: its AK (TPM2B_PUBLIC) and name, and which EK certificate it
    was proven under (sha256 of the DER, its subject and issuer for the operator)."""

    node: str
    ak_public: bytes
    ak_name: str
    ek_certificate_sha256: str
    ek_subject: str
    ek_issuer: str
    enrolled: dt.datetime


@dataclass(frozen=True)
class Attestation:
    """What a verified quote showed: the installer's AK and its boot PCR values."""

    node: str
    ak_name: str
    pcrs: dict[int, bytes]
    pcr_digest: str  # hex sha256 over the values in index order: what an approval binds

    def doc(self) -> dict[str, object]:
        return {
            "node": self.node,
            "ak_name": self.ak_name,
            "pcrs": {str(i): v.hex() for i, v in sorted(self.pcrs.items())},
            "pcr_digest": self.pcr_digest,
        }


def default_dir() -> Path:
    """Where a controller keeps enrollments: ``$NBDNATS_STATE_DIR/enrolled`` and so on
    (``nbdnats.transfer.resolve_state_dir``)."""
    return resolve_state_dir() / "enrolled"


class Enrollments:
    """Enrollments in a directory, one ``NODE.json`` each (mode 0600)."""

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = directory or default_dir()

    def _path(self, node: str) -> Path:
        return self.directory / f"{subjects.check_token(node, 'node name')}.json"

    def load(self, node: str) -> Enrollment:
        path = self._path(node)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise AttestationError(
                f"{node} is not enrolled in {self.directory}: run nbd-nats ctl enroll {node} "
                "--ek-ca FILE first"
            ) from None
        except OSError as e:
            raise UsageError(f"cannot read enrollment {path}: {e.strerror}") from None
        try:
            found = msgspec.json.decode(data, type=Enrollment)
        except (msgspec.ValidationError, msgspec.DecodeError) as e:
            raise UsageError(f"enrollment {path} is damaged ({e}); enroll {node} again") from None
        if found.node != node:
            raise UsageError(f"enrollment {path} is for {found.node}, not {node}")
        return found

    def save(self, enrollment: Enrollment) -> Path:
        path = self._path(enrollment.node)
        try:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            tmp = path.with_suffix(".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(msgspec.json.encode(enrollment))
            os.replace(tmp, path)
        except OSError as e:
            raise UsageError(f"cannot store the enrollment in {self.directory}: {e}") from None
        return path


def check_identity(
    identity: TpmIdentity, cas: Sequence[x509.Certificate]
) -> tuple[attest.TpmPublic, attest.TpmPublic, x509.Certificate]:
    """The installer's EK (certified by a configured CA) and AK (a restricted signing
    key): parsed and checked, before a credential is made for them."""
    if identity.ek_certificate is None:
        raise AttestationError(
            f"{identity.node}'s TPM holds no EK certificate: its manufacturer's certificate "
            "is needed to tell a real TPM from software"
        )
    ek = attest.parse_public(identity.ek_public)
    attest.check_ek(ek)
    cert = attest.verify_ek_certificate(identity.ek_certificate, ek, cas)
    ak = attest.parse_public(identity.ak_public)
    attest.check_ak(ak)
    return ek, ak, cert


def enrollment_of(
    node: str, identity: TpmIdentity, ak: attest.TpmPublic, cert: x509.Certificate
) -> Enrollment:
    """What is kept of installer ``node`` (the one asked, never the name its answer claims)
    whose AK was proven: the AK as it sent it (TPM2B_PUBLIC)."""
    der = cert.public_bytes(Encoding.DER)
    return Enrollment(
        node=node,
        ak_public=identity.ak_public,
        ak_name=ak.name.hex(),
        ek_certificate_sha256=hashlib.sha256(der).hexdigest(),
        ek_subject=cert.subject.rfc4514_string(),
        ek_issuer=cert.issuer.rfc4514_string(),
        enrolled=dt.datetime.now(dt.UTC).replace(microsecond=0),
    )


def check_secret(expected: bytes, answered: bytes) -> None:
    if not hmac.compare_digest(expected, answered):
        raise AttestationError(
            "the installer could not activate the credential: its AK is not in the TPM of "
            "that EK (a key from another TPM, or software)"
        )


def verify_quote(
    enrollment: Enrollment,
    reply: QuoteReply,
    nonce: bytes,
    pcrs: Sequence[int],
    golden: attest.Golden | None,
) -> Attestation:
    """Accept a quote only as the module says; the values it shows, else AttestationError."""
    ak = attest.parse_public(enrollment.ak_public)
    if ak.name.hex() != enrollment.ak_name:
        raise UsageError(f"enrollment of {enrollment.node} is damaged; enroll it again")
    info = attest.verify_quote(ak, reply.attest, reply.signature, nonce)
    if not reply.event_log:
        raise AttestationError(
            f"{enrollment.node} sent no event log: the quoted PCRs cannot be explained"
        )
    replayed = attest.replay(attest.parse_event_log(reply.event_log))
    order = sorted(set(pcrs))
    values = attest.check_quote_pcrs(info, replayed, order)
    for i in order:  # what the installer reported must be what the log and quote show
        reported = reply.pcrs.get(i)
        if reported is None or not hmac.compare_digest(reported, values[i]):
            raise AttestationError(
                f"{enrollment.node} reported PCR {i} unlike its quote and event log"
            )
    if golden is not None:
        golden.check(values)
    return Attestation(
        node=enrollment.node,
        ak_name=enrollment.ak_name,
        pcrs=values,
        pcr_digest=attest.pcr_digest(values, order).hex(),
    )
