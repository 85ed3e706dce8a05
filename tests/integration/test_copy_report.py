"""``copy --json`` reports both ends: the receiver's counters as before, and the sender's
own (retransmits, bytes sent) as ``sender``."""

from __future__ import annotations

import json
from pathlib import Path

from tests.cli import run_cli
from tests.images import MiB, make_image, sha256_file

RECEIVER_FIELDS = [
    "id",
    "role",
    "size",
    "data_bytes",
    "zero_bytes",
    "seconds",
    "mb_per_s",
    "digest",
    "verified",
    "chunk_size",
    "window",
    "frames",
    "bad_frames",
    "duplicate_frames",
    "corrupt_frames",
    "retransmits",
    "resumes",
    "sent_bytes",
    "dirty_bytes",
    "wire_bytes",
    "streams",
]


def test_copy_json_shows_the_senders_retransmits(tmp_path: Path) -> None:
    """Before: only the receiver's counters, so retransmits read 0 after forced ones."""
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    size = 32 * MiB
    want = make_image(src, size, [(0, 24 * MiB)])
    faults = {"NBDNATS_FAULTS": "drop_chunk=0.05,seed=3"}
    proc = run_cli("copy", str(src), str(dst), "--json", "--chunk-size", "256K", env=faults)
    assert proc.returncode == 0, proc.stderr.decode()
    report = json.loads(proc.stdout)
    assert sha256_file(dst) == want
    assert list(report) == [*RECEIVER_FIELDS, "format", "sender"]  # format: both are files
    assert report["role"] == "recv"
    sender = report["sender"]
    assert list(sender) == [*RECEIVER_FIELDS, "format"]
    assert report["format"] == sender["format"] == "raw"
    assert sender["role"] == "send" and sender["id"] == report["id"]
    assert sender["digest"] == report["digest"]
    assert sender["retransmits"] > 0, sender
    assert sender["sent_bytes"] > 24 * MiB, sender  # what was dropped was sent again
