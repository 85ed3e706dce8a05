"""Micro benchmarks of the core's per-chunk hot paths (pytest-benchmark).

Disabled in the normal test run (pytest runs with ``--benchmark-disable``, and these live
outside ``tests/``); ``make bench`` runs them with ``--benchmark-enable`` and reports GB/s
from ``extra_info["bytes"]`` over the median time of one call.
"""

from __future__ import annotations

import os

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from nbdnats import _core

KiB = 1024
MiB = 1024 * KiB
SIZES = [256 * KiB, 4 * MiB]
IDS = ["256K", "4M"]


@pytest.fixture(scope="module", params=SIZES, ids=IDS)
def payload(request: pytest.FixtureRequest) -> bytes:
    return os.urandom(request.param)


def test_checksum(benchmark: BenchmarkFixture, payload: bytes) -> None:
    benchmark.extra_info["bytes"] = len(payload)
    assert benchmark(_core.checksum_of, payload) == _core.checksum_of(payload)


def test_encode_frame(benchmark: BenchmarkFixture, payload: bytes) -> None:
    """Header in front of a copy of the payload, checksum sealed in."""
    benchmark.extra_info["bytes"] = len(payload)
    frame = benchmark(_core.encode_frame, 7, 4096, payload)
    assert len(frame) == _core.HEADER_LEN + len(payload)


def test_decode_frame(benchmark: BenchmarkFixture, payload: bytes) -> None:
    """Parse and verify: the checksum over the whole payload is recomputed."""
    frame = _core.encode_frame(7, 4096, payload)
    benchmark.extra_info["bytes"] = len(payload)
    assert benchmark(_core.decode_frame, frame) == (1, 7, 4096, len(payload))


@pytest.mark.parametrize("size", SIZES, ids=IDS)
def test_is_zero_zeros(benchmark: BenchmarkFixture, size: int) -> None:
    """A zero chunk: the whole buffer is scanned (the worst case)."""
    buf = bytes(size)
    benchmark.extra_info["bytes"] = size
    assert benchmark(_core.is_zero, buf) is True


@pytest.mark.parametrize("size", SIZES, ids=IDS)
def test_is_zero_last_byte(benchmark: BenchmarkFixture, size: int) -> None:
    """Data only in the last byte: a full scan that answers False."""
    buf = bytes(size - 1) + b"\x01"
    benchmark.extra_info["bytes"] = size
    assert benchmark(_core.is_zero, buf) is False


def test_merge_extents(benchmark: BenchmarkFixture) -> None:
    """16384 block-status entries of 64 KiB (runs of data and zeros) merged into extents;
    GB/s is of the disk range described, m_entries_s of the entries."""
    entries = [(64 * KiB, 2 if (i // 3) % 2 else 0) for i in range(16384)]
    total = sum(n for n, _ in entries)
    benchmark.extra_info["bytes"] = total
    benchmark.extra_info["entries"] = len(entries)
    merged = benchmark(_core.merge_extents, 0, total, entries)
    assert sum(n for _, n, _ in merged) == total
    assert len(merged) == len(entries) // 3 + 1
