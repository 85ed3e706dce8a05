"""TPM attestation end to end against real swtpm + tpm2-tools: enrollment and quotes.

The installer side (`nbdnats.metal.tpm.Tpm`) drives tpm2-tools; the controller side
(`nbdnats.metal.attest`) checks what it produced in pure Python.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from nbdnats.errors import AttestationError
from nbdnats.metal import attest
from nbdnats.metal.tpm import Identity, Tpm
from tests.tpm import (
    EV_EFI_BOOT_SERVICES_APPLICATION,
    EV_SEPARATOR,
    SwtpmProc,
    event_log_for,
    extend_pcrs,
)


@pytest.fixture
def swtpm(tmp_path: Path) -> Iterator[Callable[[], SwtpmProc]]:
    made: list[SwtpmProc] = []

    def start() -> SwtpmProc:
        proc = SwtpmProc(tmp_path / f"tpm{len(made)}")
        made.append(proc)
        return proc

    yield start
    for proc in made:
        proc.stop()


def _tpm(proc: SwtpmProc, log: Path | None = None) -> Tpm:
    return Tpm(proc.root / "work", tcti=proc.tcti, event_log=log or proc.root / "no-log")


def _identity(tpm: Tpm) -> Identity:
    return asyncio.run(tpm.identity())


def test_enrollment_round_trip_ek_cert_chains_and_tpm_activates_the_credential(
    swtpm: Callable[[], SwtpmProc],
) -> None:
    proc = swtpm()
    tpm = _tpm(proc)
    ident = _identity(tpm)
    ek = attest.parse_public(ident.ek_public)
    ak = attest.parse_public(ident.ak_public)
    attest.check_ek(ek)
    attest.check_ak(ak)
    assert ident.ek_certificate is not None
    cas = attest.load_cas(proc.ca_bundle)
    attest.verify_ek_certificate(ident.ek_certificate, ek, cas)
    secret = os.urandom(32)
    blob, enc = attest.make_credential(ek, ak.name, secret)
    assert asyncio.run(tpm.activate(blob, enc)) == secret
    # identity is stable: the persistent keys are reused, so enrollment survives reboots.
    assert _identity(tpm) == ident


def test_ak_from_another_tpm_cannot_activate_a_credential_bound_to_this_ek(
    swtpm: Callable[[], SwtpmProc],
) -> None:
    a, b = swtpm(), swtpm()
    ta, tb = _tpm(a), _tpm(b)
    ia, ib = _identity(ta), _identity(tb)
    ek_a = attest.parse_public(ia.ek_public)
    ak_b = attest.parse_public(ib.ak_public)
    blob, enc = attest.make_credential(ek_a, ak_b.name, b"s" * 32)
    # Neither TPM releases it: A does not hold AK b, B does not hold EK a's private key.
    with pytest.raises(AttestationError, match="tpm2_activatecredential failed"):
        asyncio.run(ta.activate(blob, enc))
    with pytest.raises(AttestationError, match="tpm2_activatecredential failed"):
        asyncio.run(tb.activate(blob, enc))


def test_ek_certificate_from_an_unconfigured_ca_is_refused(
    swtpm: Callable[[], SwtpmProc],
) -> None:
    a, b = swtpm(), swtpm()
    ia = _identity(_tpm(a))
    assert ia.ek_certificate is not None
    ek = attest.parse_public(ia.ek_public)
    with pytest.raises(AttestationError, match="does not chain to a configured TPM CA"):
        attest.verify_ek_certificate(ia.ek_certificate, ek, attest.load_cas(b.ca_bundle))


def test_ek_certificate_for_another_key_is_refused(swtpm: Callable[[], SwtpmProc]) -> None:
    a, b = swtpm(), swtpm()
    ia, ib = _identity(_tpm(a)), _identity(_tpm(b))
    assert ib.ek_certificate is not None
    ek_a = attest.parse_public(ia.ek_public)
    cas = attest.load_cas(a.ca_bundle) + attest.load_cas(b.ca_bundle)
    with pytest.raises(AttestationError, match="for another key"):
        attest.verify_ek_certificate(ib.ek_certificate, ek_a, cas)


def test_ek_certificate_signed_by_a_non_ca_or_expired_is_refused(
    swtpm: Callable[[], SwtpmProc],
) -> None:
    proc = swtpm()
    ident = _identity(_tpm(proc))
    ek = attest.parse_public(ident.ek_public)
    assert isinstance(ek.key, rsa.RSAPublicKey)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "not a ca")])
    now = dt.datetime.now(dt.UTC)

    def cert(subject_key: rsa.RSAPublicKey, ca: bool) -> x509.Certificate:
        b = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(subject_key)
            .serial_number(1)
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        return b.sign(key, hashes.SHA256())

    issuer = cert(key.public_key(), ca=False)
    leaf = cert(ek.key, ca=False).public_bytes(serialization.Encoding.DER)
    with pytest.raises(AttestationError, match="is not a CA"):
        attest.verify_ek_certificate(leaf, ek, [issuer])
    with pytest.raises(AttestationError, match="expired or not yet valid"):
        attest.verify_ek_certificate(
            leaf, ek, [cert(key.public_key(), ca=True)], now=now + dt.timedelta(days=3)
        )


EXTENDS = [
    (0, EV_SEPARATOR, b"firmware"),
    (4, EV_EFI_BOOT_SERVICES_APPLICATION, b"installer kernel"),
    (4, EV_EFI_BOOT_SERVICES_APPLICATION, b"installer initrd"),
    (7, EV_SEPARATOR, b"secure boot off"),
]


@pytest.fixture
def measured(swtpm: Callable[[], SwtpmProc]) -> tuple[SwtpmProc, Tpm, attest.TpmPublic]:
    """A swtpm whose PCRs 0/4/7 were extended as the synthetic event log says (scaffolding)."""
    proc = swtpm()
    log = proc.root / "binary_bios_measurements"
    log.write_bytes(event_log_for(EXTENDS))
    extend_pcrs(proc, EXTENDS)
    tpm = _tpm(proc, log)
    ak = attest.parse_public(_identity(tpm).ak_public)
    return proc, tpm, ak


def test_quote_verifies_and_the_event_log_replays_to_the_quoted_digest(
    measured: tuple[SwtpmProc, Tpm, attest.TpmPublic],
) -> None:
    _proc, tpm, ak = measured
    nonce = os.urandom(32)
    q = asyncio.run(tpm.quote(nonce))
    info = attest.verify_quote(ak, q.attest, q.signature, nonce)
    values = attest.check_quote_pcrs(
        info, attest.replay(attest.parse_event_log(q.event_log)), attest.DEFAULT_PCRS
    )
    assert values == q.pcrs
    pcr4 = hashlib.sha256(b"\x00" * 32 + hashlib.sha256(b"installer kernel").digest()).digest()
    pcr4 = hashlib.sha256(pcr4 + hashlib.sha256(b"installer initrd").digest()).digest()
    assert values[4] == pcr4
    assert attest.pcr_digest(values, attest.DEFAULT_PCRS) == info.pcr_digest
    golden = attest.Golden(pcrs=values, label="installer-1")
    path = _proc.root / "golden.json"
    golden.save(path)
    attest.Golden.load(path).check(values)


def test_quote_for_a_wrong_nonce_is_refused_as_replayed(
    measured: tuple[SwtpmProc, Tpm, attest.TpmPublic],
) -> None:
    _proc, tpm, ak = measured
    q = asyncio.run(tpm.quote(b"old nonce"))
    with pytest.raises(AttestationError, match="another nonce"):
        attest.verify_quote(ak, q.attest, q.signature, b"new nonce")


def test_quote_signed_by_another_tpms_ak_is_refused(
    swtpm: Callable[[], SwtpmProc], measured: tuple[SwtpmProc, Tpm, attest.TpmPublic]
) -> None:
    _proc, _tpm_a, ak = measured
    other = _tpm(swtpm())
    _identity(other)
    q = asyncio.run(other.quote(b"n" * 16))
    with pytest.raises(AttestationError, match="does not verify with the enrolled"):
        attest.verify_quote(ak, q.attest, q.signature, b"n" * 16)


@pytest.mark.parametrize("part", ["attest", "signature"])
def test_quote_with_a_flipped_bit_is_refused(
    measured: tuple[SwtpmProc, Tpm, attest.TpmPublic], part: str
) -> None:
    _proc, tpm, ak = measured
    q = asyncio.run(tpm.quote(b"n" * 16))
    data = bytearray(q.attest if part == "attest" else q.signature)
    data[-5] ^= 0x01
    a, s = (bytes(data), q.signature) if part == "attest" else (q.attest, bytes(data))
    with pytest.raises(AttestationError, match="does not verify with the enrolled"):
        attest.verify_quote(ak, a, s, b"n" * 16)


def test_event_log_with_one_event_changed_does_not_match_the_quote(
    measured: tuple[SwtpmProc, Tpm, attest.TpmPublic],
) -> None:
    _proc, tpm, ak = measured
    q = asyncio.run(tpm.quote(b"n" * 16))
    info = attest.verify_quote(ak, q.attest, q.signature, b"n" * 16)
    changed = [*EXTENDS[:2], (4, EV_EFI_BOOT_SERVICES_APPLICATION, b"tampered initrd"), EXTENDS[3]]
    replayed = attest.replay(attest.parse_event_log(event_log_for(changed)))
    with pytest.raises(AttestationError, match="the event log does not match the quoted PCRs"):
        attest.check_quote_pcrs(info, replayed, attest.DEFAULT_PCRS)


def test_golden_check_refuses_a_different_pcr_4(
    measured: tuple[SwtpmProc, Tpm, attest.TpmPublic],
) -> None:
    _proc, tpm, _ak = measured
    values = asyncio.run(tpm.pcr_values())
    golden = attest.Golden(pcrs=dict(values), label="installer-1")
    golden.pcrs[4] = b"\x11" * 32
    with pytest.raises(AttestationError, match=r"PCR 4 differs .* installer-1"):
        golden.check(values)


def test_credential_file_matches_tpm2_makecredential_offline_output(
    swtpm: Callable[[], SwtpmProc],
) -> None:
    """tpm2_makecredential -T none's file (random seed, so compared by activation and layout)."""
    proc = swtpm()
    tpm = _tpm(proc)
    ident = _identity(tpm)
    ak = attest.parse_public(ident.ak_public)
    ek_pub = proc.root / "ek.pub"
    ek_pub.write_bytes(ident.ek_public)
    secret_file = proc.root / "secret"
    secret_file.write_bytes(b"offline secret")
    out = proc.root / "cred.out"
    subprocess.run(
        [
            *("tpm2_makecredential", "-T", "none", "-e", str(ek_pub)),
            *("-s", str(secret_file), "-n", ak.name_hex, "-o", str(out)),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    data = out.read_bytes()
    assert data[:8] == bytes.fromhex("badcc0de00000001")
    blob_len = int.from_bytes(data[8:10], "big")
    blob, enc = data[8 : 10 + blob_len], data[10 + blob_len :]
    ek = attest.parse_public(ident.ek_public)
    ours, our_enc = attest.make_credential(ek, ak.name, b"offline secret")
    assert attest.credential_file(blob, enc) == data
    assert (len(ours), len(our_enc)) == (len(blob), len(enc))
    assert asyncio.run(tpm.activate(blob, enc)) == b"offline secret"
