"""Disk images as the tests make, hash and serve them: sparse files with known data, their
sha256 (of a file or of what an NBD export serves), and a deliberately slow qemu-nbd."""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

from tests.waits import wait_for

MiB = 1024 * 1024


def make_image(path: Path, size: int, data: list[tuple[int, int]], seed: int = 1) -> str:
    """A sparse image of ``size`` bytes with random data at ``(offset, length)``; its sha256."""
    with path.open("wb") as f:
        f.truncate(size)
        rnd = __import__("random").Random(seed)
        for offset, length in data:
            f.seek(offset)
            f.write(rnd.randbytes(length))
    return sha256_file(path)


def sha256_file(path: Path, size: int | None = None) -> str:
    h = hashlib.sha256()
    left = size if size is not None else path.stat().st_size
    with path.open("rb") as f:
        while left > 0:
            block = f.read(min(left, 4 * MiB))
            if not block:
                break
            h.update(block)
            left -= len(block)
    return h.hexdigest()


def sha256_nbd(uri: str) -> str:
    """The sha256 of what an NBD export serves, read by nbdcopy (a different client)."""
    out = subprocess.run(["nbdcopy", uri, "-"], capture_output=True, check=True).stdout
    return hashlib.sha256(out).hexdigest()


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def holds(path: Path, least: int = 1) -> Callable[[], bool]:
    """A check for ``wait_for``/``until``: ``path`` exists and has at least ``least`` bytes
    allocated (data written, not just a size set)."""
    return lambda: path.exists() and allocated(path) >= least


@contextlib.contextmanager
def throttled_nbd(
    image: Path, sock: Path, *, read_bps: int = 0, write_bps: int = 0
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """qemu-nbd serving ``image`` through a QEMU throttle group: a really slow disk.
    Read-only unless a write limit is given. Yields the process and the NBD URI."""
    limits = ",".join(f"x-bps-{k}={v}" for k, v in (("read", read_bps), ("write", write_bps)) if v)
    args = ["qemu-nbd", "--persistent", "-x", "disk", "-k", str(sock)]
    args += [] if write_bps else ["--read-only"]
    args += ["--object", f"throttle-group,id=tg,{limits}", "--image-opts"]
    args.append(f"driver=throttle,throttle-group=tg,file.driver=file,file.filename={image}")
    proc = subprocess.Popen(args)
    try:
        wait_for(sock.exists, "qemu-nbd")
        yield proc, f"nbd+unix:///disk?socket={sock}"
    finally:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def slow_disk(path: Path, size: int, read_bps: int) -> Iterator[tuple[str, str]]:
    """A disk of ``size`` bytes of random data at ``path``, served read-only at ``read_bps``
    through a socket beside it: a copy of it runs long enough to act on while it runs.
    Yields its NBD URI and its sha256."""
    digest = make_image(path, size, [(0, size)])
    with throttled_nbd(path, path.with_suffix(".sock"), read_bps=read_bps) as (_, uri):
        yield uri, digest
