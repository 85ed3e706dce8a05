"""Spine announcements through gobgpd: a gobgpd in namespace ``inj`` (standing in for the
injector's speaker beside the ToR) peers over a veth with FRR's bgpd in ``spine``;
``GobgpAnnouncer`` drives gobgpd through its API on a management link from the test's own
namespace, as the injector does. What reaches the spine is read from the spine: bgpd's
table (``show bgp ipv6 unicast json``) and the spine's kernel FIB."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from nbdnats.errors import EndpointError, UsageError
from nbdnats.metal.gobgp import COMMUNITY, GobgpAnnouncer
from tests.netns import Frr, Gobgpd, rack, start_bgpd, start_frr, start_gobgpd
from tests.waits import wait_for

INJ_ASN, SPINE_ASN = 65101, 65000
INJ_LINK, SPINE_LINK = "2001:db8:f0::1", "2001:db8:f0::2"
TOR_LOOPBACK = "2001:db8:ff::1"  # the next hop the spine must see (on inj's lo)
HOST_LOOPBACK = "2001:db8:100::7/128"
SESSION_TIMEOUT = 60  # two daemons' connect timers on a loaded 2-core machine


@dataclass
class Fabric:
    spine: Frr
    gobgpd: Gobgpd

    def announcer(self, next_hop: str = TOR_LOOPBACK) -> GobgpAnnouncer:
        return GobgpAnnouncer(self.gobgpd.api, next_hop=next_hop)

    def spine_paths(self, prefix: str) -> list[dict[str, object]]:
        """bgpd's paths for ``prefix`` on the spine."""
        table = json.loads(self.spine.vtysh("show bgp ipv6 unicast json") or "{}")
        return list(table.get("routes", {}).get(prefix, []))

    def spine_next_hops(self, prefix: str) -> set[str]:
        return {
            str(nh["ip"])
            for path in self.spine_paths(prefix)
            for nh in path.get("nexthops", [])  # type: ignore[attr-defined]
        }

    def spine_fib(self, prefix: str) -> list[dict[str, object]]:
        dst = prefix.removesuffix("/128")
        return [r for r in self.spine.kernel_routes() if r.get("dst") in (dst, prefix)]


@pytest.fixture(scope="module")
def fabric(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fabric]:
    root = tmp_path_factory.mktemp("gobgp")
    with rack(root) as r:
        inj, spine_ns = r.ns("inj"), r.ns("spine")
        r.link(inj, "spine0", spine_ns, "inj0")
        inj.run("ip", "-6", "addr", "add", f"{INJ_LINK}/64", "dev", "spine0", "nodad")
        spine_ns.run("ip", "-6", "addr", "add", f"{SPINE_LINK}/64", "dev", "inj0", "nodad")
        inj.run("ip", "-6", "addr", "add", f"{TOR_LOOPBACK}/128", "dev", "lo")
        _, api_host = r.mgmt(inj)
        spine = start_bgpd(start_frr(spine_ns, root), root)
        spine.vtysh(
            "configure terminal",
            # The ToR's loopback, reached over the link (the underlay's job in a fabric).
            f"ipv6 route {TOR_LOOPBACK}/128 {INJ_LINK}",
            f"router bgp {SPINE_ASN}",
            "bgp router-id 10.255.0.2",
            "no bgp ebgp-requires-policy",
            "no bgp default ipv4-unicast",
            f"neighbor {INJ_LINK} remote-as {INJ_ASN}",
            f"neighbor {INJ_LINK} timers connect 1",
            # The next hop is a loopback behind the link, not on it: resolve it recursively.
            f"neighbor {INJ_LINK} disable-connected-check",
            "address-family ipv6 unicast",
            f"neighbor {INJ_LINK} activate",
        )
        gobgpd = start_gobgpd(
            inj,
            root,
            asn=INJ_ASN,
            router_id="10.255.0.1",
            api_host=api_host,
            neighbour=(SPINE_LINK, SPINE_ASN),
        )
        wait_for(
            gobgpd.established,
            "the BGP session between gobgpd and the spine",
            timeout=SESSION_TIMEOUT,
        )
        yield Fabric(spine, gobgpd)


def test_an_announced_prefix_reaches_the_spine_via_the_tor_loopback(fabric: Fabric) -> None:
    announcer = fabric.announcer()
    asyncio.run(announcer.announce(HOST_LOOPBACK))
    try:
        assert asyncio.run(announcer.announced()) == {HOST_LOOPBACK}
        wait_for(
            lambda: fabric.spine_next_hops(HOST_LOOPBACK) == {TOR_LOOPBACK},
            "the /128 in the spine's BGP table via the ToR's loopback",
            timeout=30,
        )
        (path,) = fabric.spine_paths(HOST_LOOPBACK)
        assert path["valid"] is True
        wait_for(lambda: bool(fabric.spine_fib(HOST_LOOPBACK)), "the /128 in the spine's FIB")
        (route,) = fabric.spine_fib(HOST_LOOPBACK)
        assert route["protocol"] == "bgp"
        # Announcing again changes nothing.
        asyncio.run(announcer.announce(HOST_LOOPBACK))
        assert asyncio.run(announcer.announced()) == {HOST_LOOPBACK}
    finally:
        asyncio.run(announcer.withdraw(HOST_LOOPBACK))


def test_a_withdrawn_prefix_leaves_the_spine(fabric: Fabric) -> None:
    announcer = fabric.announcer()
    prefix = "2001:db8:100::8/128"
    asyncio.run(announcer.announce(prefix))
    wait_for(lambda: bool(fabric.spine_fib(prefix)), "the /128 in the spine's FIB", timeout=30)
    asyncio.run(announcer.withdraw(prefix))
    assert asyncio.run(announcer.announced()) == set()
    wait_for(lambda: not fabric.spine_paths(prefix), "the /128 gone from the spine's BGP table")
    wait_for(lambda: not fabric.spine_fib(prefix), "the /128 gone from the spine's FIB")
    # Withdrawing what is not announced is a no-op.
    asyncio.run(announcer.withdraw(prefix))


def test_a_changed_tor_loopback_replaces_the_next_hop(fabric: Fabric) -> None:
    prefix = "2001:db8:100::9/128"
    old = fabric.announcer(next_hop="2001:db8:ff::99")
    new = fabric.announcer()
    asyncio.run(old.announce(prefix))
    try:
        wait_for(lambda: fabric.spine_paths(prefix) != [], "the /128 at the spine", timeout=30)
        asyncio.run(new.announce(prefix))
        assert asyncio.run(new.announced()) == {prefix}
        assert asyncio.run(old.announced()) == set()
        wait_for(
            lambda: fabric.spine_next_hops(prefix) == {TOR_LOOPBACK},
            "the spine's next hop for the /128 moved to the ToR's loopback",
            timeout=30,
        )
    finally:
        asyncio.run(new.withdraw(prefix))


def test_a_path_someone_else_originated_is_neither_listed_nor_touched(fabric: Fabric) -> None:
    prefix = "2001:db8:100::a/128"
    fabric.gobgpd.gobgp("global", "rib", "add", "-a", "ipv6", prefix, "nexthop", TOR_LOOPBACK)
    announcer = fabric.announcer()
    try:
        assert prefix not in asyncio.run(announcer.announced())
        with pytest.raises(EndpointError) as err:
            asyncio.run(announcer.announce(prefix))
        assert str(err.value) == (
            f"gobgpd at {announcer.api} already originates {prefix} for someone else "
            f"(no community {COMMUNITY}): remove that path or choose another community"
        )
        asyncio.run(announcer.withdraw(prefix))
        assert fabric.spine_next_hops(prefix) == {TOR_LOOPBACK}
        rib = json.loads(fabric.gobgpd.gobgp("global", "rib", "-a", "ipv6", prefix, "-j").stdout)
        assert list(rib) == [prefix]
    finally:
        fabric.gobgpd.gobgp("global", "rib", "del", "-a", "ipv6", prefix)


def test_a_stopped_gobgpd_is_one_routing_error_line(tmp_path: Path) -> None:
    with rack(tmp_path) as r:
        inj = r.ns("inj")
        _, api_host = r.mgmt(inj)
        gobgpd = start_gobgpd(inj, tmp_path, asn=INJ_ASN, router_id="10.255.0.1", api_host=api_host)
        announcer = GobgpAnnouncer(gobgpd.api, next_hop=TOR_LOOPBACK)
        asyncio.run(announcer.announce(HOST_LOOPBACK))
        gobgpd.stop()
        calls: list[Callable[[], Coroutine[object, object, object]]] = [
            lambda: announcer.announce(HOST_LOOPBACK),
            lambda: announcer.withdraw(HOST_LOOPBACK),
            announcer.announced,
        ]
        for call in calls:
            with pytest.raises(EndpointError) as err:
                asyncio.run(call())
            assert str(err.value) == (
                f"gobgpd at {announcer.api} is not answering (context deadline exceeded): "
                "start gobgpd or point the announcer at its API address"
            )


# Nothing listens here: a value that reached gobgp would fail as a EndpointError.
NOWHERE = "127.0.0.1:9"


@pytest.mark.parametrize(
    ("prefix", "why"),
    [
        ("2001:db8:100::/64", "only /128s are announced"),
        ("2001:db8:100::7/64", "give an IPv6 /128"),
        ("192.0.2.7/32", "give an IPv6 /128"),
        ("-h", "give an IPv6 /128"),
        ("2001:db8:100::7/128 nexthop ::1", "give an IPv6 /128"),
        ("ff02::1/128", "not a unicast address"),
    ],
)
def test_a_bad_prefix_is_refused_before_gobgp_runs(prefix: str, why: str) -> None:
    announcer = GobgpAnnouncer(NOWHERE, next_hop=TOR_LOOPBACK)
    for call in (announcer.announce, announcer.withdraw):
        with pytest.raises(UsageError) as err:
            asyncio.run(call(prefix))
        assert str(err.value) == f"bad prefix {prefix!r}: {why}"


@pytest.mark.parametrize(
    "next_hop",
    ["fe80::1", "192.0.2.1", "::", "::1", "ff02::2", "::ffff:192.0.2.1", "--help", ""],
)
def test_a_bad_next_hop_is_refused_before_gobgp_runs(next_hop: str) -> None:
    with pytest.raises(UsageError) as err:
        GobgpAnnouncer(NOWHERE, next_hop=next_hop)
    assert str(err.value).startswith(f"bad next hop {next_hop!r}: ")


@pytest.mark.parametrize(
    "api", ["localhost:50051", "127.0.0.1", "127.0.0.1:0", "::1:50051", "[::1]:x", "-u:1"]
)
def test_a_bad_api_address_is_refused(api: str) -> None:
    with pytest.raises(UsageError) as err:
        GobgpAnnouncer(api, next_hop=TOR_LOOPBACK)
    assert str(err.value).startswith(f"bad gobgpd API address {api!r}: ")


def test_an_ipv6_api_address_is_taken_in_brackets() -> None:
    announcer = GobgpAnnouncer("[fd00::2]:50051", next_hop=TOR_LOOPBACK)
    assert (announcer.host, announcer.port, announcer.api) == ("fd00::2", 50051, "[fd00::2]:50051")


def test_a_bad_community_is_refused() -> None:
    with pytest.raises(UsageError) as err:
        GobgpAnnouncer(NOWHERE, next_hop=TOR_LOOPBACK, community="65536:1")
    assert str(err.value) == "bad community '65536:1': give ASN:VALUE, each 0-65535"


def test_a_hung_gobgpd_is_a_routing_error_within_the_timeout(tmp_path: Path) -> None:
    with rack(tmp_path) as r:
        inj = r.ns("inj")
        _, api_host = r.mgmt(inj)
        gobgpd = start_gobgpd(inj, tmp_path, asn=INJ_ASN, router_id="10.255.0.1", api_host=api_host)
        os.killpg(gobgpd.proc.pid, signal.SIGSTOP)  # its socket accepts, nothing answers
        try:
            # gobgp itself gives up after a second; a shorter timeout is the announcer's own.
            for timeout, why in (
                (0.5, "did not answer in 0.5s: check that it runs"),
                (
                    10.0,
                    "is not answering (context deadline exceeded): start gobgpd or "
                    "point the announcer at its API address",
                ),
            ):
                announcer = GobgpAnnouncer(gobgpd.api, next_hop=TOR_LOOPBACK, timeout=timeout)
                started = time.monotonic()
                with pytest.raises(EndpointError) as err:
                    asyncio.run(announcer.announce(HOST_LOOPBACK))
                assert time.monotonic() - started < timeout + 2
                assert str(err.value) == f"gobgpd at {announcer.api} {why}"
        finally:
            os.killpg(gobgpd.proc.pid, signal.SIGCONT)
