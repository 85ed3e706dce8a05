"""What the route injector makes of one adjacency (``adjacency_routes``), without a ToR:
the routes it asks for, and what refuses it. The integration tests program a real FRR."""

from __future__ import annotations

import datetime as dt
import ipaddress
from typing import Any

import pytest

from nbdnats.errors import PolicyError, SchemaError
from nbdnats.metal.frr import StaticRoute
from nbdnats.metal.injector import AllowList, Route, adjacency_routes
from nbdnats.schemas import AdjacencyEvent, Uplink, encode

ALLOW = AllowList(
    nodes={"bm1": (ipaddress.IPv6Network("2001:db8:100::/64"),)},
    ports={"tor1": None, "tor2": None},
)
PORTS = {"tor1": frozenset({"swp1", "swp2"}), "tor2": frozenset({"swp7"})}


def uplink(name: str = "eth0", **kw: Any) -> Uplink:
    fields: dict[str, Any] = {"name": name, "link_local": "fe80::1", "tor": "tor1", "port": "swp1"}
    fields.update(kw)
    return Uplink(**fields)


def event(loopbacks: list[str], uplinks: list[Uplink], **kw: Any) -> bytes:
    return encode(
        AdjacencyEvent(
            node=kw.pop("node", "bm1"),
            loopbacks=loopbacks,
            uplinks=uplinks,
            at=dt.datetime.now(dt.UTC),
            **kw,
        )
    )


def routes(data: bytes) -> set[Route]:
    return set(adjacency_routes("bm1", data, ALLOW, PORTS)[1])


def test_every_loopback_is_routed_through_every_uplink_with_a_managed_neighbour() -> None:
    data = event(
        ["2001:db8:100::7/128", "2001:db8:100::8"],  # a bare address is a /128
        [
            uplink(),
            uplink("eth1", link_local="fe80::2/64", tor="tor2", port="swp7"),
            Uplink(name="eth2", link_local="fe80::3"),  # no LLDP neighbour: not routed
            uplink("eth3", link_local=None, port="swp2"),  # no address (yet): not routed
        ],
    )
    assert routes(data) == {
        Route("tor1", StaticRoute("2001:db8:100::7/128", "fe80::1", "swp1")),
        Route("tor1", StaticRoute("2001:db8:100::8/128", "fe80::1", "swp1")),
        Route("tor2", StaticRoute("2001:db8:100::7/128", "fe80::2", "swp7")),
        Route("tor2", StaticRoute("2001:db8:100::8/128", "fe80::2", "swp7")),
    }


def test_withdrawn_adjacency_asks_for_no_routes() -> None:
    assert routes(event([], [], state="withdrawn")) == set()


@pytest.mark.parametrize(
    ("loopbacks", "uplinks", "error"),
    [
        (["10.0.0.7/32"], [uplink()], "is not an IPv6 /128"),
        (["2001:db8:100::7/127"], [uplink()], "is not a /128"),
        (["2001:db8:101::7/128"], [uplink()], "outside its allowed prefixes (2001:db8:100::/64)"),
        (["2001:db8:100::7/128"], [uplink(tor=None, chassis_id="x")], "names ToR None"),
        (["2001:db8:100::7/128"], [uplink(port=None)], "port None of ToR tor1"),
        (["2001:db8:100::7/128"], [uplink(port="swp7")], "port 'swp7' of ToR tor1"),
        (["2001:db8:100::7/128"], [uplink(link_local="fe80::1::2")], "is not an IPv6 address"),
        (["2001:db8:100::7/128"], [uplink(link_local="fec0::1")], "is not link-local"),
    ],
)
def test_policy_refuses_the_whole_adjacency(
    loopbacks: list[str], uplinks: list[Uplink], error: str
) -> None:
    with pytest.raises(PolicyError) as e:
        routes(event(loopbacks, [uplink("eth9"), *uplinks]))
    assert error in str(e.value)


def test_a_node_outside_the_allow_file_is_refused() -> None:
    data = event([], [], node="bm2")
    with pytest.raises(PolicyError, match=r"node bm2 is not in the injector's allow-file"):
        adjacency_routes("bm2", data, ALLOW, PORTS)


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"[]", "invalid adjacency of bm1"),
        (b'{"node": "bm1", "at": "2026-01-01T00:00:00Z", "extra": 1}', "invalid adjacency"),
        (b'{"v": 9, "node": "bm1", "at": "2026-01-01T00:00:00Z"}', "has schema version 9"),
        (b"x" * (64 * 1024 + 1), "65537 bytes; at most 65536 are read"),
    ],
)
def test_schema_refuses_what_is_not_an_adjacency(data: bytes, error: str) -> None:
    with pytest.raises(SchemaError) as e:
        routes(data)
    assert error in str(e.value)
