"""Image formats of file endpoints: a file whose header says qcow2 (vmdk, vhdx, ...) is
served through a private ``qemu-nbd`` of that format, so what travels is the disk it holds,
never its container's bytes, unless the caller asks for them (``raw``).

Regular files are probed, and block devices read as a source (a qcow2 on a logical volume,
as oVirt keeps them, is served as the disk it holds); a block device written as a target is
raw by nature (it is never wrapped: whatever header it held is overwritten), and a file that
does not exist yet (a new target) is created raw.
The formats are those of ``MAGICS``, one table; what matches none is raw. A LUKS container
is refused (nbd-nats has no key for it), unless ``raw``.

The qemu-nbd a file gets (``serve``) is private: read-only for a source, writable for a
target; it listens on a unix socket in a temporary directory of its own (mode 0700), runs
in a session of its own (a Ctrl-C on the terminal reaches the transfer, which ends first,
then stops it) and is killed by the kernel if this process dies without stopping it. It
keeps qemu's default cache (writeback; a target is flushed at the end of the transfer):
``--cache=none`` (O_DIRECT) fails on file systems that have no direct I/O (tmpfs), and
``--aio=native`` needs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from nbdnats.embedded import die_with_parent
from nbdnats.errors import EndpointError, UsageError

RAW = "raw"
START_TIMEOUT = 30.0  # how long qemu-nbd may take to open an image and listen
STOP_TIMEOUT = 10.0  # how long it may take to close it (a target's metadata) after SIGTERM
_POLL = 0.02
_HEAD = 4096
_EXPORT = "disk"


@dataclass(frozen=True)
class Magic:
    """``magic`` at ``offset`` (from the end when negative) means qemu's driver ``format``."""

    format: str
    offset: int
    magic: bytes


# First match wins (qcow version 1 before qcow2, which shares its magic).
MAGICS = (
    Magic("qcow", 0, b"QFI\xfb\x00\x00\x00\x01"),
    Magic("qcow2", 0, b"QFI\xfb"),
    Magic("qed", 0, b"QED\x00"),
    Magic("vmdk", 0, b"KDMV"),
    Magic("vmdk", 0, b"# Disk DescriptorFile"),
    Magic("vhdx", 0, b"vhdxfile"),
    Magic("vdi", 64, b"\x7f\x10\xda\xbe"),
    Magic("vpc", 0, b"conectix"),  # a dynamic or differencing VHD
    Magic("vpc", -512, b"conectix"),  # a fixed VHD: the raw disk, then its footer
    Magic("luks", 0, b"LUKS\xba\xbe"),
)
# Formats that are refused rather than served, and why.
_REFUSED = {
    "luks": "a LUKS-encrypted image, and nbd-nats has no key for it: open it with "
    "cryptsetup and name the mapped device, or pass --raw to copy its bytes as they are",
}
# What an endpoint is when it is not a file or a device (see the core's io::open_*).
_NOT_FILES = ("-", "null:")
_NOT_FILE_PREFIXES = ("pipe:", "unix:", "pattern:")


def probe(path: str) -> str:
    """The format of the file or device ``path`` by its magic bytes: ``RAW`` when none
    matches (or the file cannot be read: opening it will say why)."""
    try:
        with open(path, "rb") as f:
            head = f.read(_HEAD)
            size = f.seek(0, os.SEEK_END)  # a block device's too (its st_size is 0)
            tail = b""
            if size >= 512:
                f.seek(size - 512)
                tail = f.read(512)
    except OSError:
        return RAW
    for m in MAGICS:
        if m.offset >= 0:
            found = head[m.offset : m.offset + len(m.magic)] == m.magic
        else:
            found = tail[len(tail) + m.offset :].startswith(m.magic) if tail else False
        if found:
            return m.format
    return RAW


def _is_file_endpoint(spec: str) -> bool:
    return (
        spec not in _NOT_FILES
        and not spec.startswith(_NOT_FILE_PREFIXES)
        and "://" not in spec
        and spec != os.devnull
    )


def format_of(spec: str, *, raw: bool = False, target: bool = False) -> str | None:
    """The format endpoint ``spec`` is opened as: ``None`` for what is not a file or a
    device (an NBD URI, a stream), ``RAW`` for a new file, a raw file or device, a device
    written as a ``target``, or anything with ``raw``; else the format its header says."""
    if not _is_file_endpoint(spec):
        return None
    try:
        mode = os.stat(spec).st_mode
    except OSError:
        return RAW
    if raw or not (stat.S_ISREG(mode) or (stat.S_ISBLK(mode) and not target)):
        return RAW
    return probe(spec)


def _refuse(spec: str, fmt: str) -> None:
    if fmt in _REFUSED:
        raise EndpointError(f"{spec} is {_REFUSED[fmt]}")


def _qemu_nbd(spec: str, fmt: str) -> str:
    found = shutil.which("qemu-nbd")
    if not found:
        raise EndpointError(
            f"{spec} is a {fmt} image: install qemu-utils, or pass --raw to copy its bytes "
            "as they are"
        )
    return found


def check(spec: str, *, raw: bool = False, target: bool = False) -> str | None:
    """``format_of``, and refuse now what ``serve`` would (a missing qemu-nbd, LUKS), before
    anything is written."""
    fmt = format_of(spec, raw=raw, target=target)
    if fmt is not None and fmt != RAW:
        _refuse(spec, fmt)
        _qemu_nbd(spec, fmt)
    return fmt


class Served:
    """An endpoint as the core opens it: ``endpoint`` (the spec itself, or the NBD URI of
    the qemu-nbd serving it) and ``format`` (as ``format_of``). ``close`` stops the
    qemu-nbd, if any, and removes its directory; it may be called more than once."""

    def __init__(
        self,
        endpoint: str,
        fmt: str | None,
        proc: asyncio.subprocess.Process | None = None,
        workdir: str | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.format = fmt
        self._proc = proc
        self._dir = workdir

    async def close(self) -> None:
        proc, self._proc = self._proc, None
        workdir, self._dir = self._dir, None
        try:
            if proc is not None and proc.returncode is None:
                proc.terminate()  # sent at once, even if this wait is cancelled
                try:
                    await asyncio.shield(asyncio.wait_for(proc.wait(), STOP_TIMEOUT))
                except TimeoutError:
                    proc.kill()
                    await proc.wait()
        finally:
            if workdir is not None:
                shutil.rmtree(workdir, ignore_errors=True)


def _last_line(log: Path) -> str:
    try:
        lines = log.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1].strip() if lines else ""


async def serve(
    spec: str,
    *,
    target: bool,
    raw: bool = False,
    resume: bool = False,
    timeout: float = START_TIMEOUT,
    bitmap: str | None = None,
) -> Served:
    """``spec`` as the core should open it: a file whose header names a format is served
    by a private qemu-nbd (read-only unless ``target``); anything else is left as it is.
    Fails with one line when qemu-nbd is missing, exits, or does not listen in time, and
    for a target to ``resume``: its journal names the endpoint, and each qemu-nbd has a
    socket of its own. ``bitmap`` (a source; checked by ``transfer.check_bitmap_name``):
    the qemu-nbd also offers that dirty bitmap of the image (``-B``)."""
    fmt = format_of(spec, raw=raw, target=target)
    if fmt is None or fmt == RAW:
        return Served(spec, fmt)
    _refuse(spec, fmt)
    if target and resume:
        raise UsageError(
            f"{spec} is a {fmt} image, served by a new qemu-nbd each time: a transfer into "
            f"it cannot be resumed; serve it yourself (qemu-nbd -f {fmt} -x disk -k SOCKET) "
            "and receive into nbd+unix:///disk?socket=SOCKET, or pass --raw"
        )
    binary = _qemu_nbd(spec, fmt)
    workdir = tempfile.mkdtemp(prefix="nbdnats-qemu-")  # mode 0700
    served = Served(spec, fmt, workdir=workdir)
    try:
        sock, pidfile, log = (Path(workdir) / n for n in ("nbd.sock", "pid", "stderr"))
        argv = [
            binary,
            f"--format={fmt}",
            f"--socket={sock}",
            f"--export-name={_EXPORT}",
            f"--pid-file={pidfile}",  # written once it listens with the image open
            "--persistent",  # the core may connect again (--verify, --resume)
            "--shared=8",
            "--read-only" if not target else "--discard=unmap",
            *([f"--bitmap={bitmap}"] if bitmap is not None and not target else []),
            # Absolute, so that qemu never reads it as an option or as "proto:...".
            os.path.abspath(spec),
        ]
        with log.open("wb") as err:
            served._proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=err,
                start_new_session=True,
                preexec_fn=die_with_parent(),
            )
        proc = served._proc
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not (pidfile.exists() and pidfile.stat().st_size):
            if proc.returncode is not None:
                if bitmap is not None and not target:
                    await _check_bitmap(spec, fmt, bitmap)
                raise EndpointError(
                    f"qemu-nbd could not serve {spec} ({fmt}): "
                    f"{_last_line(log) or f'it exited with status {proc.returncode}'}"
                )
            if loop.time() > deadline:
                last = _last_line(log)
                raise EndpointError(
                    f"qemu-nbd did not serve {spec} ({fmt}) within {timeout:.0f} s"
                    + (f": {last}" if last else "")
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), _POLL)
    except BaseException:
        await served.close()
        raise
    served.endpoint = f"nbd+unix:///{_EXPORT}?socket={sock}"
    return served


async def _check_bitmap(spec: str, fmt: str, bitmap: str) -> None:
    """After qemu-nbd refused to serve ``spec``: if the image has no bitmap ``bitmap``, say
    so in one line, naming those it has (or how to add one)."""
    qemu_img = shutil.which("qemu-img")
    if not qemu_img:
        return
    proc = await asyncio.create_subprocess_exec(
        qemu_img,
        "info",
        "--output=json",
        "--force-share",
        f"--format={fmt}",
        os.path.abspath(spec),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), START_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return
    if proc.returncode != 0:
        return
    data = (json.loads(out).get("format-specific") or {}).get("data") or {}
    names = [str(b.get("name", "")) for b in data.get("bitmaps") or []]
    if bitmap in names:
        return
    if names:
        raise UsageError(
            f"{spec} has no dirty bitmap '{bitmap}'; it has: {', '.join(sorted(names))}"
        )
    raise UsageError(
        f"{spec} has no dirty bitmap '{bitmap}' (it has none); add one with "
        f"`qemu-img bitmap --add {spec} {bitmap}` before the full copy it starts from"
    )


async def referenced_files(spec: str, *, raw: bool = False, target: bool = False) -> list[str]:
    """Every file qemu would open to serve ``spec`` besides ``spec`` itself: the backing
    chain, a qcow2's external data file, a vmdk's extents (absolute as qemu resolves them;
    anything that is not a plain file, such as an ``nbd:`` backing, is returned as
    qemu names it). Empty for an endpoint that is not served by qemu-nbd. An agent checks
    these against its allow-list: an image's header is data, not a permission."""
    fmt = format_of(spec, raw=raw, target=target)
    if fmt is None or fmt == RAW:
        return []
    _refuse(spec, fmt)
    qemu_img = shutil.which("qemu-img")
    if not qemu_img:
        raise EndpointError(
            f"{spec} is a {fmt} image: install qemu-utils, or pass --raw to copy its bytes "
            "as they are"
        )
    proc = await asyncio.create_subprocess_exec(
        qemu_img,
        "info",
        "--output=json",
        "--backing-chain",
        "--force-share",
        f"--format={fmt}",
        os.path.abspath(spec),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), START_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise EndpointError(
            f"qemu-img info {spec} did not answer within {START_TIMEOUT:.0f} s"
        ) from None
    if proc.returncode != 0:
        last = err.decode(errors="replace").strip().splitlines()
        raise EndpointError(f"qemu-img cannot read {spec} ({fmt}): {last[-1] if last else ''}")
    chain = json.loads(out)
    top = os.path.abspath(spec)
    files: list[str] = []
    for image in chain:
        name = str(image.get("filename", ""))
        if name and name != top:
            files.append(name)
        data = (image.get("format-specific") or {}).get("data") or {}
        if data.get("data-file"):
            files.append(_beside(name, str(data["data-file"])))
        for extent in data.get("extents") or []:
            ext = str(extent.get("filename", ""))
            if ext and ext != name:
                files.append(ext)
    return list(dict.fromkeys(files))


def _beside(image: str, name: str) -> str:
    """A file an image names, resolved as qemu does: relative to the image's directory."""
    if name.startswith("/") or ":" in name.split("/", 1)[0]:
        return name
    return os.path.join(os.path.dirname(image), name)
