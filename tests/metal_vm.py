"""A machine for the bare-metal tests: QEMU (q35, OVMF) with a software TPM (swtpm).

``Swtpm`` manufactures a TPM 2.0 with an EK certificate signed by a CA of its own (in its
directory, never the system's swtpm-localca) and serves it on a unix socket; the process
outlives the VM's reboots, so the TPM's state does too. ``MetalVm`` boots firmware (OVMF,
with per-VM variables) from a virtio target disk (bootindex 1) or, when that is blank, from
an installer ESP on AHCI (bootindex 2); or a kernel directly. Its serial console goes to a
file that ``wait_for_serial`` polls. Inside QEMU's user network the host is 10.0.2.2 and
fec0::2: a server on the host's 127.0.0.1 and ::1 is reachable there.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from tests.tpm import ca_bundle, manufacture
from tests.waits import wait_for

OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
# What guests see of the host in QEMU's user network (slirp forwards it to loopback).
HOST_V4 = "10.0.2.2"
HOST_V6 = "fec0::2"


class Swtpm:
    """A manufactured software TPM 2.0 in ``dir``, served over ``dir/ctrl.sock``."""

    def __init__(self, dir: Path) -> None:
        self.dir = dir
        self.state = dir / "state"
        self.ca = dir / "ca"
        self.sock = dir / "ctrl.sock"
        self.log = dir / "swtpm.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def ca_bundle(self) -> Path:
        """The EK certificate's issuer and root, PEM (what a controller's --ek-ca takes)."""
        return ca_bundle(self.dir, self.ca)

    def manufacture(self) -> None:
        manufacture(self.dir, self.state, self.ca)

    def start(self) -> None:
        if not (self.state / "tpm2-00.permall").exists():
            self.manufacture()
        # swtpm ends when its QEMU shuts down (a reboot keeps it); starting it again for the
        # next machine keeps the TPM's state. A socket left behind would look like it is up.
        self.stop()
        self.sock.unlink(missing_ok=True)
        with self.log.open("ab") as log:
            args = ["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={self.state}"]
            args += ["--ctrl", f"type=unixio,path={self.sock}", "--log", f"file={self.log}"]
            self.proc = subprocess.Popen(
                args,
                stdout=log,
                stderr=log,
            )
        wait_for(
            lambda: self.sock.exists() or self.proc is None or self.proc.poll() is not None,
            "swtpm's socket",
        )
        if self.proc.poll() is not None:
            raise RuntimeError(f"swtpm exited: {self.log.read_text()[-1500:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def kvm_wanted() -> bool:
    """KVM only when asked (NBDNATS_VM_KVM=1): a /dev/kvm that opens may still fail to run a
    guest (nested or restricted hosts), and TCG always works."""
    return os.environ.get("NBDNATS_VM_KVM") == "1" and os.access("/dev/kvm", os.R_OK | os.W_OK)


class MetalVm:
    """A QEMU machine. Firmware boot: ``disk`` (virtio, the target) first, then ``esp`` (AHCI,
    the installer medium). Direct boot: ``kernel`` + ``initrd`` + ``append``."""

    def __init__(
        self,
        dir: Path,
        *,
        disk: Path | None = None,
        esp: Path | None = None,
        tpm: Swtpm | None = None,
        kernel: Path | None = None,
        initrd: Path | None = None,
        append: str = "",
        memory: int = 1536,
        cpus: int = 2,
        hostfwd: str = "",
    ) -> None:
        self.dir = dir
        self.disk, self.esp, self.tpm = disk, esp, tpm
        self.kernel, self.initrd, self.append = kernel, initrd, append
        self.memory, self.cpus, self.hostfwd = memory, cpus, hostfwd
        self.serial = dir / "serial.log"
        self.qmp_sock = dir / "qmp.sock"
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    def args(self) -> list[str]:
        accel = "kvm" if kvm_wanted() else "tcg"
        a = ["qemu-system-x86_64", "-machine", f"q35,accel={accel}", "-m", str(self.memory)]
        a += ["-smp", str(self.cpus), "-cpu", "host" if accel == "kvm" else "max"]
        a += ["-display", "none", "-nodefaults", "-serial", f"file:{self.serial}"]
        a += ["-qmp", f"unix:{self.qmp_sock},server=on,wait=off"]
        vars_copy = self.dir / "OVMF_VARS.fd"
        if not vars_copy.exists():
            shutil.copyfile(OVMF_VARS, vars_copy)
        a += ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}"]
        a += ["-drive", f"if=pflash,format=raw,unit=1,file={vars_copy}"]
        if self.tpm is not None:
            a += ["-chardev", f"socket,id=chrtpm,path={self.tpm.sock}"]
            a += ["-tpmdev", "emulator,id=tpm0,chardev=chrtpm", "-device", "tpm-crb,tpmdev=tpm0"]
        if self.disk is not None:
            a += ["-drive", f"if=none,id=target,format=raw,file={self.disk}"]
            a += ["-device", "virtio-blk-pci,drive=target,bootindex=1"]
        if self.esp is not None:
            a += ["-drive", f"if=none,id=esp,format=raw,snapshot=on,file={self.esp}"]
            a += ["-device", "ide-hd,drive=esp,bus=ide.0,bootindex=2"]
        if self.kernel is not None:
            a += ["-kernel", str(self.kernel), "-append", self.append]
            if self.initrd is not None:
                a += ["-initrd", str(self.initrd)]
        fwd = f",hostfwd={self.hostfwd}" if self.hostfwd else ""
        a += ["-netdev", f"user,id=n,ipv4=on,ipv6=on{fwd}"]
        # No option ROM: OVMF would otherwise try PXE on the NIC for minutes.
        a += ["-device", "virtio-net-pci,netdev=n,romfile="]
        a += ["-device", "virtio-rng-pci"]
        return a

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.serial.write_bytes(b"")
        log = (self.dir / "qemu.log").open("wb")
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(self.args(), stdout=log, stderr=log)
        log.close()

    def serial_text(self) -> str:
        return self.serial.read_bytes().decode(errors="replace")

    def wait_for_serial(self, text: str, timeout: float = 90) -> float:
        """Wait until ``text`` is on the serial console; the seconds since start."""

        def seen() -> bool:
            if (
                self.proc is not None
                and self.proc.poll() is not None
                and text not in (self.serial_text())
            ):
                qemu = (self.dir / "qemu.log").read_text(errors="replace")[-1500:]
                raise AssertionError(
                    f"QEMU exited ({self.proc.returncode}) before {text!r}: {qemu}\n"
                    f"serial: {self.serial_text()[-3000:]}"
                )
            return text in self.serial_text()

        try:
            wait_for(seen, f"{text!r} on the serial console", timeout=timeout)
        except (TimeoutError, AssertionError) as e:
            if isinstance(e, AssertionError):
                raise
            raise AssertionError(
                f"{text!r} not on the serial console within {timeout} s; it ends: "
                f"{self.serial_text()[-3000:]}"
            ) from e
        return time.monotonic() - self.started_at

    def wait_exit(self, timeout: float = 90) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def qmp(self, command: str) -> None:
        """Send one QMP command (``quit``, ``system_reset``...) and read its answer."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(str(self.qmp_sock))
            f = s.makefile("rwb")
            f.readline()  # greeting
            for cmd in ("qmp_capabilities", command):
                f.write(json.dumps({"execute": cmd}).encode() + b"\n")
                f.flush()
                f.readline()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(OSError):
            self.qmp("quit")
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
