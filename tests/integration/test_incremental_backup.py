"""``nbd-nats ctl backup --incremental`` through real agents, restic and QEMU.

The test guest (bench/vm.py) keeps writing its counter while it is backed up. Each run's
reference is the disk at the run's checkpoint: the guest is paused (QMP ``stop`` flushes
the image), the reference copied (``qemu-img convert -U``), the backup started; once the
source's agent has taken its checkpoint the guest runs again and writes while the disk is
streamed. Every snapshot, full or incremental, must restore alone to its reference's bytes.

KVM when /dev/kvm can run a guest, TCG otherwise ($NBDNATS_TEST_ACCEL overrides).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.request import urlopen

import pytest

from bench import vm
from nbdnats import _core, subjects
from nbdnats.embedded import free_port
from nbdnats.schemas import RecvCommand, Tool, encode
from tests.backups import RESTIC_ENV, restic, slow_backup
from tests.cli import one_line_error, start_cli
from tests.ctl import AgentProc, ctl, ctl_request, ok, stored_events
from tests.images import MiB, make_image, sha256_file
from tests.nats_server import NatsServer
from tests.waits import wait_for

DISK = 64 * MiB
CLUSTER = 64 * 1024  # the dirty bitmaps' granularity (qcow2's cluster size)
RUN = 300.0  # how long one backup may take under TCG on a loaded machine
# The peer timeout (--timeout) of the runs whose peer is killed: the survivor gives up after
# it rather than the default 60 s. Long enough for a loaded TCG run's peer to keep answering.
PEER_GONE = "10"


@pytest.fixture(scope="session")
def guest() -> tuple[Path, Path]:
    """Build (or find cached) the guest once; a failure here fails the tests, no skip."""
    return vm.guest_files()


@pytest.fixture
def machine(guest: tuple[Path, Path], tmp_path: Path) -> Iterator[vm.VM]:
    """The counter guest on a 64 MiB qcow2 disk with 16 MiB of data, and a second monitor
    for the test (the source's agent holds the first one while it takes a checkpoint)."""
    disk = vm.make_disk(tmp_path / "vm1.qcow2", DISK, data_mib=16)
    running = vm.VM("vm1", tmp_path, disk, second_monitor=True).start()
    try:
        running.wait_counter(0, timeout=120)
        yield running
    finally:
        if running.proc and running.proc.poll() is None:
            running.proc.kill()
            running.proc.wait(10)


@pytest.fixture
def url(start_nats: Callable[..., NatsServer]) -> str:
    return start_nats(jetstream=True).url


@dataclass
class Site:
    """A source node ``a``, a backup node ``b`` with a restic repository, and where
    restores and references go."""

    url: str
    repo: Path
    work: Path
    a: AgentProc
    b: AgentProc
    src: str  # what ctl backup names: VM or export

    def backup(self, tid: str, *extra: str) -> subprocess.Popen[bytes]:
        args = ("--json", "backup", f"a:{self.src}", "b", "--restic", str(self.repo))
        return start_cli("ctl", "--ctl-url", self.url, *args, "--incremental", "--id", tid, *extra)

    def snapshots(self) -> list[dict[str, Any]]:
        return list(json.loads(restic(self.repo, "snapshots", "--json").stdout))

    def restore(self, snapshot: str, name: str) -> tuple[Path, dict[str, Any]]:
        """Restore one snapshot alone into a new file on a."""
        target = self.work / name
        pick = ("--restic", str(self.repo), "--snapshot", snapshot)
        doc = json.loads(ok(ctl(self.url, "--json", "restore", "b", f"a:{target}", *pick)))
        return target, doc


def ok_stderr(proc: subprocess.CompletedProcess[bytes]) -> str:
    """What a command that exited 0 said on stderr (where the summary goes)."""
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stderr.decode()


def finished(proc: subprocess.Popen[bytes]) -> dict[str, Any]:
    out, err = proc.communicate(timeout=RUN)
    assert proc.returncode == 0, err.decode()
    return dict(json.loads(out))


def raw_image(qcow2: Path, out: Path) -> Path:
    """The disk's bytes now, read past QEMU's lock (the guest is paused, its image flushed)."""
    cmd = ["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", str(qcow2), str(out)]
    subprocess.run(cmd, check=True, capture_output=True)
    return out


def changed_extents(before: Path, after: Path) -> tuple[int, int]:
    """(bytes, runs) of the 64 KiB clusters that differ between two images: what a dirty
    bitmap must at least mark, and in how many extents."""
    changed, runs, previous = 0, 0, False
    with before.open("rb") as x, after.open("rb") as y:
        while True:
            a, b = x.read(CLUSTER), y.read(CLUSTER)
            if not a and not b:
                return changed, runs
            differs = a != b
            changed += len(b) if differs else 0
            runs += 1 if differs and not previous else 0
            previous = differs


def assert_only_changes_crossed(disk: dict[str, Any], before: Path, after: Path) -> None:
    """The bitmap marked every changed cluster, and the stream carried little more than what
    it marked: at most 1% over, plus one chunk per changed extent."""
    changed, runs = changed_extents(before, after)
    dirty, sent = disk["dirty_bytes"], disk["sent_bytes"]
    assert disk["kind"] == "incremental", disk
    assert dirty >= changed > 0, disk
    assert sent <= dirty * 1.01 + _core.DEFAULT_CHUNK * max(runs, 1), (sent, dirty, runs)
    assert sent < DISK // 4, disk


def monitor(machine: vm.VM, name: str, **args: Any) -> Any:
    """A QMP command on the test's own monitor."""
    return asyncio.run(vm.qmp_command(machine.monitor, name, **args))


def guest_writes(
    machine: vm.VM, offset: int, length: int, pattern: int, drive: str = "vda"
) -> None:
    """Write through one of the guest's disk devices in QEMU (HMP ``qemu-io -d``), as the
    guest would: its dirty bitmaps see it. Silent when it worked."""
    device = f"/machine/peripheral/{drive}/virtio-backend"
    line = f'qemu-io -d {device} "write -P {pattern:#x} {offset} {length}"'
    out = monitor(machine, "human-monitor-command", **{"command-line": line})
    assert not str(out).strip(), out


def checkpoints_taken(agent: AgentProc, src: str) -> int:
    return len(re.findall(rf"checkpoint nbdnats-\S+ of {re.escape(src)} \(", agent.text()))


def backup_at_checkpoint(
    site: Site, machine: vm.VM, tid: str, ref: Path
) -> tuple[subprocess.Popen[bytes], Path]:
    """Start a run whose checkpoint is taken while the guest is paused, its reference
    copied just before; the guest runs again once the checkpoint exists."""
    monitor(machine, "stop")
    raw_image(machine.disk, ref)
    taken = checkpoints_taken(site.a, "vm1")
    proc = site.backup(tid)
    try:
        wait_for(
            lambda: checkpoints_taken(site.a, "vm1") > taken or proc.poll() is not None,
            f"the checkpoint of {tid}",
            RUN,
        )
    finally:
        monitor(machine, "cont")
    return proc, ref


def restic_backup_child(agent: AgentProc) -> int | None:
    """The pid of the ``restic backup`` an agent started, if it runs."""
    pid = agent.proc.pid
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return None
    for child in children:
        try:
            argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"restic") and b"backup" in argv:
            return int(child)
    return None


def vm_site(
    url: str, tmp_path: Path, machine: vm.VM, start_agent: Callable[..., AgentProc]
) -> Site:
    repo = tmp_path / "backups" / "repo"
    repo.parent.mkdir()
    restic(repo, "init", "-q")
    work = tmp_path / "restored"
    work.mkdir()
    a = start_agent("a", url, "--vm", f"vm1={machine.qmp}", "--allow", str(work))
    b = start_agent("b", url, "--allow", str(repo), env=RESTIC_ENV)
    return Site(url, repo, work, a, b, "vm1")


@pytest.mark.timeout(1500)
def test_incrementals_of_a_writing_vm_each_restore_alone_to_their_checkpoint(
    url: str, start_agent: Callable[..., AgentProc], tmp_path: Path, machine: vm.VM
) -> None:
    """A full run, then three incrementals while the guest writes: each snapshot restores
    alone to the disk as it was at that run's checkpoint, only the changes cross the
    network, and the snapshots are listed with their kind, checkpoint and parent. A later
    snapshot another tool stored makes the next run full, and the report says why."""
    site = vm_site(url, tmp_path, machine, start_agent)
    runs: list[tuple[dict[str, Any], Path]] = []
    for n in range(4):
        if n == 2:
            guest_writes(machine, 20 * MiB, 3 * MiB, 0x60 + n)  # beside the counter's writes
        proc, ref = backup_at_checkpoint(site, machine, f"run{n}", tmp_path / f"ref{n}.raw")
        runs.append((finished(proc), ref))

    first, _ = runs[0]
    assert first["kind"] == "full" and first["since"] is None
    assert first["reason"].startswith("no earlier backup of a:vm1"), first
    [disk0] = first["disks"]
    name = disk0["disk"]
    assert name.startswith("vm1/") and disk0["kind"] == "full" and disk0["parent"] is None
    for n in (1, 2, 3):
        doc, ref = runs[n]
        previous, before = runs[n - 1]
        assert doc["kind"] == "incremental" and doc["since"] == previous["checkpoint"], doc
        [disk] = doc["disks"]
        assert disk["parent"] == previous["disks"][0]["snapshot"]
        assert_only_changes_crossed(disk, before, ref)
    # Every snapshot alone is the disk at its checkpoint; the restore checks its digest.
    for n, (doc, ref) in enumerate(runs):
        target, restored = site.restore(doc["disks"][0]["snapshot"], f"restored{n}.raw")
        assert restored["ok"] and restored["snapshot"]["kind"] == doc["disks"][0]["kind"]
        assert sha256_file(target) == sha256_file(ref), f"run {n}"
        assert restored["receiver"]["digest"] == doc["disks"][0]["digest"]

    listed = json.loads(
        ok(ctl(url, "--json", "backups", "b", "--restic", str(site.repo), "--disk", f"a:{name}"))
    )
    assert [(b["kind"], b["checkpoint"]) for b in listed] == [
        (d["kind"], d["checkpoint"]) for d, _ in runs
    ]
    assert [b.get("parent") for b in listed] == [None] + [b["id"] for b in listed[:-1]]
    shown = ok(ctl(url, "backups", "b", "--restic", str(site.repo)))
    assert f"incremental {runs[3][0]['checkpoint']} parent {listed[2]['id'][:8]}" in shown

    # Another tool stores a later snapshot of the disk: the chain cannot be trusted.
    tags = f"nbdnats,node=a,disk={name}"
    env = {**os.environ, **RESTIC_ENV, "RESTIC_REPOSITORY": str(site.repo)}
    by_hand = ["restic", "backup", "--stdin", "--stdin-filename", "disk.img", "--tag", tags]
    subprocess.run(by_hand, input=runs[3][1].read_bytes(), env=env, check=True, capture_output=True)
    proc, ref = backup_at_checkpoint(site, machine, "run4", tmp_path / "ref4.raw")
    doc = finished(proc)
    assert doc["kind"] == "full" and "has no checkpoint tag" in doc["reason"], doc
    assert doc["disks"][0]["kind"] == "full" and doc["disks"][0]["parent"] is None
    target, _ = site.restore(doc["disks"][0]["snapshot"], "restored4.raw")
    assert sha256_file(target) == sha256_file(ref)
    # Without --snapshot, the disk's latest: this run's.
    latest = site.work / "latest.raw"
    pick = ("--restic", str(site.repo), "--disk", f"a:{name}")
    ok(ctl(url, "restore", "b", f"a:{latest}", *pick))
    assert sha256_file(latest) == sha256_file(ref)


@pytest.mark.timeout(1500)
def test_a_failed_run_stores_nothing_and_the_next_one_sends_its_changes_again(
    url: str, start_agent: Callable[..., AgentProc], tmp_path: Path, machine: vm.VM
) -> None:
    """restic, the backup node's agent, then the source's agent killed mid-stream: no run
    leaves a snapshot, the source keeps every change (the checkpoint rolled back, or its
    leftovers recovered by the restarted agent), and the next incremental restores to the
    disk at its own checkpoint. A controller that dies leaves an unconfirmed checkpoint,
    rolled back after the transfer timeout: the next run is full and says why."""
    site = vm_site(url, tmp_path, machine, start_agent)
    proc, ref = backup_at_checkpoint(site, machine, "full", tmp_path / "ref-full.raw")
    full = finished(proc)
    stored = len(site.snapshots())

    # 1. restic dies while the changes stream in.
    guest_writes(machine, 24 * MiB, 32 * MiB, 0x71)
    proc = site.backup("killed-restic")
    wait_for(lambda: restic_backup_child(site.b) is not None, "restic backup on b", RUN)
    pid = restic_backup_child(site.b)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    _, err = proc.communicate(timeout=RUN)
    assert proc.returncode != 0 and "restic" in err.decode(), err.decode()
    assert len(site.snapshots()) == stored

    proc, ref = backup_at_checkpoint(site, machine, "after-restic", tmp_path / "ref1.raw")
    doc = finished(proc)
    assert doc["kind"] == "incremental" and doc["since"] == full["checkpoint"], doc
    # The killed run's 32 MiB are sent again: its checkpoint rolled back into the old one.
    assert doc["disks"][0]["dirty_bytes"] >= 32 * MiB
    target, _ = site.restore(doc["disks"][0]["snapshot"], "after-restic.raw")
    assert sha256_file(target) == sha256_file(ref)
    stored = len(site.snapshots())

    # 2. The backup node's agent dies (SIGKILL) while the changes stream in: its restic
    # dies with it rather than store a truncated image; the source rolls back.
    guest_writes(machine, 40 * MiB, 8 * MiB, 0x73)
    proc = site.backup("killed-receiver", "--timeout", PEER_GONE)
    wait_for(lambda: restic_backup_child(site.b) is not None, "restic backup on b", RUN)
    orphan = restic_backup_child(site.b)
    site.b.proc.kill()
    site.b.proc.wait(30)
    _, err = proc.communicate(timeout=RUN)
    assert proc.returncode != 0, err.decode()
    wait_for(lambda: not Path(f"/proc/{orphan}").exists(), "b's restic gone with it", RUN)
    assert len(site.snapshots()) == stored
    site.b = start_agent("b", url, "--allow", str(site.repo), env=RESTIC_ENV)
    wait_for(
        lambda: "rolled back" in site.a.text().rsplit("killed-receiver", 1)[-1], "rollback", RUN
    )

    # 3. The source's agent dies (SIGKILL: no rollback) while its disk streams.
    guest_writes(machine, 30 * MiB, 16 * MiB, 0x72)
    proc = site.backup("killed-source", "--timeout", PEER_GONE)
    wait_for(lambda: restic_backup_child(site.b) is not None, "restic backup on b", RUN)
    site.a.proc.kill()
    site.a.proc.wait(30)
    _, err = proc.communicate(timeout=RUN)
    assert proc.returncode != 0, err.decode()
    wait_for(lambda: restic_backup_child(site.b) is None, "b stopping its restic", RUN)
    assert len(site.snapshots()) == stored
    site.a = start_agent("a", url, "--vm", f"vm1={machine.qmp}", "--allow", str(site.work))

    proc, ref2 = backup_at_checkpoint(site, machine, "after-source", tmp_path / "ref2.raw")
    again = finished(proc)
    assert again["kind"] == "incremental" and again["since"] == doc["checkpoint"], again
    assert again["disks"][0]["dirty_bytes"] >= 16 * MiB
    target, _ = site.restore(again["disks"][0]["snapshot"], "after-source.raw")
    assert sha256_file(target) == sha256_file(ref2)

    # 4. The controller dies while the disk streams: the backup node still stores the
    # snapshot, but nobody confirms it, so the source rolls back once its bound (--timeout)
    # has passed. The next run cannot start from that snapshot's checkpoint: full, saying so.
    proc = site.backup("controller-gone", "--timeout", "5")
    wait_for(lambda: restic_backup_child(site.b) is not None, "restic backup on b", RUN)
    proc.kill()
    proc.communicate()
    wait_for(lambda: "no word from the controller" in site.a.text(), "a's rollback", RUN)
    proc, ref3 = backup_at_checkpoint(site, machine, "after-controller", tmp_path / "ref3.raw")
    last = finished(proc)
    assert last["kind"] == "full" and "not on vm1/" in last["reason"], last["reason"]
    target, _ = site.restore(last["disks"][0]["snapshot"], "after-controller.raw")
    assert sha256_file(target) == sha256_file(ref3)


def test_an_offline_qcow2_image_is_backed_up_incrementally(
    url: str, start_agent: Callable[..., AgentProc], tmp_path: Path
) -> None:
    """An export whose file is a qcow2 image nothing has open: a full run, writes by
    qemu-io, an incremental run that sends only them; each snapshot restores to the image's
    bytes at its run. The agent counts both runs in its metrics. kopia is refused, and so
    is a raw image (it cannot keep a dirty bitmap) and a qcow2 image whose backing file is
    outside the allow-list."""
    images = tmp_path / "images"
    images.mkdir()
    image = vm.make_disk(images / "data.qcow2", 32 * MiB, data_mib=8)
    repo = tmp_path / "backups" / "repo"
    repo.parent.mkdir()
    restic(repo, "init", "-q")
    port = free_port()
    a = start_agent(
        "a",
        url,
        "--allow",
        str(images),
        "--export",
        f"data={image}",
        "--metrics-addr",
        f"127.0.0.1:{port}",
    )
    b = start_agent("b", url, "--allow", str(repo), env=RESTIC_ENV)
    site = Site(url, repo, images, a, b, "data")

    before = raw_image(image, tmp_path / "before.raw")
    full = finished(site.backup("offline-full"))
    assert full["kind"] == "full" and full["disks"][0]["disk"] == "data"
    write = "write -P 0x3c 5M 1M"
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", write, str(image)], check=True)
    after = raw_image(image, tmp_path / "after.raw")
    incremental = finished(site.backup("offline-incr"))
    assert incremental["kind"] == "incremental", incremental
    assert_only_changes_crossed(incremental["disks"][0], before, after)

    full_id = full["disks"][0]["snapshot"]
    for doc, want in ((full, before), (incremental, after)):
        target, _ = site.restore(doc["disks"][0]["snapshot"], f"{doc['transfer_id']}.raw")
        assert sha256_file(target) == sha256_file(want)

    # The summary line and the transfer events say the same as --json.
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x3d 9M 64k", str(image)], check=True)
    args = ("backup", "a:data", "b", "--restic", str(repo), "--incremental", "--id", "line")
    line = ok_stderr(ctl(url, *args))
    assert re.search(
        rf"backed up line at checkpoint nbdnats-\S+ \(since {incremental['checkpoint']}\): "
        r"data incremental: 64\.0 KiB dirty, [0-9.]+ \S+ sent in [0-9.]+ s, snapshot [0-9a-f]{8}, "
        r"blk64k-xxh3-128:",
        line,
    ), line
    ends = {
        e["role"]: e
        for e in stored_events(url, "transfer")
        if e["transfer_id"] == "offline-incr-disk0" and e["state"] == "done"
    }
    assert ends["send"]["backup_kind"] == "incremental" and ends["send"]["dirty_bytes"] > 0
    assert ends["send"]["checkpoint"] == incremental["checkpoint"]
    assert ends["recv"]["parent"] == full["disks"][0]["snapshot"]

    body = urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    for kind, runs in (("full", 1), ("incremental", 2)):
        assert f'nbdnats_backups_total{{kind="{kind}",outcome="done",role="send"}} {runs}' in body
    assert "nbdnats_backup_dirty_bytes_total" in body

    before_crafted = len(site.snapshots())
    err = one_line_error(ctl(url, "backup", "a:data", "b", "--kopia", "/vms/data", "--incremental"))
    assert "--incremental needs --restic" in err
    plain = images / "plain.raw"
    make_image(plain, MiB, [(0, MiB)])
    err = one_line_error(
        ctl(url, "backup", f"a:{plain}", "b", "--restic", str(repo), "--incremental")
    )
    assert "needs a VM this agent knows" in err and "or a qcow2 image" in err
    # A qcow2 image whose backing file is outside the allow-list is not opened.
    outside = tmp_path / "outside"
    outside.mkdir()
    make_image(outside / "base.raw", MiB, [(0, MiB)])
    child = images / "child.qcow2"
    backing = ["-b", str(outside / "base.raw"), "-F", "raw"]
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *backing, str(child)], check=True)
    err = one_line_error(
        ctl(url, "backup", f"a:{child}", "b", "--restic", str(repo), "--incremental")
    )
    assert "base.raw" in err and "allow-list" in err, err

    # Whoever chose the parent, the backup node lays changes only over a whole backup of
    # the same disk: a crafted command naming another disk's snapshot is refused.
    tool = Tool(
        kind="restic",
        repo=str(repo),
        node="a",
        disk="other",
        parent=full_id,
        checkpoint=incremental["checkpoint"],
    )
    refused = ctl_request(
        url,
        subjects.ctl_command("b", "recv"),
        encode(RecvCommand(transfer_id="crafted-parent", key="k1", tool=tool)),
    )
    assert refused["ok"] is False and refused["code"] == "usage", refused
    assert f"snapshot {full_id[:8]} is not a backup of a:other" in str(refused["error"])
    assert len(site.snapshots()) == before_crafted


def test_disks_stored_side_by_side_each_get_their_tags(
    url: str, start_agent: Callable[..., AgentProc], tmp_path: Path
) -> None:
    """A VM's disks are stored into one repository at once, and ``restic tag`` needs it to
    itself: the backup that ends first waits for the other's restic before it tags, so
    both snapshots get their size and digest (the next incremental run starts from them)."""
    # 12 s of slow backup: the fast one (4 MiB) ends well within it, and the test waits
    # for both.
    with slow_backup(url, start_agent, tmp_path, "slow", size=24 * MiB) as (_, _, slow, repo):
        fast = tmp_path / "disks" / "fast.raw"
        make_image(fast, 4 * MiB, [(0, 4 * MiB)])
        wait_for(lambda: any((repo / "locks").iterdir()), "the slow backup's restic lock", RUN)
        done = ctl(url, "--json", "backup", f"a:{fast}", "b", "--restic", str(repo), "--id", "fast")
        assert "without its" not in ok(done)
        _, err = slow.communicate(timeout=RUN)
        assert slow.returncode == 0, err.decode()
    tags = [set(s["tags"]) for s in json.loads(restic(repo, "snapshots", "--json").stdout)]
    assert len(tags) == 2
    for t in tags:
        assert any(x.startswith("digest=") for x in t) and any(x.startswith("size=") for x in t)


@pytest.mark.timeout(900)
def test_each_disk_of_a_vm_is_its_own_snapshot_taken_at_the_same_instant(
    url: str, start_agent: Callable[..., AgentProc], tmp_path: Path, guest: tuple[Path, Path]
) -> None:
    """A VM with two disks: one run, one checkpoint, one transfer and one snapshot per disk
    (``vm1/vda``, ``vm1/vdb``); after writes to both, an incremental run sends each disk's
    changes, and each snapshot restores to its disk at the checkpoint."""
    second = vm.make_disk(tmp_path / "vm1-b.qcow2", 16 * MiB, data_mib=4)
    disk = vm.make_disk(tmp_path / "vm1.qcow2", 32 * MiB, data_mib=8)
    machine = vm.VM("vm1", tmp_path, disk, second_monitor=True, extra_disks=[second]).start()
    try:
        machine.wait_counter(0, timeout=120)
        site = vm_site(url, tmp_path, machine, start_agent)

        def at_checkpoint(tid: str) -> tuple[dict[str, Any], dict[str, Path]]:
            refs = {"vm1/vda": tmp_path / f"{tid}-a.raw", "vm1/vdb": tmp_path / f"{tid}-b.raw"}
            raw_image(second, refs["vm1/vdb"])  # idle but for our writes, taken while paused
            proc, _ = backup_at_checkpoint(site, machine, tid, refs["vm1/vda"])
            return finished(proc), refs

        full, before = at_checkpoint("both-full")
        guest_writes(machine, 4 * MiB, 2 * MiB, 0x41, drive="vdb")
        guest_writes(machine, 12 * MiB, 1 * MiB, 0x42)
        incremental, after = at_checkpoint("both-incr")
    finally:
        machine.stop()
    for doc, refs in ((full, before), (incremental, after)):
        disks = {d["disk"]: d for d in doc["disks"]}
        assert sorted(disks) == ["vm1/vda", "vm1/vdb"], doc
        assert {d["transfer_id"] for d in doc["disks"]} == {
            f"{doc['transfer_id']}-disk0",
            f"{doc['transfer_id']}-disk1",
        }
        for name, d in disks.items():
            assert d["kind"] == doc["kind"] and d["checkpoint"] == doc["checkpoint"]
            target, _ = site.restore(d["snapshot"], f"{doc['transfer_id']}-{name[-1]}.raw")
            assert sha256_file(target) == sha256_file(refs[name]), (doc["transfer_id"], name)
    assert incremental["kind"] == "incremental"
    for name in ("vm1/vda", "vm1/vdb"):
        d = next(x for x in incremental["disks"] if x["disk"] == name)
        assert_only_changes_crossed(d, before[name], after[name])
