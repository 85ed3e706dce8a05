"""``node:endpoint``, as ctl commands name a disk on a node."""

from __future__ import annotations

import pytest

from nbdnats.ctl.controller import parse_endpoint
from nbdnats.errors import UsageError


def test_an_endpoint_is_a_node_a_colon_and_a_uri_or_path() -> None:
    assert parse_endpoint("a:nbd+unix:///x?socket=/s") == ("a", "nbd+unix:///x?socket=/s")
    assert parse_endpoint("b:/dev/sda") == ("b", "/dev/sda")
    for bad in ("/dev/sda", "a:", "nbd://h/x"):
        with pytest.raises(UsageError):
            parse_endpoint(bad)
