"""The agent's side of bare-metal networking, in network namespaces: an agent in ``bm1``
puts its /128s on ``lo`` and publishes ``ctl.evt.bm1.adjacency`` with what its uplinks see
of the ToR (lldpd in ``tor``, hostname tor1), reaching a nats-server here over a management
link. The events are read back from JetStream, as a route injector reads them."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from nbdnats.schemas import MAX_ADJACENCY_BYTES, AdjacencyEvent, decode, encode
from tests.cli import run_cli
from tests.ctl import AgentProc, ctl, ok
from tests.nats_server import NatsServer
from tests.netns import Lldpd, Netns, Rack, link_local, rack, start_lldpd
from tests.waits import wait_for

LOOPBACK = "2001:db8:100::7/128"
NODE = "bm1"


@dataclass
class Rig:
    r: Rack
    tor: Netns
    bm1: Netns
    tor_lldpd: Lldpd
    host_lldpd: Lldpd
    url: str
    start: Callable[..., AgentProc]

    def agent(self, *args: str) -> AgentProc:
        return self.start(
            NODE, self.url, "--lldp-socket", str(self.host_lldpd.socket), *args, netns=self.bm1.name
        )


@pytest.fixture
def rig(
    tmp_path: Path, start_nats: Callable[..., NatsServer], start_agent: Callable[..., AgentProc]
) -> Iterator[Rig]:
    """tor:swp1 -- bm1:eth0, lldpd on both ends (the ToR's on swp1 only, the host's on every
    eth*), and a nats-server with JetStream the agent in bm1 reaches."""
    with rack(tmp_path) as r:
        tor, bm1 = r.ns("tor"), r.ns(NODE)
        r.link(tor, "swp1", bm1, "eth0")
        r.link(tor, "swp2", bm1, "eth1")
        here, _ = r.mgmt(bm1)
        nats = start_nats(host=here, jetstream=True)
        tor_lldpd = start_lldpd(tor, tmp_path, "swp1", hostname="tor1")
        host_lldpd = start_lldpd(bm1, tmp_path, "eth*")
        yield Rig(r, tor, bm1, tor_lldpd, host_lldpd, nats.url, start_agent)


def events(url: str) -> list[tuple[str, dict[str, Any]]]:
    """Every stored ctl event, oldest first: (kind, data)."""
    out = ok(ctl(url, "--json", "events", "--all", "--no-follow"))
    lines = [json.loads(x) for x in out.splitlines()]
    return [(x["subject"].rsplit(".", 1)[-1], x["data"]) for x in lines]


def adjacencies(url: str) -> list[AdjacencyEvent]:
    """The stored adjacency events, each decoded as a route injector decodes it (an
    invalid one fails the test here)."""
    found = [d for kind, d in events(url) if kind == "adjacency"]
    return [decode(AdjacencyEvent, json.dumps(d).encode(), "adjacency") for d in found]


def latest(url: str, check: Callable[[AdjacencyEvent], bool], what: str) -> AdjacencyEvent:
    """Wait until the newest adjacency satisfies ``check``; that adjacency."""
    seen: list[AdjacencyEvent] = []

    def newest_ok() -> bool:
        seen[:] = adjacencies(url)[-1:]
        return bool(seen) and check(seen[0])

    wait_for(newest_ok, what, timeout=30)
    return seen[0]


def uplink(ev: AdjacencyEvent, name: str) -> Any:
    return next(u for u in ev.uplinks if u.name == name)


def on_lo(ns: Netns) -> set[str]:
    return {
        f"{a['local']}/{a['prefixlen']}"
        for link in ns.ip_json("-6", "addr", "show", "dev", "lo")
        for a in link["addr_info"]  # type: ignore[attr-defined]
    }


def test_agent_announces_its_loopback_link_local_and_tor_port(rig: Rig) -> None:
    agent = rig.agent("--loopback", "2001:db8:100:0::7", "--uplink", "eth0")
    ev = latest(rig.url, lambda e: uplink(e, "eth0").tor == "tor1", "adjacency with the ToR's name")
    eth0 = uplink(ev, "eth0")
    assert (ev.node, ev.state, ev.loopbacks) == (NODE, "up", [LOOPBACK])
    assert eth0.link_local == link_local(rig.bm1, "eth0")
    assert eth0.port == "swp1"
    assert eth0.default_route is False
    assert eth0.management == [link_local(rig.tor, "swp1")]
    assert LOOPBACK in on_lo(rig.bm1)
    assert "no default route via a link-local next hop on eth0" in agent.text()
    announced = [d for kind, d in events(rig.url) if kind == "announce"]
    assert "adjacency" in announced[-1]["capabilities"]

    tor_ll = link_local(rig.tor, "swp1")
    assert tor_ll is not None
    rig.bm1.run("ip", "-6", "route", "add", "default", "via", tor_ll, "dev", "eth0")
    ev = latest(rig.url, lambda e: uplink(e, "eth0").default_route, "default_route true")
    assert uplink(ev, "eth0").tor == "tor1"
    assert agent.text().count("no default route via") == 1
    assert agent.proc.poll() is None


def test_second_uplink_appears_in_a_republish_and_a_pulled_cable_empties_it(rig: Rig) -> None:
    rig.agent("--loopback", LOOPBACK, "--uplink", "eth0", "--uplink", "eth1")
    ev = latest(rig.url, lambda e: uplink(e, "eth0").tor == "tor1", "eth0's neighbour")
    eth1 = uplink(ev, "eth1")
    assert eth1.link_local == link_local(rig.bm1, "eth1")
    assert eth1.tor is None  # the ToR sends LLDP on swp1 only

    rig.tor_lldpd.cli("configure", "system", "interface", "pattern", "swp1,swp2")
    ev = latest(rig.url, lambda e: uplink(e, "eth1").port == "swp2", "eth1's neighbour")
    assert (uplink(ev, "eth1").tor, uplink(ev, "eth0").port) == ("tor1", "swp1")

    rig.r.unlink(rig.bm1, "eth1")
    ev = latest(rig.url, lambda e: uplink(e, "eth1").link_local is None, "eth1 gone")
    gone = uplink(ev, "eth1")
    assert (gone.tor, gone.port, gone.default_route) == (None, None, False)
    assert uplink(ev, "eth0").tor == "tor1"


def test_sigterm_withdraws_and_releases_only_the_loopbacks_it_added(
    rig: Rig, tmp_path: Path
) -> None:
    before = "2001:db8:100::8/128"
    rig.bm1.run("ip", "-6", "addr", "add", before, "dev", "lo")
    conf = tmp_path / "agent.toml"  # the file's loopbacks first, then the command line's
    conf.write_text(f'loopbacks = ["{before}"]\nuplinks = ["eth0"]\nrelease_loopbacks = true\n')
    agent = rig.agent("--config", str(conf), "--loopback", LOOPBACK)
    latest(rig.url, lambda e: e.loopbacks == [before, LOOPBACK], "both loopbacks announced")
    assert {LOOPBACK, before} <= on_lo(rig.bm1)

    assert agent.stop() == 0
    kinds = [
        (kind, d.get("state")) for kind, d in events(rig.url) if kind in ("adjacency", "announce")
    ]
    assert kinds[-2:] == [("adjacency", "withdrawn"), ("announce", "stopped")]
    last = adjacencies(rig.url)[-1]
    assert (last.state, last.loopbacks) == ("withdrawn", [])
    assert before in on_lo(rig.bm1)
    assert LOOPBACK not in on_lo(rig.bm1)


def test_agent_without_lldpd_reports_its_uplink_without_a_neighbour(rig: Rig) -> None:
    gone = str(rig.host_lldpd.socket) + ".missing"
    agent = rig.start(
        NODE, rig.url, "--lldp-socket", gone, "--loopback", LOOPBACK, "--uplink", "eth0",
        "--adjacency-interval", "0.5", netns=rig.bm1.name,
    )  # fmt: skip
    wait_for(lambda: len(adjacencies(rig.url)) >= 3, "adjacencies every half second", 30)
    for ev in adjacencies(rig.url):
        eth0 = uplink(ev, "eth0")
        assert (eth0.link_local, eth0.tor, eth0.port) == (link_local(rig.bm1, "eth0"), None, None)
    assert agent.text().count("cannot read LLDP neighbours from lldpd") == 1
    assert agent.proc.poll() is None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--loopback", "192.0.2.7/32"], "--loopback '192.0.2.7/32': loopbacks are IPv6"),
        (["--loopback", "2001:db8::/64"], "a loopback is one address, a /128 (not /64)"),
        (["--loopback", "fe80::7"], "must be a global or unique-local address"),
        (["--loopback", "not-an-address"], "not an IPv6 address or /128 prefix"),
        (["--loopback=-v"], "--loopback '-v': give an IPv6 address or /128"),
        (["--uplink=-eth0"], "--uplink '-eth0': not an interface name"),
        (["--uplink", "eth0;id"], "--uplink 'eth0;id': not an interface name"),
        (["--uplink", "nosuch-uplink0"], "--uplink nosuch-uplink0: no such interface here"),
    ],
)
def test_bad_loopback_or_uplink_exits_2_with_one_line(args: list[str], message: str) -> None:
    # Refused before connecting: the URL is never dialled.
    proc = run_cli("agent", "--node", NODE, "--ctl-url", "nats://127.0.0.1:1", *args)
    err = proc.stderr.decode()
    assert proc.returncode == 2, err
    assert message in err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err


def test_bad_loopback_in_the_config_file_exits_2_with_one_line(tmp_path: Path) -> None:
    conf = tmp_path / "agent.toml"
    conf.write_text('loopbacks = ["2001:db8::7/127"]\n')
    proc = run_cli(
        "agent", "--node", NODE, "--ctl-url", "nats://127.0.0.1:1", "--config", str(conf)
    )
    err = proc.stderr.decode()
    assert proc.returncode == 2, err
    assert "loopbacks '2001:db8::7/127': a loopback is one address" in err
    assert len(err.strip().splitlines()) == 1, err


HOSTILE_NAMES = [
    # (what the ToR calls itself, what the adjacency may say: None, or that exact name)
    ("tor\x01\x1b[31mred\nline2", None),  # control characters: dropped
    ("é" * 127 + "x", "é" * 127 + "x"),  # 255 bytes: fits, kept whole
    ("a;$(reboot)`id` ' \" <x>", "a;$(reboot)`id` ' \" <x>"),  # plain text to us: kept
    ("tor\udcff", "tor\ufffd"),  # the byte 0xff, not UTF-8: replaced
]


def test_hostile_lldp_neighbour_never_crashes_the_agent_nor_yields_an_invalid_event(
    rig: Rig,
) -> None:
    agent = rig.agent("--loopback", LOOPBACK, "--uplink", "eth0", "--adjacency-interval", "1")
    latest(rig.url, lambda e: uplink(e, "eth0").tor == "tor1", "the ToR's name")
    for name, expected in HOSTILE_NAMES:
        rig.tor_lldpd.cli("configure", "system", "hostname", name)
        ev = latest(
            rig.url,
            lambda e: uplink(e, "eth0").tor != "tor1" and uplink(e, "eth0").port == "swp1",
            f"an adjacency after hostname {name!r}",
        )
        assert uplink(ev, "eth0").tor == expected
        rig.tor_lldpd.cli("configure", "system", "hostname", "tor1")
        latest(rig.url, lambda e: uplink(e, "eth0").tor == "tor1", "the ToR's name again")

    # A port id with a bell in it: dropped, the rest of the neighbour kept.
    rig.tor_lldpd.cli(
        "configure", "ports", "swp1", "lldp", "portidsubtype", "local", "swp\x071",
        "description", "uplink of bm1",
    )  # fmt: skip
    ev = latest(
        rig.url, lambda e: uplink(e, "eth0").port_description == "uplink of bm1", "the odd port"
    )
    assert (uplink(ev, "eth0").port, uplink(ev, "eth0").tor) == (None, "tor1")

    # A name longer than an LLDP TLV holds: whatever lldpd makes of it, the agent carries on.
    rig.tor_lldpd.cli("configure", "system", "hostname", "n" * 300)
    latest(rig.url, lambda e: uplink(e, "eth0").tor != "tor1", "an adjacency after a long name")
    assert all(len(u.tor or "") <= 255 for e in adjacencies(rig.url) for u in e.uplinks)
    assert agent.proc.poll() is None
    for e in adjacencies(rig.url):  # every one decoded (adjacencies) and fits the bound
        assert len(encode(e)) <= MAX_ADJACENCY_BYTES
