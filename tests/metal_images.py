"""Boot media for the bare-metal tests: the installer image (built once, cached by its
inputs), a disk that boots to a marker on the serial console, and the ESP image the
firmware falls back to when the target disk is blank (the ISO/PXE stand-in).

Everything here is built without root and without mounting: GPT by sgdisk, FAT by mtools,
initramfs archives written directly in the kernel's ``newc`` cpio format, UKIs by
``scripts/uki.sh`` (the same as the installer's)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
IMAGES = Path(os.environ.get("NBDNATS_IMAGE_DIR", REPO / ".cache" / "images"))
BUSYBOX = Path("/bin/busybox")  # busybox-static: runs with no libraries beside it
MiB = 1024 * 1024
# Where the ESP starts on a marker disk: 1 MiB, the usual first partition offset.
ESP_START = 2048


@dataclass(frozen=True)
class InstallerBase:
    """The cached base image: Debian's kernel and the whole root as one initramfs."""

    dir: Path

    @property
    def vmlinuz(self) -> Path:
        return self.dir / "vmlinuz"

    @property
    def rootfs(self) -> Path:
        return self.dir / "rootfs.cpio.zst"


@dataclass(frozen=True)
class Deployment:
    """One deployment's boot files (``installer-image.sh --out``)."""

    dir: Path

    @property
    def vmlinuz(self) -> Path:
        return self.dir / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.dir / "initrd.img"

    @property
    def efi(self) -> Path:
        return self.dir / "installer.efi"


def _run(args: list[str], what: str, env: dict[str, str] | None = None) -> None:
    p = subprocess.run(args, capture_output=True, text=True, env=env, cwd=REPO)
    if p.returncode != 0:
        raise RuntimeError(f"{what} failed ({p.returncode}): {(p.stderr or p.stdout)[-2000:]}")


def _script_env() -> dict[str, str]:
    env = dict(os.environ, NBDNATS_IMAGE_DIR=str(IMAGES))
    # The builder wants the project's venv (maturin, pip): the one running the tests.
    env.setdefault("VENV", sys.prefix)
    return env


def installer_base() -> InstallerBase:
    """Build the installer's base image, or find it cached (seconds when inputs are same)."""
    _run([str(REPO / "scripts" / "installer-image.sh")], "installer-image.sh", _script_env())
    return InstallerBase((IMAGES / "installer").resolve())


def installer_deployment(
    out: Path, *, cmdline: str, trusted_keys: Path | None = None, env_file: Path | None = None
) -> Deployment:
    """Write a deployment's initrd, kernel and UKI into ``out`` (the base must be built)."""
    args = [str(REPO / "scripts" / "installer-image.sh"), "--out", str(out), "--cmdline", cmdline]
    if trusted_keys is not None:
        args += ["--trusted-keys", str(trusted_keys)]
    if env_file is not None:
        args += ["--env", str(env_file)]
    _run(args, "installer-image.sh --out", _script_env())
    return Deployment(out)


def uki(kernel: Path, initrd: Path, cmdline: str, out: Path) -> Path:
    _run([str(REPO / "scripts" / "uki.sh"), str(kernel), str(initrd), cmdline, str(out)], "uki.sh")
    return out


# --- initramfs archives ---------------------------------------------------------------


def _newc(name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> bytes:
    fields = [0, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name) + 1, 0]
    head = b"070701" + b"".join(b"%08X" % f for f in fields) + name.encode() + b"\0"
    head += b"\0" * (-len(head) % 4)
    return head + data + b"\0" * (-len(data) % 4)


def marker_initramfs(marker: str) -> bytes:
    """A tiny initramfs: busybox-static and an /init that prints ``marker`` on the serial
    console and powers the machine off."""
    init = f"#!/bin/busybox sh\n/bin/busybox echo '{marker}'\n/bin/busybox poweroff -f\n"
    if "'" in marker or "\n" in marker:
        raise ValueError(f"marker {marker!r} may not hold quotes or newlines")
    return b"".join(
        [
            _newc("bin", 0o40755),
            _newc("dev", 0o40755),
            _newc("dev/console", 0o20600, rdev=(5, 1)),
            _newc("bin/busybox", 0o100755, BUSYBOX.read_bytes()),
            _newc("init", 0o100755, init.encode()),
            _newc("TRAILER!!!", 0),
        ]
    )


# --- FAT and GPT ------------------------------------------------------------------------


def _fat(path: Path, size: int, files: dict[str, Path]) -> None:
    """A FAT image of ``size`` bytes holding ``files`` (``EFI/BOOT/BOOTX64.EFI`` -> source)."""
    with path.open("wb") as f:
        f.truncate(size)
    _run(["mformat", "-i", str(path), "-N", "4E424E41", "-v", "ESP", "::"], "mformat")
    made: set[str] = set()
    for dest, src in files.items():
        parts = dest.split("/")
        for i in range(1, len(parts)):
            d = "/".join(parts[:i])
            if d not in made:
                _run(["mmd", "-i", str(path), f"::/{d}"], "mmd")
                made.add(d)
        _run(["mcopy", "-i", str(path), str(src), f"::/{dest}"], "mcopy")


def esp_image(path: Path, efi: Path) -> Path:
    """A FAT image with ``efi`` as \\EFI\\BOOT\\BOOTX64.EFI: what firmware boots from a
    removable disk (here: the installer UKI when the target disk is blank)."""
    size = (efi.stat().st_size + 8 * MiB + MiB - 1) // MiB * MiB
    _fat(path, size, {"EFI/BOOT/BOOTX64.EFI": efi})
    return path


def _digest(*parts: bytes | Path) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.read_bytes() if isinstance(p, Path) else p)
        h.update(b"\0")
    return h.hexdigest()[:16]


def marker_disk(path: Path, marker: str, kernel: Path, size: int = 64 * MiB) -> Path:
    """A GPT disk of ``size`` bytes with one EFI system partition whose
    \\EFI\\BOOT\\BOOTX64.EFI is a UKI (``kernel`` + :func:`marker_initramfs`): booted, it
    prints ``marker`` on ttyS0 and powers off. Cached by its inputs; ``path`` is a copy."""
    key = _digest(
        marker.encode(), kernel, BUSYBOX, Path(__file__), REPO / "scripts" / "uki.sh", b"%d" % size
    )
    cached = IMAGES / f"marker-{key}.raw"
    if not cached.exists():
        IMAGES.mkdir(parents=True, exist_ok=True)
        work = IMAGES / f"marker-{key}.tmp"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        initrd = work / "initrd.cpio"
        initrd.write_bytes(marker_initramfs(marker))
        efi = uki(kernel, initrd, "console=ttyS0 panic=-1 quiet", work / "BOOTX64.EFI")
        disk = work / "disk.raw"
        with disk.open("wb") as f:
            f.truncate(size)
        _run(["sgdisk", "-n", f"1:{ESP_START}:0", "-t", "1:ef00", str(disk)], "sgdisk")
        # The partition ends 34 sectors before the disk does (the backup GPT).
        esp = work / "esp.img"
        _fat(esp, size - ESP_START * 512 - 34 * 512, {"EFI/BOOT/BOOTX64.EFI": efi})
        with disk.open("r+b") as d, esp.open("rb") as e:
            d.seek(ESP_START * 512)
            shutil.copyfileobj(e, d, MiB)
        disk.rename(cached)
        shutil.rmtree(work)
    shutil.copyfile(cached, path)
    return path
