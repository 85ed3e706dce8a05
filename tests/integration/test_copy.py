"""Copies between every kind of endpoint, through a real nats-server and real qemu-nbd."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.cli import run_cli
from tests.images import MiB, allocated, make_image, sha256_file, sha256_nbd

SPARSE = [(0, 3 * MiB), (10 * MiB, 5 * MiB + 123), (40 * MiB - 4096, 4096)]


def ok(proc: subprocess.CompletedProcess[bytes]) -> dict[str, object]:
    assert proc.returncode == 0, proc.stderr.decode()
    line = (
        proc.stdout.decode().strip().splitlines()[-1]
        if proc.stdout.strip()
        else proc.stderr.decode().strip().splitlines()[-1]
    )
    return json.loads(line)  # type: ignore[no-any-return]


def test_copy_nbd_to_nbd(tmp_path: Path, qemu_nbd, nats_url: str) -> None:
    src = tmp_path / "src.img"
    want = make_image(src, 48 * MiB, SPARSE)
    dst = tmp_path / "dst.img"
    dst.write_bytes(b"")
    subprocess.run(["truncate", "-s", str(48 * MiB), str(dst)], check=True)
    report = ok(
        run_cli(
            "copy", qemu_nbd(src, read_only=True), qemu_nbd(dst), "--json", "--data-url", nats_url
        )
    )
    assert sha256_file(dst) == want
    assert report["size"] == 48 * MiB
    assert report["data_bytes"] + report["zero_bytes"] == 48 * MiB  # type: ignore[operator]
    assert str(report["digest"]).startswith("blk64k-xxh3-128:")


def test_copy_nbd_to_file(tmp_path: Path, qemu_nbd) -> None:
    src = tmp_path / "src.img"
    want = make_image(src, 48 * MiB, SPARSE)
    dst = tmp_path / "new" / "dst.img"
    dst.parent.mkdir()
    ok(run_cli("copy", qemu_nbd(src, read_only=True), str(dst), "--json"))  # embedded server
    assert dst.stat().st_size == 48 * MiB
    assert sha256_file(dst) == want


def test_copy_file_to_nbd_qcow2(tmp_path: Path, qemu_nbd) -> None:
    src = tmp_path / "src.img"
    want = make_image(src, 48 * MiB, SPARSE)
    dst = tmp_path / "dst.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(dst), "48M"], check=True)
    uri = qemu_nbd(dst, "qcow2")
    ok(run_cli("copy", str(src), uri, "--json"))
    assert sha256_nbd(uri) == want


def test_copy_stdin_to_nbd(tmp_path: Path, qemu_nbd) -> None:
    src = tmp_path / "src.img"
    want = make_image(src, 20 * MiB, [(0, 20 * MiB)])
    dst = tmp_path / "dst.img"
    subprocess.run(["truncate", "-s", "20M", str(dst)], check=True)
    proc = run_cli(
        "copy", "-", qemu_nbd(dst), "--size", str(20 * MiB), "--json", input=src.read_bytes()
    )
    ok(proc)
    assert sha256_file(dst) == want


def test_copy_nbd_to_stdout(tmp_path: Path, qemu_nbd) -> None:
    src = tmp_path / "src.img"
    want = make_image(src, 30 * MiB, SPARSE[:2])
    proc = run_cli("copy", qemu_nbd(src, read_only=True), "-", "--json")
    assert proc.returncode == 0, proc.stderr.decode()
    import hashlib

    assert hashlib.sha256(proc.stdout).hexdigest() == want  # zeros written out in order
    report = json.loads(proc.stderr.decode().strip().splitlines()[-1])  # JSON goes to stderr
    assert report["size"] == 30 * MiB


@pytest.mark.parametrize("size", [0, 1, 4096 * 3 + 17, 2 * MiB + 1])
def test_copy_odd_sizes(tmp_path: Path, size: int) -> None:
    src = tmp_path / "src.img"
    want = make_image(src, size, [(0, size)] if size else [])
    dst = tmp_path / "dst.img"
    report = ok(run_cli("copy", str(src), str(dst), "--chunk-size", "1M", "--json"))
    assert dst.stat().st_size == size
    assert sha256_file(dst) == want
    assert report["data_bytes"] == size


def test_existing_file_target_is_overwritten_and_zeroed(tmp_path: Path) -> None:
    """A target with old data: data ranges overwritten, source holes zeroed, size kept."""
    src = tmp_path / "src.img"
    want = make_image(src, 16 * MiB, [(MiB, MiB)])
    dst = tmp_path / "dst.img"
    make_image(dst, 16 * MiB, [(0, 16 * MiB)], seed=9)
    ok(run_cli("copy", str(src), str(dst), "--json", "--verify"))
    assert sha256_file(dst) == want


def test_sparse_holes_stay_holes(tmp_path: Path, qemu_nbd) -> None:
    """512 MiB holding 32 MiB of data lands with about 32 MiB allocated, not 512 MiB."""
    src = tmp_path / "src.img"
    data = [(i * 64 * MiB, 4 * MiB) for i in range(8)]  # 8 x 4 MiB = 32 MiB
    want = make_image(src, 512 * MiB, data)
    dst = tmp_path / "dst.img"
    report = ok(run_cli("copy", qemu_nbd(src, read_only=True), str(dst), "--json"))
    assert sha256_file(dst) == want
    assert report["data_bytes"] == 32 * MiB
    assert allocated(dst) <= 32 * MiB + 4 * MiB, allocated(dst)


def test_sparse_1gib_to_nbd_target(tmp_path: Path, qemu_nbd) -> None:
    src = tmp_path / "src.img"
    data = [(0, MiB), (300 * MiB, 7 * MiB + 512), (1024 * MiB - MiB, MiB)]
    want = make_image(src, 1024 * MiB, data)
    dst = tmp_path / "dst.img"
    subprocess.run(["truncate", "-s", "1G", str(dst)], check=True)
    ok(run_cli("copy", qemu_nbd(src, read_only=True), qemu_nbd(dst), "--json", "--verify"))
    assert sha256_file(dst) == want
    assert allocated(dst) <= 9 * MiB + 4 * MiB, allocated(dst)


def test_zeros_inside_data_are_detected(tmp_path: Path) -> None:
    """All-zero chunks of allocated data travel as zero frames and land as holes."""
    src = tmp_path / "src.img"
    with src.open("wb") as f:  # fully allocated: 8 MiB zeros written out, then 1 MiB data
        f.write(b"\0" * 8 * MiB)
        f.write(b"\1" * MiB)
    dst = tmp_path / "dst.img"
    report = ok(run_cli("copy", str(src), str(dst), "--chunk-size", "1M", "--json"))
    assert report["zero_bytes"] == 8 * MiB
    assert report["data_bytes"] == MiB
    assert sha256_file(dst) == sha256_file(src)
    assert allocated(dst) <= 2 * MiB


def _qcow2_map(image: Path) -> list[dict[str, object]]:
    """The qcow2's own map (-U: qemu-nbd still holds it): unallocated vs zero clusters."""
    cmd = ["qemu-img", "map", "-U", "--output=json", "-f", "qcow2", str(image)]
    out = subprocess.run(cmd, capture_output=True, check=True)
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def test_target_is_zero_skips_zero_writes(tmp_path: Path, qemu_nbd) -> None:
    """With --target-is-zero nothing is written for holes: the qcow2 stays unallocated there.
    Without it, holes land as NBD write-zeroes (allocated zero clusters)."""
    src = tmp_path / "src.img"
    want = make_image(src, 32 * MiB, [(8 * MiB, MiB)])
    results = {}
    for flag in (True, False):
        dst = tmp_path / f"dst-{flag}.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(dst), "32M"], check=True)
        uri = qemu_nbd(dst, "qcow2")
        args = ["copy", str(src), uri, "--json"] + (["--target-is-zero"] if flag else [])
        ok(run_cli(*args))
        assert sha256_nbd(uri) == want
        zero_present = sum(
            int(e["length"])
            for e in _qcow2_map(dst)
            if e["zero"] and e["present"]  # type: ignore[call-overload]
        )
        results[flag] = zero_present
    assert results[True] == 0
    assert results[False] >= 31 * MiB


def test_verify_reports_verified(tmp_path: Path, qemu_nbd) -> None:
    src = tmp_path / "src.img"
    make_image(src, 8 * MiB, [(0, MiB)])
    dst = tmp_path / "dst.img"
    report = ok(run_cli("copy", str(src), str(dst), "--verify", "--json"))
    assert report["verified"] is True
    report = ok(run_cli("copy", str(src), str(dst), "--json"))
    assert report["verified"] is False


def test_chunk_size_negotiated_down_to_server_max_payload(tmp_path: Path, start_nats) -> None:
    server = start_nats(max_payload=512 * 1024)
    src = tmp_path / "src.img"
    want = make_image(src, 5 * MiB, [(0, 5 * MiB)])
    dst = tmp_path / "dst.img"
    report = ok(run_cli("copy", str(src), str(dst), "--data-url", server.url, "--json"))
    # The default 1 MiB - 4 KiB does not fit; the largest 2^k - 4 KiB under 512 KiB does.
    assert report["chunk_size"] == 512 * 1024 - 4096
    assert sha256_file(dst) == want
