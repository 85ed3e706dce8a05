"""Only dirty ranges travel: ``--dirty-bitmap NAME`` sends what a QEMU dirty bitmap marks
changed since the last full copy, the target keeps every other byte as it was, and
``recv - --base OLD`` merges the changes into a stream of the whole new image."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import threading
from pathlib import Path
from typing import IO

import nats
import pytest

import nbdnats
from nbdnats import subjects
from tests.cli import NBD_NATS, cli_env, finish_json, one_line_error, run_cli, start_cli
from tests.images import MiB, sha256_file
from tests.waits import wait_for

SIZE = 8 * MiB
BITMAP = "b0"
POISON = b"\xee" * 65536
POISON_AT = 4 * MiB  # outside every range the bitmap marks


def qemu(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


def report(proc: subprocess.CompletedProcess[bytes]) -> dict[str, object]:
    assert proc.returncode == 0, proc.stderr.decode()
    out = proc.stdout.decode().strip() or proc.stderr.decode().strip()
    return json.loads(out.splitlines()[-1])  # type: ignore[no-any-return]


def dirty_setup(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A qcow2 with data, a whole copy of it as raw (the previous image, kept as OLD too),
    then changes the bitmap records, and the bitmap stopped (as a checkpoint does).
    Returns (source qcow2, the target holding the previous image, OLD)."""
    src, dst, old = tmp_path / "src.qcow2", tmp_path / "dst.img", tmp_path / "old.img"
    qemu("qemu-img", "create", "-f", "qcow2", str(src), str(SIZE))
    qemu("qemu-io", "-c", "write -P 0x11 0 3M", "-c", "write -P 0x22 6M 1M", str(src))
    qemu("qemu-img", "bitmap", "--add", str(src), BITMAP)
    whole = report(run_cli("copy", str(src), str(dst), "--json"))
    assert whole["dirty_bytes"] == 0
    old.write_bytes(dst.read_bytes())
    qemu(
        "qemu-io",
        "-c",
        "write -P 0xab 1M 64k",
        "-c",
        "write -z 5M 128k",
        "-c",
        "write -P 0xcd 6M 4k",
        str(src),
    )
    qemu("qemu-img", "bitmap", "--disable", str(src), BITMAP)
    return src, dst, old


def raw_of(image: Path) -> Path:
    raw = image.with_suffix(".raw")
    qemu("qemu-img", "convert", "-O", "raw", str(image), str(raw))
    return raw


def dirty_map_bytes(uri: str) -> int:
    out = subprocess.run(
        ["nbdinfo", "--json", f"--map=qemu:dirty-bitmap:{BITMAP}", uri],
        check=True,
        capture_output=True,
    ).stdout
    return sum(e["length"] for e in json.loads(out) if e["type"] & 1)


def test_only_dirty_ranges_travel_and_unsent_ranges_stay_untouched(
    tmp_path: Path, qemu_nbd
) -> None:  # type: ignore[no-untyped-def]
    src, dst, _ = dirty_setup(tmp_path)
    # Poison a range of the target the bitmap does not mark: a dirty copy must not touch it.
    with dst.open("r+b") as f:
        f.seek(POISON_AT)
        f.write(POISON)
    uri = qemu_nbd(src, "qcow2", True, "-B", BITMAP)
    dirty = dirty_map_bytes(uri)
    assert 0 < dirty < SIZE // 8
    got = report(run_cli("copy", uri, str(dst), "--dirty-bitmap", BITMAP, "--json"))
    sender = got["sender"]
    assert isinstance(sender, dict)
    assert got["dirty_bytes"] == sender["dirty_bytes"] == dirty
    assert got["data_bytes"] + got["zero_bytes"] == dirty  # type: ignore[operator]
    assert sender["sent_bytes"] <= dirty + 4096  # type: ignore[operator]
    new = raw_of(src).read_bytes()
    out = dst.read_bytes()
    assert out[POISON_AT : POISON_AT + len(POISON)] == POISON
    assert out[:POISON_AT] == new[:POISON_AT]
    assert out[POISON_AT + len(POISON) :] == new[POISON_AT + len(POISON) :]


def test_a_qcow2_file_source_offers_its_bitmap(tmp_path: Path) -> None:
    src, dst, _ = dirty_setup(tmp_path)
    got = report(run_cli("copy", str(src), str(dst), "--dirty-bitmap", BITMAP, "--json"))
    assert got["dirty_bytes"] == 256 * 1024  # 64k + 128k + 4k rounded to the 64k granularity
    assert sha256_file(dst) == sha256_file(raw_of(src))


def test_base_merge_streams_the_new_image_with_its_content_digest(tmp_path: Path) -> None:
    src, _, old = dirty_setup(tmp_path)
    out = tmp_path / "out.img"
    with out.open("wb") as f:
        proc = _merge(src, old, f)
    assert proc.returncode == 0, proc.stderr.decode()
    new = raw_of(src)
    assert sha256_file(out) == sha256_file(new)
    got = json.loads(proc.stderr.decode().strip().splitlines()[-1])
    digest = run_cli("digest", "--algo", "blk64k-xxh3-128", str(new)).stdout.decode().split()[0]
    assert got["digest"] == digest
    assert got["dirty_bytes"] == 256 * 1024


def _merge(src: Path, base: Path, out: IO[bytes]) -> subprocess.CompletedProcess[bytes]:
    """copy SRC - --dirty-bitmap --base pipe:/proc/self/fd/N, the base fed through a pipe
    (as a backup tool's restore writes it)."""
    r, w = os.pipe()
    data = base.read_bytes()

    def feed() -> None:
        with os.fdopen(w, "wb") as p:
            p.write(data)

    t = threading.Thread(target=feed)
    t.start()
    try:
        return subprocess.run(
            [
                NBD_NATS,
                "copy",
                str(src),
                "-",
                "--dirty-bitmap",
                BITMAP,
                "--base",
                f"pipe:/proc/self/fd/{r}",
                "--json",
            ],
            stdout=out,
            stderr=subprocess.PIPE,
            pass_fds=(r,),
            timeout=120,
            env=cli_env(),
        )
    finally:
        os.close(r)
        t.join(30)


def test_a_short_base_fails_the_merge_naming_the_base(tmp_path: Path) -> None:
    src, _, old = dirty_setup(tmp_path)
    short = tmp_path / "short.img"
    short.write_bytes(old.read_bytes()[: 5 * MiB])
    proc = subprocess.run(
        [NBD_NATS, "copy", str(src), "-", "--dirty-bitmap", BITMAP, "--base", str(short)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        timeout=120,
        env=cli_env(),
    )
    line = one_line_error(proc)
    assert f"base {short} ends at byte {5 * MiB}" in line, line


def test_an_unknown_bitmap_names_the_ones_offered(tmp_path: Path, qemu_nbd) -> None:  # type: ignore[no-untyped-def]
    src, dst, _ = dirty_setup(tmp_path)
    uri = qemu_nbd(src, "qcow2", True, "-B", BITMAP)
    line = one_line_error(run_cli("copy", uri, str(dst), "--dirty-bitmap", "nope"))
    assert line.endswith(f"offers no dirty bitmap 'nope'; it offers: {BITMAP}"), line


def test_an_export_without_bitmaps_says_how_to_add_one(tmp_path: Path, qemu_nbd) -> None:  # type: ignore[no-untyped-def]
    src, dst, _ = dirty_setup(tmp_path)
    uri = qemu_nbd(raw_of(src), "raw", True)
    line = one_line_error(run_cli("copy", uri, str(dst), "--dirty-bitmap", "nope"))
    assert "(it offers none); add one with `qemu-img bitmap --add FILE nope`" in line, line
    assert "qemu-nbd -B nope" in line and "block-export-add" in line


def test_a_plain_file_source_with_a_bitmap_is_a_usage_error(tmp_path: Path) -> None:
    src = tmp_path / "plain.img"
    src.write_bytes(bytes(MiB))
    proc = run_cli("copy", str(src), str(tmp_path / "dst.img"), "--dirty-bitmap", BITMAP)
    line = one_line_error(proc)
    assert proc.returncode == 2 and "needs an NBD source" in line, line
    assert not (tmp_path / "dst.img").exists()


def test_a_bad_bitmap_name_is_refused_at_the_edge(tmp_path: Path) -> None:
    for name in ("-x", "a/b", "a\tb"):
        proc = run_cli("copy", "nbd://h/x", str(tmp_path / "d"), f"--dirty-bitmap={name}")
        assert proc.returncode == 2 and "a bitmap name is 1 to 1023 bytes" in one_line_error(proc)


def test_a_missing_or_other_size_target_is_refused_before_writing(tmp_path: Path) -> None:
    src, _, _ = dirty_setup(tmp_path)
    missing = tmp_path / "missing.img"
    line = one_line_error(run_cli("copy", str(src), str(missing), "--dirty-bitmap", BITMAP))
    assert (
        "a dirty-bitmap transfer updates an existing image of the same size: copy it whole first"
        in line
    )
    assert not missing.exists()
    other = tmp_path / "other.img"
    other.write_bytes(b"\x5a" * MiB)
    line = one_line_error(run_cli("copy", str(src), str(other), "--dirty-bitmap", BITMAP))
    assert "copy it whole first" in line
    assert other.read_bytes() == b"\x5a" * MiB
    # A stream without a base has no previous image to keep.
    line = one_line_error(run_cli("copy", str(src), "null:", "--dirty-bitmap", BITMAP))
    assert "needs the previous image to merge: pass --base FILE" in line


def test_verify_and_resume_are_refused_for_a_dirty_transfer(tmp_path: Path) -> None:
    src, dst, _ = dirty_setup(tmp_path)
    before = dst.read_bytes()
    args = ("copy", str(src), str(dst), "--dirty-bitmap", BITMAP)
    assert "--verify cannot check a dirty-bitmap transfer" in one_line_error(
        run_cli(*args, "--verify")
    )
    assert "cannot be resumed" in one_line_error(run_cli(*args, "--resume"))
    assert dst.read_bytes() == before


async def ask_open(url: str, subject: str, request: dict[str, object]) -> dict[str, object]:
    nc = await nats.connect(url)
    try:
        msg = await nc.request(subject, json.dumps(request).encode(), timeout=10)
        return json.loads(msg.data)  # type: ignore[no-any-return]
    finally:
        await nc.close()


def test_a_protocol_4_sender_is_refused_with_one_line(tmp_path: Path, start_nats) -> None:  # type: ignore[no-untyped-def]
    server = start_nats()
    recv = start_cli("recv", str(tmp_path / "dst.img"), "--id", "v4", "--data-url", server.url)
    open_subject = subjects.transfer("v4")[0]
    wait_for(lambda: server.has_subscription(open_subject), "the receiver", 60)
    request = {"v": 4, "size": 4096, "chunk_size": 4096, "window": 1 << 20, "key": "ab" * 32}
    reply = asyncio.run(ask_open(server.url, open_subject, request))
    assert reply["ok"] is False and reply["code"] == "protocol", reply
    assert reply["message"] == (
        "the peer speaks nbdnats protocol 4, this one 5: run the same nbd-nats version on both ends"
    )
    assert recv.poll() is None
    recv.terminate()
    recv.communicate(timeout=30)


def test_a_dirty_send_into_a_separate_recv_with_base(tmp_path: Path, start_nats) -> None:  # type: ignore[no-untyped-def]
    """send --dirty-bitmap and recv - --base as two commands, as a backup runs them."""
    src, _, old = dirty_setup(tmp_path)
    server = start_nats()
    out = tmp_path / "out.img"
    with out.open("wb") as f:
        recv = subprocess.Popen(
            [
                NBD_NATS,
                "recv",
                "-",
                "--id",
                "inc",
                "--data-url",
                server.url,
                "--base",
                str(old),
                "--json",
            ],
            stdout=f,
            stderr=subprocess.PIPE,
            env=cli_env(),
        )
        sent = finish_json(
            start_cli(
                "send",
                str(src),
                "--id",
                "inc",
                "--data-url",
                server.url,
                "--json",
                "--dirty-bitmap",
                BITMAP,
            )
        )
        _, err = recv.communicate(timeout=120)
    assert recv.returncode == 0, err.decode()
    assert sent["dirty_bytes"] == 256 * 1024
    got = json.loads(err.decode().strip().splitlines()[-1])
    assert got["dirty_bytes"] == 256 * 1024
    assert str(got["digest"]).startswith("blk64k-xxh3-128:")
    assert sha256_file(out) == sha256_file(raw_of(src))


def test_the_api_copies_dirty_ranges_and_reports_dirty_bytes(tmp_path: Path) -> None:
    src, dst, _ = dirty_setup(tmp_path)
    stats = asyncio.run(nbdnats.copy(str(src), str(dst), dirty_bitmap=BITMAP))
    assert stats.dirty_bytes == 256 * 1024
    assert stats.data_bytes + stats.zero_bytes == stats.dirty_bytes
    assert stats.done_bytes == stats.size == SIZE  # every byte is current: sent or kept
    assert sha256_file(dst) == sha256_file(raw_of(src))
    whole = asyncio.run(nbdnats.copy(str(src), str(tmp_path / "whole.img")))
    assert whole.dirty_bytes == 0
    with pytest.raises(nbdnats.UsageError, match="cannot be resumed"):
        asyncio.run(nbdnats.copy(str(src), str(dst), dirty_bitmap=BITMAP, resume=True))


def test_a_whole_transfer_into_a_base_merge_is_refused(tmp_path: Path) -> None:
    src, _, old = dirty_setup(tmp_path)
    proc = subprocess.run(
        [NBD_NATS, "copy", str(src), "-", "--base", str(old)],
        capture_output=True,
        timeout=120,
        env=cli_env(),
    )
    assert "--base merges a dirty-bitmap transfer, but this sender sends a whole image" in (
        one_line_error(proc)
    )
    assert proc.stdout == b""


def test_a_qcow2_file_without_the_bitmap_names_the_ones_it_has(tmp_path: Path) -> None:
    src, dst, _ = dirty_setup(tmp_path)
    line = one_line_error(run_cli("copy", str(src), str(dst), "--dirty-bitmap", "nope"))
    assert line.endswith(f"{src} has no dirty bitmap 'nope'; it has: {BITMAP}"), line
