"""Untrusted TPM evidence: every truncation, extension or corruption is an AttestationError.

Structures are marshalled here by hand from the TPM 2.0 Part 2 layouts, so no TPM is needed.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import random
import struct

import pytest
from cryptography.hazmat.decrepit.ciphers.modes import CFB
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from nbdnats.errors import AttestationError
from nbdnats.metal import attest
from tests.tpm import EV_NO_ACTION, EV_SEPARATOR, event_log_for

KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _public(attrs: int, symmetric: bool, scheme: int) -> bytes:
    n = KEY.public_key().public_numbers().n.to_bytes(256, "big")
    body = struct.pack(">HHI", attest.ALG_RSA, attest.ALG_SHA256, attrs) + struct.pack(">H", 0)
    body += struct.pack(">HHH", attest.ALG_AES, 128, attest.ALG_CFB) if symmetric else b"\x00\x10"
    body += struct.pack(">HH", scheme, attest.ALG_SHA256) if scheme != 0x10 else b"\x00\x10"
    body += struct.pack(">HI", 2048, 0) + struct.pack(">H", 256) + n
    return struct.pack(">H", len(body)) + body


AK_ATTRS = (
    (attest.FIXED_TPM | attest.FIXED_PARENT | attest.SENSITIVE_DATA_ORIGIN | attest.RESTRICTED)
    | attest.SIGN
    | attest.USER_WITH_AUTH
)
EK_ATTRS = attest.FIXED_TPM | attest.FIXED_PARENT | attest.SENSITIVE_DATA_ORIGIN
EK_ATTRS |= attest.RESTRICTED | attest.DECRYPT | attest.ADMIN_WITH_POLICY
AK = _public(AK_ATTRS, False, attest.ALG_RSASSA)
EK = _public(EK_ATTRS, True, 0x10)


def _attest(nonce: bytes = b"n" * 16) -> bytes:
    sel = struct.pack(">IHB", 1, attest.ALG_SHA256, 3) + bytes([0x91, 0, 0])
    return (
        struct.pack(">IH", attest.TPM_GENERATED_VALUE, attest.TPM_ST_ATTEST_QUOTE)
        + struct.pack(">H", 4)
        + b"name"
        + struct.pack(">H", len(nonce))
        + nonce
        + struct.pack(">QIIB", 1, 2, 3, 1)
        + struct.pack(">Q", 7)
        + sel
        + struct.pack(">H", 32)
        + b"d" * 32
    )


def _signature(data: bytes) -> bytes:
    sig = KEY.sign(data, padding.PKCS1v15(), hashes.SHA256())
    return struct.pack(">HHH", attest.ALG_RSASSA, attest.ALG_SHA256, len(sig)) + sig


LOG = event_log_for([(0, EV_SEPARATOR, b"a"), (4, EV_SEPARATOR, b"b")])


def _mutations(data: bytes) -> list[bytes]:
    rng = random.Random(len(data))
    out = [data[:n] for n in range(len(data))] + [data + b"\x00", data + b"x" * 100]
    for _ in range(300):
        b = bytearray(data)
        i = rng.randrange(len(b))
        b[i] ^= rng.randrange(1, 256)  # never a no-op
        out.append(bytes(b))
    return out


def test_well_formed_structures_parse() -> None:
    ak = attest.parse_public(AK)
    attest.check_ak(ak)
    ek = attest.parse_public(EK)
    attest.check_ek(ek)
    assert ak.name[:2] == b"\x00\x0b" and ak.name[2:] == hashlib.sha256(AK[2:]).digest()
    info = attest.verify_quote(ak, _attest(), _signature(_attest()), b"n" * 16)
    assert info.pcr_select == {attest.ALG_SHA256: [0, 4, 7]}
    assert (info.clock, info.reset_count, info.restart_count, info.firmware_version) == (1, 2, 3, 7)


def test_ak_shaped_like_an_ek_is_refused_and_vice_versa() -> None:
    with pytest.raises(AttestationError, match="not a restricted, TPM-bound signing key"):
        attest.check_ak(attest.parse_public(EK))
    with pytest.raises(AttestationError, match="not a restricted, TPM-bound decryption key"):
        attest.check_ek(attest.parse_public(AK))


@pytest.mark.parametrize("data", _mutations(AK))
def test_mangled_tpm2b_public_raises_only_attestation_error(data: bytes) -> None:
    with contextlib.suppress(AttestationError):
        attest.parse_public(data)


@pytest.mark.parametrize("data", _mutations(_attest()))
def test_mangled_tpms_attest_raises_only_attestation_error(data: bytes) -> None:
    with contextlib.suppress(AttestationError):
        attest.parse_attest(data)


@pytest.mark.parametrize("data", _mutations(_signature(_attest())))
def test_mangled_signature_raises_only_attestation_error(data: bytes) -> None:
    ak = attest.parse_public(AK)
    with pytest.raises(AttestationError):
        attest.verify_quote(ak, _attest(), data, b"n" * 16)


@pytest.mark.parametrize("data", _mutations(LOG))
def test_mangled_event_log_raises_only_attestation_error(data: bytes) -> None:
    with contextlib.suppress(AttestationError):
        attest.replay(attest.parse_event_log(data))


def test_oversized_inputs_are_refused() -> None:
    with pytest.raises(AttestationError):
        attest.parse_public(b"\xff" * 5000)
    with pytest.raises(AttestationError):
        attest.parse_attest(b"\xff" * 5000)
    with pytest.raises(AttestationError, match="over 4 MiB"):
        attest.parse_event_log(LOG + b"\x00" * (4 * 1024 * 1024))


def test_startup_locality_sets_pcr0_start() -> None:
    log = event_log_for([(0, EV_NO_ACTION, b"StartupLocality\x00\x03"), (0, EV_SEPARATOR, b"x")])
    start = b"\x00" * 31 + b"\x03"
    want = hashlib.sha256(start + hashlib.sha256(b"x").digest()).digest()
    assert attest.replay(attest.parse_event_log(log)) == {0: want}


def test_make_credential_unwraps_with_the_ek_private_key() -> None:
    """What the TPM does in ActivateCredential, done with the private key (Part 1 §24)."""
    ek = attest.parse_public(EK)
    name = attest.parse_public(AK).name
    blob, enc = attest.make_credential(ek, name, b"secret")
    seed = KEY.decrypt(
        enc[2:],
        padding.OAEP(
            mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=b"IDENTITY\x00"
        ),
    )
    assert len(seed) == 32 and struct.unpack(">H", enc[:2])[0] == len(enc) - 2
    id_object = blob[2:]
    hmac_len = struct.unpack(">H", id_object[:2])[0]
    outer, enc_identity = id_object[2 : 2 + hmac_len], id_object[2 + hmac_len :]
    hkey = attest.kdfa(attest.ALG_SHA256, seed, b"INTEGRITY", b"", b"", 256)
    assert hmac.compare_digest(outer, hmac.new(hkey, enc_identity + name, "sha256").digest())
    skey = attest.kdfa(attest.ALG_SHA256, seed, b"STORAGE", name, b"", 128)
    dec = Cipher(algorithms.AES(skey), CFB(b"\x00" * 16)).decryptor()
    assert dec.update(enc_identity) + dec.finalize() == b"\x00\x06secret"
    cred = attest.credential_file(blob, enc)
    assert cred[:8] == bytes.fromhex("badcc0de00000001") and cred[8:] == blob + enc


def test_golden_file_round_trip_and_refusal(tmp_path: object) -> None:
    from pathlib import Path

    path = Path(str(tmp_path)) / "golden.json"
    values = {0: b"\x00" * 32, 4: b"\x04" * 32, 7: b"\x07" * 32}
    attest.Golden(pcrs=values, label="build-7").save(path)
    golden = attest.Golden.load(path)
    golden.check(values)
    with pytest.raises(AttestationError, match=r"PCR 4, 7 differs .* build-7"):
        golden.check({**values, 4: b"\x00" * 32, 7: b"\x00" * 32})


def test_ecc_p256_ak_and_ecdsa_quote_verify() -> None:
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

    key = ec.generate_private_key(ec.SECP256R1())
    nums = key.public_key().public_numbers()
    body = struct.pack(">HHI", attest.ALG_ECC, attest.ALG_SHA256, AK_ATTRS) + b"\x00\x00"
    body += b"\x00\x10" + struct.pack(">HH", attest.ALG_ECDSA, attest.ALG_SHA256)
    body += struct.pack(">H", attest.ECC_NIST_P256) + b"\x00\x10"
    body += b"\x00\x20" + nums.x.to_bytes(32, "big") + b"\x00\x20" + nums.y.to_bytes(32, "big")
    ak = attest.parse_public(struct.pack(">H", len(body)) + body)
    attest.check_ak(ak)
    r, s = decode_dss_signature(key.sign(_attest(), ec.ECDSA(hashes.SHA256())))
    sig = struct.pack(">HH", attest.ALG_ECDSA, attest.ALG_SHA256)
    sig += b"\x00\x20" + r.to_bytes(32, "big") + b"\x00\x20" + s.to_bytes(32, "big")
    attest.verify_quote(ak, _attest(), sig, b"n" * 16)
    with pytest.raises(AttestationError, match="does not verify"):
        attest.verify_quote(ak, _attest(b"m" * 16), sig, b"m" * 16)
    with pytest.raises(AttestationError, match="does not verify"):
        attest.verify_quote(attest.parse_public(AK), _attest(), sig, b"n" * 16)
