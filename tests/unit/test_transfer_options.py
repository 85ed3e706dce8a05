"""Transfer options and server URLs, checked before anything connects."""

from __future__ import annotations

import pytest

from nbdnats import _core, errors
from nbdnats.planes import resolve_urls
from nbdnats.transfer import check_options, check_streams


def test_window_timeout_and_chunk_size_out_of_range_are_usage_errors() -> None:
    check_options(window=1 << 20, timeout=0, chunk_size=1 << 20)
    for kw in ({"window": 1}, {"window": 1 << 30}, {"timeout": -1.0}, {"chunk_size": 1000}):
        args = {"window": 1 << 20, "timeout": 1.0, **kw}
        with pytest.raises(errors.UsageError):
            check_options(**args)  # type: ignore[arg-type]


def test_urls_default_to_localhost_and_ctl_follows_data_unless_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("NBDNATS_DATA_URL", raising=False)
    monkeypatch.delenv("NBDNATS_CTL_URL", raising=False)
    assert resolve_urls(None, None) == ("nats://127.0.0.1:4222", "nats://127.0.0.1:4222")
    assert resolve_urls("nats://d:1", None) == ("nats://d:1", "nats://d:1")
    monkeypatch.setenv("NBDNATS_CTL_URL", "nats://c:2")
    assert resolve_urls("nats://d:1", None) == ("nats://d:1", "nats://c:2")


@pytest.mark.parametrize("streams", [0, -1, 9, 2.0, True, "2"])
def test_streams_out_of_range_or_not_a_count_are_usage_errors(streams: object) -> None:
    with pytest.raises(errors.UsageError, match="--streams"):
        check_streams(streams)  # type: ignore[arg-type]


def test_more_than_one_stream_needs_an_id_its_children_can_be_named_from() -> None:
    for n in range(1, _core.MAX_STREAMS + 1):
        check_streams(n, "x" * 61)
    check_streams(1, "x" * 62)  # one stream has no children
    with pytest.raises(errors.UsageError, match=r"at most 61 characters .* not 62"):
        check_streams(2, "x" * 62)
