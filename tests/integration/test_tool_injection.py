"""An attacker who may publish ctl commands tries to run programs, read or write files
through the backup tools' arguments, and the agent refuses before it starts anything.

Each attempt names a marker file that the injected program or option would create; the
marker must never exist, and the refusal is one line with its code."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from nbdnats import subjects
from nbdnats.schemas import RecvCommand, SendCommand, Tool, encode
from tests.backups import RESTIC_ENV, restic, slow_backup
from tests.cli import one_line_error
from tests.ctl import AgentProc, ctl, ctl_request, ok, stored_events
from tests.images import MiB, make_image
from tests.nats_server import NatsServer
from tests.waits import wait_for


@pytest.fixture
def url(start_nats: Callable[..., NatsServer]) -> str:
    return start_nats(jetstream=True).url


@pytest.fixture
def backup_node(url: str, start_agent: Callable[..., AgentProc], tmp_path: Path) -> dict[str, Path]:
    """Node b holds a restic repository with one snapshot; its allow-list covers the
    repository and a store directory, and zstd for pipes."""
    repo = tmp_path / "backups" / "repo"
    repo.parent.mkdir()
    restic(repo, "init", "-q")
    image = tmp_path / "img"
    make_image(image, 1 * MiB, [(0, MiB)])
    with image.open("rb") as f:
        subprocess.run(
            ["restic", "backup", "-q", "--stdin", "--stdin-filename", "disk.img"],
            stdin=f,
            env={**os.environ, **RESTIC_ENV, "RESTIC_REPOSITORY": str(repo)},
            check=True,
        )
    store = tmp_path / "store"
    store.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"not for the network\n")
    zstd = os.path.realpath(shutil.which("zstd") or "zstd")
    disks = tmp_path / "disks"
    disks.mkdir()
    start_agent("a", url, "--allow", str(disks))
    allow = ("--allow", str(repo.parent), "--allow", str(store), "--allow", zstd)
    start_agent("b", url, *allow, env=RESTIC_ENV)
    return {"repo": repo, "store": store, "outside": outside, "disks": disks}


def test_restore_snapshot_option_cannot_inject(
    url: str, backup_node: dict[str, Path], tmp_path: Path
) -> None:
    """`--snapshot=--password-command=CMD` would make restic run CMD (`ls`/`dump` take the
    value as an option); the agent refuses it before restic starts."""
    marker = tmp_path / "pwned"
    target = backup_node["disks"] / "restored.raw"
    snapshot = f"--snapshot=--password-command=touch {marker}"
    proc = ctl(url, "restore", "b", f"a:{target}", "--restic", str(backup_node["repo"]), snapshot)
    err = one_line_error(proc)
    assert proc.returncode == 2  # the agent's code is "usage": a bad value, not a failure
    assert "restic snapshot" in err and "not a snapshot id" in err, err
    assert not marker.exists()
    assert not target.exists()
    refused = stored_events(url, "refused")
    assert [e["code"] for e in refused if e["node"] == "b"] == ["usage"]


def _tool_cases(paths: dict[str, Path], marker: Path) -> list[tuple[str, Tool, str]]:
    """(op, tool, what the refusal says) for crafted ctl messages."""
    repo, store, outside = str(paths["repo"]), paths["store"], paths["outside"]
    inject = f"--password-command=touch {marker}"
    return [
        ("send", Tool(kind="restic", repo=repo, snapshot=inject), "not a snapshot id"),
        ("send", Tool(kind="restic", repo=repo, snapshot="latest disk.img"), "not a snapshot id"),
        ("send", Tool(kind="restic", repo=inject), "restic repository"),
        ("recv", Tool(kind="restic", repo=inject), "restic repository"),
        ("send", Tool(kind="kopia", object=f"--config-file={marker}"), "not a kopia object"),
        ("send", Tool(kind="kopia", object=f"@{marker}"), "not a kopia object"),
        ("send", Tool(kind="kopia", object="k1234abcd/../../etc"), "not a kopia object"),
        ("recv", Tool(kind="kopia", source=f"--config-file={marker}"), "kopia source"),
        ("recv", Tool(kind="kopia", source="/vms/../etc"), "kopia source"),
        # Pipes: writing or reading outside the allow-list, or relative paths.
        ("recv", Tool(kind="pipe", command=["zstd", "-q", "-o", f"{outside}/x"]), "outside"),
        ("recv", Tool(kind="pipe", command=["zstd", "-q", f"-o{outside}/x"]), "outside"),
        ("recv", Tool(kind="pipe", command=["zstd", "-q", f"--output={outside}/x"]), "outside"),
        ("recv", Tool(kind="pipe", command=["zstd", "-q", "-o", f"{store}/../outside/x"]), ".."),
        ("recv", Tool(kind="pipe", command=["zstd", "-q", "-o", "../x"]), ".."),
        ("recv", Tool(kind="pipe", command=["zstd", "-q", "-o", "sub/x"]), "not absolute"),
        ("recv", Tool(kind="pipe", command=["zstd", "-o", f"{store}/a:{outside}/x"]), "two paths"),
        ("send", Tool(kind="pipe", command=["zstd", "-dc", f"{outside}/secret"]), "outside"),
    ]


def test_crafted_tool_values_are_refused_before_any_tool_runs(
    url: str, backup_node: dict[str, Path], tmp_path: Path
) -> None:
    """Raw ctl messages, as an attacker would publish them: every value that would reach a
    tool's argv is checked by the agent itself, whatever the ctl client did."""
    marker = tmp_path / "pwned"
    cases = _tool_cases(backup_node, marker)
    for i, (op, tool, message) in enumerate(cases):
        cmd: SendCommand | RecvCommand
        if op == "send":
            cmd = SendCommand(key=f"k{i}", transfer_id=f"t{i}", tool=tool, size=MiB)
        else:
            cmd = RecvCommand(key=f"k{i}", transfer_id=f"t{i}", tool=tool)
        reply = ctl_request(url, subjects.ctl_command("b", op), encode(cmd))
        assert reply["ok"] is False, (tool, reply)
        assert reply["code"] in ("usage", "denied"), (tool, reply)
        error = str(reply["error"])
        assert message in error and "\n" not in error, (tool, error)
    assert not marker.exists()
    assert list((backup_node["outside"]).iterdir()) == [backup_node["outside"] / "secret"]
    assert list(backup_node["store"].iterdir()) == []
    rows = json.loads(ok(ctl(url, "--json", "transfers", "--node", "b")))
    assert rows == []  # nothing was started


def test_pipe_backup_into_the_allowed_store_still_works(
    url: str, backup_node: dict[str, Path]
) -> None:
    """The documented zstd example, with its output under the allow-list."""
    src = backup_node["disks"] / "vm1.raw"
    make_image(src, 4 * MiB, [(0, MiB)])
    out = backup_node["store"] / "vm1.img.zst"
    ok(ctl(url, "backup", f"a:{src}", "b", "--pipe", f"zstd -q -o {out}"))
    back = subprocess.run(["zstd", "-dc", str(out)], capture_output=True, check=True).stdout
    assert back == src.read_bytes()


def test_pipe_writing_a_bare_name_fails_instead_of_losing_the_image(
    url: str, backup_node: dict[str, Path]
) -> None:
    """A bare relative name lands in the tool's private, empty working directory, which is
    removed: the job fails and says so, rather than reporting a backup that is gone."""
    src = backup_node["disks"] / "vm1.raw"
    make_image(src, 2 * MiB, [(0, MiB)])
    err = one_line_error(ctl(url, "backup", f"a:{src}", "b", "--pipe", "zstd -q -o vm1.zst"))
    assert "zstd left vm1.zst in its private working directory" in err, err


def test_repository_password_never_appears_in_errors_events_or_logs(
    url: str, start_agent: Callable[..., AgentProc], tmp_path: Path
) -> None:
    """A REST repository URL with a password: refused, or failing, it is shown as ***."""
    disks = tmp_path / "disks"
    disks.mkdir()
    src = disks / "vm1.raw"
    make_image(src, 2 * MiB, [(0, MiB)])
    a = start_agent("a", url, "--allow", str(disks))
    b = start_agent(
        "b", url, "--allow", "rest:http://backup:s3cret-pw@127.0.0.1:9/", env=RESTIC_ENV
    )
    allowed = "rest:http://backup:s3cret-pw@127.0.0.1:9/repo"
    refused = "rest:http://backup:s3cret-pw@127.0.0.2:9/repo"
    shown = []
    for repo in (allowed, refused):
        proc = ctl(url, "backup", f"a:{src}", "b", "--restic", repo)
        shown.append(one_line_error(proc))
        proc = ctl(url, "restore", "b", f"a:{disks}/r.raw", "--restic", repo)
        shown.append(one_line_error(proc))
    assert "rest:http://backup:***@127.0.0.2:9/repo is outside" in shown[2], shown
    everything = "\n".join(
        [*shown, a.text(), b.text(), ok(ctl(url, "--json", "events", "--all", "--no-follow"))]
    )
    assert "rest:http://backup:***@127.0.0.1:9/repo" in everything
    assert "s3cret-pw" not in everything and "agent-secret" not in everything


def test_ctl_backup_stores_no_snapshot_when_the_sender_dies(
    url: str, start_agent: Callable[..., AgentProc], tmp_path: Path
) -> None:
    """What a bare `recv - | restic backup --stdin` cannot promise: the sending agent is
    killed mid-stream; the receiving agent gives up after --timeout and stops restic before
    its stdin closes, so no truncated disk.img becomes `latest`."""
    with slow_backup(url, start_agent, tmp_path, "dies", "--timeout", "3") as (a, b, run, repo):
        wait_for(lambda: "accepted recv dies" in b.text(), "the backup", timeout=20)
        wait_for(
            lambda: '"done_bytes":0' not in ok(ctl(url, "--json", "transfers", "--node", "b")),
            "data",
        )
        a.proc.kill()
        a.proc.wait()
        _, err = run.communicate(timeout=90)
    assert run.returncode != 0, err.decode()  # the controller lost the sender's agent
    wait_for(lambda: "recv dies failed" in b.text(), "the receiver's end", timeout=30)
    assert json.loads(restic(repo, "snapshots", "--json").stdout) == []
