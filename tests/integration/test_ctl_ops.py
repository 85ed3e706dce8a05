"""Operations through agents: backup and restore with real restic (kopia when installed) and
with pipes, provisioning under signed approvals, and every refusal: allow-list, role,
approval, schema, unknown op, repeated idempotency key."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest

from nbdnats import subjects
from nbdnats.metal.approval import load_private, sign
from nbdnats.schemas import SCHEMA_VERSION, Approval, ProvisionCommand, RecvCommand, encode
from tests.backups import RESTIC_ENV, restic, slow_backup
from tests.cli import one_line_error, run_cli
from tests.ctl import AgentProc, ctl, ctl_ask, ctl_request, ok, stored_events
from tests.images import MiB, make_image, sha256_file
from tests.nats_server import NatsServer
from tests.waits import wait_for


@pytest.fixture
def url(start_nats: Callable[..., NatsServer]) -> str:
    return start_nats(jetstream=True).url


@pytest.fixture
def disk(tmp_path: Path) -> tuple[Path, str]:
    src = tmp_path / "disks" / "vm1.raw"
    src.parent.mkdir()
    return src, make_image(src, 20 * MiB + 4096, [(0, 2 * MiB), (9 * MiB + 77, 3 * MiB)])


# -- backup and restore ---------------------------------------------------------------------


def test_backup_into_restic_and_restore_through_agents(
    url: str, start_agent: Callable[..., AgentProc], tmp_path: Path, disk: tuple[Path, str]
) -> None:
    """The password lives only in the backup node's agent environment, never in a command."""
    src, want = disk
    repo = tmp_path / "backups" / "repo"
    repo.parent.mkdir()
    restic(repo, "init", "-q")
    start_agent("a", url, "--allow", str(tmp_path / "disks"), "--export", f"vm1={src}")
    start_agent("b", url, "--allow", str(repo), env=RESTIC_ENV)

    out = ctl(url, "backup", "a:vm1", "b", "--restic", str(repo), "--id", "bk1")
    ok(out)
    assert "backed up bk1" in out.stderr.decode() and "restic snapshot " in out.stderr.decode()
    snaps = json.loads(restic(repo, "snapshots", "--json").stdout)
    assert len(snaps) == 1 and "transfer=bk1" in snaps[0]["tags"]
    dumped = restic(repo, "dump", "latest", "disk.img").stdout
    assert len(dumped) == src.stat().st_size

    target = tmp_path / "disks" / "restored.raw"
    restore = ("--json", "restore", "b", f"a:{target}", "--restic", str(repo))
    doc = json.loads(ok(ctl(url, *restore, "--snapshot", snaps[0]["short_id"])))
    assert doc["ok"] and doc["sender"]["tool"] == "restic"
    assert sha256_file(target) == want


def test_restore_takes_the_disk_it_is_told_not_the_latest_backup(
    url: str, start_agent: Callable[..., AgentProc], tmp_path: Path, disk: tuple[Path, str]
) -> None:
    """Two disks backed up into one repository: each snapshot is tagged with its disk and
    the transfer's digest; `ctl backups` lists both; a restore takes the disk it is told,
    refuses to guess between two, and ignores a crafted snapshot."""
    vm1, want1 = disk
    vm2 = vm1.parent / "vm2.raw"
    want2 = make_image(vm2, 12 * MiB, [(MiB, 5 * MiB)], seed=7)
    assert want1 != want2
    repo = tmp_path / "backups" / "repo"
    repo.parent.mkdir()
    restic(repo, "init", "-q")
    exports = ("--export", f"vm1={vm1}", "--export", f"vm2={vm2}")
    start_agent("a", url, "--allow", str(vm1.parent), *exports)
    start_agent("b", url, "--allow", str(repo), env=RESTIC_ENV)
    target = vm1.parent / "restored.raw"
    restore = ("restore", "b", f"a:{target}", "--restic", str(repo))

    done = json.loads(ok(ctl(url, "--json", "backup", "a:vm1", "b", "--restic", str(repo))))
    # One disk in the repository: a restore without --disk takes its latest.
    doc = json.loads(ok(ctl(url, "--json", *restore)))
    assert sha256_file(target) == want1 and doc["snapshot"]["disk"] == "vm1"
    done2 = json.loads(ok(ctl(url, "--json", "backup", "a:vm2", "b", "--restic", str(repo))))

    listed = json.loads(ok(ctl(url, "--json", "backups", "b", "--restic", str(repo))))
    snaps = {s["id"]: s for s in json.loads(restic(repo, "snapshots", "--json").stdout)}
    assert sorted(b["id"] for b in listed) == sorted(snaps)  # the ids restic holds
    by_disk = {(b["node"], b["disk"]): b for b in listed}
    assert set(by_disk) == {("a", "vm1"), ("a", "vm2")}
    assert by_disk["a", "vm1"]["digest"] == done["receiver"]["digest"]  # as the stats say
    assert (
        by_disk["a", "vm2"]["digest"] == done2["receiver"]["digest"] != done["receiver"]["digest"]
    )
    assert by_disk["a", "vm1"]["size"] == vm1.stat().st_size
    assert by_disk["a", "vm1"]["transfer_id"] == done["transfer_id"]
    tags = snaps[by_disk["a", "vm2"]["id"]]["tags"]
    digest2 = done2["receiver"]["digest"]
    assert {"nbdnats", "node=a", "disk=vm2", f"digest={digest2}"} <= set(tags), tags
    text = ok(ctl(url, "backups", "b", "--restic", str(repo)))
    assert by_disk["a", "vm1"]["short_id"] in text and "a:vm2" in text
    one = json.loads(
        ok(ctl(url, "--json", "backups", "b", "--restic", str(repo), "--disk", "a:vm2"))
    )
    assert [b["id"] for b in one] == [by_disk["a", "vm2"]["id"]]
    # The repository is checked against the agent's allow-list, as for backup and restore.
    err = one_line_error(ctl(url, "backups", "b", "--restic", str(tmp_path / "elsewhere")))
    assert "outside this agent's allow-list" in err, err

    # Two disks and no --disk: refused, naming both.
    err = one_line_error(ctl(url, *restore))
    assert "holds backups of 2 disks" in err and "a:vm1 (latest" in err and "a:vm2 (latest" in err
    assert by_disk["a", "vm2"]["short_id"] in err and "--disk NODE:DISK" in err

    # A crafted snapshot, newest and tagged as vm1 but with an impossible size: left out.
    tags = "nbdnats,node=a,disk=vm1,size=-5"
    stdin = ("--stdin", "--stdin-filename", "disk.img")
    subprocess.run(
        ["restic", "-r", str(repo), "backup", "-q", "--tag", tags, *stdin],
        input=b"\x66" * MiB,
        env={**os.environ, **RESTIC_ENV},
        check=True,
    )
    assert len(json.loads(restic(repo, "snapshots", "--json").stdout)) == 3

    target.unlink()
    out = ctl(url, "--json", *restore, "--disk", "a:vm1")
    doc = json.loads(ok(out))
    assert sha256_file(target) == want1  # vm1's bytes, not vm2's (the latest backup)
    # The content digest names the bytes: the restore's is the backup's.
    assert doc["receiver"]["digest"] == done["receiver"]["digest"]
    assert doc["snapshot"]["id"] == by_disk["a", "vm1"]["id"]
    again = json.loads(ok(ctl(url, "--json", "backups", "b", "--restic", str(repo))))
    assert sorted(b["id"] for b in again) == sorted(snaps)  # not the crafted one

    # --snapshot still works, and the summary names the snapshot it restored.
    short2 = by_disk["a", "vm2"]["short_id"]
    target.unlink()
    out = ctl(url, *restore, "--snapshot", short2)
    ok(out)
    assert sha256_file(target) == want2
    assert f"from snapshot {short2} of a:vm2 " in out.stderr.decode()
    for crafted_id in ("../x", "-v", f"{short2},latest"):
        err = one_line_error(ctl(url, *restore, f"--snapshot={crafted_id}"))
        assert "not a snapshot id" in err, err
    err = one_line_error(ctl(url, *restore, "--disk", "a:vm1\x1b[2J"))
    assert "disk name" in err, err


def test_a_restore_whose_bytes_are_not_what_was_backed_up_fails(
    url: str, start_agent: Callable[..., AgentProc], tmp_path: Path
) -> None:
    """A snapshot whose recorded content digest does not match what the repository gives
    back (crafted here with restic itself: a damaged pack would read the same) fails the
    restore with an integrity error, though every frame arrived intact."""
    repo = tmp_path / "backups" / "repo"
    repo.parent.mkdir()
    restic(repo, "init", "-q")
    lie = "blk64k-xxh3-128:" + "0" * 32
    tags = f"nbdnats,node=a,disk=vm9,size={MiB},digest={lie}"
    stdin = ("--stdin", "--stdin-filename", "disk.img")
    subprocess.run(
        ["restic", "-r", str(repo), "backup", "-q", "--tag", tags, *stdin],
        input=b"\x42" * MiB,
        env={**os.environ, **RESTIC_ENV},
        check=True,
    )
    start_agent("a", url, "--allow", str(tmp_path))
    start_agent("b", url, "--allow", str(repo), env=RESTIC_ENV)
    target = tmp_path / "restored.raw"
    run = ctl(url, "--json", "restore", "b", f"a:{target}", "--restic", str(repo))
    err = one_line_error(run)
    assert run.returncode == 1, run
    assert "are not what was backed up" in err and lie in err and "a:vm9" in err, err
    assert json.loads(run.stdout)["code"] == "integrity"


def test_a_backup_finishing_while_another_holds_the_repository_keeps_its_snapshot(
    url: str, start_agent: Callable[..., AgentProc], tmp_path: Path, disk: tuple[Path, str]
) -> None:
    """`restic tag` needs the repository to itself: while another restic backup runs, the
    digest cannot be added. The backup still succeeds, its snapshot tagged with its disk
    (from the start), and says which tags it lacks; a restore by disk finds it."""
    src, want = disk
    repo = tmp_path / "backups" / "repo"
    repo.parent.mkdir()
    restic(repo, "init", "-q")
    start_agent("a", url, "--allow", str(src.parent), "--export", f"vm1={src}")
    start_agent("b", url, "--allow", str(repo), env=RESTIC_ENV)
    stdin = ("--stdin", "--stdin-filename", "other.img")
    other = subprocess.Popen(
        ["restic", "-r", str(repo), "backup", "-q", *stdin],
        stdin=subprocess.PIPE,
        env={**os.environ, **RESTIC_ENV},
    )
    try:
        wait_for(lambda: any((repo / "locks").iterdir()), "the other backup's lock")
        out = ctl(url, "backup", "a:vm1", "b", "--restic", str(repo))
        summary = ok(out) + out.stderr.decode()
        assert "(without its size, digest tags: " in summary and " tag failed" in summary
    finally:
        assert other.stdin is not None
        other.stdin.write(b"other")
        other.stdin.close()
        other.wait(timeout=60)
    listed = json.loads(ok(ctl(url, "--json", "backups", "b", "--restic", str(repo))))
    assert [(b["node"], b["disk"], b.get("digest")) for b in listed] == [("a", "vm1", None)]
    target = src.parent / "restored.raw"
    ok(ctl(url, "restore", "b", f"a:{target}", "--restic", str(repo), "--disk", "a:vm1"))
    assert sha256_file(target) == want


def test_failed_backup_saves_no_snapshot(
    url: str, start_agent: Callable[..., AgentProc], tmp_path: Path
) -> None:
    """Cancelled half-way: restic is stopped before its pipe closes, so no partial image is
    stored as a snapshot."""
    with slow_backup(url, start_agent, tmp_path, "half") as (_, b, run, repo):
        wait_for(lambda: "accepted recv half" in b.text(), "the backup", timeout=20)
        wait_for(lambda: '"done_bytes":0' not in ok(ctl(url, "--json", "transfers")), "data")
        ok(ctl(url, "cancel", "half"))
        _, err = run.communicate(timeout=60)
    assert run.returncode == 1 and "cancelled" in err.decode()
    assert json.loads(restic(repo, "snapshots", "--json").stdout) == []


def test_backup_tool_failure_is_reported_as_the_tool_said_it(
    url: str, start_agent: Callable[..., AgentProc], tmp_path: Path, disk: tuple[Path, str]
) -> None:
    src, _ = disk
    repo = tmp_path / "repo"
    restic(repo, "init", "-q")
    start_agent("a", url, "--allow", str(src.parent))
    start_agent("b", url, "--allow", str(repo), env={"RESTIC_PASSWORD": "wrong"})
    err = one_line_error(ctl(url, "backup", f"a:{src}", "b", "--restic", str(repo)))
    assert "restic failed" in err and "wrong password" in err


def test_backup_and_restore_through_a_pipe_command(
    url: str, start_agent: Callable[..., AgentProc], tmp_path: Path, disk: tuple[Path, str]
) -> None:
    src, want = disk
    store = tmp_path / "store"
    store.mkdir()
    gzip = os.path.realpath(shutil.which("gzip") or "gzip")
    dd = os.path.realpath(shutil.which("dd") or "dd")
    start_agent("a", url, "--allow", str(src.parent))
    start_agent("b", url, "--allow", str(store), "--allow", gzip)
    # A pipe runs without a shell: dd writes its stdin into the store.
    start_agent("c", url, "--allow", str(store), "--allow", dd)
    ok(ctl(url, "backup", f"a:{src}", "c", "--pipe", f"dd of={store}/vm1.img bs=1M status=none"))
    assert sha256_file(store / "vm1.img") == want
    size = str(src.stat().st_size)
    subprocess.run(["gzip", "-k", str(store / "vm1.img")], check=True)
    target = src.parent / "back.raw"
    pipe = ("--pipe", f"gzip -dc {store}/vm1.img.gz", "--size", size)
    ok(ctl(url, "restore", "b", f"a:{target}", *pipe))
    assert sha256_file(target) == want
    # A pipe restore must be told the size; a program off the allow-list is refused.
    err = one_line_error(ctl(url, "restore", "b", f"a:{target}", "--pipe", "gzip -dc x"))
    assert "needs --size" in err
    err = one_line_error(ctl(url, "backup", f"a:{src}", "b", "--pipe", "dd of=/tmp/x"))
    assert "pipe command" in err and "outside this agent's allow-list" in err


@pytest.mark.skipif(shutil.which("kopia") is None, reason="no kopia binary on this machine")
def test_backup_into_kopia_and_restore(
    url: str, start_agent: Callable[..., AgentProc], tmp_path: Path, disk: tuple[Path, str]
) -> None:
    src, want = disk
    env = {
        "KOPIA_PASSWORD": "agent-secret",
        "KOPIA_CONFIG_PATH": str(tmp_path / "kopia.config"),
        "KOPIA_CACHE_DIRECTORY": str(tmp_path / "kcache"),
    }
    subprocess.run(
        ["kopia", "repository", "create", "filesystem", "--path", str(tmp_path / "krepo")],
        env={**os.environ, **env},
        check=True,
    )
    start_agent("a", url, "--allow", str(src.parent))
    start_agent("b", url, env=env)
    out = ctl(url, "backup", f"a:{src}", "b", "--kopia", "/vms/vm1")
    ok(out)
    root = out.stderr.decode().split("kopia root ")[1].split()[0].rstrip(";")
    target = src.parent / "k.raw"
    ok(ctl(url, "restore", "b", f"a:{target}", "--kopia", f"{root}/disk.img"))
    assert sha256_file(target) == want


# -- provisioning ---------------------------------------------------------------------------


@pytest.fixture
def installer(
    url: str, start_agent: Callable[..., AgentProc], tmp_path: Path, disk: tuple[Path, str]
) -> dict[str, Path]:
    """An image host, an installer with a trusted key, and its disk filled with a pattern."""
    keys, untrusted = tmp_path / "trusted", tmp_path / "untrusted"
    keys.mkdir()
    untrusted.mkdir()
    ok(run_cli("approve", "--new-key", str(tmp_path / "ops")))
    shutil.copy(tmp_path / "ops.pub", keys / "ops.pub")
    ok(run_cli("approve", "--new-key", str(untrusted / "rogue")))
    devdir = tmp_path / "dev"
    devdir.mkdir()
    device = devdir / "sda"
    device.write_bytes(b"\xa5" * (32 * MiB))
    start_agent("images", url, "--allow", str(disk[0].parent))
    start_agent(
        "inst1", url, "--role", "installer", "--trusted-keys", str(keys), "--allow", str(devdir)
    )
    return {"key": tmp_path / "ops.key", "rogue": untrusted / "rogue.key", "device": device}


def approve(tmp_path: Path, key: Path, name: str, *args: str) -> Path:
    out = tmp_path / f"{name}.json"
    ok(run_cli("approve", "--key", str(key), "-o", str(out), *args))
    return out


def test_provision_with_a_signed_approval_writes_and_verifies(
    url: str, installer: dict[str, Path], tmp_path: Path, disk: tuple[Path, str]
) -> None:
    src, want = disk
    digest = ok(run_cli("digest", str(src))).split()[0]
    assert digest == f"sha256:{want}"
    for_it = ("--node", "inst1", "--device", str(installer["device"]), "--image", str(src))
    approval = approve(tmp_path, installer["key"], "good", *for_it)
    target = f"inst1:{installer['device']}"
    out = ctl(url, "provision", f"images:{src}", target, "--approval", str(approval))
    ok(out)
    assert f"verified sha256:{want}" in out.stderr.decode()
    assert sha256_file(installer["device"], src.stat().st_size) == want
    done = [
        e for e in stored_events(url, "transfer") if e["state"] == "done" and e["node"] == "inst1"
    ]
    assert done[0]["image_digest"] == f"sha256:{want}" and done[0]["op"] == "provision"


def test_provision_of_a_qcow2_image_writes_the_disk_it_holds(
    url: str, installer: dict[str, Path], tmp_path: Path, disk: tuple[Path, str]
) -> None:
    """The approval, the image host's digest and the stream all see the disk, not the
    qcow2 file: the device ends up holding the raw disk, read back and verified."""
    src, want = disk
    qcow = src.with_suffix(".qcow2")
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(src), str(qcow)], check=True)
    for_it = ("--node", "inst1", "--device", str(installer["device"]), "--image", str(qcow))
    approval = approve(tmp_path, installer["key"], "qcow", *for_it)
    out = ctl(
        url,
        "provision",
        f"images:{qcow}",
        f"inst1:{installer['device']}",
        "--approval",
        str(approval),
    )
    ok(out)
    assert f"verified sha256:{want}" in out.stderr.decode()
    assert sha256_file(installer["device"], src.stat().st_size) == want


BAD_APPROVALS = {
    "expired": "approval expired at",
    "wrong-node": "approval is for node inst2, not inst1",
    "wrong-digest": "approval is for image sha256:" + "0" * 64,
    "wrong-device": "approval is for device",
    "untrusted": "which this installer does not trust",
    "tampered": "approval signature is not valid",
}


@pytest.mark.parametrize("case", sorted(BAD_APPROVALS))
def test_provision_refuses_a_bad_approval_and_writes_nothing(
    case: str, url: str, installer: dict[str, Path], tmp_path: Path, disk: tuple[Path, str]
) -> None:
    src, _ = disk
    device = installer["device"]
    before = sha256_file(device)
    args = {"node": "inst1", "device": str(device), "digest": None, "key": installer["key"]}
    if case == "wrong-node":
        args["node"] = "inst2"
    if case == "wrong-digest":
        args["digest"] = "sha256:" + "0" * 64
    if case == "wrong-device":
        args["device"] = str(device.parent / "sdb")
    if case == "untrusted":
        args["key"] = installer["rogue"]
    image = ["--digest", str(args["digest"])] if args["digest"] else ["--image", str(src)]
    for_it = ("--node", str(args["node"]), "--device", str(args["device"]), *image)
    approval = approve(tmp_path, Path(str(args["key"])), case, *for_it)
    doc = json.loads(approval.read_text())
    if case == "expired":  # signed properly, but its time is up
        key = load_private(installer["key"])
        signed = sign(
            key,
            node="inst1",
            image_digest=doc["image_digest"],
            device=str(device),
            expires=dt.datetime(2020, 1, 1, tzinfo=dt.UTC),
        )
        approval.write_bytes(encode(signed))
    if case == "tampered":  # a valid approval with a later expiry written in
        doc["expires"] = "2099-01-01T00:00:00Z"
        approval.write_text(json.dumps(doc))
    proc = ctl(url, "provision", f"images:{src}", f"inst1:{device}", "--approval", str(approval))
    err = one_line_error(proc)
    assert proc.returncode == 1
    assert BAD_APPROVALS[case] in err
    assert sha256_file(device) == before
    refused = [e for e in stored_events(url, "refused") if e["node"] == "inst1"]
    assert (
        refused
        and refused[-1]["code"] == "approval"
        and BAD_APPROVALS[case] in str(refused[-1]["error"])
    )


def test_a_replayed_approval_with_another_stream_leaves_the_device_unbootable(
    url: str, installer: dict[str, Path], tmp_path: Path, disk: tuple[Path, str]
) -> None:
    """An attacker replays a valid approval in a command of its own and streams another
    image: the installer hashes the stream as it writes it, wipes the device's first and
    last MiB (partition tables, boot code) and fails, before anything reports success."""
    src, want = disk
    device = installer["device"]
    for_it = ("--node", "inst1", "--device", str(device), "--image", str(src))
    approval = approve(tmp_path, installer["key"], "good", *for_it)
    evil = tmp_path / "evil.raw"
    make_image(evil, src.stat().st_size, [(0, src.stat().st_size)], seed=99)
    cmd = ProvisionCommand(
        key="replay-1",
        transfer_id="replayed",
        device=str(device),
        approval=msgspec.json.decode(approval.read_bytes(), type=Approval),
        image_digest=f"sha256:{want}",
        size=src.stat().st_size,
    )
    reply = ctl_request(url, subjects.ctl_command("inst1", "provision"), encode(cmd))
    assert reply["ok"] is True, reply  # the approval itself is genuine
    sent = run_cli("send", str(evil), "--id", "replayed", "--data-url", url)
    assert sent.returncode == 1
    assert "nobody approved" in one_line_error(sent)
    data = device.read_bytes()
    size = src.stat().st_size
    assert data[:MiB] == bytes(MiB) and data[size - MiB : size] == bytes(MiB)
    failed = []

    def reported() -> bool:
        failed[:] = [e for e in stored_events(url, "transfer") if e["node"] == "inst1"]
        return any(e["state"] == "failed" for e in failed)

    wait_for(reported, "the installer's failure event")
    assert not any(e["state"] == "done" for e in failed)
    assert "first and last MiB were zeroed" in str(failed[-1]["error"])


def test_provision_without_approval_file_is_a_usage_error(url: str, tmp_path: Path) -> None:
    proc = ctl(url, "provision", "a:/x", "b:/dev/sda", "--approval", str(tmp_path / "none.json"))
    assert proc.returncode == 2
    assert "cannot read approval" in one_line_error(proc)


def test_installer_refuses_plain_writes(
    url: str, installer: dict[str, Path], disk: tuple[Path, str]
) -> None:
    before = sha256_file(installer["device"])
    err = one_line_error(ctl(url, "copy", f"images:{disk[0]}", f"inst1:{installer['device']}"))
    assert "inst1 is an installer" in err and "signed approval" in err
    assert sha256_file(installer["device"]) == before


# -- refusals -------------------------------------------------------------------------------


def test_paths_outside_the_allow_list_are_refused_before_a_byte_is_written(
    url: str, start_agent: Callable[..., AgentProc], tmp_path: Path, disk: tuple[Path, str]
) -> None:
    src, _ = disk
    inside = tmp_path / "inside"
    inside.mkdir()
    (tmp_path / "inside2").mkdir()
    start_agent("a", url, "--allow", str(src.parent))
    start_agent("b", url, "--allow", str(inside))
    cases = [
        (f"a:{src}", f"b:{tmp_path}/outside.raw", f"{tmp_path}/outside.raw"),
        (f"a:{src}", f"b:{tmp_path}/inside2/x.raw", f"{tmp_path}/inside2/x.raw"),  # a prefix
        (f"a:{src}", f"b:{inside}/../escape.raw", f"(that is {tmp_path}/escape.raw) is outside"),
        (f"a:{src}", "b:relative.raw", "'relative.raw' is not an absolute path"),
        (f"a:{src}", "b:-", "endpoint '-' cannot be named"),
        (f"a:{src}", "b:null:", "endpoint 'null:' cannot be named"),
        (f"a:{src}", f"b:nbd+unix:///x?socket={tmp_path}/s.sock", f"NBD socket {tmp_path}/s.sock"),
        (f"a:{src}", "b:nbd://10.0.0.1/x", "nbd://10.0.0.1/x is outside"),
        ("a:/etc/passwd", f"b:{inside}/p.raw", "/etc/passwd is outside"),
    ]
    for s, d, message in cases:
        err = one_line_error(ctl(url, "copy", s, d))
        assert message in err, (s, d, err)
    os.symlink("/etc", inside / "etc")
    err = one_line_error(ctl(url, "copy", f"a:{src}", f"b:{inside}/etc/x.raw"))
    assert "(that is /etc/x.raw) is outside" in err
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".raw") == []
    assert list(inside.iterdir()) == [inside / "etc"]
    refused = stored_events(url, "refused")
    assert len(refused) == len(cases) + 1 and all(e["code"] == "denied" for e in refused)


def test_an_unknown_export_is_refused_with_the_exports_the_node_has(
    url: str, start_agent: Callable[..., AgentProc], tmp_path: Path, disk: tuple[Path, str]
) -> None:
    src, _ = disk
    start_agent("a", url, "--allow", str(src.parent), "--export", f"vm1={src}")
    start_agent("b", url, "--allow", str(src.parent))
    proc = ctl(url, "copy", "a:vm2", f"b:{src.parent}/out.raw")
    assert one_line_error(proc) == (
        "nbd-nats: error: a: node a has no export vm2 (it has: vm1); "
        "name one of them, an absolute path or an NBD URI"
    )
    assert proc.returncode == 1
    # A node without exports says so; the target node resolves its end the same way.
    err = one_line_error(ctl(url, "copy", "a:vm1", "b:vm1"))
    assert err.endswith(
        "b: node b has no export vm1 (it has: none); "
        "name one of them, an absolute path or an NBD URI"
    )
    refused = stored_events(url, "refused")
    assert [(e["node"], e["code"]) for e in refused] == [("a", "denied"), ("b", "denied")]
    assert not (src.parent / "out.raw").exists()


def test_an_agent_advertises_only_the_backup_tools_on_its_path(
    url: str, start_agent: Callable[..., AgentProc], tmp_path: Path, disk: tuple[Path, str]
) -> None:
    """restic is installed here; kopia is listed only where it is installed too."""
    src, _ = disk
    empty = tmp_path / "bin"
    empty.mkdir()
    repo = tmp_path / "repo"
    restic(repo, "init", "-q")
    start_agent("a", url, "--allow", str(src.parent))
    start_agent("full", url, "--allow", str(repo), env=RESTIC_ENV)
    start_agent("bare", url, "--allow", str(repo), env={**RESTIC_ENV, "PATH": str(empty)})
    nodes = {n["node"]: n for n in json.loads(ok(ctl(url, "--json", "nodes")))}
    kopia = ["kopia"] if shutil.which("kopia") else []
    assert nodes["full"]["capabilities"] == ["send", "recv", "digest", "restic", *kopia, "pipe"]
    assert nodes["bare"]["capabilities"] == ["send", "recv", "digest", "pipe"]
    # Asked anyway, the node without restic says what is missing.
    err = one_line_error(ctl(url, "backup", f"a:{src}", "bare", "--restic", str(repo)))
    assert "bare: restic is not installed on this node (not on its agent's PATH)" in err
    ok(ctl(url, "backup", f"a:{src}", "full", "--restic", str(repo)))


def test_bad_messages_get_an_error_reply_and_the_agent_carries_on(
    url: str, start_agent: Callable[..., AgentProc], tmp_path: Path
) -> None:
    a = start_agent("a", url, "--allow", str(tmp_path))
    cmd = subjects.ctl_command("a", "recv")
    cases = [
        (cmd, b"not json", "schema", "not JSON"),
        (cmd, b'{"transfer_id": 7}', "schema", "Expected `str`, got `int` - at `$.transfer_id`"),
        (cmd, b'{"transfer_id": "x", "dst": "/x", "colour": 1}', "schema", "unknown field"),
        (cmd, b'{"v": 99, "transfer_id": "x"}', "schema", "schema version 99"),
        (cmd, b'{"transfer_id": "x", "dst": "/x"}', "schema", "no idempotency key"),
        (cmd, b'{"key": "k", "transfer_id": "a.b", "dst": "/x"}', "usage", "invalid transfer id"),
        (cmd, b'{"key": "k", "transfer_id": "x"}', "schema", "exactly one of 'dst' and 'tool'"),
        (subjects.ctl_command("a", "format"), b"{}", "schema", "unknown command 'format'"),
        (subjects.ctl_query("a", "secrets"), b"{}", "schema", "unknown query 'secrets'"),
    ]
    for subject, payload, code, message in cases:
        reply = ctl_request(url, subject, payload)
        assert reply["ok"] is False and reply["code"] == code, (payload, reply)
        assert message in str(reply["error"]), (payload, reply)
    info = ctl_request(url, subjects.ctl_query("a", "info"), b"")
    assert info["node"] == "a" and info["state"] == "up" and info["v"] == SCHEMA_VERSION
    assert a.proc.poll() is None and "Traceback" not in a.text()


def test_a_repeated_idempotency_key_never_starts_a_second_transfer(
    url: str, start_agent: Callable[..., AgentProc], tmp_path: Path
) -> None:
    start_agent("b", url, "--allow", str(tmp_path))
    cmd = RecvCommand(key="k-1", transfer_id="once", dst=str(tmp_path / "d.raw"))
    subject = subjects.ctl_command("b", "recv")

    async def twice() -> list[dict[str, object]]:
        return list(await asyncio.gather(*(ctl_ask(url, subject, encode(cmd)) for _ in range(3))))

    replies = asyncio.run(twice())
    again = ctl_request(url, subject, encode(cmd))
    assert all(r == {**replies[0]} for r in [*replies, again])
    assert replies[0]["ok"] is True and replies[0]["transfer_id"] == "once"
    rows = json.loads(ok(ctl(url, "--json", "transfers", "--node", "b")))
    assert [(r["transfer_id"], r["state"]) for r in rows] == [("once", "running")]
    accepted = [e for e in stored_events(url, "transfer") if e["state"] == "accepted"]
    assert len(accepted) == 1
    # The same key for another command is a conflict; a new key for the same id is busy.
    other = msgspec.structs.replace(cmd, dst=str(tmp_path / "other.raw"))
    reply = ctl_request(url, subject, encode(other))
    assert reply["code"] == "conflict" and "used for a different command" in str(reply["error"])
    fresh = msgspec.structs.replace(cmd, key="k-2")
    reply = ctl_request(url, subject, encode(fresh))
    assert reply["code"] == "busy" and "already running" in str(reply["error"])
    ok(ctl(url, "cancel", "once"))
