"""The installer's side of attestation: its TPM's evidence, and the check that binds a
provisioning approval to the quote that preceded it.

A controller enrolls an installer (EK certificate, an AK proven to live in the same TPM) and,
before each attested provision, asks for a quote over the boot PCRs with a fresh nonce
(``nbdnats.metal.attest`` verifies it). The approval an operator signed can name the
installer's AK and the digest of the PCR values it expects (``nbd-nats approve
--attestation``). Then this installer writes only when:

- its own AK is the one the approval names (another machine's approval does not fit),
- the provision names a quote this installer made within ``QUOTE_TTL`` and not used before
  (a controller cannot skip the quote or reuse an old one),
- that quote's PCR digest and the PCR values now both equal the approval's (nothing was
  measured since: the installer is still running what the quote showed).

The installer is the code being attested: these checks hold because its PCRs matched what
the approver expected, which is the point of binding the approval to them.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Sequence
from dataclasses import dataclass

from nbdnats.errors import AttestationError
from nbdnats.metal import attest
from nbdnats.metal.tpm import Quote, Tpm
from nbdnats.schemas import (
    ActivateCommand,
    ActivateReply,
    Approval,
    QuoteCommand,
    QuoteReply,
    TpmIdentity,
    TpmQuery,
)

QUOTE_TTL = 300.0  # seconds a quote may precede the provision that names it
MAX_QUOTES = 16  # quotes remembered at once (the oldest is forgotten)


@dataclass
class _Quoted:
    at: float
    pcrs: tuple[int, ...]
    digest: bytes


class Evidence:
    """One installer's TPM: its identity, quotes, and the approval binding check."""

    def __init__(self, tpm: Tpm) -> None:
        self.tpm = tpm
        self._ak_name: str | None = None
        self._quotes: dict[bytes, _Quoted] = {}

    async def ak_name(self) -> str:
        """The AK's TPM name in hex (made on first use; persistent in the TPM)."""
        if self._ak_name is None:
            identity = await self.tpm.identity()
            self._ak_name = attest.parse_public(identity.ak_public).name.hex()
        return self._ak_name

    async def quote(self, nonce: bytes, pcrs: Sequence[int]) -> Quote:
        quote = await self.tpm.quote(nonce, pcrs)
        order = tuple(sorted(set(pcrs)))
        missing = [i for i in order if i not in quote.pcrs]
        if missing:
            raise AttestationError(f"the TPM did not report PCR {missing[0]}")
        self._quotes[nonce] = _Quoted(time.monotonic(), order, attest.pcr_digest(quote.pcrs, order))
        while len(self._quotes) > MAX_QUOTES:
            self._quotes.pop(next(iter(self._quotes)))
        return quote

    def forget(self, nonce: bytes) -> bool:
        return self._quotes.pop(nonce, None) is not None

    async def check(self, approval: Approval, nonce: bytes | None) -> None:
        """Refuse a provision its approval's TPM binding does not allow (see the module)."""
        if approval.ak_name is None:
            if nonce is not None:  # the controller attested: that quote is spent
                self._take(nonce)
            return
        mine = await self.ak_name()
        if not hmac.compare_digest(approval.ak_name, mine):
            raise AttestationError(
                f"the approval is bound to attestation key {approval.ak_name[:16]}…, not this "
                f"installer's ({mine[:16]}…): sign one for this machine"
            )
        if nonce is None:
            raise AttestationError(
                "the approval is bound to this installer's TPM, but no quote preceded the "
                "provision: provision it through a controller that attests (ctl provision)"
            )
        if approval.pcr_digest is None:
            raise AttestationError(
                "the approval names an attestation key but no PCR digest: sign it again "
                "with nbd-nats approve --attestation"
            )
        quoted = self._take(nonce)
        pcrs = tuple(sorted(set(approval.pcrs or attest.DEFAULT_PCRS)))
        if pcrs != quoted.pcrs:
            raise AttestationError(
                f"the quote covered PCRs {list(quoted.pcrs)}, the approval binds "
                f"{list(pcrs)}: quote the approval's PCRs"
            )
        want = bytes.fromhex(approval.pcr_digest)
        if not hmac.compare_digest(quoted.digest, want):
            raise AttestationError(
                "this installer's boot PCRs differ from those the approval was signed for "
                "(a different or changed installer image, firmware or boot path)"
            )
        now = attest.pcr_digest(await self.tpm.pcr_values(pcrs), pcrs)
        if not hmac.compare_digest(now, want):
            raise AttestationError(
                "a PCR changed since the quote (something was measured after it): quote again"
            )

    def _take(self, nonce: bytes) -> _Quoted:
        quoted = self._quotes.pop(nonce, None)
        if quoted is None:
            raise AttestationError(
                "the provision names a quote this installer did not make or already used: "
                "attest again"
            )
        if time.monotonic() - quoted.at > QUOTE_TTL:
            raise AttestationError(
                f"the quote is older than {QUOTE_TTL:.0f} s: attest again just before provisioning"
            )
        return quoted


class TpmService:
    """The installer's TPM ops on the ctl plane (``nbdnats.ctl.agent``'s table): its
    identity, credential activation and quotes."""

    def __init__(self, node: str, evidence: Evidence) -> None:
        self.node = node
        self.evidence = evidence

    async def identity(self, _: TpmQuery) -> TpmIdentity:
        found = await self.evidence.tpm.identity()
        return TpmIdentity(
            ok=True,
            node=self.node,
            ek_certificate=found.ek_certificate,
            ek_public=found.ek_public,
            ak_public=found.ak_public,
        )

    async def activate(self, cmd: ActivateCommand) -> ActivateReply:
        secret = await self.evidence.tpm.activate(cmd.credential, cmd.secret)
        return ActivateReply(ok=True, secret=secret)

    async def quote(self, cmd: QuoteCommand) -> QuoteReply:
        quote = await self.evidence.quote(cmd.nonce, cmd.pcrs)
        return QuoteReply(
            ok=True,
            attest=quote.attest,
            signature=quote.signature,
            pcrs=dict(quote.pcrs),
            event_log=quote.event_log,
        )
