"""Network namespaces standing in for a rack: a ToR running FRR (zebra + staticd) and
lldpd, bare-metal hosts running lldpd and the agent, a far host behind the ToR. Each test
makes its own namespaces and veth links (names carry a per-test suffix so tests never meet)
and removes them; traffic stays between them.

Every daemon runs in the foreground of a process this module keeps, with its sockets, pid
and config files under the test's directory: nothing touches /etc/frr or /run/lldpd.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tests.waits import wait_for

FRR_DIR = Path("/usr/lib/frr")


def run(*argv: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: rc {proc.returncode}: {proc.stderr.strip()}")
    return proc


@dataclass
class Netns:
    name: str
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    cleanup: list[Callable[[], None]] = field(default_factory=list)

    def argv(self, *argv: str) -> list[str]:
        """``argv`` run inside this namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def run(
        self, *argv: str, check: bool = True, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        return run(*self.argv(*argv), check=check, timeout=timeout)

    def ip_json(self, *args: str) -> list[dict[str, object]]:
        out = run("ip", "-n", self.name, "-j", *args).stdout
        return list(json.loads(out or "[]"))

    def spawn(
        self, argv: list[str], log: Path, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """A daemon in this namespace, in the foreground, stopped at teardown."""
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                self.argv(*argv),
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        self.procs.clear()
        for undo in self.cleanup:
            undo()
        self.cleanup.clear()


class Rack:
    """Namespaces and links of one test. ``ns("tor")`` makes (or returns) a namespace;
    ``link(a, "swp1", b, "eth0")`` a veth pair between two of them, both ends up."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.suffix = uuid.uuid4().hex[:6]
        self.spaces: dict[str, Netns] = {}
        self.mgmt_links: list[str] = []

    def ns(self, name: str) -> Netns:
        if name not in self.spaces:
            full = f"nbdn-{name}-{self.suffix}"
            run("ip", "netns", "add", full)
            ns = Netns(full)
            self.spaces[name] = ns
            run("ip", "-n", full, "link", "set", "lo", "up")
            # No duplicate address detection: a link-local address is usable at once.
            ns.run("sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0")
            ns.run("sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0")
        return self.spaces[name]

    def link(self, a: Netns, a_if: str, b: Netns, b_if: str) -> None:
        run(
            "ip",
            "link",
            "add",
            a_if,
            "netns",
            a.name,
            "type",
            "veth",
            "peer",
            "name",
            b_if,
            "netns",
            b.name,
        )
        for ns, ifname in ((a, a_if), (b, b_if)):
            run("ip", "-n", ns.name, "link", "set", ifname, "up")
        for ns, ifname in ((a, a_if), (b, b_if)):
            wait_for(
                lambda ns=ns, ifname=ifname: link_local(ns, ifname) is not None,  # type: ignore[misc]
                f"{ns.name}/{ifname} link-local",
            )

    def mgmt(self, ns: Netns) -> tuple[str, str]:
        """A management link between the test's own namespace and ``ns`` (as a host's
        out-of-band network to its control plane): (our address, its address) in a ULA /64
        of this test. A nats-server bound to ours serves agents running in ``ns`` (and in every
        namespace given a management link)."""
        net = f"fd{self.suffix[:2]}:{self.suffix[2:6]}:{len(self.mgmt_links):x}"
        here, there = f"m{len(self.mgmt_links)}-{self.suffix}", "mgmt0"
        run("ip", "link", "add", here, "type", "veth", "peer", "name", there, "netns", ns.name)
        run("ip", "-6", "addr", "add", f"{net}::1/64", "dev", here, "nodad")
        run("ip", "-n", ns.name, "-6", "addr", "add", f"{net}::2/64", "dev", there, "nodad")
        run("ip", "link", "set", here, "up")
        run("ip", "-n", ns.name, "link", "set", there, "up")
        # Every management address of this test is reachable from each namespace (a server
        # bound to the first link's address serves agents on the others).
        site = f"fd{self.suffix[:2]}:{self.suffix[2:6]}::/48"
        run("ip", "-n", ns.name, "-6", "route", "add", site, "via", f"{net}::1")
        self.mgmt_links.append(here)
        return f"{net}::1", f"{net}::2"

    def unlink(self, ns: Netns, ifname: str) -> None:
        """Remove a veth pair (by either end): a cable pulled."""
        run("ip", "-n", ns.name, "link", "del", ifname)

    def close(self) -> None:
        for ns in self.spaces.values():
            ns.stop_all()
        for ns in self.spaces.values():
            run("ip", "netns", "del", ns.name, check=False)
        for here in self.mgmt_links:  # gone with their namespace's end, unless it lingers
            run("ip", "link", "del", here, check=False)
        self.spaces.clear()


def link_local(ns: Netns, ifname: str) -> str | None:
    for entry in ns.ip_json("-6", "addr", "show", "dev", ifname, "scope", "link"):
        for a in entry.get("addr_info", []):  # type: ignore[attr-defined]
            if a.get("scope") == "link" and not a.get("tentative"):
                return str(a["local"])
    return None


@contextmanager
def rack(root: Path) -> Iterator[Rack]:
    r = Rack(root)
    try:
        yield r
    finally:
        r.close()


# -- lldpd ---------------------------------------------------------------------------------


@dataclass
class Lldpd:
    ns: Netns
    socket: Path

    def cli(self, *args: str) -> str:
        return run("lldpcli", "-u", str(self.socket), *args).stdout

    def neighbours(self) -> dict[str, object]:
        return dict(json.loads(self.cli("-f", "json0", "show", "neighbors")))


def start_lldpd(ns: Netns, root: Path, *interfaces: str, hostname: str | None = None) -> Lldpd:
    """lldpd in ``ns`` on ``interfaces``, sending every second; ``hostname`` is its system
    name (a ToR's), and its port ids are interface names, as a switch sends them."""
    # As FRR's, its socket lives in a directory of its own in /tmp: lldpcli cannot reach one
    # in a test's directory (mode 0700).
    home = Path(tempfile.mkdtemp(prefix=f"{ns.name}-lldpd-"))
    home.chmod(0o755)
    ns.cleanup.append(lambda: shutil.rmtree(home, ignore_errors=True))
    sock = home / "lldpd.sock"
    ns.spawn(
        ["lldpd", "-d", "-u", str(sock), "-O", "/dev/null", "-I", ",".join(interfaces)],
        root / f"lldpd-{ns.name}.log",
    )
    lldpd = Lldpd(ns, sock)
    # The socket appears before lldpd accepts on it (and is refused until then).
    wait_for(
        lambda: (
            run("lldpcli", "-u", str(sock), "show", "configuration", check=False).returncode == 0
        ),
        f"lldpd in {ns.name}",
        timeout=30,
    )
    if hostname:
        lldpd.cli("configure", "system", "hostname", hostname)
    lldpd.cli("configure", "lldp", "portidsubtype", "ifname")
    lldpd.cli("configure", "lldp", "tx-interval", "1")
    return lldpd


# -- FRR -----------------------------------------------------------------------------------


@dataclass
class Frr:
    """zebra + staticd in a namespace; ``vty`` is the directory of their vty sockets (what
    ``route-injector --tor NAME=VTY`` takes)."""

    ns: Netns
    vty: Path

    def vtysh(self, *commands: str) -> str:
        argv = ["vtysh", "--vty_socket", str(self.vty)]
        for c in commands:
            argv += ["-c", c]
        return run(*argv).stdout

    def static_routes(self) -> dict[str, object]:
        """FRR's RIB for static IPv6 routes (``show ipv6 route static json``)."""
        return dict(json.loads(self.vtysh("show ipv6 route static json") or "{}"))

    def kernel_routes(self) -> list[dict[str, object]]:
        """The ToR namespace's kernel FIB (IPv6)."""
        return self.ns.ip_json("-6", "route", "show")


def start_frr(ns: Netns, root: Path) -> Frr:
    """FRR's zebra and staticd in ``ns``, forwarding IPv6, with empty configs."""
    if not (FRR_DIR / "zebra").exists():
        raise RuntimeError("FRR is not installed (apt-get install frr)")
    # FRR drops to the frr user, who cannot enter a test's directory: its own, in /tmp.
    vty = Path(tempfile.mkdtemp(prefix=f"{ns.name}-frr-"))
    vty.chmod(0o755)
    shutil.chown(vty, "frr", "frr")
    ns.cleanup.append(lambda: shutil.rmtree(vty, ignore_errors=True))
    conf = vty / "empty.conf"
    conf.write_text("")
    ns.run("sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
    common = [
        "-f",
        str(conf),
        "-z",
        str(vty / "zserv.api"),
        "--vty_socket",
        str(vty),
        "-A",
        "127.0.0.1",
        "-P",
        "0",
    ]
    ns.spawn(
        [str(FRR_DIR / "zebra"), "-i", str(vty / "zebra.pid"), *common],
        root / f"zebra-{ns.name}.log",
    )
    wait_for((vty / "zserv.api").exists, f"zebra in {ns.name}", timeout=30)
    ns.spawn(
        [str(FRR_DIR / "staticd"), "-i", str(vty / "staticd.pid"), *common],
        root / f"staticd-{ns.name}.log",
    )
    wait_for((vty / "staticd.vty").exists, f"staticd in {ns.name}", timeout=30)
    return Frr(ns, vty)


def start_bgpd(frr: Frr, root: Path) -> Frr:
    """FRR's bgpd beside the zebra of ``frr`` (started by ``start_frr``), listening on port
    179 of its namespace, with no BGP configuration: configure it through ``frr.vtysh``."""
    ns, vty = frr.ns, frr.vty
    ns.spawn(
        [
            str(FRR_DIR / "bgpd"),
            *("-i", str(vty / "bgpd.pid"), "-f", str(vty / "empty.conf")),
            *("-z", str(vty / "zserv.api"), "--vty_socket", str(vty)),
            *("-A", "127.0.0.1", "-P", "0", "-p", "179"),
        ],
        root / f"bgpd-{ns.name}.log",
    )
    wait_for((vty / "bgpd.vty").exists, f"bgpd in {ns.name}", timeout=30)
    return frr


# -- gobgpd --------------------------------------------------------------------------------


@dataclass
class Gobgpd:
    """gobgpd in a namespace; ``api`` is its gRPC address as ``gobgp -u/-p`` and
    ``GobgpAnnouncer`` take it, ``proc`` its process (``stop()`` ends it early)."""

    ns: Netns
    api: str
    proc: subprocess.Popen[bytes]

    def gobgp(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        host, _, port = self.api.rpartition(":")
        return run("gobgp", "-u", host.strip("[]"), "-p", port, *args, check=check)

    def established(self) -> bool:
        """Whether the session with its (first) neighbour is up (gobgp's JSON gives the
        state as the number of its API's enum: 6 is ESTABLISHED)."""
        peers = json.loads(self.gobgp("neighbor", "-j").stdout or "[]")
        return bool(peers) and peers[0]["state"].get("session_state") == 6

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(10)


def start_gobgpd(
    ns: Netns,
    root: Path,
    *,
    asn: int,
    router_id: str,
    api_host: str,
    neighbour: tuple[str, int] | None = None,
) -> Gobgpd:
    """gobgpd in ``ns`` (AS ``asn``) with its API on ``api_host`` port 50051 (an address of
    ``ns``, such as the far end of ``Rack.mgmt``) and one IPv6 unicast eBGP ``neighbour``
    (address, AS), retried every second."""
    conf = root / f"gobgpd-{ns.name}.toml"
    lines = ["[global.config]", f"  as = {asn}", f'  router-id = "{router_id}"', "  port = 179"]
    if neighbour:
        lines += [
            "[[neighbors]]",
            "  [neighbors.config]",
            f'    neighbor-address = "{neighbour[0]}"',
            f"    peer-as = {neighbour[1]}",
            "  [neighbors.timers.config]",
            "    connect-retry = 1",
            "  [[neighbors.afi-safis]]",
            "    [neighbors.afi-safis.config]",
            '      afi-safi-name = "ipv6-unicast"',
        ]
    conf.write_text("\n".join(lines) + "\n")
    api = f"[{api_host}]:50051" if ":" in api_host else f"{api_host}:50051"
    proc = ns.spawn(
        ["gobgpd", "-t", "toml", "-f", str(conf), "--api-hosts", api],
        root / f"gobgpd-{ns.name}.log",
    )
    gobgpd = Gobgpd(ns, api, proc)
    wait_for(
        lambda: gobgpd.gobgp("global", "-j", check=False).returncode == 0,
        f"gobgpd in {ns.name}",
        timeout=30,
    )
    return gobgpd
