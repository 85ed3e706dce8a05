"""swtpm helpers for the attestation tests: a software TPM with a per-test local CA.

`SwtpmProc` manufactures a TPM (EK + platform certificate signed by a CA made for this test
only) and serves it on free localhost ports. `event_log_for` and `extend_pcrs` are TEST
SCAFFOLDING: on a host no firmware measured anything into swtpm, so a test writes the
crypto-agile event log itself and extends the TPM's PCRs with the same digests.
"""

from __future__ import annotations

import hashlib
import os
import struct
import subprocess
from pathlib import Path

from nbdnats.embedded import free_port
from tests.nats_server import port_open
from tests.waits import wait_for

EV_NO_ACTION = 0x00000003
EV_SEPARATOR = 0x00000004
EV_EFI_BOOT_SERVICES_APPLICATION = 0x80000003
ALG_SHA256 = 0x000B


def _free_pair() -> int:
    for _ in range(50):
        port = free_port()
        if port < 65535 and not port_open("127.0.0.1", port + 1):
            return port
    raise RuntimeError("no free port pair for swtpm")


def manufacture(root: Path, state: Path, ca_dir: Path) -> None:
    """swtpm_setup: a TPM 2.0 in ``state`` with EK and platform certificates signed by a local
    CA made in ``ca_dir`` for this test only (never the system's swtpm-localca)."""
    state.mkdir(parents=True, exist_ok=True)
    ca_dir.mkdir(parents=True, exist_ok=True)
    localca = root / "swtpm-localca.conf"
    localca.write_text(
        f"statedir = {ca_dir}\n"
        f"signingkey = {ca_dir}/signkey.pem\n"
        f"issuercert = {ca_dir}/issuercert.pem\n"
        f"certserial = {ca_dir}/certserial\n"
    )
    options = root / "swtpm-localca.options"
    options.write_text(
        "--platform-manufacturer nbdnats-test\n--platform-version 2.1\n--platform-model swtpm\n"
    )
    setup = root / "swtpm_setup.conf"
    setup.write_text(
        "create_certs_tool = swtpm_localca\n"
        f"create_certs_tool_config = {localca}\n"
        f"create_certs_tool_options = {options}\n"
        "active_pcr_banks = sha256\n"
    )
    p = subprocess.run(
        [
            *("swtpm_setup", "--tpm2", "--tpmstate", str(state), "--config", str(setup)),
            *("--create-ek-cert", "--create-platform-cert", "--lock-nvram"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if p.returncode != 0:
        raise RuntimeError(f"swtpm_setup failed: {(p.stderr or p.stdout)[-1500:]}")


def ca_bundle(root: Path, ca_dir: Path) -> Path:
    """The local CA's issuer certificate and its root, as one PEM bundle (--ek-ca)."""
    bundle = root / "tpm-ca.pem"
    if not bundle.exists():
        roots = sorted(ca_dir.glob("*rootca-cert.pem"))
        parts = [(ca_dir / "issuercert.pem").read_bytes()]
        parts += [p.read_bytes() for p in roots]
        bundle.write_bytes(b"".join(parts))
    return bundle


class SwtpmProc:
    """A manufactured swtpm (``manufacture``) on TCP ports."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.state = root / "state"
        self.ca_dir = root / "ca"
        manufacture(root, self.state, self.ca_dir)
        # A free port's neighbour can still be taken (a client's ephemeral port in TIME_WAIT
        # passes a connect probe), so a start that loses the bind race is retried on new ports.
        for _ in range(5):
            if self._start(root):
                return
        raise RuntimeError(f"swtpm could not bind: {(root / 'swtpm.log').read_text()[-500:]}")

    def _start(self, root: Path) -> bool:
        self.port = _free_pair()
        self.log = (root / "swtpm.log").open("wb")
        self.proc = subprocess.Popen(
            [
                *("swtpm", "socket", "--tpm2", "--tpmstate", f"dir={self.state}"),
                *("--server", f"type=tcp,port={self.port},bindaddr=127.0.0.1"),
                *("--ctrl", f"type=tcp,port={self.port + 1},bindaddr=127.0.0.1"),
                *("--flags", "not-need-init,startup-clear"),
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_for(
                lambda: self.proc.poll() is not None or port_open("127.0.0.1", self.port),
                "swtpm listening",
            )
        except BaseException:
            self.stop()
            raise
        if self.proc.poll() is None:
            return True
        self.stop()
        return False

    @property
    def tcti(self) -> str:
        return f"swtpm:host=127.0.0.1,port={self.port}"

    @property
    def ca_bundle(self) -> Path:
        return ca_bundle(self.root, self.ca_dir)

    def tool(self, *argv: str) -> subprocess.CompletedProcess[bytes]:
        env = dict(os.environ, TPM2TOOLS_TCTI=self.tcti)
        return subprocess.run(list(argv), env=env, capture_output=True, timeout=60, check=True)

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.log.close()


def event_log_for(extends: list[tuple[int, int, bytes]]) -> bytes:
    """TEST SCAFFOLDING: a crypto-agile TCG event log (sha256 bank) of `(pcr, type, data)`.

    The first record is the SHA1-format Spec ID Event03 header; each later TCG_PCR_EVENT2
    carries sha256(data) as its digest.
    """
    spec = (
        b"Spec ID Event03\x00"
        + struct.pack("<IBBBB", 0, 0, 2, 0, 2)
        + struct.pack("<I", 1)
        + struct.pack("<HH", ALG_SHA256, 32)
        + b"\x00"
    )
    out = struct.pack("<II", 0, EV_NO_ACTION) + b"\x00" * 20 + struct.pack("<I", len(spec)) + spec
    for pcr, etype, data in extends:
        out += struct.pack("<III", pcr, etype, 1) + struct.pack("<H", ALG_SHA256)
        out += hashlib.sha256(data).digest() + struct.pack("<I", len(data)) + data
    return out


def extend_pcrs(tpm: SwtpmProc, extends: list[tuple[int, int, bytes]]) -> None:
    """TEST SCAFFOLDING: extend the swtpm's sha256 PCRs as firmware would have for the log."""
    for pcr, _etype, data in extends:
        tpm.tool("tpm2_pcrextend", f"{pcr}:sha256={hashlib.sha256(data).hexdigest()}")
