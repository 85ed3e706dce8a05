"""Transfer options and server URLs, checked before anything connects."""

from __future__ import annotations

import pytest

from nbdnats import errors
from nbdnats.planes import resolve_urls
from nbdnats.transfer import check_options


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
