"""The allow-list against escapes: NBD URIs read the way libnbd reads them, pipe arguments
that name paths, symlinks to block devices, tool argv built with `--` separators."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from nbdnats.ctl.policy import Policy, nbd_query
from nbdnats.ctl.tools import (
    backup_argv,
    backups_argv,
    done_tags,
    labels,
    restore_argv,
    scrub,
    shown,
    size_argv,
    tag_argv,
)
from nbdnats.errors import PolicyError, UsageError
from nbdnats.planes import redact_url
from nbdnats.schemas import Tool


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    return allowed, outside


# -- NBD URIs -------------------------------------------------------------------------------


def test_a_semicolon_cannot_smuggle_a_second_socket(dirs: tuple[Path, Path]) -> None:
    """libnbd splits the query on ';' too and takes the last socket; parse_qs did not."""
    allowed, outside = dirs
    p = Policy([str(allowed)])
    uri = f"nbd+unix:///disk?socket={allowed}/x;socket={outside}/s.sock"
    with pytest.raises(PolicyError, match="socket"):
        p.endpoint(uri)
    # Both are there, as libnbd reads the query (and it would take the last one).
    assert nbd_query(f"nbd+unix:///d?socket={allowed}/x;socket={outside}/s") == [
        ("socket", f"{allowed}/x"),
        ("socket", f"{outside}/s"),
    ]
    # libnbd's quirk: ';' separates only when no '&' follows; then it is part of a value.
    assert nbd_query("nbd+unix:///d?socket=/a;b&x=%2F") == [("socket", "/a;b"), ("x", "/")]


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("socket=ALLOWED/a&socket=ALLOWED/b", "socket is given twice"),
        ("socket=ALLOWED/a;x=1&socket=ALLOWED/b", "';'"),
        ("socket=ALLOWED/a&colour=blue", "unknown NBD URI parameter 'colour'"),
        ("socket=ALLOWED/a&=x", "parameter without a name"),
        ("socket=%2FOUTSIDE%2Fs.sock", "outside this agent's allow-list"),
        ("socket=ALLOWED/..%2F..%2Fs.sock", "outside this agent's allow-list"),
        ("socket=ALLOWED/a%00b", "control character"),
        ("socket=", "socket is empty"),
        ("socket=ALLOWED/a&tls-psk-file=OUTSIDE/k", "tls-psk-file"),
        ("socket=ALLOWED/a&tls-certificates=OUTSIDE", "tls-certificates"),
        ("socket=ALLOWED/a&tls-psk-file=ALLOWED/a&tls-psk-file=OUTSIDE/k", "given twice"),
    ],
)
def test_nbd_uri_parameters_are_checked_as_libnbd_reads_them(
    dirs: tuple[Path, Path], query: str, message: str
) -> None:
    allowed, outside = dirs
    q = query.replace("ALLOWED", str(allowed)).replace("OUTSIDE", str(outside))
    with pytest.raises(PolicyError, match=message):
        Policy([str(allowed)]).endpoint(f"nbd+unix:///disk?{q}")


def test_allowed_nbd_uris_still_pass(dirs: tuple[Path, Path]) -> None:
    allowed, _ = dirs
    p = Policy([str(allowed), "nbd://10.0.0.5:10809/"])
    for uri in (
        f"nbd+unix:///disk?socket={allowed}/s.sock",
        f"nbds+unix:///disk?socket={allowed}/s.sock&tls-psk-file={allowed}/keys.psk",
        f"nbd+unix:///disk?socket=%2F{str(allowed)[1:]}/s.sock",  # percent-encoded, decoded
        "nbd://10.0.0.5:10809/d",
    ):
        assert p.endpoint(uri) == uri


def test_tls_from_a_command_must_authenticate_the_server(dirs: tuple[Path, Path]) -> None:
    """libnbd encrypts an nbds:// connection without tls-certificates or tls-psk-file, but
    accepts any server: an agent refuses such a URI."""
    allowed, _ = dirs
    p = Policy([str(allowed), "nbds://10.0.0.5:10809/"])
    for uri in (f"nbds+unix:///disk?socket={allowed}/s.sock", "nbds://10.0.0.5:10809/d"):
        with pytest.raises(PolicyError, match="would not be authenticated"):
            p.endpoint(uri)
    with_ca = f"nbds://10.0.0.5:10809/d?tls-certificates={allowed}"
    assert p.endpoint(with_ca) == with_ca


def test_tcp_nbd_uris_get_their_parameters_checked_too(dirs: tuple[Path, Path]) -> None:
    allowed, outside = dirs
    p = Policy([str(allowed), "nbd://10.0.0.5:10809/"])
    with pytest.raises(PolicyError, match="tls-psk-file"):
        p.endpoint(f"nbd://10.0.0.5:10809/d?tls-psk-file={outside}/k")
    with pytest.raises(PolicyError, match="socket"):
        p.endpoint(f"nbd://10.0.0.5:10809/d?socket={allowed}/s")
    with pytest.raises(PolicyError, match="no socket"):
        p.endpoint("nbd+unix:///d#?socket=/x")  # after '#' it is the fragment, not a query


def test_a_uri_prefix_ends_at_a_boundary() -> None:
    p = Policy(["nbd://10.0.0.5", "rest:https://backup.example/repos"])
    assert p.endpoint("nbd://10.0.0.5/x") == "nbd://10.0.0.5/x"
    for bad in (
        "nbd://10.0.0.5.evil.example/x",
        "nbd://10.0.0.50/x",
        "nbd://10.0.0.5:x@evil.example/x",  # userinfo '10.0.0.5:x', host evil.example
        "nbd://10.0.0.5@evil.example/x",
    ):
        with pytest.raises(PolicyError, match="outside"):
            p.endpoint(bad)
    assert p.location("rest:https://backup.example/repos/a", "repo")
    with pytest.raises(PolicyError, match="outside"):
        p.location("rest:https://backup.example/repos2", "repo")


def test_a_refused_uri_is_shown_without_its_password() -> None:
    with pytest.raises(PolicyError) as e:
        Policy([]).location("rest:https://u:hunter2@host/r", "restic repository")
    assert "hunter2" not in str(e.value) and "rest:https://u:***@host/r" in str(e.value)
    assert redact_url("nats://tok3n@h:4222,nats://u:p@h2") == "nats://***@h:4222,nats://u:***@h2"
    assert redact_url("/srv/repo") == "/srv/repo"


# -- pipe arguments -------------------------------------------------------------------------


def test_pipe_arguments_that_name_paths_must_be_under_the_allow_list(
    dirs: tuple[Path, Path],
) -> None:
    allowed, outside = dirs
    zstd = shutil.which("zstd") or "/usr/bin/zstd"
    p = Policy([str(allowed), os.path.realpath(zstd)])
    good = [
        ["zstd", "-q", "-o", f"{allowed}/vm1.zst"],
        ["zstd", "-q", f"-o{allowed}/vm1.zst"],
        ["zstd", "-q", f"--output={allowed}/vm1.zst"],
        ["zstd", "-dc", f"{allowed}/vm1.zst"],
        ["zstd", "-19", "--long=27", "-T0", "-"],
    ]
    for command in good:
        argv = p.pipe_argv(command)
        assert argv[1:] == command[1:] and argv[0] == os.path.realpath(zstd)
    bad = [
        (["zstd", "-q", "-o", f"{outside}/x"], "outside"),
        (["zstd", "-q", f"-o{outside}/x"], "outside"),
        (["zstd", f"--output={outside}/x"], "outside"),
        (["zstd", "-dc", f"{outside}/secret"], "outside"),
        (["zstd", "-o", f"{allowed}/../outside/x"], "'..'"),
        (["zstd", "-o", ".."], "'..'"),
        (["zstd", "-o", "../x"], "'..'"),
        (["zstd", "-o..", "x"], "'..'"),
        (["zstd", "-o", "sub/x"], "not absolute"),
        (["zstd", "-o", "file:///etc/passwd"], "not absolute"),
        (["zstd", "-o", f"{allowed}/a:{outside}/b"], "two paths"),
        (["zstd", "-o", f"{allowed}/a\x00b"], "control character"),
    ]
    for command, message in bad:
        with pytest.raises(PolicyError, match=message):
            p.pipe_argv(command)
    with pytest.raises(PolicyError, match=r"pipe command .* is outside this agent's allow-list"):
        Policy([str(allowed)]).pipe_argv(["cat"])


# -- symlinks to block devices --------------------------------------------------------------


@contextlib.contextmanager
def block_device(tmp_path: Path) -> Iterator[str]:
    """A real block device: a loop device over a small file (losetup, as root), removed
    afterwards; else skip (a block node made with mknod needs root as well)."""
    if os.geteuid() != 0 or shutil.which("losetup") is None:
        pytest.skip("needs root and losetup for a loop device")
    backing = tmp_path / "loop.img"
    backing.write_bytes(b"\0" * (1 << 20))
    made = subprocess.run(["losetup", "--find", "--show", str(backing)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot create a loop device: {made.stderr.decode().strip()}")
    dev = made.stdout.decode().strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


def test_a_by_id_link_to_a_block_device_is_allowed(tmp_path: Path) -> None:
    """`--allow /dev/disk/by-id` as documented: the link is under the prefix as given, and
    it resolves to a block device (here a loop device, linked from a by-id directory in tmp).
    A regular file or a character device behind such a link still needs its resolved path
    under the allow-list."""
    by_id = tmp_path / "by-id"
    by_id.mkdir()
    secret = tmp_path / "secret"
    secret.write_bytes(b"x")
    with block_device(tmp_path) as dev:
        assert stat.S_ISBLK(os.stat(dev).st_mode)
        (by_id / "nvme-DISK").symlink_to(dev)
        (by_id / "file-link").symlink_to(secret)
        (by_id / "null-link").symlink_to("/dev/null")
        p = Policy([str(by_id)])
        assert p.path(str(by_id / "nvme-DISK"), "device") == dev
        assert p.endpoint(str(by_id / "nvme-DISK")) == dev
        for bad in ("file-link", "null-link"):
            with pytest.raises(PolicyError, match="outside"):
                p.path(str(by_id / bad))
        with pytest.raises(PolicyError, match="outside"):
            p.path(f"{by_id}/../by-id/nvme-DISK")  # '..' never takes the lexical rule
        with pytest.raises(PolicyError, match="outside"):
            Policy([str(tmp_path / "elsewhere")]).path(str(by_id / "nvme-DISK"))
        # A directory anyone may write into is no by-id: a link there proves nothing.
        by_id.chmod(0o777)
        with pytest.raises(PolicyError, match="outside"):
            p.path(str(by_id / "nvme-DISK"))
        by_id.chmod(0o755)
        nested = by_id / "open"
        nested.mkdir(mode=0o755)
        nested.chmod(0o757)
        (nested / "disk").symlink_to(dev)
        with pytest.raises(PolicyError, match="outside"):
            p.path(str(nested / "disk"))


# -- tool argv ------------------------------------------------------------------------------


def test_tool_argv_puts_values_from_a_command_after_a_separator(tmp_path: Path) -> None:
    """kopia is not installed here: its command lines are checked as built (kingpin, its
    flag parser, takes everything after `--` as an argument and expands `@file` only
    before it)."""
    repo = tmp_path / "repo"
    p = Policy([str(tmp_path)])
    restic = Tool(kind="restic", repo=str(repo), snapshot="1a2b3c4d")
    assert restore_argv(restic, p) == [
        "restic",
        f"--repo={repo}",
        "dump",
        "--",
        "1a2b3c4d",
        "disk.img",
    ]
    assert size_argv(restic, p) == [
        "restic",
        f"--repo={repo}",
        "ls",
        "--json",
        "--",
        "1a2b3c4d",
        "/disk.img",
    ]
    assert backup_argv(Tool(kind="restic", repo=str(repo)), p, {"transfer": "t1"}) == [
        "restic",
        f"--repo={repo}",
        "backup",
        "--stdin",
        "--stdin-filename",
        "disk.img",
        "--json",
        "--tag=nbdnats",
        "--tag=transfer=t1",
    ]
    root = "k" + "0123456789abcdef" * 2
    assert backup_argv(Tool(kind="kopia", source="/vms/vm1"), p, {"transfer": "t1"}) == [
        "kopia",
        "snapshot",
        "create",
        "--stdin-file",
        "disk.img",
        "--tags=nbdnats:backup",
        "--tags=transfer:t1",
        "--",
        "/vms/vm1",
    ]
    assert restore_argv(Tool(kind="kopia", object=f"{root}/disk.img"), p) == [
        "kopia",
        "show",
        "--",
        f"{root}/disk.img",
    ]
    assert size_argv(Tool(kind="kopia", object=f"{root}/disk.img"), p) == [
        "kopia",
        "ls",
        "-l",
        "--",
        root,
    ]
    assert restore_argv(Tool(kind="restic", repo=str(repo), snapshot="latest"), p)[4] == "latest"
    for snap in ("--password-command=x", "-1", "latest disk.img", "LATEST", "1a2b3c4g", "a" * 65):
        with pytest.raises(UsageError, match="not a snapshot id"):
            restore_argv(Tool(kind="restic", repo=str(repo), snapshot=snap), p)
    for obj in ("-x", "@/etc/x", f"{root}/../x", f"{root}/-x", "k12/disk.img x", "/abs"):
        with pytest.raises(UsageError, match="not a kopia object"):
            restore_argv(Tool(kind="kopia", object=obj), p)
    for source in ("-x", "vms/vm1", "/vms/../etc", "/vms/\nx", "@x"):
        with pytest.raises(UsageError, match="kopia source"):
            backup_argv(Tool(kind="kopia", source=source), p, {})


def test_backups_are_tagged_with_their_disk_and_listed_by_it(tmp_path: Path) -> None:
    """restic: --tag at backup, --add once the digest is known, --tag to list; kopia:
    --tags KEY:VALUE before its `--`. A disk name is percent-encoded: no comma (restic's tag
    separator) or space reaches a tag."""
    repo = tmp_path / "repo"
    p = Policy([str(tmp_path)])
    tool = Tool(kind="restic", repo=str(repo), node="a", disk="/images/my vm,1.raw")
    tags = labels(tool, "t1")
    assert tags == {"transfer": "t1", "node": "a", "disk": "/images/my%20vm%2C1.raw"}
    assert backup_argv(tool, p, tags)[-4:] == [
        "--tag=nbdnats",
        "--tag=transfer=t1",
        "--tag=node=a",
        "--tag=disk=/images/my%20vm%2C1.raw",
    ]
    kopia = Tool(kind="kopia", source="/vms/vm1", node="a", disk="vm1")
    assert backup_argv(kopia, p, labels(kopia, "t1"))[5:] == [
        "--tags=nbdnats:backup",
        "--tags=transfer:t1",
        "--tags=node:a",
        "--tags=disk:vm1",
        "--",
        "/vms/vm1",
    ]
    done = done_tags("sha256:" + "ab" * 32, 4096)
    assert tag_argv(tool, p, "1a2b3c4d", done) == [
        "restic",
        f"--repo={repo}",
        "tag",
        "--add=size=4096",
        f"--add=digest=sha256:{'ab' * 32}",
        "--",
        "1a2b3c4d",
    ]
    assert done_tags("sha256:x,y", 1) == {"size": "1"}  # not a digest: not a tag
    assert done_tags(None, 1) == {"size": "1"}
    assert backups_argv(Tool(kind="restic", repo=str(repo)), p) == [
        "restic",
        f"--repo={repo}",
        "snapshots",
        "--json",
        "--tag=nbdnats",
    ]
    assert backups_argv(tool, p)[-1] == "--tag=nbdnats,node=a,disk=/images/my%20vm%2C1.raw"
    for bad, message in [
        (Tool(kind="restic", repo=str(repo), node="a.b", disk="vm1"), "node name"),
        (Tool(kind="restic", repo=str(repo), node="a", disk="vm1\n"), "disk name"),
        (Tool(kind="restic", repo=str(repo), node="a", disk=""), "disk name"),
        (Tool(kind="restic", repo=str(repo), node="a"), "NODE:DISK"),
        (Tool(kind="restic", repo="--password-command=x"), "restic repository"),
    ]:
        with pytest.raises((UsageError, PolicyError), match=message):
            backups_argv(bad, p)
    with pytest.raises(UsageError, match="not a snapshot id"):
        tag_argv(tool, p, "--x", done)
    with pytest.raises(UsageError, match="restic restore needs a snapshot"):
        restore_argv(Tool(kind="restic", repo=str(repo)), p)


# -- secrets in tools' messages -------------------------------------------------------------


def test_a_tools_message_is_shown_without_its_secrets() -> None:
    env = {
        "RESTIC_PASSWORD": "correct-horse-battery",
        "RESTIC_PASSWORD_FILE": "/etc/nbdnats/restic.pass",
        "KOPIA_PASSWORD": "short",
        "HOME": "/root/home/dir",
    }
    said = (
        "Fatal: rest:https://u:pw@h/r: key correct-horse-battery rejected; "
        "read /etc/nbdnats/restic.pass; wrong short password in /root/home/dir"
    )
    assert scrub(said, env) == (
        "Fatal: rest:https://u:***@h/r: key *** rejected; "
        "read /etc/nbdnats/restic.pass; wrong short password in /root/home/dir"
    )
    assert shown(["restic", "--repo=rest:https://u:pw@h/r", "dump"]) == (
        "restic --repo=rest:https://u:***@h/r dump"
    )


def test_tools_do_not_inherit_the_agents_nats_logins(monkeypatch: pytest.MonkeyPatch) -> None:
    """A tool the agent starts gets the agent's environment less its NATS URLs (with
    passwords) and login files; the config's [env] still reaches it."""
    from nbdnats.ctl.agent import Agent
    from nbdnats.ctl.config import AgentConfig

    monkeypatch.setenv("NBDNATS_CTL_URL", "nats://node1:s3cret@127.0.0.1:4222")
    monkeypatch.setenv("NBDNATS_NKEY", "/etc/nbdnats/node1.nk")
    monkeypatch.setenv("PATH", "/usr/bin")
    env = Agent(AgentConfig(node="n1", env={"RESTIC_PASSWORD": "p"})).jobs.env()
    assert not [k for k in env if k.startswith("NBDNATS_")]
    assert env["RESTIC_PASSWORD"] == "p" and env["PATH"] == "/usr/bin"


def test_policy_paths_resolve_before_the_prefix_check(tmp_path: Path) -> None:
    allowed = tmp_path / "images"
    allowed.mkdir()
    (allowed / "link").symlink_to("/etc")
    p = Policy([str(allowed)], {"vm1": "nbd+unix:///vm1?socket=/run/vm1.sock"})
    assert p.endpoint(f"{allowed}/a.raw") == f"{allowed}/a.raw"
    assert p.endpoint("vm1") == "nbd+unix:///vm1?socket=/run/vm1.sock"
    for bad in (f"{allowed}2/a.raw", f"{allowed}/../x", f"{allowed}/link/passwd", "x.raw", "-"):
        with pytest.raises(PolicyError):
            p.endpoint(bad)
    with pytest.raises(PolicyError, match="exactly one socket"):
        p.endpoint("nbd+unix:///x")
    assert Policy(["nbd://10.0.0.5:10809/"]).endpoint("nbd://10.0.0.5:10809/d") == (
        "nbd://10.0.0.5:10809/d"
    )
    with pytest.raises(PolicyError):
        Policy(["nbd://10.0.0.5:10809/"]).endpoint("nbd://10.0.0.6:10809/d")


# -- export names ---------------------------------------------------------------------------


def test_an_unknown_export_lists_at_most_ten_of_the_nodes_exports() -> None:
    exports = {f"vm{i:02d}": f"/srv/vm{i:02d}.raw" for i in range(12)}
    p = Policy([], exports, "hv1")
    assert p.endpoint("vm03") == "/srv/vm03.raw"
    with pytest.raises(PolicyError) as e:
        p.endpoint("vm99")
    names = ", ".join(f"vm{i:02d}" for i in range(10))
    assert str(e.value) == (
        f"node hv1 has no export vm99 (it has: {names}, … (2 more)); "
        "name one of them, an absolute path or an NBD URI"
    )
    # Not a name: a relative path keeps its own message.
    with pytest.raises(PolicyError, match=r"'vm99\.raw' is not an absolute path"):
        p.endpoint("vm99.raw")
