"""TPM 2.0, installer side: drives tpm2-tools (5.x) to produce the evidence `attest` checks.

Every tool runs from an argv list (never a shell string) with a timeout. Keys are persistent
(EK at 0x81010001, AK at 0x81010002) so the AK, and with it the enrollment, survives reboots.
Transient objects and sessions are flushed after each step: without a resource manager (a
direct swtpm or /dev/tpm0) they would fill the TPM's few object slots.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from nbdnats.errors import AttestationError, UsageError
from nbdnats.metal.attest import DEFAULT_PCRS, credential_file
from nbdnats.metal.tool import run_tool

DEFAULT_EVENT_LOG = Path("/sys/kernel/security/tpm0/binary_bios_measurements")
EK_HANDLE = 0x81010001
AK_HANDLE = 0x81010002
EK_CERT_NV_RSA = 0x01C00002
MAX_EVENT_LOG = 4 * 1024 * 1024


@dataclass(frozen=True)
class Identity:
    """What enrollment sends: the EK certificate (if the TPM has one) and TPM2B_PUBLICs."""

    ek_certificate: bytes | None
    ek_public: bytes
    ak_public: bytes


@dataclass(frozen=True)
class Quote:
    """A quote: TPMS_ATTEST bytes, TPMT_SIGNATURE bytes, the PCR values and the event log."""

    attest: bytes
    signature: bytes
    pcrs: dict[int, bytes]
    event_log: bytes


def _check_pcrs(pcrs: Sequence[int]) -> list[int]:
    out = sorted(set(pcrs))
    if not out or any(not isinstance(i, int) or not 0 <= i <= 23 for i in out):
        raise UsageError(f"PCR indexes must be 0..23, got {list(pcrs)}")
    return out


class Tpm:
    """One TPM, reached through `tcti` (TPM2TOOLS_TCTI) or the kernel's resource manager."""

    def __init__(
        self,
        workdir: Path,
        *,
        tcti: str | None = None,
        event_log: Path = DEFAULT_EVENT_LOG,
        timeout: float = 30.0,
    ) -> None:
        self.workdir = workdir
        self.tcti = tcti
        self.event_log = event_log
        self.timeout = timeout

    async def _run(self, *argv: str, check: bool = True) -> tuple[int, bytes]:
        env = dict(os.environ)
        env["TPM2TOOLS_TCTI"] = self.tcti or "device:/dev/tpmrm0"
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            rc, out, err = await run_tool(argv, timeout=self.timeout, env=env, cwd=self.workdir)
        except FileNotFoundError:
            raise UsageError(f"{argv[0]} not found: install tpm2-tools") from None
        except TimeoutError:
            raise AttestationError(
                f"{argv[0]} did not finish in {self.timeout:g}s: check the TPM"
            ) from None
        if check and rc != 0:
            lines = [ln for ln in err.decode(errors="replace").splitlines() if ln.strip()]
            last = lines[-1].strip() if lines else f"exit status {rc}"
            raise AttestationError(f"{argv[0]} failed: {last}")
        return rc, out

    async def _flush(self) -> None:
        await self._run("tpm2_flushcontext", "-t", check=False)
        await self._run("tpm2_flushcontext", "-s", check=False)

    def _path(self, name: str) -> str:
        return str(self.workdir / name)

    async def identity(self) -> Identity:
        """Create (or reuse) the persistent EK and AK and read the RSA EK certificate."""
        await self._flush()
        ek = self._path("ek.pub")
        ak = self._path("ak.pub")
        rc, _ = await self._run("tpm2_readpublic", "-c", hex(EK_HANDLE), "-o", ek, check=False)
        if rc != 0:
            await self._run("tpm2_createek", "-c", hex(EK_HANDLE), "-G", "rsa", "-u", ek)
        rc, _ = await self._run("tpm2_readpublic", "-c", hex(AK_HANDLE), "-o", ak, check=False)
        if rc != 0:
            ctx = self._path("ak.ctx")
            await self._run(
                "tpm2_createak",
                *("-C", hex(EK_HANDLE), "-c", ctx, "-G", "rsa", "-g", "sha256"),
                *("-s", "rsassa", "-u", ak, "-n", self._path("ak.name")),
            )
            await self._run("tpm2_evictcontrol", "-c", ctx, hex(AK_HANDLE))
            await self._flush()
        cert_path = self.workdir / "ek.crt"
        rc, _ = await self._run(
            "tpm2_nvread", hex(EK_CERT_NV_RSA), "-o", str(cert_path), check=False
        )
        cert = cert_path.read_bytes() if rc == 0 and cert_path.exists() else None
        return Identity(
            ek_certificate=cert,
            ek_public=(self.workdir / "ek.pub").read_bytes(),
            ak_public=(self.workdir / "ak.pub").read_bytes(),
        )

    async def activate(self, credential_blob: bytes, encrypted_secret: bytes) -> bytes:
        """TPM2_ActivateCredential with the AK under the EK; returns the controller's secret.

        The EK's authPolicy is PolicySecret(endorsement), so a policy session satisfying it is
        started first. The TPM releases the secret only if the AK it holds has the name the
        controller bound the credential to.
        """
        cred = self.workdir / "cred.in"
        cred.write_bytes(credential_file(credential_blob, encrypted_secret))
        out = self._path("cred.out")
        session = self._path("session.ctx")
        await self._flush()
        await self._run("tpm2_startauthsession", "--policy-session", "-S", session)
        try:
            await self._run("tpm2_policysecret", "-S", session, "-c", "e")
            await self._run(
                "tpm2_activatecredential",
                *("-c", hex(AK_HANDLE), "-C", hex(EK_HANDLE)),
                *("-i", str(cred), "-o", out, "-P", f"session:{session}"),
            )
        finally:
            await self._run("tpm2_flushcontext", session, check=False)
            await self._flush()
        return Path(out).read_bytes()

    async def quote(self, nonce: bytes, pcrs: Sequence[int] = DEFAULT_PCRS) -> Quote:
        """tpm2_quote over sha256 `pcrs` with `nonce` as qualifying data, plus the event log."""
        if not 1 <= len(nonce) <= 64:
            raise UsageError("a quote nonce must be 1..64 bytes")
        sel = "sha256:" + ",".join(str(i) for i in _check_pcrs(pcrs))
        msg, sig = self._path("quote.msg"), self._path("quote.sig")
        await self._flush()
        await self._run(
            "tpm2_quote",
            *("-c", hex(AK_HANDLE), "-l", sel, "-q", nonce.hex(), "-g", "sha256"),
            *("-m", msg, "-s", sig),
        )
        values = await self.pcr_values(pcrs)
        log = b""
        with contextlib.suppress(FileNotFoundError), self.event_log.open("rb") as f:
            log = f.read(MAX_EVENT_LOG + 1)
        return Quote(
            attest=Path(msg).read_bytes(),
            signature=Path(sig).read_bytes(),
            pcrs=values,
            event_log=log,
        )

    async def pcr_values(self, pcrs: Sequence[int] = DEFAULT_PCRS) -> dict[int, bytes]:
        """tpm2_pcrread of sha256 `pcrs`, as raw 32-byte values (binary output, in order)."""
        want = _check_pcrs(pcrs)
        out = self._path("pcrs.bin")
        await self._run("tpm2_pcrread", "sha256:" + ",".join(map(str, want)), "-o", out, "-Q")
        data = Path(out).read_bytes()
        if len(data) != 32 * len(want):
            raise AttestationError("tpm2_pcrread returned an unexpected size: check tpm2-tools")
        return {i: data[n * 32 : (n + 1) * 32] for n, i in enumerate(want)}
