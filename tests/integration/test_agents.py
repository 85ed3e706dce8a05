"""Agents as separate processes, driven by ``nbd-nats ctl`` over a real nats-server with
JetStream: copy, VM<->bare-metal conversion, events, metrics, cancellation, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.request import urlopen

import pytest

from nbdnats import Controller, OperationResult
from nbdnats.embedded import free_port
from tests.cli import one_line_error, run_cli, start_cli
from tests.ctl import AgentProc, ctl, ok
from tests.images import MiB, allocated, make_image, sha256_file, sha256_nbd, slow_disk
from tests.nats_server import NatsServer
from tests.waits import wait_for


@pytest.fixture
def url(start_nats: Callable[..., NatsServer]) -> str:
    return start_nats(jetstream=True).url


# A slow copy once started: agent b, the running ``ctl copy`` and the disk's sha256.
SlowCopying = tuple[AgentProc, subprocess.Popen[bytes], str]
SlowCopy = Callable[..., contextlib.AbstractContextManager[SlowCopying]]


@pytest.fixture
def slow_ctl_copy(url: str, start_agent: Callable[..., AgentProc], tmp_path: Path) -> SlowCopy:
    """``slow_ctl_copy(size, read_bps, *args, b_args=())``: a ``ctl copy`` from agent a to
    agent b (both allowed ``tmp_path``) of a ``size``-byte disk read at ``read_bps``, slow
    enough to act on while it runs. ``args`` go to ``ctl copy``, ``b_args`` to agent b."""

    @contextlib.contextmanager
    def run(
        size: int, read_bps: int, *args: str, b_args: tuple[str, ...] = ()
    ) -> Iterator[SlowCopying]:
        with slow_disk(tmp_path / "slow.raw", size, read_bps) as (uri, digest):
            start_agent("a", url, "--allow", str(tmp_path))
            b = start_agent("b", url, "--allow", str(tmp_path), *b_args)
            copy = start_cli(
                "ctl", "--ctl-url", url, "copy", f"a:{uri}", f"b:{tmp_path}/d.raw", *args
            )
            yield b, copy, digest

    return run


def test_ctl_nodes_lists_each_agent_with_role_and_exports(
    url: str, start_agent: Callable[..., AgentProc], tmp_path: Path
) -> None:
    keys = tmp_path / "keys"
    keys.mkdir()
    ok(run_cli("approve", "--new-key", str(keys / "ops")))
    start_agent("a", url, "--allow", str(tmp_path), "--export", f"vm1={tmp_path}/vm1.raw")
    start_agent("inst", url, "--role", "installer", "--trusted-keys", str(keys))
    nodes = json.loads(ok(ctl(url, "--json", "nodes")))
    by_name = {n["node"]: n for n in nodes}
    assert sorted(by_name) == ["a", "inst"]
    assert by_name["a"]["role"] == "host" and by_name["a"]["state"] == "up"
    assert by_name["a"]["exports"] == {"vm1": f"{tmp_path}/vm1.raw"}
    assert "recv" in by_name["a"]["capabilities"]
    assert by_name["inst"]["role"] == "installer"
    assert "provision" in by_name["inst"]["capabilities"]
    assert "recv" not in by_name["inst"]["capabilities"]
    text = ok(ctl(url, "nodes"))
    assert "inst" in text and "installer" in text and "vm1=" in text


def test_ctl_copy_vm_disk_to_bare_metal_device_and_back(
    url: str,
    start_agent: Callable[..., AgentProc],
    qemu_nbd: Callable[..., str],
    tmp_path: Path,
) -> None:
    """VM -> bare metal: a qcow2 served by qemu-nbd onto a device of another node; bare metal
    -> VM: that device back into a new qcow2 disk. A file stands in for the device."""
    vmdir, bmdir = tmp_path / "vm", tmp_path / "bm"
    vmdir.mkdir()
    bmdir.mkdir()
    raw = tmp_path / "src.raw"
    digest = make_image(raw, 64 * MiB, [(0, 3 * MiB), (40 * MiB + 12345, 5 * MiB)])
    qcow = vmdir / "vm1.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(qcow)], check=True)
    vm_uri = qemu_nbd(qcow, "qcow2", True)
    start_agent("vmhost", url, "--allow", str(tmp_path), "--export", f"vm1={vm_uri}")
    start_agent("metal", url, "--allow", str(bmdir))
    device = bmdir / "sda"
    device.write_bytes(b"")
    with device.open("r+b") as f:
        f.truncate(64 * MiB)

    out = ctl(url, "--json", "copy", "vmhost:vm1", f"metal:{device}", "--id", "vm2bm")
    doc = json.loads(ok(out))
    assert doc["ok"] and doc["transfer_id"] == "vm2bm"
    assert doc["receiver"]["node"] == "metal" and doc["receiver"]["state"] == "done"
    assert doc["sender"]["digest"] == doc["receiver"]["digest"]
    assert sha256_file(device) == digest
    assert allocated(device) <= 8 * MiB + 2 * MiB  # the holes stayed holes

    back = vmdir / "vm2.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(back), "64M"], check=True)
    back_uri = qemu_nbd(back, "qcow2")
    out = ctl(url, "copy", f"metal:{device}", f"vmhost:{back_uri}", "--verify")
    ok(out)
    assert "copied" in out.stderr.decode() and "metal -> vmhost" in out.stderr.decode()
    assert sha256_nbd(back_uri) == digest


def test_planes_on_separate_servers(
    start_nats: Callable[..., NatsServer], start_agent: Callable[..., AgentProc], tmp_path: Path
) -> None:
    """Commands on the ctl server, blocks on the data server: nothing else is needed."""
    ctl_url = start_nats(jetstream=True).url
    data = start_nats()
    src = tmp_path / "src.raw"
    digest = make_image(src, 8 * MiB, [(0, 8 * MiB)])
    for node in ("a", "b"):
        start_agent(node, ctl_url, "--data-url", data.url, "--allow", str(tmp_path))
    ok(ctl(ctl_url, "copy", f"a:{src}", f"b:{tmp_path}/dst.raw"))
    assert sha256_file(tmp_path / "dst.raw") == digest


def test_events_are_stored_and_replayed(
    url: str, start_agent: Callable[..., AgentProc], tmp_path: Path
) -> None:
    """A controller that was away reads what it missed: events replay from the stream."""
    src = tmp_path / "src.raw"
    make_image(src, 4 * MiB, [(0, MiB)])
    for node in ("a", "b"):
        start_agent(node, url, "--allow", str(tmp_path))
    ok(ctl(url, "copy", f"a:{src}", f"b:{tmp_path}/dst.raw", "--id", "replayed"))
    lines = ok(ctl(url, "--json", "events", "--all", "--no-follow")).splitlines()
    evs = [json.loads(x) for x in lines]
    kinds = {(e["subject"], e["data"].get("state")) for e in evs}
    assert ("ctl.evt.a.announce", None) in {(s, None) for s, _ in kinds}
    assert ("ctl.evt.b.transfer", "accepted") in kinds
    assert ("ctl.evt.b.transfer", "done") in kinds
    assert ("ctl.evt.a.transfer", "done") in kinds
    done = [e for e in evs if e["data"].get("state") == "done" and e["data"]["role"] == "recv"]
    assert done[0]["data"]["transfer_id"] == "replayed"
    assert done[0]["data"]["done_bytes"] == 4 * MiB
    seqs = [e["seq"] for e in evs]
    assert seqs == sorted(seqs)
    # Resume from a sequence: only what came after it.
    later = ok(ctl(url, "--json", "events", "--seq", str(seqs[-2]), "--no-follow")).splitlines()
    assert [json.loads(x)["seq"] for x in later] == seqs[-2:]
    text = ok(ctl(url, "events", "--all", "--no-follow", "--kind", "transfer", "--node", "b"))
    assert "replayed" in text and " b transfer " in text and " a transfer " not in text


def test_ctl_events_shows_progress_live(
    start_nats: Callable[..., NatsServer], start_agent: Callable[..., AgentProc], tmp_path: Path
) -> None:
    server = start_nats(jetstream=True)
    url = server.url
    with slow_disk(tmp_path / "slow.raw", 24 * MiB, read_bps=8 * MiB) as (uri, _):
        for node in ("a", "b"):
            start_agent(node, url, "--allow", str(tmp_path))
        consumers = server.monitoring("jsz")["consumers"]
        watcher = start_cli("ctl", "--ctl-url", url, "events", "--kind", "transfer", "--count", "4")
        # It takes new events only: the copy starts once its consumer is on the stream.
        wait_for(
            lambda: server.monitoring("jsz")["consumers"] > consumers or watcher.poll() is not None,
            "the watcher's consumer",
            60,
        )
        ok(ctl(url, "copy", f"a:{uri}", f"b:{tmp_path}/dst.raw", "--id", "live"))
        out, err = watcher.communicate(timeout=60)
    assert watcher.returncode == 0, err.decode()
    states = [line.split("state=")[1].split()[0] for line in out.decode().splitlines()]
    assert "running" in states, out.decode()


def test_agent_serves_prometheus_metrics(
    url: str, start_agent: Callable[..., AgentProc], tmp_path: Path
) -> None:
    port = free_port()
    src = tmp_path / "src.raw"
    make_image(src, 6 * MiB, [(0, 6 * MiB)])
    start_agent("a", url, "--allow", str(tmp_path))
    start_agent("b", url, "--allow", str(tmp_path), "--metrics-addr", f"127.0.0.1:{port}")
    ok(ctl(url, "copy", f"a:{src}", f"b:{tmp_path}/dst.raw", "--id", "metered"))
    body = urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    labels = 'op="recv",role="recv",transfer="metered"'
    assert f"nbdnats_transfer_done_bytes{{{labels}}} {6 * MiB}" in body
    assert f"nbdnats_transfer_size_bytes{{{labels}}} {6 * MiB}" in body
    assert f"nbdnats_transfer_errors{{{labels}}} 0" in body
    assert f"nbdnats_transfer_retransmits{{{labels}}} 0" in body
    assert f'nbdnats_transfer_bytes_total{{role="recv"}} {6 * MiB}' in body
    assert f'nbdnats_transfer_data_bytes_total{{role="recv"}} {6 * MiB}' in body
    assert 'nbdnats_transfers_active{role="recv"} 0' in body
    assert 'nbdnats_transfers_total{outcome="done",role="recv"} 1' in body
    assert 'nbdnats_frames_dropped_total{reason="bad"} 0' in body
    assert 'nbdnats_commands_total{op="recv",result="ok"} 1' in body
    assert "# TYPE nbdnats_transfer_bytes_total counter" in body


def test_ctl_cancel_stops_both_ends(url: str, slow_ctl_copy: SlowCopy) -> None:
    with slow_ctl_copy(64 * MiB, 4 * MiB, "--id", "doomed") as (_, copy, _):
        wait_for(lambda: "doomed" in ok(ctl(url, "transfers")), "the transfer", timeout=20)
        out = ok(ctl(url, "cancel", "doomed"))
        assert "cancelled doomed on" in out
        _, err = copy.communicate(timeout=60)
    assert copy.returncode == 1
    assert "cancelled" in err.decode()
    rows = json.loads(ok(ctl(url, "--json", "transfers")))
    assert {(r["node"], r["state"]) for r in rows} == {("a", "cancelled"), ("b", "cancelled")}


def test_sigterm_lets_a_running_transfer_finish_then_stops(
    url: str, slow_ctl_copy: SlowCopy, tmp_path: Path
) -> None:
    """A drained agent finishes what it runs, reports it, announces 'stopped', exits 0."""
    drain = ("--drain-timeout", "60")
    with slow_ctl_copy(16 * MiB, 8 * MiB, b_args=drain) as (b, copy, digest):
        wait_for(lambda: "accepted recv" in b.text(), "the transfer", timeout=20)
        assert b.stop() == 0
        _, err = copy.communicate(timeout=60)
    assert copy.returncode == 0, err.decode()
    assert sha256_file(tmp_path / "d.raw") == digest
    assert "draining 1 running job" in b.text()
    nodes = json.loads(ok(ctl(url, "--json", "nodes")))
    assert [n["node"] for n in nodes] == ["a"]  # b announced that it stopped


def test_sigterm_past_the_drain_timeout_cancels_and_reports(
    url: str, slow_ctl_copy: SlowCopy
) -> None:
    drain = ("--drain-timeout", "1")
    with slow_ctl_copy(64 * MiB, 4 * MiB, "--id", "cut", b_args=drain) as (b, copy, _):
        wait_for(lambda: "accepted recv" in b.text(), "the transfer", timeout=20)
        assert b.stop() == 0
        _, err = copy.communicate(timeout=60)
    assert copy.returncode == 1
    assert "cancelled" in err.decode()
    out = ok(ctl(url, "--json", "events", "--all", "--no-follow", "--kind", "transfer"))
    evs = [json.loads(x) for x in out.splitlines()]
    ends = {
        (e["data"]["node"], e["data"]["state"]) for e in evs if e["data"]["transfer_id"] == "cut"
    }
    assert ("b", "cancelled") in ends and ("a", "cancelled") in ends


def test_ctl_to_an_unknown_node_is_a_usage_error(url: str, tmp_path: Path) -> None:
    err = one_line_error(ctl(url, "copy", f"ghost:{tmp_path}/x", f"other:{tmp_path}/y"))
    assert "no agent answers for node 'other'" in err  # the receiving end is asked first


def test_ctl_with_no_server_says_so(tmp_path: Path) -> None:
    port = free_port()
    proc = ctl(f"nats://127.0.0.1:{port}", "nodes")
    err = one_line_error(proc)
    assert proc.returncode == 1 and "cannot connect to the ctl NATS server" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["copy", "nodeonly", "b:/x"], "must be NODE:PATH"),
        (["copy", "a:/x", "nbd://host/x"], "must be NODE:PATH"),
        (["copy", "a b:/x", "b:/y"], "invalid node name"),
    ],
)
def test_a_malformed_ctl_endpoint_is_a_usage_error(url: str, args: list[str], message: str) -> None:
    proc = ctl(url, *args)
    assert proc.returncode == 2
    assert message in one_line_error(proc)


def test_agent_refuses_a_bad_config(url: str, tmp_path: Path) -> None:
    conf = tmp_path / "agent.toml"
    conf.write_text('node = "a"\nallowed = ["/x"]\n')
    err = one_line_error(run_cli("agent", "--ctl-url", url, "--config", str(conf)))
    assert "unknown setting(s) allowed" in err
    conf.write_text("node = [\n")
    assert "not valid TOML" in one_line_error(run_cli("agent", "--config", str(conf)))
    err = one_line_error(run_cli("agent", "--node", "i", "--role", "installer"))
    assert "--role installer needs --trusted-keys" in err


def test_agent_stops_on_sigint_too(url: str, start_agent: Callable[..., AgentProc]) -> None:
    a = start_agent("a", url)
    a.proc.send_signal(signal.SIGINT)
    assert a.proc.wait(30) == 0
    assert "Traceback" not in a.text()


def test_controller_api_copy_events_and_resume_from_a_sequence(
    url: str, start_agent: Callable[..., AgentProc], tmp_path: Path
) -> None:
    """The Python API as documented: copy returns both ends; events() replays from the
    last sequence a controller saw, so a reconnecting controller misses nothing."""
    src = tmp_path / "src.raw"
    digest = make_image(src, 6 * MiB, [(0, 2 * MiB)])
    for node in ("a", "b"):
        start_agent(node, url, "--allow", str(tmp_path))

    async def run() -> None:
        async with await Controller.connect(url) as c:
            seen: list[str] = []
            result = await c.copy(
                ("a", str(src)),
                ("b", f"{tmp_path}/one.raw"),
                on_event=lambda e: seen.append(e.state),
            )
            assert isinstance(result, OperationResult) and result.ok
            assert result.sender.digest == result.receiver.digest and "done" in seen
            last = [e async for e in c.events(since_seq=1, follow=False)][-1].seq
        # Away: another copy happens. Back: replay from the last sequence seen.
        async with await Controller.connect(url) as c:
            tid = await c.copy(("a", str(src)), ("b", f"{tmp_path}/two.raw"), wait=False)
            assert isinstance(tid, str)
            states = []
            async for ev in c.events(since_seq=last + 1, kind="transfer"):
                if ev.data["transfer_id"] == tid:
                    states.append((ev.node, ev.data["state"]))
                if {("a", "done"), ("b", "done")} <= set(states):
                    break
            assert ("b", "accepted") in states

    asyncio.run(asyncio.wait_for(run(), 60))
    assert sha256_file(tmp_path / "two.raw") == digest


def test_a_node_that_dies_silently_is_shown_lost(
    url: str, start_agent: Callable[..., AgentProc]
) -> None:
    a = start_agent("a", url, "--announce-interval", "0.5")
    start_agent("b", url)
    a.proc.kill()
    a.proc.wait()

    def states() -> dict[str, str]:
        return {n["node"]: n["state"] for n in json.loads(ok(ctl(url, "--json", "nodes")))}

    wait_for(lambda: states().get("a") == "lost", "node a to be lost", timeout=20)
    assert states()["b"] == "up"
    assert "lost" in ok(ctl(url, "nodes"))
    b_stopped = json.loads(ok(ctl(url, "--json", "nodes", "--all")))
    assert {n["node"] for n in b_stopped} == {"a", "b"}
