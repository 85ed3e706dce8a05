"""`nbd-nats dev`: the development topology as real local processes.

Every test that brings a topology up brings it down again and checks, by command line,
that no process of it is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.request import urlopen

import nats
import pytest

from tests.cli import NBD_NATS, one_line_error, run_cli
from tests.images import sha256_nbd
from tests.metal_images import InstallerBase
from tests.waits import until, wait_for


def leftovers(root: Path) -> list[str]:
    """Processes whose command line names the state directory (configs, sockets)."""
    out = subprocess.run(["pgrep", "-af", str(root)], capture_output=True, text=True)
    return [line for line in out.stdout.splitlines() if "pgrep" not in line]


def up(root: Path, *args: str) -> dict[str, Any]:
    """dev up; its state as `dev status --json` prints it, with the passwords, which only
    the state file holds (mode 0600), added."""
    done = run_cli("dev", "up", "--state-dir", str(root), *args, timeout=90)
    assert done.returncode == 0, done.stderr.decode()
    status = run_cli("dev", "status", "--state-dir", str(root), "--json")
    assert status.returncode == 0, status.stderr.decode()
    state: dict[str, Any] = json.loads(status.stdout)
    assert all(row["running"] for row in state["status"])
    assert (root / "dev.json").stat().st_mode & 0o777 == 0o600
    state["passwords"] = json.loads((root / "dev.json").read_text())["passwords"]
    printed = done.stdout + status.stdout
    assert not [u for u, p in state["passwords"].items() if p.encode() in printed]
    return state


def down(root: Path) -> None:
    done = run_cli("dev", "down", "--state-dir", str(root), timeout=60)
    assert done.returncode == 0, done.stderr.decode()
    assert leftovers(root) == []
    assert not (root / "dev.json").exists()


def url(state: dict[str, Any], name: str, user: str | None = None, scheme: str = "nats") -> str:
    server = next(s for s in state["servers"] if s["name"] == name)
    host = f"[{state['host']}]" if ":" in state["host"] else state["host"]
    auth = f"{user}:{state['passwords'][user]}@" if user else ""
    return f"{scheme}://{auth}{host}:{server['port']}"


def start(*args: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("NBDNATS_")}
    return subprocess.Popen(
        [NBD_NATS, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**clean, **env}
    )


def transfer(
    transfer_id: str,
    src: str,
    dst: str,
    send_args: list[str],
    recv_args: list[str],
    env: dict[str, str] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    common = ["--id", transfer_id, "--json", "--timeout", "30"]
    recv = start("recv", dst, *common, *recv_args, env=env or {})
    send = start("send", src, *common, *send_args, env=env or {})
    out_s, err_s = send.communicate(timeout=60)
    out_r, err_r = recv.communicate(timeout=60)
    assert (send.returncode, recv.returncode) == (0, 0), (err_s, err_r)
    sent, got = json.loads(out_s), json.loads(out_r)
    assert sent["digest"] == got["digest"]
    return sent, got


@pytest.fixture(scope="module")
def topology(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, Any]]]:
    root = tmp_path_factory.mktemp("dev") / "state"
    state = up(root)
    try:
        yield root, state
    finally:
        down(root)


def ends(state: dict[str, Any], node: str, data: str, ctl: str, scheme: str = "nats") -> list[str]:
    """The options of one end: logged in as ``node`` on servers ``data`` and ``ctl``."""
    return [
        *("--node", node),
        *("--data-url", url(state, data, node, scheme)),
        *("--ctl-url", url(state, ctl, node, scheme)),
    ]


def copy_node1_disk(
    state: dict[str, Any],
    transfer_id: str,
    dst: Path,
    sender: tuple[str, ...],
    receiver: tuple[str, ...],
    env: dict[str, str] | None = None,
) -> Path:
    """Send node1's disk from its NBD export into the file ``dst``, each end given the
    options ``ends(state, *sender)`` and ``ends(state, *receiver)``; the image file that
    export serves, which ``dst`` must now equal."""
    node1 = state["nodes"][0]
    transfer(transfer_id, node1["nbd"], str(dst), ends(state, *sender), ends(state, *receiver), env)
    return Path(node1["image"])


def test_transfer_across_the_data_cluster(tmp_path: Path) -> None:
    """dev up; node1's disk goes from data-1 to node2's disk through data-3 (two servers
    of the routed cluster), both ends logged in as their node with only their node's
    permissions; both end-of-transfer events reach the controller on the ctl cluster;
    equal sha256; dev down leaves no process."""
    root = tmp_path / "state"
    state = up(root, "--racks", "2")
    try:
        node1, node2 = state["nodes"]
        want = sha256_nbd(node1["nbd"])
        assert sha256_nbd(node2["nbd"]) != want

        async def watched() -> set[str]:
            controller = await nats.connect(url(state, "ctl-2", "controller"))
            try:
                events = await controller.subscribe("ctl.evt.*.transfer")
                await controller.flush()
                sent, _ = await asyncio.to_thread(
                    transfer,
                    "dev-cross-1",
                    node1["nbd"],
                    node2["nbd"],
                    ends(state, "node1", "data-1", "ctl-1"),
                    ends(state, "node2", "data-3", "ctl-3"),
                )
                assert sent["data_bytes"] > 0
                subjects = set()
                for _ in range(10):
                    subjects.add((await events.next_msg(timeout=10)).subject)
                    if len(subjects) == 2:
                        break
                return subjects
            finally:
                await controller.close()

        assert asyncio.run(watched()) == {"ctl.evt.node1.transfer", "ctl.evt.node2.transfer"}
        assert sha256_nbd(node2["nbd"]) == want
    finally:
        down(root)
    assert not root.exists()


def test_transfer_between_rack_leafnodes_over_tls(
    tmp_path: Path, topology: tuple[Path, dict[str, Any]]
) -> None:
    """Each end on its rack's leafnode (rack-1 -> data cluster -> rack-2) and ctl on the
    ctl cluster, all over TLS verified against the dev CA (SSL_CERT_FILE, which both NATS
    clients honour)."""
    root, state = topology
    dst = tmp_path / "copy.img"
    sender, receiver = ("node1", "rack-1", "ctl-1", "tls"), ("node2", "rack-2", "ctl-2", "tls")
    tls = {"SSL_CERT_FILE": str(root / "tls" / "ca.pem")}
    image = copy_node1_disk(state, "dev-leaf", dst, sender, receiver, tls)
    assert dst.read_bytes() == image.read_bytes()


def test_a_node_publishes_and_subscribes_only_on_its_own_subjects(
    topology: tuple[Path, dict[str, Any]],
) -> None:
    """A node publishes only its own ctl events and subscribes only to its own commands;
    the controller, on another server of the ctl cluster, sees the allowed event only."""
    _, state = topology

    async def check() -> None:
        errors: list[str] = []

        async def on_error(e: Exception) -> None:
            errors.append(str(e))

        controller = await nats.connect(url(state, "ctl-2", "controller"))
        node1 = await nats.connect(
            url(state, "ctl-1", "node1"), error_cb=on_error, max_reconnect_attempts=0
        )
        try:
            events = await controller.subscribe("ctl.evt.>")
            await controller.flush()
            deadline = time.monotonic() + 60  # until the interest crosses the route to ctl-1
            while True:
                await node1.publish("ctl.evt.node1.hello", b"1")
                try:
                    msg = await events.next_msg(timeout=0.1)
                    break
                except TimeoutError:
                    if time.monotonic() > deadline:
                        raise
            assert msg.subject == "ctl.evt.node1.hello"
            for subject in ("ctl.evt.node2.hello", "ctl.cmd.node2.stop", "data.blk.x.c"):
                await node1.publish(subject, b"x")
            await node1.subscribe("ctl.cmd.node2.>")
            await node1.flush()
            await until(lambda: len(errors) >= 4, "the four permission violations", 60)
            violations = " ".join(errors)
            for subject in ("ctl.evt.node2.hello", "ctl.cmd.node2.stop", "data.blk.x.c"):
                assert f'publish to "{subject}"' in violations
            assert 'subscription to "ctl.cmd.node2.>"' in violations
            for _ in range(200):  # nothing but node1's own events reached the controller
                try:
                    msg = await events.next_msg(timeout=0.3)
                except TimeoutError:
                    break
                assert msg.subject == "ctl.evt.node1.hello"
            # ...and JetStream keeps them, replicated on the three ctl servers.
            info = json.loads(
                (await controller.request("$JS.API.STREAM.INFO.CTL_EVENTS", b"", timeout=5)).data
            )
            assert info["state"]["messages"] >= 1
            assert info["config"]["num_replicas"] == 3
            assert len(info["cluster"]["replicas"]) == 2
        finally:
            await node1.close()
            await controller.close()

    asyncio.run(check())


def test_agents_serve_the_controller_with_node_credentials(
    topology: tuple[Path, dict[str, Any]],
) -> None:
    """Each node's agent runs logged in as that node; the controller (its own login) lists
    them and copies node1's disk into node2's directory through them."""
    _, state = topology
    ctl_url = ",".join(url(state, f"ctl-{i}", "controller") for i in (1, 2, 3))
    nodes = run_cli("ctl", "--ctl-url", ctl_url, "--json", "nodes")
    assert nodes.returncode == 0, nodes.stderr.decode()
    listed = {n["node"]: n for n in json.loads(nodes.stdout)}
    assert sorted(listed) == ["node1", "node2"]
    node1, node2 = state["nodes"]
    assert listed["node1"]["exports"] == {"disk": node1["nbd"]}
    dst = Path(node2["image"]).parent / "from-node1.img"
    copy = run_cli("ctl", "--ctl-url", ctl_url, "copy", "node1:disk", f"node2:{dst}")
    assert copy.returncode == 0, copy.stderr.decode()
    assert sha256_nbd(node1["nbd"]) == hashlib.sha256(dst.read_bytes()).hexdigest()
    # The agent's metrics port serves the transfer it just ran.
    metrics = urlopen(f"http://127.0.0.1:{node2['metrics_port']}/metrics", timeout=5).read()
    assert b'nbdnats_transfers_total{outcome="done",role="recv"} 1' in metrics
    # A node's own login cannot command another node.
    as_node1 = ",".join(url(state, f"ctl-{i}", "node1") for i in (1, 2, 3))
    denied = run_cli("ctl", "--ctl-url", as_node1, "copy", "node1:disk", f"node2:{dst}")
    assert denied.returncode != 0 and "Traceback" not in denied.stderr.decode()


def monitor(state: dict[str, Any], name: str, path: str) -> dict[str, Any]:
    server = next(s for s in state["servers"] if s["name"] == name)
    found: dict[str, Any] = json.load(
        urlopen(f"http://127.0.0.1:{server['http_port']}/{path}", timeout=5)
    )
    return found


def test_each_agent_is_its_node_on_the_data_plane(topology: tuple[Path, dict[str, Any]]) -> None:
    """Every agent's data connection is authorised as its node's user (nats-server's
    /connz?auth=1), not as an all-powerful default user; a client without credentials
    is refused by both clusters."""
    _, state = topology
    seen = {
        c["name"]: c.get("authorized_user")
        for i in (1, 2, 3)
        for c in monitor(state, f"data-{i}", "connz?auth=1")["connections"]
        if "data" in c.get("name", "")
    }
    assert seen == {"nbd-nats node1 data": "node1", "nbd-nats node2 data": "node2"}

    def anonymous(server: str) -> bytes:
        """What the server answers a CONNECT without credentials (the protocol, raw)."""
        port = next(s["port"] for s in state["servers"] if s["name"] == server)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            reply = sock.recv(4096)  # INFO
            sock.sendall(b'CONNECT {"verbose":false,"name":"anonymous"}\r\nPING\r\n')
            while b"\r\n" not in reply.split(b"INFO", 1)[-1].split(b"\r\n", 1)[-1]:
                more = sock.recv(4096)
                if not more:
                    break
                reply += more
        return reply.split(b"\r\n", 1)[-1]

    for server in ("data-1", "rack-1", "ctl-1"):
        assert anonymous(server).startswith(b"-ERR 'Authorization Violation'"), server


def test_logs_and_status_hold_no_password(topology: tuple[Path, dict[str, Any]]) -> None:
    """No password of dev.json in any log of the topology (agents', servers', qemu-nbd's)
    nor in `dev status`; the agents' startup lines still name their servers."""
    root, state = topology
    logs = {p.name: p.read_bytes() for p in (root / "logs").iterdir()}
    status = run_cli("dev", "status", "--state-dir", str(root)).stdout
    for user, password in state["passwords"].items():
        for name, text in [*logs.items(), ("dev status", status)]:
            assert password.encode() not in text, f"{user}'s password in {name}"
    assert b" up on ctl 127.0.0.1:" in logs["agent-node1.log"]
    assert b", data nats://node1:***@127.0.0.1:" in logs["agent-node1.log"]


def test_ipv6_transfer_and_one_line_errors(tmp_path: Path) -> None:
    """--ipv6: everything on [::1]; send and recv given nats://[::1]:PORT. Mistakes
    (up twice, down or status with nothing up) are one line, no traceback."""
    root = tmp_path / "state"
    by_env = run_cli("dev", "status", env={"NBDNATS_STATE_DIR": str(root)})
    assert f"nothing runs: no dev topology in {root}" in one_line_error(by_env)
    assert "nothing to stop" in one_line_error(run_cli("dev", "down", "--state-dir", str(root)))
    state = up(root, "--ipv6", "--racks", "1")
    try:
        assert state["host"] == "::1"
        assert all(u.startswith("nats://[::1]:") for u in state["urls"]["data"].split(","))
        again = one_line_error(run_cli("dev", "up", "--state-dir", str(root)))
        assert "already runs" in again
        dst = tmp_path / "v6.img"
        sender, receiver = ("node1", "data-1", "ctl-1"), ("node1", "data-2", "ctl-2")
        image = copy_node1_disk(state, "dev-v6", dst, sender, receiver)
        assert dst.read_bytes() == image.read_bytes()
    finally:
        down(root)


def test_port_in_use_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        err = one_line_error(  # the busy port is the first the topology would take
            run_cli("dev", "up", "--state-dir", str(tmp_path / "s"), "--base-port", str(port))
        )
    assert f"port {port} on 127.0.0.1 is in use" in err
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--racks", "0"], "--racks must be between"),
        (["--disk-size", "12345"], "--disk-size must be"),
        (["--base-port", "80"], "--base-port 80"),
        (["--state-dir", "/tmp/" + "d" * 100], "too deep for unix sockets"),
    ],
)
def test_out_of_range_up_options_are_one_line_usage_errors(
    tmp_path: Path, args: list[str], message: str
) -> None:
    done = run_cli("dev", "up", "--state-dir", str(tmp_path / "s"), *args)  # last one wins
    assert message in one_line_error(done)
    assert done.returncode == 2


def test_exited_processes_are_reported_and_replaced(tmp_path: Path) -> None:
    """Processes killed behind dev's back: status says which exited (one line, exit 1);
    up starts afresh over the stale record; down stops the new ones."""
    root = tmp_path / "state"
    state = up(root, "--racks", "1")
    try:
        for proc in state["processes"]:
            if proc["name"] in ("nats-data-2", "qemu-nbd-node1"):
                os.kill(proc["pid"], signal.SIGKILL)
        err = one_line_error(run_cli("dev", "status", "--state-dir", str(root)))
        assert "2 of 9 processes exited (nats-data-2, qemu-nbd-node1)" in err
        for proc in state["processes"]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc["pid"], signal.SIGKILL)
        again = up(root, "--racks", "1")
        assert {p["pid"] for p in again["processes"]}.isdisjoint(
            p["pid"] for p in state["processes"]
        )
    finally:
        down(root)


# The first test to need the installer image builds it (a minute or more on a fresh clone).
@pytest.mark.timeout(900)
def test_two_debian_node_vms_join_as_node1_and_node2_and_copy(
    tmp_path: Path, installer: InstallerBase
) -> None:
    """The vm profile's Debian node OS, built here (scripts/vm-image.sh debian) and booted by
    scripts/vm-node.sh debian N (direct kernel boot, TCG, concurrently): after dev up's own
    agents of node1 and node2 stop, each VM's agent logs in as its node (the password only in
    its agent.env layer) over QEMU's user network; `ctl nodes` lists both as role host, up,
    with export `disk` (the VM's /dev/vda); `ctl copy node1:disk node2:disk` gives equal
    sha256 on the host's files behind those disks."""
    from nbdnats.dev.processes import stop
    from nbdnats.dev.topology import load
    from tests.metal_images import IMAGES, REPO
    from tests.metal_vm import HOST_V4, kvm_wanted

    built = time.monotonic()
    images = {"NBDNATS_IMAGE_DIR": str(IMAGES), "VENV": sys.prefix}
    image = subprocess.run(
        [str(REPO / "scripts" / "vm-image.sh"), "debian"],
        env={**os.environ, **images, "NBDNATS_VM_DIR": str(tmp_path / "vm")},
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert image.returncode == 0, image.stderr
    print(f"image ready in {time.monotonic() - built:.1f} s")
    root = tmp_path / "state"
    state = up(root, "--racks", "2")
    vms: list[subprocess.Popen[bytes]] = []
    try:
        recorded = load(root)
        assert recorded is not None
        asyncio.run(stop([p for p in recorded.processes if p.name.startswith("agent-")]))

        def servers(kind: str) -> str:
            ports = [s["port"] for s in state["servers"] if s["kind"] == kind]
            return ",".join(f"nats://{HOST_V4}:{p}" for p in ports)

        disks = {}
        for n in (1, 2):
            node = tmp_path / "vm" / f"node{n}"
            node.mkdir(parents=True)
            disks[n] = node / "data.img"
            with disks[n].open("wb") as f:  # node1: data in a few places; node2: blank
                f.truncate(8 * 1024 * 1024)
                if n == 1:
                    for offset in (0, 3 * 1024 * 1024, 8 * 1024 * 1024 - 65536):
                        f.seek(offset)
                        f.write(os.urandom(65536))
        want = hashlib.sha256(disks[1].read_bytes()).hexdigest()
        env = {
            **os.environ,
            "NBDNATS_VM_DIR": str(tmp_path / "vm"),
            **images,
            "NBDNATS_VM_CTL_URL": servers("ctl"),
            "NBDNATS_VM_DATA_URL": servers("data"),
            "VM_ACCEL": "kvm" if kvm_wanted() else "tcg",
            "VM_MEMORY": "1536",
            "VM_CPUS": "1",
        }
        booted = time.monotonic()
        for n in (1, 2):
            env[f"NBDNATS_PASSWORD_NODE{n}"] = state["passwords"][f"node{n}"]
            with (tmp_path / "vm" / f"node{n}.console").open("wb") as console:
                vms.append(
                    subprocess.Popen(
                        [str(REPO / "scripts" / "vm-node.sh"), "debian", str(n)],
                        stdin=subprocess.DEVNULL,
                        stdout=console,
                        stderr=subprocess.STDOUT,
                        env=env,
                        cwd=REPO,
                    )
                )
        ctl_url = ",".join(url(state, f"ctl-{i}", "controller") for i in (1, 2, 3))
        listed: dict[str, Any] = {}

        def joined() -> bool:
            for n, vm in enumerate(vms, 1):
                if vm.poll() is not None:
                    console = (tmp_path / "vm" / f"node{n}.console").read_bytes()
                    raise AssertionError(
                        f"node{n}'s VM exited {vm.returncode}: {console[-3000:]!r}"
                    )
            nodes = run_cli("ctl", "--ctl-url", ctl_url, "--json", "nodes")
            assert nodes.returncode == 0, nodes.stderr.decode()
            listed.clear()
            listed.update({n["node"]: n for n in json.loads(nodes.stdout)})
            return all(
                listed.get(name, {}).get("exports") == {"disk": "/dev/vda"}
                for name in ("node1", "node2")
            )

        try:
            wait_for(joined, "both node VMs' agents in `ctl nodes`", timeout=300)
        except TimeoutError:
            consoles = [(tmp_path / "vm" / f"node{n}.console").read_bytes()[-2000:] for n in (1, 2)]
            raise AssertionError(f"not joined: {listed}; consoles: {consoles!r}") from None
        print(f"both VMs joined in {time.monotonic() - booted:.1f} s")
        for name in ("node1", "node2"):
            assert (listed[name]["role"], listed[name]["state"]) == ("host", "up")
        # The login is not on the kernel command line the VM booted with.
        qemu_argv = Path(f"/proc/{vms[0].pid}/cmdline").read_bytes()
        assert b"nbdnats.node=node1" in qemu_argv
        assert state["passwords"]["node1"].encode() not in qemu_argv

        copied = time.monotonic()
        copy = run_cli("ctl", "--ctl-url", ctl_url, "copy", "node1:disk", "node2:disk", timeout=300)
        assert copy.returncode == 0, copy.stderr.decode()
        print(f"copy in {time.monotonic() - copied:.1f} s")
        assert hashlib.sha256(disks[2].read_bytes()).hexdigest() == want
    finally:
        for vm in vms:
            vm.terminate()
        for vm in vms:
            try:
                vm.wait(30)
            except subprocess.TimeoutExpired:
                vm.kill()
                vm.wait()
        down(root)
