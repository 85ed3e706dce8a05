"""TPM 2.0 attestation, controller side: pure Python over `cryptography`.

Everything here parses untrusted bytes sent by an installer. Each parser reads through a
bounds-checked `_Reader`, so truncated, oversized or trailing input raises
`AttestationError`, never `IndexError` or `struct.error`.

Structures follow TPM 2.0 Library Part 2 (TPMT_PUBLIC, TPMS_ATTEST, TPMT_SIGNATURE),
credential protection follows Part 1 §24 (MakeCredential done in software), and the event
log follows the TCG PC Client Platform Firmware Profile (crypto-agile log).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

try:  # cryptography >= 43 keeps CFB (which credential protection needs) under "decrepit"
    from cryptography.hazmat.decrepit.ciphers.modes import CFB
except ImportError:  # pragma: no cover
    from cryptography.hazmat.primitives.ciphers.modes import CFB

from nbdnats.errors import AttestationError, UsageError

# TPM_ALG_ID values (Part 2 §6.3).
ALG_RSA = 0x0001
ALG_SHA1 = 0x0004
ALG_AES = 0x0006
ALG_SHA256 = 0x000B
ALG_SHA384 = 0x000C
ALG_SHA512 = 0x000D
ALG_NULL = 0x0010
ALG_RSASSA = 0x0014
ALG_RSAPSS = 0x0016
ALG_ECDSA = 0x0018
ALG_ECC = 0x0023
ALG_CFB = 0x0043
ECC_NIST_P256 = 0x0003

SHA256 = ALG_SHA256
DEFAULT_PCRS = (0, 4, 7)

_HASHES: dict[int, str] = {
    ALG_SHA1: "sha1",
    ALG_SHA256: "sha256",
    ALG_SHA384: "sha384",
    ALG_SHA512: "sha512",
}

# TPMA_OBJECT bits (Part 2 §8.3).
FIXED_TPM = 1 << 1
FIXED_PARENT = 1 << 4
SENSITIVE_DATA_ORIGIN = 1 << 5
USER_WITH_AUTH = 1 << 6
ADMIN_WITH_POLICY = 1 << 7
RESTRICTED = 1 << 16
DECRYPT = 1 << 17
SIGN = 1 << 18

TPM_GENERATED_VALUE = 0xFF544347
TPM_ST_ATTEST_QUOTE = 0x8018

CREDENTIAL_MAGIC = 0xBADCC0DE
CREDENTIAL_VERSION = 1

MAX_PUBLIC = 4096
MAX_ATTEST = 4096
MAX_SIGNATURE = 2048
MAX_EVENT_LOG = 4 * 1024 * 1024
MAX_EVENTS = 10000
MAX_SECRET = 64

EV_NO_ACTION = 0x00000003


class _Reader:
    """Big- or little-endian cursor over untrusted bytes; every read is bounds-checked."""

    def __init__(self, data: bytes, what: str, *, little: bool = False) -> None:
        self.data = data
        self.pos = 0
        self.what = what
        self.order = "<" if little else ">"

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise AttestationError(
                f"{self.what} is truncated at byte {self.pos}: resend the TPM evidence unmodified"
            )
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int(struct.unpack(self.order + "H", self.take(2))[0])

    def u32(self) -> int:
        return int(struct.unpack(self.order + "I", self.take(4))[0])

    def u64(self) -> int:
        return int(struct.unpack(self.order + "Q", self.take(8))[0])

    def tpm2b(self, limit: int = 4096) -> bytes:
        size = self.u16()
        if size > limit:
            raise AttestationError(
                f"{self.what} has a {size}-byte field (at most {limit}): not TPM evidence"
            )
        return self.take(size)

    def end(self) -> None:
        if self.pos != len(self.data):
            raise AttestationError(
                f"{self.what} has {len(self.data) - self.pos} trailing bytes: not TPM evidence"
            )


def _digest(alg: int, data: bytes) -> bytes:
    name = _HASHES.get(alg)
    if name is None:
        raise AttestationError(f"unsupported TPM hash algorithm 0x{alg:04x}: use sha256")
    return hashlib.new(name, data).digest()


def _hash_obj(alg: int) -> hashes.HashAlgorithm:
    if alg == ALG_SHA256:
        return hashes.SHA256()
    if alg == ALG_SHA384:
        return hashes.SHA384()
    if alg == ALG_SHA512:
        return hashes.SHA512()
    if alg == ALG_SHA1:
        return hashes.SHA1()
    raise AttestationError(f"unsupported TPM hash algorithm 0x{alg:04x}: use sha256")


# ---------------------------------------------------------------- TPMT_PUBLIC


@dataclass(frozen=True)
class TpmPublic:
    """A parsed TPMT_PUBLIC (Part 2 §12.2.4); `raw` is exactly the bytes the TPM name hashes."""

    raw: bytes
    type: int
    name_alg: int
    attributes: int
    symmetric: tuple[int, int, int] | None
    key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey
    scheme: int = ALG_NULL
    auth_policy: bytes = b""

    @property
    def name(self) -> bytes:
        """The TPM name (Part 1 §16): nameAlg (u16 BE) || H_nameAlg(TPMT_PUBLIC)."""
        return struct.pack(">H", self.name_alg) + _digest(self.name_alg, self.raw)

    @property
    def name_hex(self) -> str:
        return self.name.hex()


def _parse_tpmt_public(data: bytes) -> TpmPublic:
    r = _Reader(data, "TPM public area")
    type_ = r.u16()
    name_alg = r.u16()
    if name_alg not in _HASHES:
        raise AttestationError(f"TPM public area names hash 0x{name_alg:04x}: use sha256")
    attributes = r.u32()
    auth_policy = r.tpm2b(64)
    sym_alg = r.u16()
    symmetric: tuple[int, int, int] | None = None
    if sym_alg != ALG_NULL:
        symmetric = (sym_alg, r.u16(), r.u16())
    scheme = r.u16()
    if scheme != ALG_NULL:
        r.u16()  # the scheme's hash
    key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey
    if type_ == ALG_RSA:
        bits = r.u16()
        exponent = r.u32() or 65537
        modulus = r.tpm2b(512)
        if bits not in (1024, 2048, 3072, 4096) or len(modulus) * 8 != bits:
            raise AttestationError("TPM RSA public key has an inconsistent size: not TPM evidence")
        try:
            key = rsa.RSAPublicNumbers(exponent, int.from_bytes(modulus, "big")).public_key()
        except ValueError as e:
            raise AttestationError(f"TPM RSA public key is invalid ({e}): not TPM evidence") from e
    elif type_ == ALG_ECC:
        curve = r.u16()
        kdf = r.u16()
        if kdf != ALG_NULL:
            r.u16()
        x = r.tpm2b(66)
        y = r.tpm2b(66)
        if curve != ECC_NIST_P256 or len(x) != 32 or len(y) != 32:
            raise AttestationError("TPM ECC key is not NIST P-256: use an RSA 2048 or P-256 key")
        try:
            key = ec.EllipticCurvePublicNumbers(
                int.from_bytes(x, "big"), int.from_bytes(y, "big"), ec.SECP256R1()
            ).public_key()
        except ValueError as e:
            raise AttestationError(f"TPM ECC point is invalid ({e}): not TPM evidence") from e
    else:
        raise AttestationError(f"TPM key type 0x{type_:04x} is not RSA or ECC: not TPM evidence")
    r.end()
    return TpmPublic(
        raw=data,
        type=type_,
        name_alg=name_alg,
        attributes=attributes,
        symmetric=symmetric,
        key=key,
        scheme=scheme,
        auth_policy=auth_policy,
    )


def parse_public(data: bytes) -> TpmPublic:
    """Parse a marshalled TPM2B_PUBLIC (tpm2_createek/createak -u, default "tss" format)."""
    if len(data) > MAX_PUBLIC:
        raise AttestationError(f"TPM public area is {len(data)} bytes: not TPM evidence")
    r = _Reader(data, "TPM public area")
    inner = r.tpm2b(MAX_PUBLIC)
    r.end()
    return _parse_tpmt_public(inner)


def check_ak(ak: TpmPublic) -> None:
    """Refuse a key that is not a TPM-resident restricted signing key.

    restricted+sign means the TPM only signs data it produced itself (quotes cannot be forged
    by asking the AK to sign arbitrary bytes); fixedTPM/fixedParent/sensitiveDataOrigin mean the
    private part was generated in and never leaves this TPM, which is what MakeCredential binds.
    """
    need = RESTRICTED | SIGN | FIXED_TPM | FIXED_PARENT | SENSITIVE_DATA_ORIGIN
    if ak.attributes & need != need or ak.attributes & DECRYPT:
        raise AttestationError(
            "the attestation key is not a restricted, TPM-bound signing key: "
            "create it with tpm2_createak"
        )
    if ak.name_alg != ALG_SHA256:
        raise AttestationError("the attestation key's name algorithm is not sha256: recreate it")


def check_ek(ek: TpmPublic) -> None:
    """Refuse a key that is not a standard EK (TCG EK Credential Profile template).

    MakeCredential only proves AK residency if the EK is a restricted decryption key bound to
    the TPM: the TPM then only decrypts a credential for an object it holds.
    """
    need = RESTRICTED | DECRYPT | FIXED_TPM | FIXED_PARENT
    if ek.attributes & need != need or ek.attributes & SIGN:
        raise AttestationError(
            "the endorsement key is not a restricted, TPM-bound decryption key: "
            "use tpm2_createek's default template"
        )
    if ek.symmetric != (ALG_AES, 128, ALG_CFB):
        raise AttestationError("the endorsement key's symmetric algorithm is not AES-128-CFB")
    if isinstance(ek.key, rsa.RSAPublicKey) and ek.key.key_size != 2048:
        raise AttestationError("the RSA endorsement key is not 2048 bits")


# ---------------------------------------------------------------- EK certificates


def load_cas(path: Path) -> list[x509.Certificate]:
    """Load the operator's PEM bundle of TPM manufacturer CAs (roots and intermediates)."""
    try:
        data = path.read_bytes()
        cas = x509.load_pem_x509_certificates(data)
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read TPM CA bundle {path}: {e}") from e
    if not cas:
        raise UsageError(f"TPM CA bundle {path} holds no certificate: add the manufacturer's CAs")
    return cas


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return False
    return bc.ca


def _valid_at(cert: x509.Certificate, now: datetime) -> bool:
    return cert.not_valid_before_utc <= now <= cert.not_valid_after_utc


def _same_key(a: object, b: object) -> bool:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    try:
        return bool(
            a.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)  # type: ignore[attr-defined]
            == b.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)  # type: ignore[attr-defined]
        )
    except (AttributeError, ValueError):
        return False


def verify_ek_certificate(
    cert_der: bytes,
    ek: TpmPublic,
    cas: Sequence[x509.Certificate],
    now: datetime | None = None,
) -> x509.Certificate:
    """Check the EK certificate names this EK and chains to an operator-configured CA.

    Walked by hand: EK certificates carry critical extensions (a SAN of directory names) that
    cryptography's TLS verifier refuses. Every certificate in `cas` is a trusted anchor or link.
    """
    now = now or datetime.now(UTC)
    if len(cert_der) > 16384:
        raise AttestationError("the EK certificate is over 16 KiB: not an EK certificate")
    try:
        cert = x509.load_der_x509_certificate(cert_der)
        key = cert.public_key()
    except ValueError as e:
        raise AttestationError(
            f"the EK certificate does not parse ({e}): not an EK certificate"
        ) from e
    if not _same_key(key, ek.key):
        raise AttestationError(
            "the EK certificate is for another key than this TPM's endorsement key"
        )
    if not _valid_at(cert, now):
        raise AttestationError("the EK certificate is expired or not yet valid")
    # Every certificate in the bundle is trusted (roots and intermediates alike), so one
    # verified link to any of them ends the walk.
    for issuer in (ca for ca in cas if ca.subject == cert.issuer):
        try:
            cert.verify_directly_issued_by(issuer)
        except (ValueError, TypeError, InvalidSignature):
            continue
        name = issuer.subject.rfc4514_string()
        if not _is_ca(issuer):
            raise AttestationError(f"EK certificate issuer {name} is not a CA (basicConstraints)")
        if not _valid_at(issuer, now):
            raise AttestationError(f"TPM CA {name} is expired or not yet valid: update the bundle")
        return cert
    raise AttestationError(
        f"the EK certificate (issuer {cert.issuer.rfc4514_string()}) does not chain to a "
        "configured TPM CA: add the manufacturer's CA to the bundle"
    )


# ---------------------------------------------------------------- MakeCredential


def kdfa(
    alg: int, key: bytes, label: bytes, context_u: bytes, context_v: bytes, bits: int
) -> bytes:
    """KDFa (Part 1 §11.4.10.2): SP 800-108 counter-mode HMAC; `label` without its NUL."""
    name = _HASHES[alg]
    out = b""
    counter = 1
    while len(out) * 8 < bits:
        out += hmac.new(
            key,
            struct.pack(">I", counter)
            + label
            + b"\x00"
            + context_u
            + context_v
            + struct.pack(">I", bits),
            name,
        ).digest()
        counter += 1
    return out[: (bits + 7) // 8]


def make_credential(ek: TpmPublic, ak_name: bytes, secret: bytes) -> tuple[bytes, bytes]:
    """TPM2_MakeCredential in software (Part 1 §24; Part 3 §12.6).

    Only the TPM holding the EK's private key can recover the seed, and it only releases the
    secret for the object named `ak_name` that it holds: activation proves the AK lives there.
    Returns (TPM2B_ID_OBJECT, TPM2B_ENCRYPTED_SECRET), both size-prefixed.
    """
    if not 1 <= len(secret) <= MAX_SECRET:
        raise AttestationError("credential secret must be 1..64 bytes")
    if not isinstance(ek.key, rsa.RSAPublicKey):
        raise AttestationError("credential protection needs an RSA endorsement key")
    if ek.symmetric is None or ek.symmetric[0] != ALG_AES or ek.symmetric[2] != ALG_CFB:
        raise AttestationError("the endorsement key's symmetric algorithm is not AES-CFB")
    alg = ek.name_alg
    dsize = len(_digest(alg, b""))
    seed = os.urandom(dsize)
    h = _hash_obj(alg)
    enc_seed = ek.key.encrypt(
        seed, padding.OAEP(mgf=padding.MGF1(h), algorithm=h, label=b"IDENTITY\x00")
    )
    sym_bits = ek.symmetric[1]
    sym_key = kdfa(alg, seed, b"STORAGE", ak_name, b"", sym_bits)
    plain = struct.pack(">H", len(secret)) + secret
    enc = Cipher(algorithms.AES(sym_key), CFB(b"\x00" * 16)).encryptor()
    enc_identity = enc.update(plain) + enc.finalize()
    hmac_key = kdfa(alg, seed, b"INTEGRITY", b"", b"", dsize * 8)
    outer = hmac.new(hmac_key, enc_identity + ak_name, _HASHES[alg]).digest()
    id_object = struct.pack(">H", len(outer)) + outer + enc_identity
    blob = struct.pack(">H", len(id_object)) + id_object
    encrypted_secret = struct.pack(">H", len(enc_seed)) + enc_seed
    return blob, encrypted_secret


def credential_file(blob: bytes, secret: bytes) -> bytes:
    """The file tpm2_activatecredential -i reads (as tpm2_makecredential writes it).

    tpm2-tools: header (magic 0xBADCC0DE, version 1, u32 BE each), then the TPM2B_ID_OBJECT
    and TPM2B_ENCRYPTED_SECRET, each u16 BE size then bytes.
    """
    for what, b in (("credential blob", blob), ("encrypted secret", secret)):
        r = _Reader(b, what)
        r.tpm2b(1024)
        r.end()
    return struct.pack(">II", CREDENTIAL_MAGIC, CREDENTIAL_VERSION) + blob + secret


# ---------------------------------------------------------------- quotes


@dataclass(frozen=True)
class QuoteInfo:
    """The fields of a TPMS_ATTEST quote (Part 2 §10.12.12) the controller checks."""

    nonce: bytes
    pcr_select: dict[int, list[int]]
    pcr_digest: bytes
    clock: int
    reset_count: int
    restart_count: int
    signer_name: bytes
    firmware_version: int


def parse_attest(attest: bytes) -> QuoteInfo:
    """Parse a TPMS_ATTEST; only TPM-generated quotes (magic, TPM_ST_ATTEST_QUOTE) pass.

    The magic TPM_GENERATED_VALUE is what a restricted AK refuses to sign over external data,
    so a structure carrying it and verifying was produced by the TPM itself.
    """
    if len(attest) > MAX_ATTEST:
        raise AttestationError(f"quote is {len(attest)} bytes: not a TPM quote")
    r = _Reader(attest, "TPM quote")
    if r.u32() != TPM_GENERATED_VALUE:
        raise AttestationError("quote lacks the TPM_GENERATED magic: not produced by a TPM")
    if r.u16() != TPM_ST_ATTEST_QUOTE:
        raise AttestationError("attestation structure is not a quote: send tpm2_quote's message")
    signer = r.tpm2b(68)
    nonce = r.tpm2b(64)
    clock = r.u64()
    reset_count = r.u32()
    restart_count = r.u32()
    r.u8()  # safe
    firmware = r.u64()
    count = r.u32()
    if count > 16:
        raise AttestationError(f"quote selects {count} PCR banks: not a TPM quote")
    select: dict[int, list[int]] = {}
    for _ in range(count):
        alg = r.u16()
        size = r.u8()
        if size > 8:
            raise AttestationError(f"quote PCR selection is {size} bytes: not a TPM quote")
        bitmap = r.take(size)
        if alg in select:
            raise AttestationError("quote selects a PCR bank twice: not a TPM quote")
        select[alg] = [
            i * 8 + b for i, byte in enumerate(bitmap) for b in range(8) if byte >> b & 1
        ]
    digest = r.tpm2b(64)
    r.end()
    return QuoteInfo(
        nonce=nonce,
        pcr_select=select,
        pcr_digest=digest,
        clock=clock,
        reset_count=reset_count,
        restart_count=restart_count,
        signer_name=signer,
        firmware_version=firmware,
    )


def verify_quote(ak: TpmPublic, attest: bytes, signature: bytes, nonce: bytes) -> QuoteInfo:
    """Verify a TPMT_SIGNATURE (Part 2 §11.3.4) over `attest` with the enrolled AK, then the nonce.

    The signature ties the PCR digest to the enrolled TPM; the nonce stops a replayed quote.
    """
    info = parse_attest(attest)
    if len(signature) > MAX_SIGNATURE:
        raise AttestationError("quote signature is oversized: not a TPM signature")
    r = _Reader(signature, "quote signature")
    sig_alg = r.u16()
    hash_alg = r.u16()
    if hash_alg != ALG_SHA256:
        raise AttestationError("quote is not signed with sha256: quote with -g sha256")
    bad = AttestationError("quote signature does not verify with the enrolled attestation key")
    try:
        if sig_alg in (ALG_RSASSA, ALG_RSAPSS):
            sig = r.tpm2b(512)
            r.end()
            if not isinstance(ak.key, rsa.RSAPublicKey):
                raise bad
            pad: padding.AsymmetricPadding
            if sig_alg == ALG_RSASSA:
                pad = padding.PKCS1v15()
            else:
                pad = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.AUTO)
            ak.key.verify(sig, attest, pad, hashes.SHA256())
        elif sig_alg == ALG_ECDSA:
            rr = r.tpm2b(66)
            ss = r.tpm2b(66)
            r.end()
            if not isinstance(ak.key, ec.EllipticCurvePublicKey):
                raise bad
            der = encode_dss_signature(int.from_bytes(rr, "big"), int.from_bytes(ss, "big"))
            ak.key.verify(der, attest, ec.ECDSA(hashes.SHA256()))
        else:
            raise AttestationError(
                f"quote signature scheme 0x{sig_alg:04x} is not RSASSA, RSAPSS or ECDSA"
            )
    except (InvalidSignature, ValueError) as e:
        raise bad from e
    if not hmac.compare_digest(info.nonce, nonce):
        raise AttestationError(
            "quote answers another nonce (replayed or stale): ask for a fresh quote"
        )
    return info


# ---------------------------------------------------------------- event log


@dataclass(frozen=True)
class Event:
    """One TCG_PCR_EVENT2 record (PC Client PFP §10.2.2)."""

    pcr: int
    type: int
    digests: dict[int, bytes]
    data: bytes


def parse_event_log(log: bytes) -> list[Event]:
    """Parse a crypto-agile TCG event log (binary_bios_measurements).

    The first record is a SHA1-format TCG_PCR_EVENT holding "Spec ID Event03" with the digest
    size of each bank; without that table the TCG_PCR_EVENT2 digests cannot be walked.
    """
    if len(log) > MAX_EVENT_LOG:
        raise AttestationError("the event log is over 4 MiB: not a firmware event log")
    r = _Reader(log, "event log", little=True)
    pcr = r.u32()
    etype = r.u32()
    r.take(20)
    size = r.u32()
    spec = r.take(size)
    if pcr != 0 or etype != EV_NO_ACTION or not spec.startswith(b"Spec ID Event03\x00"):
        raise AttestationError(
            "the event log is not crypto-agile (no Spec ID Event03): not supported"
        )
    s = _Reader(spec, "event log Spec ID event", little=True)
    s.take(16 + 4 + 4)
    n = s.u32()
    if not 1 <= n <= 16:
        raise AttestationError(f"the event log names {n} algorithms: not a firmware event log")
    sizes: dict[int, int] = {}
    for _ in range(n):
        alg = s.u16()
        dsize = s.u16()
        if dsize > 64:
            raise AttestationError("the event log names a digest over 64 bytes")
        sizes[alg] = dsize
    s.take(s.u8())
    s.end()
    events = [Event(pcr=0, type=EV_NO_ACTION, digests={ALG_SHA1: b"\x00" * 20}, data=spec)]
    while r.pos < len(log):
        if len(events) >= MAX_EVENTS:
            raise AttestationError(f"the event log has over {MAX_EVENTS} events: not supported")
        pcr = r.u32()
        etype = r.u32()
        count = r.u32()
        if count > len(sizes):
            raise AttestationError(
                f"event log record has {count} digests: not a firmware event log"
            )
        digests: dict[int, bytes] = {}
        for _ in range(count):
            alg = r.u16()
            if alg not in sizes:
                raise AttestationError(
                    f"event log record uses algorithm 0x{alg:04x} not in its header"
                )
            digests[alg] = r.take(sizes[alg])
        data = r.take(r.u32())
        if pcr > 23:
            raise AttestationError(f"event log record extends PCR {pcr}: not a firmware event log")
        events.append(Event(pcr=pcr, type=etype, digests=digests, data=data))
    return events


def replay(events: Sequence[Event], alg: int = SHA256) -> dict[int, bytes]:
    """Recompute the PCRs the log claims: PCR = H(PCR || digest) per event, from zeros.

    EV_NO_ACTION events are not extended; a StartupLocality one sets PCR 0's start to 0..0N.
    """
    size = len(_digest(alg, b""))
    pcrs: dict[int, bytes] = {}
    for ev in events:
        if ev.type == EV_NO_ACTION:
            if ev.pcr == 0 and ev.data.startswith(b"StartupLocality\x00") and len(ev.data) == 17:
                pcrs[0] = b"\x00" * (size - 1) + ev.data[16:17]
            continue
        d = ev.digests.get(alg)
        if d is None:
            raise AttestationError(f"event log lacks the 0x{alg:04x} bank: cannot replay it")
        pcrs[ev.pcr] = _digest(alg, pcrs.get(ev.pcr, b"\x00" * size) + d)
    return pcrs


def pcr_digest(values: dict[int, bytes], pcrs: Sequence[int]) -> bytes:
    """sha256 of the PCR values in order: what a quote's pcrDigest and an approval bind."""
    return hashlib.sha256(b"".join(values.get(i, b"\x00" * 32) for i in pcrs)).digest()


def check_quote_pcrs(
    info: QuoteInfo, replayed: dict[int, bytes], pcrs: Sequence[int]
) -> dict[int, bytes]:
    """The quote must select exactly sha256 `pcrs`, and the replayed log must give its digest."""
    want = sorted(set(pcrs))
    if info.pcr_select != {ALG_SHA256: want}:
        raise AttestationError(
            f"the quote does not select exactly sha256 PCRs {want}: quote those PCRs"
        )
    values = {i: replayed.get(i, b"\x00" * 32) for i in want}
    if not hmac.compare_digest(pcr_digest(values, want), info.pcr_digest):
        raise AttestationError("the event log does not match the quoted PCRs")
    return values


# ---------------------------------------------------------------- golden values


@dataclass
class Golden:
    """Known-good PCR values for one installer build, recorded once and compared on each boot."""

    bank: str = "sha256"
    pcrs: dict[int, bytes] = field(default_factory=dict)
    label: str = ""

    @classmethod
    def load(cls, path: Path) -> Golden:
        try:
            doc = json.loads(path.read_text())
            if doc["bank"] != "sha256":
                raise ValueError("bank is not sha256")
            pcrs = {int(k): bytes.fromhex(v) for k, v in doc["pcrs"].items()}
            if any(len(v) != 32 or not 0 <= k <= 23 for k, v in pcrs.items()):
                raise ValueError("a PCR value is not 32 bytes")
            return cls(bank="sha256", pcrs=pcrs, label=str(doc.get("label", "")))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise UsageError(f"cannot read golden PCR values {path}: {e}") from e

    def save(self, path: Path) -> None:
        doc = {
            "bank": self.bank,
            "label": self.label,
            "pcrs": {str(k): v.hex() for k, v in sorted(self.pcrs.items())},
        }
        path.write_text(json.dumps(doc, indent=2) + "\n")

    def check(self, values: dict[int, bytes]) -> None:
        differ = [i for i in sorted(self.pcrs) if values.get(i) != self.pcrs[i]]
        if differ:
            which = ", ".join(str(i) for i in differ)
            raise AttestationError(
                f"PCR {which} differs from the golden value recorded for {self.label} "
                "(a different or tampered installer)"
            )
