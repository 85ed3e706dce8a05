"""A NATS server that dies for good, or goes silent for a while; a receiver that freezes.

A server SIGKILLed and never restarted: ``--timeout`` bounds the time without a connection
too, every end says so in one line, and SIGTERM/SIGINT end a process that waits forever.
A server cut off (packets vanish) for longer than TCP's first retransmissions: the transfer
recovers about a second after the path is back, within the default ``--timeout``. A sender
whose receiver froze does not tell the user to start a second receiver.
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from nbdnats.embedded import EmbeddedServer, nats_server_binary
from tests.cli import NBD_NATS, cli_env, finish_json, one_line_error, start_cli
from tests.images import MiB, allocated, holds, make_image, sha256_file, throttled_nbd
from tests.nats_server import NatsServer
from tests.waits import wait_for

SIZE = 96 * MiB
RATE = 8 * MiB  # a throttled source: about twelve seconds, so the server can die mid-way
TIMEOUT = 5  # short: the tests wait it out, and only its being a bound is under test
# A dead server is noticed at once (the socket closes) or by the pings (10 to 15 s); then
# --timeout runs. Generous: the machine may be loaded.
MARGIN = 25


def kill_for_good(server: NatsServer) -> float:
    """SIGKILL the server and never restart it; when it died."""
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait()
    return time.monotonic()


def ended(
    proc: subprocess.Popen[bytes], since: float, bound: float
) -> tuple[subprocess.CompletedProcess[bytes], float]:
    """Wait for ``proc`` at most ``bound`` seconds after ``since``: how it ended, and when
    (seconds after ``since``)."""
    try:
        out, err = proc.communicate(timeout=max(0.1, since + bound - time.monotonic()))
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"still running {bound:.0f} s later; stderr={err.decode()!r}")
    took = time.monotonic() - since
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), took


def test_transfer_gives_up_when_its_only_server_dies(tmp_path: Path, start_nats) -> None:  # type: ignore[no-untyped-def]
    """The only server is SIGKILLed mid-transfer and never comes back: both ends fail with
    one line within --timeout (plus the bounded shutdown), not reconnect for ever."""
    server = start_nats()
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    make_image(src, SIZE, [(0, SIZE)])
    common = ("--id", "gone", "--data-url", server.url, "--timeout", str(TIMEOUT))
    with throttled_nbd(src, tmp_path / "src.sock", read_bps=RATE) as (_, uri):
        recv = start_cli("recv", str(dst), *common)
        send = start_cli("send", uri, *common)
        wait_for(holds(dst, 8 * MiB), "data", 60)
        died = kill_for_good(server)
        for name, proc in (("sender", send), ("receiver", recv)):
            done, took = ended(proc, died, TIMEOUT + MARGIN)
            line = one_line_error(done)
            print(f"{name} ended {took:.1f} s after the server died: {line}")


def test_copy_gives_up_when_its_data_server_dies(tmp_path: Path, start_nats) -> None:  # type: ignore[no-untyped-def]
    """The same for copy, both ends in one process, on the server given with --data-url."""
    server = start_nats()
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    make_image(src, SIZE, [(0, SIZE)])
    with throttled_nbd(src, tmp_path / "src.sock", read_bps=RATE) as (_, uri):
        copy = start_cli("copy", uri, str(dst), "--data-url", server.url, "--timeout", str(TIMEOUT))
        wait_for(holds(dst, 8 * MiB), "data", 60)
        died = kill_for_good(server)
        done, took = ended(copy, died, TIMEOUT + MARGIN)
    line = one_line_error(done)
    print(f"copy ended {took:.1f} s after the server died: {line}")


@pytest.mark.parametrize(("sig", "want"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
@pytest.mark.parametrize("role", ["recv", "send"])
def test_signal_ends_a_process_that_waits_forever_for_a_dead_server(  # type: ignore[no-untyped-def]
    tmp_path: Path, start_nats, role: str, sig: signal.Signals, want: int
) -> None:
    """--timeout 0 waits for the server to come back; the user can still stop it."""
    server = start_nats()
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    make_image(src, SIZE, [(0, SIZE)])
    common = ("--id", "forever", "--data-url", server.url, "--timeout", "0")
    with throttled_nbd(src, tmp_path / "src.sock", read_bps=RATE) as (_, uri):
        recv = start_cli("recv", str(dst), *common)
        send = start_cli("send", uri, *common)
        wait_for(holds(dst, 8 * MiB), "data", 60)
        kill_for_good(server)
        victim = recv if role == "recv" else send
        # Its socket closed with the server, so it has been reconnecting (to a dead port)
        # since: let it do so for a while, as a user would before giving up. The wait is
        # the case under test (it must still be waiting after it), not a synchronisation.
        time.sleep(2)
        assert victim.poll() is None, victim.communicate()[1].decode()
        victim.send_signal(sig)
        sent = time.monotonic()
        done, took = ended(victim, sent, 10)
    err = done.stderr.decode()
    assert done.returncode == want, err
    assert "Traceback" not in err, err
    assert len([line for line in err.splitlines() if line.strip()]) == 1, err
    print(f"{role} ended {took:.1f} s after {sig.name}: {err.strip()!r}")


@dataclass
class Netns:
    """A nats-server in a network namespace, its clients in a second, a router in a third
    between them (two veth pairs, IPv6 ULA addresses): nothing else is on that path.

    The cut is a blackhole route in the router: packets in both directions vanish in the
    network, as on a failed link, and the ends' own stacks see nothing. (A blackhole route
    in a client's own namespace is not that: its TCP sees each send fail locally and
    retries every half second instead of backing off, so nothing old stays stuck.)"""

    server_ns: str
    router_ns: str
    client_ns: str
    server_addr: str
    client_addr: str

    def run(self, ns: str, *args: str) -> None:
        subprocess.run(["ip", "-n", ns, *args], check=True, capture_output=True)

    def mac(self, ns: str, ifname: str) -> str:
        out = subprocess.run(
            ["ip", "-n", ns, "-j", "link", "show", "dev", ifname],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        return str(json.loads(out)[0]["address"])

    def blackhole(self, on: bool) -> None:
        verb = "add" if on else "del"
        for addr in (self.server_addr, self.client_addr):
            self.run(self.router_ns, "-6", "route", verb, "blackhole", f"{addr}/128")


@contextlib.contextmanager
def namespaces() -> Iterator[Netns]:
    suffix = secrets.token_hex(3)
    names = [f"nbdnats-t-{role}{suffix}" for role in ("srv", "rtr", "cli")]
    made = subprocess.run(["ip", "netns", "add", names[0]], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot create a network namespace (needs root): {made.stderr.strip()}")
    try:
        for ns in names[1:]:
            subprocess.run(["ip", "netns", "add", ns], check=True, capture_output=True)
        g = secrets.token_hex(5)  # a ULA prefix: fd + a random 40-bit global id
        server_net, client_net = (
            f"fd{g[:2]}:{g[2:6]}:{g[6:10]}:1",
            f"fd{g[:2]}:{g[2:6]}:{g[6:10]}:2",
        )
        server_ns, router_ns, client_ns = names
        net = Netns(server_ns, router_ns, client_ns, f"{server_net}::1", f"{client_net}::1")
        for end, subnet, side in ((server_ns, server_net, "s"), (client_ns, client_net, "c")):
            outer, inner = f"nbt{suffix}{side}0", f"nbt{suffix}{side}1"
            peer = ("peer", "name", inner, "netns", router_ns)
            subprocess.run(
                ["ip", "-n", end, "link", "add", outer, "type", "veth", *peer],
                check=True,
                capture_output=True,
            )
            for ns, ifname in ((end, outer), (router_ns, inner), (end, "lo")):
                net.run(ns, "link", "set", ifname, "up")
            # nodad: usable at once, not after duplicate address detection; and fixed
            # neighbours: neighbour discovery between fresh namespaces proved unreliable.
            net.run(end, "addr", "add", f"{subnet}::1/64", "dev", outer, "nodad")
            net.run(router_ns, "addr", "add", f"{subnet}::2/64", "dev", inner, "nodad")
            for ns, ifname, peer_ns, peer_if, peer in (
                (end, outer, router_ns, inner, "2"),
                (router_ns, inner, end, outer, "1"),
            ):
                mac = net.mac(peer_ns, peer_if)
                entry = ("lladdr", mac, "dev", ifname, "nud", "permanent")
                net.run(ns, "-6", "neigh", "replace", f"{subnet}::{peer}", *entry)
            net.run(end, "-6", "route", "add", "default", "via", f"{subnet}::2")
        subprocess.run(
            ["ip", "netns", "exec", router_ns, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"],
            check=True,
            capture_output=True,
        )
        yield net
    finally:
        for ns in names:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_transfer_recovers_after_a_35s_blackhole(tmp_path: Path) -> None:
    """The path to the only server is cut (packets vanish, nothing is refused) for 35 s,
    then restored: the pings notice the silent server, the reconnects retry every second,
    and a transfer with the default 60 s --timeout finishes intact, promptly."""
    size, rate, cut = 64 * MiB, 8 * MiB, 35.0
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    want = make_image(src, size, [(0, size)])
    procs: list[subprocess.Popen[bytes]] = []
    with namespaces() as net, throttled_nbd(src, tmp_path / "src.sock", read_bps=rate) as (_, uri):
        try:
            cfg = EmbeddedServer(net.server_addr, max_payload=8 * MiB)
            cfg.port = 4222
            conf = tmp_path / "nats.conf"
            conf.write_text(cfg.config(tmp_path / "js"))
            with (tmp_path / "nats.log").open("wb") as log:
                server = subprocess.Popen(
                    ["ip", "netns", "exec", net.server_ns, nats_server_binary(), "-c", str(conf)],
                    stdout=log,
                    stderr=log,
                )
            procs.append(server)

            def in_clients(*args: str) -> subprocess.Popen[bytes]:
                proc = subprocess.Popen(
                    ["ip", "netns", "exec", net.client_ns, NBD_NATS, *args],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    env=cli_env(),
                )
                procs.append(proc)
                return proc

            common = ("--id", "bh", "--data-url", cfg.url, "--json")
            wait_for(lambda: "Server is ready" in (tmp_path / "nats.log").read_text(), "nats")
            recv = in_clients("recv", str(dst), *common)
            send = in_clients("send", uri, *common)
            wait_for(holds(dst, 8 * MiB), "data", 60)
            net.blackhole(True)
            # No fixed sleep could be replaced here: the cut lasts this long by design.
            time.sleep(cut)
            held = allocated(dst)
            net.blackhole(False)
            lifted = time.monotonic()
            wait_for(lambda: allocated(dst) > held or recv.poll() is not None, "recovery", 60)
            recovered = time.monotonic() - lifted
            sent, got = finish_json(send), finish_json(recv)
            done = time.monotonic() - lifted
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                proc.communicate()
    print(
        f"blackhole {cut:.0f} s; data flowed again {recovered:.1f} s "
        f"after it lifted, transfer done {done:.1f} s after"
    )
    assert sha256_file(dst) == want
    assert sent["digest"] == got["digest"]
    # The pings found the old connections dead during the cut and the reconnects retry
    # every second: data flows within a second or two of the path coming back (measured
    # 0.2 to 0.9 s, 1.6 s under load). Before, it waited for TCP's next retransmission on
    # the old connection (its backoff doubles past 25 s): 20 s after a 35 s cut.
    assert recovered < 10, f"data flowed again only {recovered:.1f} s after the path was back"


def test_sender_does_not_call_a_frozen_receiver_gone(tmp_path: Path, start_nats) -> None:  # type: ignore[no-untyped-def]
    """The receiver is frozen (SIGSTOP) for longer than the sender's --timeout: the sender
    cannot tell a frozen receiver from a dead one, so it must not tell the user to start
    `recv --resume` while that recv may still run. Thawed, the receiver ends too (its
    sender left), keeps its journal and says how to resume; the resume then finishes."""
    server = start_nats()
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    want = make_image(src, SIZE, [(0, SIZE)])
    common = ("--id", "frozen", "--data-url", server.url, "--timeout", str(TIMEOUT))
    with throttled_nbd(src, tmp_path / "src.sock", read_bps=RATE) as (_, uri):
        recv = start_cli("recv", str(dst), *common)
        send = start_cli("send", uri, *common)
        # Past the receiver's first journal checkpoint (5 s in): there is progress to keep.
        wait_for(holds(dst, 56 * MiB), "data", 60)
        recv.send_signal(signal.SIGSTOP)
        try:
            done, took = ended(send, time.monotonic(), TIMEOUT + MARGIN)
        finally:
            recv.send_signal(signal.SIGCONT)
        line = one_line_error(done)
        print(f"sender ended {took:.1f} s after the receiver froze: {line}")
        assert "no receiver" not in line and "start `nbd-nats recv" not in line, line
        assert "if its recv has ended" in line, line
        done, took = ended(recv, time.monotonic(), MARGIN)
        line = one_line_error(done)
        print(f"receiver ended {took:.1f} s after it thawed: {line}")
        match = re.search(r"progress is kept in (\S+): run the same recv with --resume", line)
        assert match, line
        assert Path(match.group(1)).is_file(), line
        # The hint holds: both ends resume and finish the transfer.
        recv = start_cli("recv", str(dst), *common, "--resume", "--json")
        send = start_cli("send", uri, *common, "--resume", "--json")
        sent, got = finish_json(send), finish_json(recv)
    assert sha256_file(dst) == want
    assert sent["digest"] == got["digest"]
