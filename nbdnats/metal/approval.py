"""Signed provisioning approvals: Ed25519 over (node, image digest, device, expiry).

An installer writes an image onto a disk only with an approval signed by a key in its
``--trusted-keys DIR`` (``*.pub``, PEM). ``nbd-nats approve`` (``nbdnats.cli.approve``) makes
keys and approvals:

    nbd-nats approve --new-key ops            # ops.key (private, 0600) and ops.pub
    nbd-nats approve --key ops.key --node rack1-07 --device /dev/sda \\
        --image /srv/images/debian.raw --expires 2h -o approval.json

The signature covers the approval's JSON with an empty ``signature`` (msgspec encodes
fields in declaration order, so the bytes are the same on both ends). A key's id is the
first 16 hex digits of the sha256 of its raw public key.

An approval may also be bound to the installer's TPM (``--attestation FILE``, what
``nbd-nats ctl attest NODE --json`` prints): its attestation key's name and the digest of
its boot PCR values. The installer then writes only after a quote showing exactly those
(``nbdnats.metal.installer``). The binding fields are signed too; unset, they are left out
of the signed bytes, so an approval without them signs and verifies as before.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import os
from pathlib import Path

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from nbdnats.errors import ApprovalError, UsageError
from nbdnats.schemas import Approval, decode, encode


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


BINDING = ("ak_name", "pcr_digest", "pcrs")


def signed_bytes(approval: Approval) -> bytes:
    fields = msgspec.structs.asdict(msgspec.structs.replace(approval, signature=""))
    for name in BINDING:
        if fields[name] is None:
            del fields[name]
    return encode(fields)


def new_key(stem: Path) -> tuple[Path, Path]:
    """Write ``STEM.key`` (PKCS#8 PEM, mode 0600) and ``STEM.pub``; never overwrite."""
    key_path, pub_path = stem.with_name(stem.name + ".key"), stem.with_name(stem.name + ".pub")
    for p in (key_path, pub_path):
        if p.exists():
            raise UsageError(f"{p} exists; choose another name or remove it first")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub_path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return key_path, pub_path


def load_private(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as e:
        raise UsageError(f"cannot read key {path}: {e.strerror}") from None
    except (ValueError, TypeError):
        raise UsageError(f"{path} is not an unencrypted PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise UsageError(f"{path} is not an Ed25519 key; make one with --new-key")
    return key


def sign(
    key: Ed25519PrivateKey,
    *,
    node: str,
    image_digest: str,
    device: str,
    expires: dt.datetime,
    ak_name: str | None = None,
    pcr_digest: str | None = None,
    pcrs: list[int] | None = None,
) -> Approval:
    if (ak_name is None) != (pcr_digest is None):
        raise UsageError("a TPM binding needs both the attestation key's name and a PCR digest")
    approval = Approval(
        node=node,
        image_digest=image_digest,
        device=device,
        expires=expires.astimezone(dt.UTC).replace(microsecond=0),
        key_id=key_id(key.public_key()),
        ak_name=ak_name,
        pcr_digest=pcr_digest,
        pcrs=pcrs if ak_name is not None else None,
    )
    signature = key.sign(signed_bytes(approval))
    return msgspec.structs.replace(approval, signature=base64.b64encode(signature).decode())


def load_approval(path: Path) -> Approval:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UsageError(f"cannot read approval {path}: {e.strerror}") from None
    try:
        return decode(Approval, data, f"approval {path}")
    except Exception as e:
        raise UsageError(str(e)) from None


class TrustedKeys:
    """The public keys in a directory (``*.pub``), by key id."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.keys: dict[str, Ed25519PublicKey] = {}
        try:
            files = sorted(directory.glob("*.pub"))
        except OSError as e:
            raise UsageError(f"cannot read --trusted-keys {directory}: {e.strerror}") from None
        for f in files:
            try:
                key = serialization.load_pem_public_key(f.read_bytes())
            except (OSError, ValueError):
                raise UsageError(f"trusted key {f} is not a PEM public key") from None
            if not isinstance(key, Ed25519PublicKey):
                raise UsageError(f"trusted key {f} is not an Ed25519 key")
            self.keys[key_id(key)] = key
        if not self.keys:
            raise UsageError(f"--trusted-keys {directory} holds no *.pub key")

    def verify(
        self,
        approval: Approval,
        *,
        node: str,
        device: str,
        image_digest: str,
        now: dt.datetime | None = None,
    ) -> None:
        """Accept the approval for this write, or raise ``ApprovalError`` saying why not."""
        key = self.keys.get(approval.key_id)
        if key is None:
            raise ApprovalError(
                f"approval signed by key {approval.key_id}, which this installer does not trust"
            )
        try:
            key.verify(base64.b64decode(approval.signature, validate=True), signed_bytes(approval))
        except (InvalidSignature, ValueError):
            raise ApprovalError("approval signature is not valid (altered or forged)") from None
        if approval.node != node:
            raise ApprovalError(f"approval is for node {approval.node}, not {node}")
        now = now or dt.datetime.now(dt.UTC)
        if approval.expires.tzinfo is None or approval.expires <= now:
            raise ApprovalError(f"approval expired at {approval.expires.isoformat()}")
        if os.path.realpath(approval.device) != os.path.realpath(device):
            raise ApprovalError(f"approval is for device {approval.device}, not {device}")
        if approval.image_digest != image_digest:
            raise ApprovalError(
                f"approval is for image {approval.image_digest}, but the source holds "
                f"{image_digest}"
            )
