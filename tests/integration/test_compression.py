"""``--compress``: data frames travel compressed where that pays, arrive byte-exact, and
leave digests as they are; damaged or lying compressed frames are refused and sent again;
a peer from before compression is met uncompressed (``auto``) or refused in one line.

The "older peer" is simulated with ``NBDNATS_FAULTS=old_peer=1`` (test-only, faults.rs): the
receiver ignores the offer and replies without the ``compress`` field, the sender offers
none, which is what an nbd-nats from before compression does on the wire."""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import sysconfig
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.cli import one_line_error, run_cli, start_cli
from tests.ctl import ctl, ok
from tests.images import MiB, make_image, sha256_file

IMAGE_SIZE = 256 * MiB


@pytest.fixture(scope="module")
def ext4_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 256 MiB ext4 file system (mke2fs -d) holding Python's standard library sources
    (text) and 4 MiB of random bytes: what a disk image of an OS looks like to a codec."""
    where = tmp_path_factory.mktemp("ext4")
    tree = where / "tree"
    shutil.copytree(
        sysconfig.get_paths()["stdlib"],
        tree / "lib",
        ignore=shutil.ignore_patterns("__pycache__", "site-packages", "test", "*.so"),
    )
    make_image(tree / "random.bin", 4 * MiB, [(0, 4 * MiB)], seed=7)
    image = where / "ext4.img"
    subprocess.run(
        ["mke2fs", "-q", "-F", "-t", "ext4", "-d", str(tree), str(image), "256M"],
        check=True,
        capture_output=True,
    )
    return image


def copy(src: Path, dst: Path, *extra: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    proc = run_cli("copy", str(src), str(dst), "--json", "-q", *extra, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()
    report: dict[str, Any] = json.loads(proc.stdout)
    return report


def test_an_ext4_image_travels_in_half_its_data_bytes(ext4_image: Path, tmp_path: Path) -> None:
    dst = tmp_path / "dst.img"
    report = copy(ext4_image, dst, "--compress", "auto")
    assert sha256_file(dst) == sha256_file(ext4_image)
    sender = report["sender"]
    print(
        f"ext4: data {report['data_bytes']}, wire {report['wire_bytes']} (receiver), "
        f"sent {sender['sent_bytes']}, wire {sender['wire_bytes']} (sender)"
    )
    assert report["data_bytes"] > 32 * MiB, report  # the files really are data
    assert report["wire_bytes"] <= 0.5 * report["data_bytes"], report
    assert sender["wire_bytes"] <= 0.5 * sender["sent_bytes"], sender


def test_without_compress_nothing_is_compressed(ext4_image: Path, tmp_path: Path) -> None:
    """The default is off: one core's zstd is slower than a fast link."""
    dst = tmp_path / "dst.img"
    report = copy(ext4_image, dst)
    assert sha256_file(dst) == sha256_file(ext4_image)
    sender = report["sender"]
    assert sender["wire_bytes"] == sender["sent_bytes"] > 0, sender


def test_random_data_costs_at_most_a_hundredth_more_on_the_wire(tmp_path: Path) -> None:
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    want = make_image(src, 64 * MiB, [(0, 64 * MiB)], seed=11)
    report = copy(src, dst, "--compress", "auto")
    assert sha256_file(dst) == want
    sender = report["sender"]
    assert report["data_bytes"] == 64 * MiB
    assert report["wire_bytes"] <= 1.01 * report["data_bytes"], report
    assert sender["wire_bytes"] <= 1.01 * sender["sent_bytes"], sender


def test_digests_are_the_same_compressed_or_not(ext4_image: Path, tmp_path: Path) -> None:
    reports = {
        c: copy(ext4_image, tmp_path / f"{c}.img", "--compress", c)
        for c in ("off", "zstd", "lz4", "auto")
    }
    want = sha256_file(ext4_image)
    for codec in reports:
        assert sha256_file(tmp_path / f"{codec}.img") == want, codec
    assert len({r["digest"] for r in reports.values()}) == 1, reports
    assert len({r["sender"]["digest"] for r in reports.values()}) == 1
    off = reports["off"]
    assert off["wire_bytes"] == off["data_bytes"], off
    for codec in ("zstd", "lz4"):
        assert reports[codec]["wire_bytes"] < off["wire_bytes"] / 2, (codec, reports[codec])


@pytest.mark.parametrize(
    "fault", ["corrupt_chunk=0.05,seed=5", "lie_size=0.1,seed=6"], ids=["corrupt", "lying"]
)
def test_damaged_compressed_frames_are_refused_and_sent_again(
    fault: str, ext4_image: Path, tmp_path: Path
) -> None:
    """A corrupted compressed payload, or one that inflates one byte beyond the length its
    header declares (with a checksum right for the declared bytes), is never written: it
    counts as damaged, is named missing and sent again, and the copy is byte-exact."""
    dst = tmp_path / "dst.img"
    report = copy(ext4_image, dst, "--compress", "zstd", env={"NBDNATS_FAULTS": fault})
    assert sha256_file(dst) == sha256_file(ext4_image)
    assert report["corrupt_frames"] > 0, report
    assert report["sender"]["retransmits"] >= report["corrupt_frames"], report


@pytest.fixture
def pair(
    start_nats: Callable[..., Any], tmp_path: Path
) -> Callable[[dict[str, str] | None, dict[str, str] | None, str], tuple[Any, Any]]:
    """Run ``recv`` and ``send --compress MODE`` as two processes, each with its own
    ``NBDNATS_FAULTS``; returns both finished processes' (returncode, stdout, stderr)."""
    url = start_nats().url
    src = tmp_path / "src.img"
    make_image(src, 8 * MiB, [(0, 4 * MiB)])
    (tmp_path / "text.txt").write_text("compressible " * 400_000)
    with src.open("r+b") as f:
        f.seek(4 * MiB)
        f.write((tmp_path / "text.txt").read_bytes()[: 4 * MiB])

    ids = itertools.count()

    def run(
        recv_env: dict[str, str] | None, send_env: dict[str, str] | None, mode: str
    ) -> tuple[Any, Any]:
        tid = f"c{mode}{next(ids)}"
        dst = tmp_path / f"{tid}.img"
        common = ("--id", tid, "--data-url", url, "--json", "-q", "--timeout", "20")
        recv = start_cli("recv", str(dst), *common, env=recv_env)
        send = run_cli("send", str(src), *common, "--compress", mode, env=send_env)
        out, err = recv.communicate(timeout=60)
        if send.returncode == 0:
            assert sha256_file(dst) == sha256_file(src)
        return send, (recv.returncode, out, err)

    return run


OLD = {"NBDNATS_FAULTS": "old_peer=1"}


def test_an_explicit_codec_against_an_older_receiver_fails_in_one_line(pair: Any) -> None:
    send, (recv_rc, _, recv_err) = pair(OLD, None, "zstd")
    line = one_line_error(send)
    assert "cannot decompress zstd" in line and "--compress auto or off" in line, line
    assert recv_rc != 0, recv_err.decode()  # told by ABORT, not left to time out
    assert b"the sender gave up" in recv_err, recv_err.decode()


def test_auto_against_an_older_receiver_goes_uncompressed(pair: Any) -> None:
    send, (recv_rc, _, err) = pair(OLD, None, "auto")
    assert send.returncode == 0, send.stderr.decode()
    assert recv_rc == 0, err.decode()
    sent = json.loads(send.stdout)
    assert sent["wire_bytes"] == sent["sent_bytes"] > 0, sent


def test_an_older_sender_is_received_uncompressed(pair: Any) -> None:
    send, (recv_rc, out, err) = pair(None, OLD, "auto")
    assert send.returncode == 0, send.stderr.decode()
    assert recv_rc == 0, err.decode()
    got = json.loads(out)
    assert got["wire_bytes"] == got["data_bytes"] > 0, got


def test_both_new_ends_compress(pair: Any) -> None:
    send, (recv_rc, _, err) = pair(None, None, "lz4")
    assert send.returncode == 0 and recv_rc == 0, (send.stderr, err)
    sent = json.loads(send.stdout)
    assert sent["wire_bytes"] < sent["sent_bytes"], sent


def test_an_unknown_codec_is_a_usage_error() -> None:
    proc = run_cli("copy", "pattern:1048576", "null:", "--compress", "gzip")
    assert proc.returncode != 0
    assert "invalid choice: 'gzip'" in proc.stderr.decode()


def test_ctl_copy_passes_compress_to_the_sending_agent(
    start_nats: Callable[..., Any], start_agent: Callable[..., Any], tmp_path: Path
) -> None:
    """``ctl copy --compress lz4`` reaches the sending agent (``TransferOptions.compress``):
    its result shows fewer bytes on the wire than it sent, and the copy is byte-exact."""
    url = start_nats(jetstream=True).url
    src = tmp_path / "src.raw"
    src.write_bytes(b"a disk that compresses well. " * (8 * MiB // 29) + b"x" * (8 * MiB % 29))
    for node in ("a", "b"):
        start_agent(node, url, "--allow", str(tmp_path))
    out = ok(ctl(url, "--json", "copy", f"a:{src}", f"b:{tmp_path}/dst.raw", "--compress", "lz4"))
    assert sha256_file(tmp_path / "dst.raw") == sha256_file(src)
    sender = json.loads(out.splitlines()[-1])["sender"]
    assert sender["wire_bytes"] < sender["sent_bytes"] / 4, sender
