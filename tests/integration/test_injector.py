"""The route injector against a real ToR: FRR (zebra + staticd) in a network namespace, a
real nats-server with JetStream, and ``nbd-nats route-injector`` as a process. The test
publishes adjacencies as a bare-metal host's agent would (crafted ones too, as a hostile
host would) and reads what FRR's RIB, the ToR's kernel FIB, the stored events, the
injector's answers and its metrics say."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import re
import signal
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.request import urlopen

import nats
import pytest

from nbdnats import subjects
from nbdnats.ctl import events
from nbdnats.embedded import free_port, nats_server_binary
from nbdnats.metal.frr import ROUTE_TAG
from nbdnats.schemas import AdjacencyEvent, Uplink, encode
from tests.cli import NBD_NATS, cli_env, one_line_error, run_cli
from tests.ctl import ctl_request
from tests.nats_server import NatsServer, port_open
from tests.netns import Frr, Netns, Rack, link_local, rack, start_frr
from tests.waits import wait_for

INJECTOR = subjects.DEFAULT_INJECTOR
BM1_LO = "2001:db8:100::7/128"
BM2_LO = "2001:db8:200::9/128"
ALLOW = """\
[nodes.bm1]
prefixes = ["2001:db8:100::/64"]
[nodes.bm2]
prefixes = ["2001:db8:200::/64"]
"""
PORTS = '[tors.tor1]\nports = ["swp1", "swp2", "swp3"]\n'


# -- the rack, the injector and what they say ------------------------------------------------


@dataclass
class InjectorProc:
    proc: subprocess.Popen[bytes]
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def metrics(self) -> str:
        port = re.findall(r"metrics on [^ ]*:(\d+)", self.text())[-1]
        with urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as page:
            return str(page.read().decode())

    def sample(self, name: str) -> float:
        """One series' value (0 when absent): ``name`` with its labels as rendered."""
        for line in self.metrics().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
        return 0.0

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)


@dataclass
class Setup:
    rack: Rack
    tor: Netns
    bm1: Netns
    bm2: Netns
    frr: Frr
    url: str
    allow: Path
    root: Path
    started: list[InjectorProc]

    def injector(self, *args: str, url: str | None = None) -> InjectorProc:
        log = self.root / f"injector-{len(self.started)}.log"
        argv = [NBD_NATS, "route-injector", "--backend", "frr", "--tor", f"tor1={self.frr.vty}"]
        argv += ["--allow-file", str(self.allow), "--ctl-url", url or self.url]
        argv += ["--metrics-addr", "127.0.0.1:0", *args]
        with log.open("wb") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=out, env=cli_env())
        inj = InjectorProc(proc, log)
        self.started.append(inj)
        wait_for(lambda: " up on " in inj.text() or proc.poll() is not None, "injector", 30)
        assert proc.poll() is None, inj.text()
        return inj

    def uplink(self, ns: Netns, ifname: str, port: str, **kw: object) -> Uplink:
        fields: dict[str, object] = {
            "name": ifname,
            "link_local": link_local(ns, ifname),
            "default_route": True,
            "tor": "tor1",
            "chassis_id": "02:00:00:00:00:01",
            "port": port,
        }
        fields.update(kw)
        return Uplink(**fields)  # type: ignore[arg-type]

    def rib(self) -> dict[str, list[tuple[str, str, int | None]]]:
        """Static routes in FRR's RIB: prefix -> (next hop, port, tag) of each."""
        out: dict[str, list[tuple[str, str, int | None]]] = {}
        for prefix, entries in self.frr.static_routes().items():
            for e in entries:  # type: ignore[attr-defined]
                for hop in e.get("nexthops", []):
                    out.setdefault(prefix, []).append(
                        (hop.get("ip"), hop.get("interfaceName"), e.get("tag"))
                    )
        return out

    def fib(self) -> dict[str, tuple[str, str]]:
        """The ToR kernel's IPv6 routes with a gateway: destination -> (gateway, device)."""
        return {
            str(r["dst"]): (str(r["gateway"]), str(r["dev"]))
            for r in self.frr.kernel_routes()
            if "gateway" in r
        }

    def routed(self, lo: str, ns: Netns, ifname: str, port: str) -> bool:
        """Whether ``lo`` is in the RIB with the injector's tag and in the FIB, via
        ``ns``'s link-local on ``ifname`` out of ``port``."""
        ll = link_local(ns, ifname)
        dst = lo.removesuffix("/128")
        return self.rib().get(lo) == [(ll, port, ROUTE_TAG)] and self.fib().get(dst) == (ll, port)


@pytest.fixture
def setup(tmp_path: Path, start_nats: Callable[..., NatsServer]) -> Iterator[Setup]:
    """tor (FRR), bm1 on its swp1 and swp2, bm2 on its swp3; nats-server with JetStream."""
    with rack(tmp_path) as r:
        tor, bm1, bm2 = r.ns("tor"), r.ns("bm1"), r.ns("bm2")
        r.link(tor, "swp1", bm1, "eth0")
        r.link(tor, "swp2", bm1, "eth1")
        r.link(tor, "swp3", bm2, "eth0")
        frr = start_frr(tor, tmp_path)
        server = start_nats(jetstream=True)
        allow = tmp_path / "allow.toml"
        allow.write_text(ALLOW + PORTS)
        s = Setup(r, tor, bm1, bm2, frr, server.url, allow, tmp_path, [])
        try:
            yield s
        finally:
            for inj in s.started:
                if inj.proc.poll() is None:
                    inj.proc.kill()
                    inj.proc.wait(10)


def adjacency(
    node: str,
    loopbacks: list[str],
    uplinks: list[Uplink],
    *,
    state: str = "up",
    interval: float = 30.0,
) -> bytes:
    ev = AdjacencyEvent(
        node=node,
        state=state,  # type: ignore[arg-type]
        loopbacks=loopbacks,
        uplinks=uplinks,
        interval=interval,
        at=dt.datetime.now(dt.UTC),
    )
    return encode(ev)


def publish(url: str, subject: str, payload: bytes) -> None:
    """Publish as an agent does, and wait until the stream holds it."""

    async def go() -> None:
        nc = await nats.connect(url)
        try:
            await nc.jetstream().publish(subject, payload, stream=events.STREAM)
        finally:
            await nc.close()

    asyncio.run(go())


def announce(s: Setup, node: str, payload: bytes) -> None:
    publish(s.url, subjects.ctl_event(node, subjects.ADJACENCY), payload)


def stored(url: str, kind: str) -> list[dict[str, object]]:
    """The injector's events of ``kind`` the stream holds, oldest first."""

    async def go() -> list[dict[str, object]]:
        nc = await nats.connect(url)
        try:
            subject = subjects.ctl_event(INJECTOR, kind)
            reader = events.read(nc, subject=subject, since_seq=1, follow=False)
            return [ev.data async for ev in reader]
        finally:
            await nc.close()

    return asyncio.run(go())


def bm1_up(s: Setup, port: str = "swp1", ifname: str = "eth0", **kw: object) -> bytes:
    return adjacency("bm1", [BM1_LO], [s.uplink(s.bm1, ifname, port)], **kw)  # type: ignore[arg-type]


# -- install, withdraw, lose, move -----------------------------------------------------------


def test_adjacency_installs_the_route_in_the_rib_and_the_tor_fib(setup: Setup) -> None:
    s = setup
    s.injector()
    announce(s, "bm1", bm1_up(s))
    wait_for(lambda: s.routed(BM1_LO, s.bm1, "eth0", "swp1"), "bm1's route", 20)
    ll = link_local(s.bm1, "eth0")
    wait_for(lambda: bool(stored(s.url, "route")), "a route event", 20)
    (ev,) = stored(s.url, "route")
    assert ev == {
        "v": 1,
        "injector": INJECTOR,
        "node": "bm1",
        "action": "installed",
        "prefix": BM1_LO,
        "tor": "tor1",
        "port": "swp1",
        "via": ll,
        "reason": "announced",
    }
    running = s.frr.vtysh("show running-config")
    assert f"ipv6 route {BM1_LO} {ll} swp1 tag {ROUTE_TAG}" in running


def test_withdrawn_adjacency_removes_the_route(setup: Setup) -> None:
    s = setup
    s.injector()
    announce(s, "bm1", bm1_up(s))
    wait_for(lambda: s.routed(BM1_LO, s.bm1, "eth0", "swp1"), "bm1's route", 20)
    announce(s, "bm1", adjacency("bm1", [], [], state="withdrawn"))
    wait_for(lambda: BM1_LO not in s.rib(), "bm1's route withdrawn", 20)
    assert BM1_LO.removesuffix("/128") not in s.fib()
    wait_for(lambda: len(stored(s.url, "route")) == 2, "two route events", 20)
    assert [(e["action"], e["reason"]) for e in stored(s.url, "route")] == [
        ("installed", "announced"),
        ("withdrawn", "withdrawn"),
    ]


def test_node_silent_for_three_intervals_is_lost(setup: Setup) -> None:
    s = setup
    s.injector()
    announce(s, "bm1", bm1_up(s, interval=1.0))
    wait_for(lambda: s.routed(BM1_LO, s.bm1, "eth0", "swp1"), "bm1's route", 20)
    installed = dt.datetime.now(dt.UTC)
    wait_for(lambda: BM1_LO not in s.rib(), "bm1 lost", 20)
    # Not before three intervals (from the stream's time, which is before `installed`).
    assert (dt.datetime.now(dt.UTC) - installed).total_seconds() > 2.0
    wait_for(lambda: len(stored(s.url, "route")) == 2, "the withdrawal event", 20)
    assert stored(s.url, "route")[-1]["reason"] == "lost"
    reply = ctl_request(s.url, subjects.ctl_query(INJECTOR, "routes"), b'{"node": "bm1"}')
    assert [(r["node"], r["state"], r["installed"]) for r in reply["routes"]] == [  # type: ignore[attr-defined]
        ("bm1", "lost", False)
    ]


def test_port_move_installs_the_new_route_before_removing_the_old(setup: Setup) -> None:
    s = setup
    s.injector()
    announce(s, "bm1", bm1_up(s))
    wait_for(lambda: s.routed(BM1_LO, s.bm1, "eth0", "swp1"), "bm1 on swp1", 20)
    announce(s, "bm1", bm1_up(s, port="swp2", ifname="eth1"))
    wait_for(lambda: s.routed(BM1_LO, s.bm1, "eth1", "swp2"), "bm1 on swp2 only", 20)
    wait_for(lambda: len(stored(s.url, "route")) == 3, "the move's events", 20)
    moved = [(e["action"], e["port"], e["reason"]) for e in stored(s.url, "route")[1:]]
    assert moved == [("installed", "swp2", "moved"), ("withdrawn", "swp1", "moved")]


# -- restarts and reconciles -----------------------------------------------------------------


def consumer_drained(url: str) -> bool:
    """Whether the injector's consumer has delivered and seen acked all it holds."""

    async def go() -> bool:
        nc = await nats.connect(url)
        try:
            name = subjects.injector_consumer(INJECTOR)
            info = await nc.jetstream().consumer_info(events.STREAM, name)
            return bool(info.num_pending == 0 and info.num_ack_pending == 0)
        finally:
            await nc.close()

    return asyncio.run(go())


def test_restart_reconciles_what_changed_while_it_was_away(setup: Setup) -> None:
    """Stopped, its routes stay; meanwhile bm1 moves, then withdraws, and bm2 appears;
    started again, bm1's route is gone and bm2's there, and the backlog its consumer kept
    (bm1's move among it) changes nothing: older than the snapshot. A route removed by hand
    comes back at the next reconcile. (Every FRR interface but lo is managed: the
    allow-file names no ports.)"""
    s = setup
    s.allow.write_text(ALLOW)
    first = s.injector()
    announce(s, "bm1", bm1_up(s))
    wait_for(lambda: s.routed(BM1_LO, s.bm1, "eth0", "swp1"), "bm1's route", 20)
    assert first.stop() == 0, first.text()
    assert s.routed(BM1_LO, s.bm1, "eth0", "swp1")  # the routes stay
    announce(s, "bm1", bm1_up(s, port="swp2", ifname="eth1"))
    announce(s, "bm1", adjacency("bm1", [], [], state="withdrawn"))
    announce(s, "bm2", adjacency("bm2", [BM2_LO], [s.uplink(s.bm2, "eth0", "swp3")]))
    s.injector("--reconcile-interval", "1")
    wait_for(lambda: s.routed(BM2_LO, s.bm2, "eth0", "swp3"), "bm2's route", 20)
    wait_for(lambda: BM1_LO not in s.rib(), "bm1's route withdrawn", 20)
    wait_for(lambda: consumer_drained(s.url), "the backlog consumed", 20)
    seen = [(e["node"], e["action"], e["port"], e["reason"]) for e in stored(s.url, "route")]
    assert seen == [
        ("bm1", "installed", "swp1", "announced"),
        ("bm2", "installed", "swp3", "reconcile"),
        ("bm1", "withdrawn", "swp1", "reconcile"),
    ]

    ll = link_local(s.bm2, "eth0")
    s.frr.vtysh("configure terminal", f"no ipv6 route {BM2_LO} {ll} swp3 tag {ROUTE_TAG}")
    assert BM2_LO not in s.rib()
    wait_for(lambda: s.routed(BM2_LO, s.bm2, "eth0", "swp3"), "bm2's route re-added", 20)


def test_another_operators_static_routes_are_never_touched(setup: Setup) -> None:
    s = setup
    theirs = [
        "ipv6 route 2001:db8:100::99/128 fe80::99 swp1 tag 100",  # inside bm1's prefixes
        "ipv6 route 2001:db8:300::1/128 fe80::98 swp3",
    ]
    s.frr.vtysh("configure terminal", *theirs)
    inj = s.injector("--reconcile-interval", "1")
    announce(s, "bm1", bm1_up(s))
    wait_for(lambda: s.routed(BM1_LO, s.bm1, "eth0", "swp1"), "bm1's route", 20)
    announce(s, "bm1", adjacency("bm1", [], [], state="withdrawn"))
    wait_for(lambda: BM1_LO not in s.rib(), "bm1's route withdrawn", 20)
    done = inj.sample("nbdnats_injector_reconciles_total")
    wait_for(lambda: inj.sample("nbdnats_injector_reconciles_total") >= done + 2, "reconciles", 20)
    running = s.frr.vtysh("show running-config")
    for line in theirs:
        assert line in running
    assert set(s.rib()) == {"2001:db8:100::99/128", "2001:db8:300::1/128"}


# -- refusals --------------------------------------------------------------------------------

OVERSIZED = b'{"node": "bm1", "pad": "' + b"x" * (70 * 1024) + b'"}'

# case -> (a bad adjacency of bm1 on bm1's subject, the refused event's code, its error)
REFUSALS: dict[str, tuple[Callable[[Setup], bytes], str, str]] = {
    "prefix_outside_the_allow_list": (
        lambda s: adjacency("bm1", ["2001:db8:999::1/128"], [s.uplink(s.bm1, "eth0", "swp1")]),
        "denied",
        "loopback 2001:db8:999::1/128 of bm1 is outside its allowed prefixes",
    ),
    "prefix_not_a_128": (
        lambda s: adjacency("bm1", ["2001:db8:100::/64"], [s.uplink(s.bm1, "eth0", "swp1")]),
        "denied",
        "loopback 2001:db8:100::/64 of bm1 is not a /128",
    ),
    "unknown_tor": (
        lambda s: adjacency("bm1", [BM1_LO], [s.uplink(s.bm1, "eth0", "swp1", tor="tor9")]),
        "denied",
        "uplink eth0 of bm1 names ToR 'tor9', which this injector does not manage",
    ),
    "unmanaged_port": (
        lambda s: adjacency("bm1", [BM1_LO], [s.uplink(s.bm1, "eth0", "swp9")]),
        "denied",
        "uplink eth0 of bm1: port 'swp9' of ToR tor1 is not a managed port",
    ),
    "next_hop_not_link_local": (
        lambda s: adjacency(
            "bm1", [BM1_LO], [s.uplink(s.bm1, "eth0", "swp1", link_local="2001:db8::1")]
        ),
        "denied",
        "next hop 2001:db8::1 is not link-local",
    ),
    "payload_node_is_not_the_subject_node": (
        lambda s: adjacency("bm2", [BM2_LO], [s.uplink(s.bm2, "eth0", "swp3")]),
        "denied",
        "an adjacency on bm1's subject names node bm2",
    ),
    "oversized": (lambda s: OVERSIZED, "schema", "at most 65536 are read"),
    "malformed_json": (lambda s: b'{"node": "bm1", loopbacks', "schema", "not JSON"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_bad_adjacency_is_refused_and_programs_nothing(setup: Setup, case: str) -> None:
    """bm1's good routes stay as they were; the refusal is published once however often
    the host repeats itself."""
    s = setup
    make, code, error = REFUSALS[case]
    inj = s.injector()
    announce(s, "bm1", bm1_up(s))
    wait_for(lambda: s.routed(BM1_LO, s.bm1, "eth0", "swp1"), "bm1's route", 20)
    rib = s.rib()
    bad = make(s)
    for _ in range(2):
        announce(s, "bm1", bad)
    refusals = f'nbdnats_injector_refusals_total{{reason="{code}"}}'
    wait_for(lambda: inj.sample(refusals) == 2, "both refusals", 20)
    wait_for(lambda: bool(stored(s.url, "refused")), "the refused event", 20)
    (ev,) = stored(s.url, "refused")
    assert (ev["node"], ev["op"], ev["code"], ev["about"]) == (INJECTOR, "adjacency", code, "bm1")
    assert error in str(ev["error"]), ev["error"]
    assert s.rib() == rib
    assert s.routed(BM1_LO, s.bm1, "eth0", "swp1")
    assert len(stored(s.url, "route")) == 1  # bm1's install, nothing since


# -- what it tells ---------------------------------------------------------------------------


def test_routes_query_answers_each_nodes_state(setup: Setup) -> None:
    s = setup
    s.injector()
    announce(s, "bm1", bm1_up(s))
    announce(s, "bm2", adjacency("bm2", ["2001:db8:100::1/128"], []))  # bm1's, not bm2's
    wait_for(lambda: s.routed(BM1_LO, s.bm1, "eth0", "swp1"), "bm1's route", 20)
    wait_for(lambda: bool(stored(s.url, "refused")), "bm2's refusal", 20)
    reply = ctl_request(s.url, subjects.ctl_query(INJECTOR, "routes"), b"{}")
    assert reply["ok"] is True and reply["injector"] == INJECTOR
    routes = {r["node"]: r for r in reply["routes"]}  # type: ignore[attr-defined]
    bm1 = routes["bm1"]
    assert (bm1["state"], bm1["loopbacks"], bm1["tor"], bm1["port"], bm1["installed"]) == (
        "up",
        [BM1_LO],
        "tor1",
        "swp1",
        True,
    )
    assert bm1["link_local"] == link_local(s.bm1, "eth0")
    assert routes["bm2"]["state"] == "refused" and not routes["bm2"]["installed"]
    assert "outside its allowed prefixes" in routes["bm2"]["error"]
    one = ctl_request(s.url, subjects.ctl_query(INJECTOR, "routes"), b'{"node": "bm2"}')
    assert [r["node"] for r in one["routes"]] == ["bm2"]  # type: ignore[attr-defined]
    other = ctl_request(s.url, subjects.ctl_query(INJECTOR, "tables"), b"{}")
    assert (other["ok"], other["code"]) == (False, "schema")


def test_metrics_count_installed_routes_refusals_and_reconciles(setup: Setup) -> None:
    s = setup
    inj = s.injector("--reconcile-interval", "1")
    announce(s, "bm1", bm1_up(s))
    announce(s, "bm2", b"not json")
    wait_for(lambda: s.routed(BM1_LO, s.bm1, "eth0", "swp1"), "bm1's route", 20)
    wait_for(lambda: inj.sample("nbdnats_injector_reconciles_total") >= 2, "a timed reconcile", 20)
    text = inj.metrics()
    assert 'nbdnats_injector_routes_installed{tor="tor1"} 1' in text
    assert 'nbdnats_injector_refusals_total{reason="schema"} 1' in text
    assert "nbdnats_injector_errors_total 0" in text
    assert "# TYPE nbdnats_injector_reconciles_total counter" in text


# -- the command line ------------------------------------------------------------------------

BAD_ALLOW = {
    "prefix": ('[nodes.bm1]\nprefixes = ["2001:db8:100::/300"]\n', "is not an IPv6 network"),
    "node_name": ('[nodes."bm 1"]\nprefixes = []\n', "invalid node name"),
    "key": ('[nodes.bm1]\nprefix = ["2001:db8::/64"]\n', "unknown key(s) prefix"),
    "tor": ('[tors.tor9]\nports = ["swp1"]\n', "no --tor tor9=VTY is given"),
    "port": ('[tors.tor1]\nports = ["-x"]\n', "is not an interface name"),
    "toml": ("[nodes.bm1\n", "is not valid TOML"),
}


@pytest.mark.parametrize("case", sorted(BAD_ALLOW))
def test_bad_allow_file_exits_2_with_one_line(tmp_path: Path, case: str) -> None:
    text, error = BAD_ALLOW[case]
    allow = tmp_path / "allow.toml"
    allow.write_text(text)
    done = run_cli("route-injector", "--tor", f"tor1={tmp_path}", "--allow-file", str(allow))
    assert done.returncode == 2
    assert error in one_line_error(done)


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["--tor", "tor1"], "use NAME=VTY"),
        (["--tor", "tor 1=DIR"], "invalid ToR name"),
        (["--tor", "tor1=/nonexistent/vty"], "no such directory"),
        (["--tor", "tor1=DIR", "--name", "a.b"], "invalid --name"),
        (["--tor", "tor1=DIR", "--metrics-addr", "nowhere"], "use HOST:PORT"),
        (["--tor", "tor1=DIR", "--reconcile-interval", "0"], "reconcile-interval"),
        (["--tor", "tor1=DIR", "--backend", "gobgp"], "invalid choice"),
    ],
)
def test_bad_command_line_exits_2_with_one_line(
    tmp_path: Path, args: list[str], error: str
) -> None:
    allow = tmp_path / "allow.toml"
    allow.write_text(ALLOW)
    argv = [a.replace("DIR", str(tmp_path)) for a in args]
    done = run_cli("route-injector", *argv, "--allow-file", str(allow))
    assert done.returncode == 2
    assert error in one_line_error(done)


# -- permissions -----------------------------------------------------------------------------


def _user(name: str, grants: tuple[list[str], list[str]], responses: bool) -> str:
    publish, subscribe = grants
    extra = ", allow_responses: true" if responses else ""
    return (
        f"{{ user: {name}, password: pw-{name}, permissions: {{ "
        f"publish: {{ allow: {json.dumps(publish)} }}, "
        f"subscribe: {{ allow: {json.dumps(subscribe)} }}{extra} }} }}"
    )


@pytest.fixture
def auth_url(tmp_path: Path) -> Iterator[str]:
    """A nats-server with JetStream whose users are the controller, nodes bm1 and bm2 and
    the injector, each with its grants from nbdnats.subjects; its host:port."""
    port = free_port()
    users = [
        _user("controller", subjects.controller_grants("ctl"), True),
        _user("bm1", subjects.node_grants("ctl", "bm1"), True),
        _user("bm2", subjects.node_grants("ctl", "bm2"), True),
        _user("injector", subjects.injector_grants(INJECTOR), False),
    ]
    conf = tmp_path / "auth.conf"
    listed = ",\n  ".join(users)
    conf.write_text(
        f'listen: "127.0.0.1:{port}"\n'
        f"jetstream {{ store_dir: {json.dumps(str(tmp_path / 'js-auth'))} }}\n"
        f"authorization {{ users = [\n  {listed}\n] }}\n"
    )
    log = (tmp_path / "auth.log").open("wb")
    proc = subprocess.Popen([nats_server_binary(), "-c", str(conf)], stdout=log, stderr=log)
    log.close()
    try:
        wait_for(lambda: port_open("127.0.0.1", port), "nats-server")
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


def _as_node(
    hostport: str, user: str, subject: str, payload: bytes, *, refused: bool = False
) -> list[str]:
    """Publish as ``user`` (a plain publish, as an agent does); the server's errors (when
    ``refused``, once one has come)."""
    errors: list[str] = []

    async def go() -> None:
        async def on_error(e: Exception) -> None:
            errors.append(str(e))

        nc = await nats.connect(f"nats://{user}:pw-{user}@{hostport}", error_cb=on_error)
        try:
            await nc.publish(subject, payload)
            await nc.flush()  # the server's -ERR for the publish comes before its PONG
            for _ in range(500 if refused else 5):
                if errors:
                    break
                await asyncio.sleep(0.01)
        finally:
            await nc.close()

    asyncio.run(go())
    return errors


def test_node_cannot_speak_for_another_and_injector_user_can_run(
    setup: Setup, auth_url: str, tmp_path: Path
) -> None:
    """The injector's user (subjects.injector_grants) creates its consumer, reads the
    snapshot, pulls, answers and publishes; restarted, it binds to its consumer again."""
    s = setup

    async def make_stream() -> None:  # the controller's job, as in the dev topology
        nc = await nats.connect(f"nats://controller:pw-controller@{auth_url}")
        try:
            assert await events.ensure_stream(nc) is None
        finally:
            await nc.close()

    asyncio.run(make_stream())
    url = f"nats://injector:pw-injector@{auth_url}"
    inj = s.injector("--reconcile-interval", "1", url=url)
    subject = subjects.ctl_event("bm1", subjects.ADJACENCY)
    # bm2 claims to be bm1 (its own loopback, but on bm1's subject): the server refuses.
    forged = adjacency("bm1", ["2001:db8:100::5/128"], [s.uplink(s.bm2, "eth0", "swp3")])
    errors = _as_node(auth_url, "bm2", subject, forged, refused=True)
    assert any("permissions violation" in e.lower() for e in errors), errors
    # bm1 speaks for itself: installed by an injector that holds only its own grants.
    assert _as_node(auth_url, "bm1", subject, bm1_up(s)) == []
    wait_for(lambda: s.routed(BM1_LO, s.bm1, "eth0", "swp1"), "bm1's route", 20)
    assert "2001:db8:100::5/128" not in s.rib()
    reply = ctl_request(
        f"nats://controller:pw-controller@{auth_url}",
        subjects.ctl_query(INJECTOR, "routes"),
        b"{}",
    )
    assert [r["node"] for r in reply["routes"]] == ["bm1"]  # type: ignore[attr-defined]
    wait_for(lambda: inj.sample("nbdnats_injector_reconciles_total") >= 2, "reconciles", 20)
    assert inj.sample("nbdnats_injector_errors_total") == 0, inj.text()
    assert inj.stop() == 0, inj.text()
    again = s.injector(url=url)
    assert _as_node(auth_url, "bm1", subject, bm1_up(s, port="swp2", ifname="eth1")) == []
    wait_for(lambda: s.routed(BM1_LO, s.bm1, "eth1", "swp2"), "bm1 moved", 20)
    assert again.stop() == 0, again.text()
    assert "user:injector" not in (tmp_path / "auth.log").read_text()
