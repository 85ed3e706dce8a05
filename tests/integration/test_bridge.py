"""The bridge: a local NBD server (QEMU's and libnbd's NBD clients write into it) and a
byte-stream relay, pushed over NATS into an NBD export or a unix socket. This is what live
migration carries; here real NBD clients stand in for QEMU's mirror."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import socket
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from nbdnats.errors import NbdNatsError
from nbdnats.planes import Planes
from nbdnats.transfer import TransferHandle, start_bridge, start_recv
from tests.images import MiB, make_image, sha256_file
from tests.nats_server import NatsServer
from tests.waits import until

SIZE = 64 * MiB
Connect = Callable[[], contextlib.AbstractAsyncContextManager[Planes]]


@pytest.fixture
def planes(start_nats: Callable[..., NatsServer]) -> Connect:
    url = start_nats().url

    @contextlib.asynccontextmanager
    async def connect() -> AsyncIterator[Planes]:
        p = await Planes.connect(url, url, "bridge-test")
        try:
            yield p
        finally:
            await p.close()

    return connect


def blank(path: Path, size: int = SIZE) -> None:
    with path.open("wb") as f:
        f.truncate(size)


async def run(*argv: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode()


async def both(tx: TransferHandle, rx: TransferHandle) -> None:
    await asyncio.wait_for(asyncio.gather(tx.wait(), rx.wait()), 60)


def commands(ops: list[str]) -> list[str]:
    """qemu-io's arguments for running ``ops`` in turn."""
    return [arg for op in ops for arg in ("-c", op)]


async def nbd_bridge(
    p: Planes, sock: Path, dst: str, tid: str
) -> tuple[TransferHandle, TransferHandle]:
    """An NBD bridge listening on ``sock`` and the receiver that writes what it takes into
    ``dst``: the sending and the receiving ends."""
    rx = await start_recv(dst, transfer_id=tid, planes=p)
    tx = await start_bridge("nbd", str(sock), transfer_id=tid, planes=p, size=SIZE)
    return tx, rx


def test_qemu_nbd_client_writes_through_the_bridge(
    planes: Connect, qemu_nbd: Callable[..., str], tmp_path: Path
) -> None:
    """QEMU's own NBD client (qemu-io): writes, write-zeroes, trim, flush and a refused
    read; every write lands where it was aimed, later writes over earlier ones."""
    target = tmp_path / "dst.raw"
    make_image(target, SIZE, [(8 * MiB, 4 * MiB)], seed=3)  # old contents to overwrite
    dst = qemu_nbd(target)
    sock = tmp_path / "bridge.sock"

    async def go() -> str:
        async with planes() as p:
            tx, rx = await nbd_bridge(p, sock, dst, "br1")
            assert sock.exists()
            ops = ["write -P 0xab 0 3M", "write -P 0xcd 1M 1M", "write -z 2M 512k", "flush"]
            ops += ["discard 8M 4M", "write -P 0x11 60M 4M", "read 0 4k"]
            rc, out = await run(
                "qemu-io", "-f", "raw", f"nbd+unix:///?socket={sock}", *commands(ops)
            )
            await both(tx, rx)
            assert not sock.exists()  # removed once its one client connected
            return f"{rc}\n{out}"

    out = asyncio.run(go())
    assert "read failed: Invalid argument" in out
    want = bytearray(SIZE)
    want[0 : 3 * MiB] = b"\xab" * (3 * MiB)
    want[MiB : 2 * MiB] = b"\xcd" * MiB
    want[2 * MiB : 2 * MiB + 512 * 1024] = bytes(512 * 1024)
    want[60 * MiB :] = b"\x11" * (4 * MiB)
    got = target.read_bytes()
    assert got[: 8 * MiB] == want[: 8 * MiB] and got[12 * MiB :] == want[12 * MiB :]
    # A trimmed range reads as anything the target likes; qemu-nbd's raw file gives zeros.
    assert got[8 * MiB : 12 * MiB] == bytes(4 * MiB)


def test_libnbd_client_copies_an_image_through_the_bridge(
    planes: Connect, qemu_nbd: Callable[..., str], tmp_path: Path
) -> None:
    src = tmp_path / "src.raw"
    digest = make_image(src, SIZE, [(0, 5 * MiB), (33 * MiB + 4096, 7 * MiB)], seed=9)
    target = tmp_path / "dst.raw"
    blank(target)
    dst = qemu_nbd(target)
    sock = tmp_path / "bridge.sock"

    async def go() -> None:
        async with planes() as p:
            tx, rx = await nbd_bridge(p, sock, dst, "br2")
            rc, out = await run("nbdcopy", "--flush", str(src), f"nbd+unix:///?socket={sock}")
            assert rc == 0, out
            await both(tx, rx)
            assert tx.stats().digest == rx.stats().digest

    asyncio.run(go())
    assert sha256_file(target) == digest


def listening(path: Path) -> socket.socket:
    """A unix socket listening at ``path``, non-blocking for the event loop to accept on:
    the destination a stream's receiver connects to."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    server.setblocking(False)
    return server


def test_a_byte_stream_is_relayed_in_order(planes: Connect, tmp_path: Path) -> None:
    """The migration stream's shape: one client writes bytes into the source socket; the
    receiver connects to a listening socket on the other side and writes them there."""
    data = random.Random(5).randbytes(20 * MiB + 12345)
    src_sock, dst_sock = tmp_path / "out.sock", tmp_path / "in.sock"
    server = listening(dst_sock)

    async def go() -> bytes:
        loop = asyncio.get_running_loop()
        async with planes() as p:
            rx = await start_recv(f"unix:{dst_sock}", transfer_id="st1", planes=p)
            tx = await start_bridge("stream", str(src_sock), transfer_id="st1", planes=p)
            _, writer = await asyncio.open_unix_connection(str(src_sock))

            async def feed(writer: asyncio.StreamWriter) -> None:
                for i in range(0, len(data), 100_000):
                    writer.write(data[i : i + 100_000])
                    await writer.drain()
                writer.close()
                await writer.wait_closed()

            async def drain() -> bytes:
                # The receiver connects when the first bytes arrive, not before.
                conn, _ = await loop.sock_accept(server)
                got = bytearray()
                while chunk := await loop.sock_recv(conn, 1 << 20):
                    got += chunk
                conn.close()
                return bytes(got)

            got, *_ = await asyncio.wait_for(
                asyncio.gather(drain(), feed(writer), both(tx, rx)), 60
            )
            return got

    got = asyncio.run(go())
    server.close()
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(data).hexdigest()


def test_a_failing_destination_fails_the_writes_and_the_bridge(
    planes: Connect, tmp_path: Path
) -> None:
    """The destination's NBD server dies: the client's writes fail (EIO), never succeed,
    and both ends report the failure."""
    target = tmp_path / "dst.raw"
    blank(target)
    dsock = tmp_path / "dst.sock"
    qnbd = subprocess.Popen(
        ["qemu-nbd", "-f", "raw", "-k", str(dsock), "--persistent", str(target)]
    )
    sock = tmp_path / "bridge.sock"

    async def go() -> tuple[int, str, list[BaseException | None]]:
        await until(dsock.exists, "qemu-nbd's socket", 60)
        async with planes() as p:
            rx = await start_recv(
                f"nbd+unix:///?socket={dsock}", transfer_id="br3", planes=p, timeout=5
            )
            tx = await start_bridge(
                "nbd", str(sock), transfer_id="br3", planes=p, size=SIZE, timeout=5
            )
            # Kill only once the receiver holds its NBD connection (it connects, then
            # listens): its writes must fail, not its connect.
            await until(lambda: rx.stats().state != "connecting", "the receiver's NBD connection")
            qnbd.kill()  # the receiver is connected; its writes will fail
            qnbd.wait()
            ops = ["write -P 2 0 1M", "flush"]
            rc, out = await run(
                "qemu-io", "-f", "raw", f"nbd+unix:///?socket={sock}", *commands(ops)
            )
            results = await asyncio.gather(tx.wait(), rx.wait(), return_exceptions=True)
            return rc, out, [r if isinstance(r, BaseException) else None for r in results]

    _, out, errors = asyncio.run(go())
    assert "write failed: Input/output error" in out, out
    assert all(isinstance(e, NbdNatsError) for e in errors), errors
    assert all("NBD" in str(e) for e in errors), errors  # the writes failed, no timeout
    assert not os.path.exists(sock)


def test_a_byte_stream_is_relayed_both_ways(planes: Connect, tmp_path: Path) -> None:
    """The migration stream is full-duplex (QEMU's return path): what the listening side
    writes back reaches the connecting side, in order, over a transfer of its own."""
    data = random.Random(6).randbytes(3 * MiB + 7)
    reply = random.Random(7).randbytes(2 * MiB + 3)
    src_sock, dst_sock = tmp_path / "out.sock", tmp_path / "in.sock"
    server = listening(dst_sock)

    async def go() -> tuple[bytes, bytes]:
        loop = asyncio.get_running_loop()
        async with planes() as p:
            rx = await start_recv(
                f"unix:{dst_sock}", transfer_id="fd1", planes=p, return_id="fd1-back"
            )
            tx = await start_bridge(
                "stream", str(src_sock), transfer_id="fd1", planes=p, return_id="fd1-back"
            )
            reader, writer = await asyncio.open_unix_connection(str(src_sock))

            async def listener() -> bytes:
                conn, _ = await loop.sock_accept(server)
                got = bytearray()
                while len(got) < len(data):
                    got += await loop.sock_recv(conn, 1 << 20)
                await loop.sock_sendall(conn, reply)
                conn.close()
                return bytes(got)

            async def client() -> bytes:
                writer.write(data)
                await writer.drain()
                writer.write_eof()  # our direction ends; the reply still comes
                back = await reader.read()
                writer.close()
                await writer.wait_closed()
                return back

            got, back, *_ = await asyncio.wait_for(
                asyncio.gather(listener(), client(), both(tx, rx)), 60
            )
            return got, back

    got, back = asyncio.run(go())
    server.close()
    assert got == data
    assert back == reply
