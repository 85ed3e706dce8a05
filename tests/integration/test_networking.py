"""Bare metal without BGP on the host, end to end, in network namespaces: `tor` runs FRR
(zebra + staticd) and lldpd, `bm1` (and `bm2`) a host with lldpd and the real agent, `far`
a host behind the ToR. The agent puts its /128 on `lo` and announces its adjacency over the
ctl plane (a nats-server with JetStream, reached over a management link); the real route
injector programs the ToR through vtysh. `far` reaching the /128 is the proof.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import msgspec
import nats
import pytest

from nbdnats import subjects
from nbdnats.ctl import events
from tests.cli import NBD_NATS, cli_env
from tests.ctl import AgentProc, ctl, ok, stored_events
from tests.nats_server import NatsServer
from tests.netns import (
    Frr,
    Lldpd,
    Netns,
    Rack,
    link_local,
    rack,
    start_frr,
    start_gobgpd,
    start_lldpd,
)
from tests.waits import wait_for

LOOPBACK = "2001:db8:100::7"
FOREIGN = "2001:db8:666::1"  # outside every node's allowed prefixes
INTERVAL = "2"  # seconds between adjacencies: lost after 6 s
BOUND = 60.0  # any change reaches the ToR well within this, even on a loaded machine


@dataclass
class Site:
    rack: Rack
    tor: Netns
    bm1: Netns
    far: Netns
    frr: Frr
    tor_lldp: Lldpd
    bm1_lldp: Lldpd
    url: str
    allow: Path
    root: Path
    injector: subprocess.Popen[bytes] | None = None
    injector_runs: int = 0

    def start_injector(self, *extra: str) -> None:
        self.injector_runs += 1
        log = (self.root / f"injector-{self.injector_runs}.log").open("wb")
        argv = [
            NBD_NATS,
            "route-injector",
            "--backend",
            "frr",
            "--tor",
            f"tor1={self.frr.vty}",
            "--allow-file",
            str(self.allow),
            "--ctl-url",
            self.url,
            *extra,
        ]
        self.injector = subprocess.Popen(argv, stdout=log, stderr=log, env=cli_env(None))
        log.close()
        wait_for(
            lambda: "up on" in self.injector_log() or self.injector.poll() is not None,  # type: ignore[union-attr]
            "route injector",
            timeout=BOUND,
        )
        assert self.injector.poll() is None, self.injector_log()

    def injector_log(self) -> str:
        return (self.root / f"injector-{self.injector_runs}.log").read_text(errors="replace")

    def stop_injector(self) -> None:
        assert self.injector is not None
        self.injector.terminate()
        assert self.injector.wait(30) == 0, self.injector_log()

    def route(self, prefix: str) -> list[dict[str, object]]:
        """The nexthops FRR installed for ``prefix`` (empty: no such route)."""
        entries = self.frr.static_routes().get(f"{prefix}/128", [])
        return [
            nh
            for e in entries  # type: ignore[union-attr]
            if e.get("installed")
            for nh in e.get("nexthops", [])
        ]

    def fib(self, prefix: str) -> list[dict[str, object]]:
        return [r for r in self.frr.kernel_routes() if r.get("dst") == prefix]

    def far_reaches(self, address: str) -> bool:
        return (
            self.far.run("ping", "-6", "-c", "1", "-W", "1", address, check=False).returncode == 0
        )


def _default_route_via_tor(host: Netns, tor: Netns, tor_port: str) -> None:
    via = link_local(tor, tor_port)
    assert via is not None
    host.run("ip", "-6", "route", "replace", "default", "via", via, "dev", "eth0")


@pytest.fixture
def site(tmp_path: Path, start_nats: Callable[..., NatsServer]) -> Iterator[Site]:
    with rack(tmp_path) as r:
        tor, bm1, far = r.ns("tor"), r.ns("bm1"), r.ns("far")
        r.link(tor, "swp1", bm1, "eth0")
        r.link(tor, "swp9", far, "eth0")
        frr = start_frr(tor, tmp_path)
        # far: a global /64 with the ToR, default route to it.
        tor.run("ip", "-6", "addr", "add", "2001:db8:f::1/64", "dev", "swp9", "nodad")
        far.run("ip", "-6", "addr", "add", "2001:db8:f::2/64", "dev", "eth0", "nodad")
        far.run("ip", "-6", "route", "add", "default", "via", "2001:db8:f::1")
        _default_route_via_tor(bm1, tor, "swp1")
        tor_lldp = start_lldpd(tor, tmp_path, "swp*", hostname="tor1")
        bm1_lldp = start_lldpd(bm1, tmp_path, "eth0")
        here, _ = r.mgmt(bm1)
        server = start_nats(host=here, jetstream=True)
        allow = tmp_path / "allow.toml"
        allow.write_text(
            '[nodes.bm1]\nprefixes = ["2001:db8:100::/64"]\n'
            '[nodes.bm2]\nprefixes = ["2001:db8:200::/64"]\n'
            '[tors.tor1]\nports = ["swp1", "swp2", "swp3"]\n'
        )
        asyncio.run(_stream(server.url))
        s = Site(r, tor, bm1, far, frr, tor_lldp, bm1_lldp, server.url, allow, tmp_path)
        try:
            yield s
        finally:
            if s.injector is not None and s.injector.poll() is None:
                s.injector.kill()
                s.injector.wait()


async def _stream(url: str) -> None:
    nc = await nats.connect(url)
    try:
        assert await events.ensure_stream(nc) is None
    finally:
        await nc.close()


def _agent(
    site: Site, start_agent: Callable[..., AgentProc], ns: Netns, lldp: Lldpd, *loopbacks: str
) -> AgentProc:
    node = ns.name.split("-")[1]  # nbdn-bm1-xxxx -> bm1
    args = [f"--loopback={lo}/128" for lo in loopbacks]
    args += ["--uplink", "eth0", "--lldp-socket", str(lldp.socket)]
    args += ["--adjacency-interval", INTERVAL, "--release-loopbacks"]
    return start_agent(node, site.url, *args, netns=ns.name)


def test_a_hosts_loopback_is_routed_by_the_tor_until_its_agent_stops(
    site: Site, start_agent: Callable[..., AgentProc]
) -> None:
    assert not site.far_reaches(LOOPBACK)
    site.start_injector()
    t0 = time.monotonic()
    agent = _agent(site, start_agent, site.bm1, site.bm1_lldp, LOOPBACK)
    host_ll = link_local(site.bm1, "eth0")

    wait_for(lambda: bool(site.route(LOOPBACK)), "the /128 in FRR's RIB", BOUND)
    print(f"\nagent start -> route in the ToR's RIB: {time.monotonic() - t0:.2f} s")
    (nh,) = site.route(LOOPBACK)
    assert (nh["ip"], nh["interfaceName"]) == (host_ll, "swp1")
    assert [(r["gateway"], r["dev"]) for r in site.fib(LOOPBACK)] == [(host_ll, "swp1")]
    wait_for(lambda: site.far_reaches(LOOPBACK), "far reaching bm1's loopback", BOUND)

    line = ok(ctl(site.url, "adjacency", "bm1")).splitlines()[0].split()
    assert line[:7] == ["bm1", "up", f"{LOOPBACK}/128", "eth0", host_ll, "tor1", "swp1"]
    assert " ".join(line[7:]) == "installed on tor1/swp1"

    t0 = time.monotonic()
    assert agent.stop() == 0
    wait_for(lambda: not site.route(LOOPBACK), "the route withdrawn", BOUND)
    print(f"agent SIGTERM -> route withdrawn: {time.monotonic() - t0:.2f} s")
    assert not site.fib(LOOPBACK)
    assert not site.far_reaches(LOOPBACK)
    # --release-loopbacks: the agent took its /128 off lo again.
    addrs = site.bm1.ip_json("-6", "addr", "show", "dev", "lo")
    assert LOOPBACK not in json.dumps(addrs)
    withdrawn = [e for e in stored_events(site.url, "route") if e["action"] == "withdrawn"]
    assert [(e["node"], e["prefix"], e["reason"]) for e in withdrawn] == [
        ("bm1", f"{LOOPBACK}/128", "withdrawn")
    ]


def test_a_host_moved_to_another_port_has_its_route_moved(
    site: Site, start_agent: Callable[..., AgentProc]
) -> None:
    site.start_injector()
    _agent(site, start_agent, site.bm1, site.bm1_lldp, LOOPBACK)
    wait_for(lambda: site.far_reaches(LOOPBACK), "far reaching bm1's loopback", BOUND)

    # The cable moves from swp1 to swp2: LLDP tells the agent, the agent the injector.
    t0 = time.monotonic()
    site.rack.unlink(site.bm1, "eth0")
    site.rack.link(site.tor, "swp2", site.bm1, "eth0")
    _default_route_via_tor(site.bm1, site.tor, "swp2")
    host_ll = link_local(site.bm1, "eth0")

    def moved() -> bool:
        return [(n["ip"], n["interfaceName"]) for n in site.route(LOOPBACK)] == [(host_ll, "swp2")]

    wait_for(moved, "the route on swp2", BOUND)
    print(f"\ncable moved -> route on the new port: {time.monotonic() - t0:.2f} s")
    assert [r["dev"] for r in site.fib(LOOPBACK)] == ["swp2"]
    wait_for(lambda: site.far_reaches(LOOPBACK), "far reaching bm1 on its new port", BOUND)


def test_a_prefix_the_node_does_not_own_is_never_installed(
    site: Site, start_agent: Callable[..., AgentProc]
) -> None:
    site.start_injector()
    bm2 = site.rack.ns("bm2")
    site.rack.mgmt(bm2)
    site.rack.link(site.tor, "swp3", bm2, "eth0")
    _default_route_via_tor(bm2, site.tor, "swp3")
    lldp = start_lldpd(bm2, site.root, "eth0")
    # bm2 claims bm1's loopback and one nobody owns, besides its own.
    _agent(site, start_agent, bm2, lldp, "2001:db8:200::2", LOOPBACK, FOREIGN)

    def refused() -> list[dict[str, object]]:
        return [e for e in stored_events(site.url, "refused") if e.get("about") == "bm2"]

    wait_for(lambda: bool(refused()), "the refused event", BOUND)
    (event,) = refused()[:1]
    assert event["node"] == subjects.DEFAULT_INJECTOR and event["op"] == "adjacency"
    assert event["code"] == "denied" and LOOPBACK in str(event["error"]), event
    # Nothing of bm2's was programmed, not even its own prefix: the whole word is refused.
    assert not site.route(LOOPBACK) and not site.route(FOREIGN)
    assert not site.route("2001:db8:200::2")
    assert not site.fib(f"{LOOPBACK}") and not site.fib(FOREIGN)
    view = ok(ctl(site.url, "adjacency", "bm2")).splitlines()[0]
    assert "refused:" in view


def test_a_restarted_injector_withdraws_what_went_away_while_it_was_down(
    site: Site, start_agent: Callable[..., AgentProc]
) -> None:
    site.start_injector()
    agent = _agent(site, start_agent, site.bm1, site.bm1_lldp, LOOPBACK)
    wait_for(lambda: site.far_reaches(LOOPBACK), "far reaching bm1's loopback", BOUND)

    site.stop_injector()
    assert site.route(LOOPBACK), "a stopped injector leaves the routes in place"
    assert agent.stop() == 0  # its withdrawal is stored while nobody programs the ToR
    assert site.route(LOOPBACK)

    site.start_injector()
    wait_for(lambda: not site.route(LOOPBACK), "the route withdrawn on restart", BOUND)
    assert not site.far_reaches(LOOPBACK)


def test_an_agent_killed_without_a_word_is_withdrawn_once_lost(
    site: Site, start_agent: Callable[..., AgentProc]
) -> None:
    site.start_injector()
    agent = _agent(site, start_agent, site.bm1, site.bm1_lldp, LOOPBACK)
    wait_for(lambda: bool(site.route(LOOPBACK)), "the /128 in FRR's RIB", BOUND)
    agent.proc.kill()  # no withdrawal: three intervals of silence make it lost
    agent.proc.wait(30)
    t0 = time.monotonic()
    wait_for(lambda: not site.route(LOOPBACK), "the lost node's route withdrawn", BOUND)
    print(f"\nagent killed -> lost route withdrawn: {time.monotonic() - t0:.2f} s")
    lost = [e for e in stored_events(site.url, "route") if e["action"] == "withdrawn"]
    assert [e["reason"] for e in lost] == ["lost"]


def test_the_injector_publishes_its_table_to_ctl_queries(
    site: Site, start_agent: Callable[..., AgentProc]
) -> None:
    site.start_injector()
    _agent(site, start_agent, site.bm1, site.bm1_lldp, LOOPBACK)
    wait_for(lambda: bool(site.route(LOOPBACK)), "the /128 in FRR's RIB", BOUND)
    doc = json.loads(ok(ctl(site.url, "--json", "adjacency")))
    (bm1,) = doc
    assert bm1["routes"]["installed"] is True and bm1["routes"]["port"] == "swp1"
    assert bm1["routes"]["loopbacks"] == [f"{LOOPBACK}/128"]
    msgspec.json.encode(bm1)  # plain JSON all the way down


TOR_LOOPBACK = "2001:db8:ff::1"


def test_an_installed_loopback_is_announced_to_the_spine_and_withdrawn_after_a_restart(
    site: Site, start_agent: Callable[..., AgentProc]
) -> None:
    """--announce gobgp: gobgpd (its own namespace, API on a management address) carries
    each installed /128 with the ToR's loopback as next hop; a restarted injector withdraws
    what went away while it was down, from the ToR and from gobgpd alike."""
    inj = site.rack.ns("inj")
    _, api_host = site.rack.mgmt(inj)
    gobgpd = start_gobgpd(inj, site.root, asn=65101, router_id="10.255.0.1", api_host=api_host)

    def announced() -> list[tuple[str, str]]:
        rib = json.loads(gobgpd.gobgp("global", "rib", "-a", "ipv6", "-j").stdout or "{}")
        return sorted(
            (prefix, attr.get("nexthop", ""))
            for prefix, paths in rib.items()
            for path in paths
            for attr in path.get("attrs", [])
            if attr.get("type") == 3 or "nexthop" in attr
        )

    announce = ["--announce", "gobgp", "--gobgp-api", gobgpd.api, "--next-hop", TOR_LOOPBACK]
    site.start_injector(*announce)
    agent = _agent(site, start_agent, site.bm1, site.bm1_lldp, LOOPBACK)
    wait_for(lambda: bool(site.route(LOOPBACK)), "the /128 in FRR's RIB", BOUND)
    wait_for(lambda: announced() == [(f"{LOOPBACK}/128", TOR_LOOPBACK)], "gobgpd's path", BOUND)

    site.stop_injector()
    assert agent.stop() == 0
    assert announced() == [(f"{LOOPBACK}/128", TOR_LOOPBACK)]
    site.start_injector(*announce)
    wait_for(lambda: not site.route(LOOPBACK), "the route withdrawn on restart", BOUND)
    wait_for(lambda: announced() == [], "the announcement withdrawn on restart", BOUND)


def test_announce_without_a_next_hop_is_one_line(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            NBD_NATS,
            "route-injector",
            "--tor",
            f"tor1={tmp_path}",
            "--allow-file",
            "/nonexistent",
            "--announce",
            "gobgp",
        ],
        capture_output=True,
        env=cli_env(None),
        timeout=60,
    )
    err = proc.stderr.decode()
    assert proc.returncode == 2 and "Traceback" not in err and len(err.splitlines()) == 1, err
