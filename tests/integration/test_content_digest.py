"""The digest a transfer reports names the image's bytes, not how they travelled: the same
image from a file, stdin or qemu-nbd, at any chunk size, with its zeros in holes or written
out, reports one digest, and ``nbd-nats digest --algo blk64k-xxh3-128`` prints it."""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import subprocess
from pathlib import Path

import nats

from nbdnats import subjects
from tests.cli import one_line_error, run_cli, start_cli
from tests.images import MiB
from tests.waits import wait_for

ALGO = "blk64k-xxh3-128"
# Not a multiple of the 64 KiB block (qemu-nbd serves whole 512-byte sectors).
SIZE = 40 * MiB + 7 * 512


DATA = [(3 * 4096, 3 * MiB + 12345), (10 * MiB + 512, 6 * MiB), (SIZE - 3000, 3000)]


def sparse_image(path: Path) -> bytes:
    """Data at misaligned places, a 1.5 MiB run of zeros written out inside data, holes
    elsewhere (the file's extents report them as zero ranges). Returns its bytes."""
    rnd = random.Random(5)
    image = bytearray(SIZE)
    for offset, length in DATA:
        image[offset : offset + length] = rnd.randbytes(length)
    image[11 * MiB + 100 : 12 * MiB + MiB // 2 + 100] = bytes(MiB + MiB // 2)
    with path.open("wb") as f:
        f.truncate(SIZE)
        for offset, length in DATA:
            f.seek(offset)
            f.write(image[offset : offset + length])
    return bytes(image)


def digest_of(src: str, algo: str = ALGO) -> str:
    proc = run_cli("digest", src, "--algo", algo)
    assert proc.returncode == 0, proc.stderr.decode()
    digest, named = proc.stdout.decode().split()
    assert named == src
    return digest


def copied(*args: str, input: bytes | None = None) -> tuple[str, str]:
    """Copy into null: and return the digests the sender and the receiver reported."""
    proc = run_cli("copy", *args, "null:", "--json", input=input)
    assert proc.returncode == 0, proc.stderr.decode()
    report = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    sender = report["sender"]
    assert isinstance(sender, dict)
    return str(sender["digest"]), str(report["digest"])


def test_one_image_one_digest_however_it_travels(tmp_path: Path, qemu_nbd) -> None:  # type: ignore[no-untyped-def]
    sparse = tmp_path / "sparse.img"
    image = sparse_image(sparse)
    dense = tmp_path / "dense.img"
    dense.write_bytes(image)  # every zero written out: no holes
    qcow2 = tmp_path / "image.qcow2"
    convert = ["qemu-img", "convert", "-q", "-O", "qcow2", str(sparse), str(qcow2)]
    subprocess.run(convert, check=True)
    want = digest_of(str(sparse))
    assert want.startswith(f"{ALGO}:") and len(want) == len(ALGO) + 1 + 32
    assert digest_of(str(dense)) == want
    export = qemu_nbd(qcow2, "qcow2", read_only=True)
    assert digest_of(export) == want
    # sha256 stays the default.
    default = run_cli("digest", str(sparse)).stdout.decode().split()[0]
    assert (
        default == digest_of(str(sparse), "sha256") == f"sha256:{hashlib.sha256(image).hexdigest()}"
    )

    ways = {
        "file": copied(str(sparse)),
        "file, 64 KiB chunks": copied(str(sparse), "--chunk-size", "64K"),
        "file, 4 MiB, small window": copied(str(sparse), "--chunk-size", "4M", "--window", "8M"),
        "dense file": copied(str(dense), "--chunk-size", "256K"),
        "stdin": copied("-", "--size", str(SIZE), input=image),
        "stdin, 12 KiB": copied("-", "--size", str(SIZE), "--chunk-size", "12K", input=image),
        "qemu-nbd qcow2": copied(export),
    }
    for way, (sent, got) in ways.items():
        assert (sent, got) == (want, want), way


def test_a_wrong_content_digest_fails_the_transfer(tmp_path: Path) -> None:
    """The sender reports one content digest and the receiver computes another. No fault of
    the network can do that (every frame is checksummed), so the core's test-only fault
    injector makes the sender put a damaged one in END."""
    src = tmp_path / "src.img"
    sparse_image(src)
    dst = tmp_path / "dst.img"
    proc = run_cli("copy", str(src), str(dst), env={"NBDNATS_FAULTS": "corrupt_content=1"})
    line = one_line_error(proc)
    assert proc.returncode == 1
    assert "content digest mismatch: the sender read blk64k-xxh3-128:" in line, line
    assert "but the receiver accepted blk64k-xxh3-128:" in line, line


def test_an_unknown_algorithm_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "src.img"
    src.write_bytes(b"x" * 4096)
    proc = run_cli("digest", str(src), "--algo", "md5")
    assert proc.returncode == 2 and "invalid choice: 'md5'" in proc.stderr.decode()


async def ask_open(url: str, subject: str, request: dict[str, object]) -> dict[str, object]:
    nc = await nats.connect(url)
    try:
        msg = await nc.request(subject, json.dumps(request).encode(), timeout=10)
        return json.loads(msg.data)  # type: ignore[no-any-return]
    finally:
        await nc.close()


def test_a_sender_of_an_older_protocol_is_refused_with_both_versions(
    tmp_path: Path, start_nats
) -> None:  # type: ignore[no-untyped-def]
    """A version-3 sender (no content digest) gets a refusal naming both versions and what
    to do; the receiver keeps waiting for a sender it can serve."""
    server = start_nats()
    recv = start_cli("recv", str(tmp_path / "dst.img"), "--id", "old", "--data-url", server.url)
    open_subject = subjects.transfer("old")[0]
    wait_for(lambda: server.has_subscription(open_subject), "the receiver", 60)
    request = {"v": 3, "size": 4096, "chunk_size": 4096, "window": 1 << 20, "key": "ab" * 32}
    reply = asyncio.run(ask_open(server.url, open_subject, request))
    assert reply["ok"] is False and reply["code"] == "protocol", reply
    assert reply["message"] == (
        "the peer speaks nbdnats protocol 3, this one 5: run the same nbd-nats version on both ends"
    )
    assert recv.poll() is None
    recv.terminate()
    recv.communicate(timeout=30)
