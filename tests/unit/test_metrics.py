"""The agent's metrics: Prometheus text, and the address it listens on."""

from __future__ import annotations

import pytest

from nbdnats.ctl.metrics import parse_addr, render
from nbdnats.errors import UsageError


def test_metrics_render_prometheus_text_and_addresses_parse() -> None:
    text = render(
        [
            ("nbdnats_transfer_bytes", {"transfer": 't"1', "role": "recv"}, 5.0),
            ("nbdnats_transfer_rate_bytes_per_second", {"transfer": "t1"}, 1.5),
        ]
    )
    assert '# TYPE nbdnats_transfer_bytes gauge\nnbdnats_transfer_bytes{role="recv",' in text
    assert 'transfer="t\\"1"} 5\n' in text
    assert 'nbdnats_transfer_rate_bytes_per_second{transfer="t1"} 1.5\n' in text
    assert parse_addr("127.0.0.1:9464") == ("127.0.0.1", 9464)
    assert parse_addr("[::1]:9464") == ("::1", 9464)
    with pytest.raises(UsageError):
        parse_addr("9464x")
