"""Sizes and durations as people write them, and sizes as people read them."""

from __future__ import annotations

import pytest

from nbdnats import errors
from nbdnats.errors import UsageError
from nbdnats.units import clock, human, parse_duration, parse_rate, parse_size, rate


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("4096", 4096),
        ("4K", 4096),
        ("4KiB", 4096),
        ("1M", 1 << 20),
        ("1.5G", 3 << 29),
        ("2mb", 2 << 20),
    ],
)
def test_sizes_take_binary_suffixes_and_fractions(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("bad", ["", "x", "1.5", "-1", "4Q"])
def test_a_malformed_size_is_a_usage_error(bad: str) -> None:
    with pytest.raises(errors.UsageError):
        parse_size(bad)


def test_human_sizes_use_binary_units_with_one_decimal() -> None:
    assert human(512) == "512 B"
    assert human(1536) == "1.5 KiB"
    assert human(3 << 30) == "3.0 GiB"


def test_rates_are_mb_per_s_and_times_m_ss() -> None:
    """One unit for every rate a command prints (bar, summaries, ctl): MB/s as nbdcopy and
    the reports' mb_per_s; sizes stay binary (human)."""
    assert rate(64 << 20, 2.0) == "33.6 MB/s"
    assert rate(5, 0.0) == "0.0 MB/s"
    assert (clock(None), clock(float("inf")), clock(59.9), clock(61), clock(3725)) == (
        "--:--",
        "--:--",
        "0:59",
        "1:01",
        "1:02:05",
    )


def test_durations_are_seconds_or_suffixed_and_never_negative() -> None:
    assert parse_duration("90") == 90 and parse_duration("2h") == 7200
    with pytest.raises(UsageError):
        parse_duration("-1m")


@pytest.mark.parametrize(
    ("text", "value"),
    [("50M", 50 << 20), ("50M/s", 50 << 20), ("512K", 512 << 10), ("1", 1), ("1T", 1 << 40)],
)
def test_rate_caps_are_sizes_per_second(text: str, value: int) -> None:
    assert parse_rate(text) == value


@pytest.mark.parametrize("bad", ["0", "-1M", "fast", "1.5", "2T", "", "50M/h"])
def test_a_rate_cap_of_0_or_beyond_1T_is_a_usage_error(bad: str) -> None:
    with pytest.raises(UsageError, match="is not a rate cap"):
        parse_rate(bad)
