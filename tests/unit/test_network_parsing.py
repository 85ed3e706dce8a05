"""What the agent makes of its own loopback options and of what ``ip -j`` and
``lldpcli -f json0`` print (shapes as lldpd 1.0.16 and iproute2 6.1 print them), including
LLDP values a hostile neighbour chose."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pytest

from nbdnats.errors import SchemaError, UsageError
from nbdnats.metal.network import (
    lldp_text,
    parse_default_routes,
    parse_link_locals,
    parse_loopback,
    parse_neighbours,
    parse_uplink,
)
from nbdnats.schemas import AdjacencyEvent, Uplink, decode, encode


@pytest.mark.parametrize(
    ("text", "normal"),
    [
        ("2001:db8:100::7/128", "2001:db8:100::7/128"),
        ("2001:db8:100::7", "2001:db8:100::7/128"),
        ("2001:0DB8:0100:0000::0007", "2001:db8:100::7/128"),
        (" fd00::1/128 ", "fd00::1/128"),
    ],
)
def test_loopback_is_a_normalised_128(text: str, normal: str) -> None:
    assert parse_loopback(text) == normal


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("192.0.2.7", "not IPv4"),
        ("192.0.2.7/32", "not IPv4"),
        ("2001:db8::/64", "(not /64)"),
        ("2001:db8::7/127", "(not /127)"),
        ("fe80::1", "global or unique-local"),
        ("fe80::1%eth0", "not an IPv6 address"),
        ("ff02::1", "global or unique-local"),
        ("::1", "global or unique-local"),
        ("::", "global or unique-local"),
        ("garbage", "not an IPv6 address"),
        ("", "give an IPv6 address"),
        ("-v", "give an IPv6 address"),
        ("2001:db8::7/128; reboot", "not an IPv6 address"),
    ],
)
def test_loopback_other_than_an_ipv6_128_is_refused_in_one_line(text: str, why: str) -> None:
    with pytest.raises(UsageError) as e:
        parse_loopback(text)
    assert why in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["-eth0", "eth0;id", "a" * 16, "", "eth 0", "eth0\n"])
def test_uplink_that_is_not_an_interface_name_is_refused(name: str) -> None:
    with pytest.raises(UsageError, match="not an interface name"):
        parse_uplink(name)


def test_uplink_names_linux_allows_are_kept() -> None:
    for name in ("eth0", "enp1s0f1", "bond0.100", "swp1@x", "a" * 15):
        assert parse_uplink(name) == name


IP_ADDR = [
    {
        "ifname": "lo",
        "addr_info": [{"family": "inet6", "local": "::1", "prefixlen": 128, "scope": "host"}],
    },
    {
        "ifname": "eth0",
        "addr_info": [
            {"family": "inet6", "local": "2001:db8::5", "prefixlen": 64, "scope": "global"},
            {"family": "inet6", "local": "fe80::1", "prefixlen": 64, "scope": "link",
             "tentative": True},
            {"family": "inet6", "local": "fe80::5090:aeff:fe92:dc42", "prefixlen": 64,
             "scope": "link"},
        ],
    },
    {"ifname": "eth1", "addr_info": []},
    {"ifname": "eth2", "addr_info": [{"family": "inet6", "local": "nonsense", "scope": "link"}]},
]  # fmt: skip


def test_link_local_is_the_first_usable_one_and_every_interface_is_listed() -> None:
    assert parse_link_locals(json.dumps(IP_ADDR)) == {
        "lo": None,
        "eth0": "fe80::5090:aeff:fe92:dc42",
        "eth1": None,
        "eth2": None,
    }


@pytest.mark.parametrize("text", ["", "not json", "{}", "[1, null, []]", '[{"ifname": 7}]'])
def test_unreadable_ip_output_lists_no_interface(text: str) -> None:
    assert parse_link_locals(text) == {}


def test_default_route_counts_only_via_a_link_local_next_hop() -> None:
    routes = [
        {"dst": "default", "gateway": "fe80::2817:b3ff:fea8:63b6", "dev": "eth0"},
        {"dst": "default", "gateway": "2001:db8::1", "dev": "eth1"},
        {"dst": "default", "type": "unreachable", "dev": "lo"},
        {"dst": "default", "nexthops": [
            {"gateway": "fe80::9", "dev": "eth2"}, {"gateway": "2001:db8::9", "dev": "eth3"}]},
        {"dst": "2001:db8::/64", "gateway": "fe80::1", "dev": "eth4"},
    ]  # fmt: skip
    assert parse_default_routes(json.dumps(routes)) == {"eth0", "eth2"}


def neighbours(**chassis_name: Any) -> str:
    """lldpcli's json0 answer with one neighbour on eth0."""
    return json.dumps(
        {
            "lldp": [
                {
                    "interface": [
                        {
                            "name": "eth0",
                            "via": "LLDP",
                            "chassis": [
                                {
                                    "id": [{"type": "mac", "value": "2a:17:b3:a8:63:b6"}],
                                    "name": [{"value": chassis_name.get("name", "tor1")}],
                                    "mgmt-ip": [
                                        {"value": "fe80::2817:b3ff:fea8:63b6"},
                                        {"value": "192.0.2.1"},
                                        {"value": "fe80::1%swp1"},
                                        {"value": "not an address"},
                                    ],
                                }
                            ],
                            "port": [
                                {
                                    "id": [{"type": "ifname", "value": "swp1"}],
                                    "descr": [{"value": chassis_name.get("descr", "swp1")}],
                                }
                            ],
                        }
                    ]
                }
            ]
        }
    )


def test_neighbour_gives_tor_chassis_port_and_usable_management_addresses() -> None:
    assert parse_neighbours(neighbours()) == {
        "eth0": Uplink(
            name="eth0",
            tor="tor1",
            chassis_id="2a:17:b3:a8:63:b6",
            port="swp1",
            port_description="swp1",
            management=["fe80::2817:b3ff:fea8:63b6", "192.0.2.1"],
        )
    }


@pytest.mark.parametrize(
    "text", ["", "garbage", "[]", '{"lldp": [{}]}', '{"lldp": {"interface": 1}}', "null"]
)
def test_no_neighbours_or_an_odd_shape_is_no_neighbour(text: str) -> None:
    assert parse_neighbours(text) == {}


@pytest.mark.parametrize(
    ("value", "kept"),
    [
        ("tor1", "tor1"),
        ("tor\x01x", None),
        ("tor\nx", None),
        ("tor\x7f", None),
        ("é" * 127 + "x", "é" * 127 + "x"),  # 255 bytes: kept whole
        ("x" * 300, "x" * 255),
        ("x" * 254 + "é", "x" * 254),  # never half a character
        ("tor\ufffd", "tor\ufffd"),  # invalid UTF-8, as lldpcli's output decodes it
        ("", None),
        (7, None),
        (None, None),
        (["tor1"], None),
    ],
)
def test_lldp_values_are_cut_to_the_schema_or_dropped(value: object, kept: str | None) -> None:
    assert lldp_text(value) == kept


def test_hostile_neighbour_still_makes_a_valid_adjacency() -> None:
    """A name with an escape sequence, a description longer than a TLV: what is left
    fits the schema the injector decodes with."""
    found = parse_neighbours(neighbours(name="\x1b[31mtor1\x1b[0m", descr="€" * 100))
    eth0 = found["eth0"]
    assert eth0.tor is None
    assert eth0.port_description == "€" * 85  # 255 bytes
    event = AdjacencyEvent(
        node="bm1", loopbacks=["2001:db8::7/128"], uplinks=[eth0], at=dt.datetime.now(dt.UTC)
    )
    assert decode(AdjacencyEvent, encode(event), "adjacency") == event


def test_neighbour_on_an_interface_name_no_linux_interface_has_is_ignored() -> None:
    text = neighbours().replace('"name": "eth0"', '"name": "-eth0; reboot"')
    assert parse_neighbours(text) == {}


@pytest.mark.parametrize(
    "field",
    [
        {"name": "eth0\n"},
        {"name": "eth0", "tor": "tor1\n"},
        {"name": "eth0", "link_local": "fe80::1\n"},
        {"name": "eth0", "management": ["fe80::1\n"]},
    ],
)
def test_adjacency_with_a_trailing_newline_in_a_value_is_invalid(field: dict[str, Any]) -> None:
    """A regex ``$`` matches before a final newline; the schema's patterns must not."""
    raw = {"node": "bm1", "uplinks": [field], "at": "2026-01-01T00:00:00Z"}
    with pytest.raises(SchemaError):
        decode(AdjacencyEvent, json.dumps(raw).encode(), "adjacency")
