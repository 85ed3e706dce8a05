"""Backup tools at one end of a stream: restic, kopia, or any command, run by the agent.

backup   the image arrives over NATS and goes into the tool's stdin, stored as disk.img:
           restic --repo=REPO backup --stdin --stdin-filename disk.img --json --tag=...
           kopia snapshot create --stdin-file disk.img --tags=K:V... -- SOURCE
         then, once the transfer's digest is known, restic's snapshot gets it as a tag:
           restic --repo=REPO tag --add=digest=... --add=size=N -- SNAPSHOT
         (when the repository is locked, once: restic --repo=REPO unlock, which removes
         only stale locks, such as a killed restic's)
restore  the tool's stdout goes back over NATS into a target:
           restic --repo=REPO dump -- SNAPSHOT disk.img
           kopia show -- OBJECT
backups  the snapshots nbdnats stored, per disk:
           restic --repo=REPO snapshots --json --tag=nbdnats[,node=N,disk=D]
incremental backup: only the changed ranges arrive; the rest is read from the parent
           restic --repo=REPO dump -- PARENT disk.img      (the receiver's base)
         and the whole image is stored as above, tagged checkpoint=, kind=, parent=

A backup's snapshot is tagged ``nbdnats``, ``transfer=ID``, ``node=N`` and ``disk=D`` (the
disk percent-encoded, so a tag never holds a comma), an incremental run's also
``checkpoint=NAME``, ``kind=full|incremental`` and ``parent=ID``, then ``digest=...`` and ``size=N``
(restic; kopia takes the first ones as ``--tags=KEY:VALUE``). What ``snapshots`` lists is
the tool's output: every id, time and tag value is checked (``schemas.Backup``) and a
snapshot that fails is left out, counted.

Every value a command supplies is checked before it joins an argv, and comes after ``--``:
nothing from the network can be read as a tool's option. Every tool runs in a private
empty working directory, removed when it ends.

The core reads or writes the tool's pipe as ``pipe:/proc/self/fd/N``; the agent keeps its
own copy of that pipe end until the transfer's outcome is known. So a failed transfer never
looks like a short image to the tool: the agent stops the tool first, then lets the pipe
close, and nothing partial is saved as a snapshot. An agent killed outright takes its
streaming tools with it (their parent-death signal, set by setpriv where installed).
Credentials (``RESTIC_PASSWORD``, ``KOPIA_PASSWORD``, ...) come from the agent's
environment and its config's ``[env]``; they, and passwords in repository URLs, are shown
as ``***`` in what the agent reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import tempfile
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import msgspec

from nbdnats import subjects
from nbdnats.ctl.policy import Policy
from nbdnats.errors import EndpointError, UsageError
from nbdnats.planes import redact_url
from nbdnats.schemas import Backup, DigestText, Tool

IMAGE_NAME = "disk.img"
STOP_GRACE = 5.0  # SIGTERM, then this long before SIGKILL
EXIT_GRACE = 0.3  # how long a tool that broke the stream gets to exit by itself
TAG_RETRIES = (0.5, 1.0, 2.0, 4.0)  # restic tag's waits while the repository is locked
PIPE_SIZE = 1 << 20  # the pipes between the core and a tool (Linux allows 1 MiB unprivileged)

# Values from a command that reach a tool's argv. Each is checked here, and placed after
# a `--` where the tool takes one (restic: cobra/pflag; kopia: kingpin, which also expands
# `@FILE` arguments, but only before `--`), so none can be read as an option.
_RESTIC_SNAPSHOT = re.compile(r"latest|[0-9a-f]{1,64}")
_KOPIA_ID = re.compile(r"[A-Za-z]{0,4}[0-9a-f]{8,128}")  # optional prefix letters, then hex
# A plain file name: not '.' or '..', not starting with '-' or '@'.
_NAME = re.compile(
    r"[A-Za-z0-9_+=,%~][A-Za-z0-9._+=,%~@:-]*|\.[A-Za-z0-9_+=,%~-][A-Za-z0-9._+=,%~@:-]*"
)
SECRET_MIN = 8  # shorter values are not hunted for in messages: they match too much
_SECRET_NAME = re.compile(r"PASSWORD|PASSPHRASE|SECRET|TOKEN|_KEY$|CREDENTIAL", re.I)


# The backup tools an agent runs by name, as its NodeInfo capabilities call them.
PROGRAMS = ("restic", "kopia")


def installed(program: str, env: Mapping[str, str]) -> bool:
    """Whether ``program`` is on the PATH a tool started with ``env`` would search."""
    return shutil.which(program, path=os.pathsep.join(os.get_exec_path(dict(env)))) is not None


def _not_installed(program: str) -> str:
    return (
        f"{program} is not installed on this node (not on its agent's PATH); install it, "
        "or use a node whose capabilities list it (nbd-nats ctl nodes)"
    )


def _need(value: str | None, option: str, kind: str) -> str:
    if not value:
        raise UsageError(f"{kind} needs {option}")
    return value


def restic_snapshot(value: str) -> str:
    """A restic snapshot id (hex, a short or full id) or ``latest``."""
    if not _RESTIC_SNAPSHOT.fullmatch(value):
        raise UsageError(
            f"restic snapshot {value!r} is not a snapshot id: give its hex id "
            "(as `restic snapshots` shows it) or latest"
        )
    return value


def is_restic_snapshot(value: str) -> bool:
    return _RESTIC_SNAPSHOT.fullmatch(value) is not None


def kopia_object(value: str) -> str:
    """A kopia object id, optionally with a path inside it: ``k3f1.../disk.img``."""
    first, *names = value.split("/")
    if (
        len(value) > 1024
        or not _KOPIA_ID.fullmatch(first)
        or not all(_NAME.fullmatch(n) for n in names)
    ):
        raise UsageError(
            f"{value!r} is not a kopia object id: give ROOT/disk.img "
            "as `ctl backup --kopia` reported it"
        )
    return value


def kopia_source(value: str) -> str:
    """The source path a kopia snapshot is recorded under (nothing is read from it)."""
    parts = value.split("/")
    if (
        len(value) > 1024
        or parts[0] != ""
        or len(parts) < 2
        or not all(_NAME.fullmatch(p) for p in parts[1:])
    ):
        raise UsageError(
            f"kopia source {value!r} must be an absolute path of plain names "
            "(/vms/vm1), without '.' or '..'"
        )
    return value


# A disk name in a tag: percent-encoded but for these (and letters, digits, "_.-~"), so no
# comma (restic's tag separator), space or control character is left in it.
_DISK_SAFE = "/:@+=?&!$'()*;"
_DISK_MAX = 1024


def disk_tag(disk: str) -> str:
    """The tag value a disk name is stored as (``vm1``, ``/images/my%20vm.raw``)."""
    if not disk or len(disk) > _DISK_MAX or any(ord(c) < 0x20 or ord(c) == 0x7F for c in disk):
        raise UsageError(
            f"disk name {disk!r} must be 1-{_DISK_MAX} characters without control characters"
        )
    return urllib.parse.quote(disk, safe=_DISK_SAFE)


def disk_of_tag(value: str) -> str | None:
    """The disk name a tag holds, or None when it is not one ``disk_tag`` writes."""
    name = urllib.parse.unquote(value, errors="strict") if "%" in value else value
    try:
        return name if disk_tag(name) == value else None
    except (UsageError, UnicodeError):
        return None


def labels(tool: Tool, transfer_id: str) -> dict[str, str]:
    """What a backup's snapshot is tagged with, before its digest is known."""
    tags = {"transfer": subjects.check_token(transfer_id, "transfer id")}
    if (tool.node is None) != (tool.disk is None):
        raise UsageError("a backup names its disk with both 'node' and 'disk', or neither")
    if tool.node is not None and tool.disk is not None:
        tags["node"] = subjects.check_token(tool.node, "node name")
        tags["disk"] = disk_tag(tool.disk)
    if tool.parent is not None and tool.checkpoint is None:
        raise UsageError("an incremental backup names its checkpoint with its parent")
    if tool.checkpoint is not None:
        if tool.kind != "restic":
            raise UsageError(
                f"incremental backups need restic (its snapshots carry the checkpoint and "
                f"give back the parent), not {tool.kind}"
            )
        tags["checkpoint"] = tool.checkpoint  # schemas.CheckpointName: no comma, no space
        tags["kind"] = "full" if tool.parent is None else "incremental"
        if tool.parent is not None:
            tags["parent"] = restic_snapshot(tool.parent)
    return tags


def base_argv(tool: Tool, policy: Policy) -> list[str] | None:
    """The command that writes an incremental backup's parent image on stdout (the base
    the changed ranges are laid over), or None for a full one."""
    if tool.parent is None:
        return None
    parent = msgspec.structs.replace(tool, snapshot=tool.parent, parent=None, checkpoint=None)
    return restore_argv(parent, policy)


def _restic_repo(tool: Tool, policy: Policy) -> str:
    repo = _need(tool.repo, "a repository", "restic")
    return "--repo=" + policy.location(repo, "restic repository")


def backup_argv(tool: Tool, policy: Policy, tags: Mapping[str, str]) -> list[str]:
    """The command that reads the image on stdin and stores it as disk.img, tagged
    ``nbdnats`` and ``KEY=VALUE`` (kopia: ``KEY:VALUE``) for each of ``tags`` (``labels``)."""
    if tool.kind == "restic":
        repo = _restic_repo(tool, policy)
        tag_args = ["--tag=nbdnats", *(f"--tag={k}={v}" for k, v in tags.items())]
        stdin = ["--stdin", "--stdin-filename", IMAGE_NAME]
        return ["restic", repo, "backup", *stdin, "--json", *tag_args]
    if tool.kind == "kopia":
        source = kopia_source(_need(tool.source, "a source path", "kopia"))
        tag_args = ["--tags=nbdnats:backup", *(f"--tags={k}:{v}" for k, v in tags.items())]
        create = ["kopia", "snapshot", "create", "--stdin-file", IMAGE_NAME]
        return [*create, *tag_args, "--", source]
    return pipe_argv(tool, policy)


def tag_argv(tool: Tool, policy: Policy, snapshot: str, tags: Mapping[str, str]) -> list[str]:
    """The command that adds ``tags`` to a restic snapshot (restic saves it anew, with a
    new id: ``stored_snapshot`` finds it)."""
    repo = _restic_repo(tool, policy)
    adds = [f"--add={k}={v}" for k, v in tags.items()]
    return ["restic", repo, "tag", *adds, "--", restic_snapshot(snapshot)]


# `restic tag` takes a repository exclusively, and a restic started meanwhile (a backup, or
# the base `restic dump` of an incremental disk) fails at once: restic 0.14 has no
# --retry-lock. Within one agent, a restic on a repository starts only while no `restic tag`
# of ours holds it (two disks of one backup store side by side: one is tagged as the other
# starts). Agents on other hosts sharing a repository are not covered.
_TAGGING: dict[tuple[int, str], asyncio.Lock] = {}


def _tagging(argv: list[str]) -> asyncio.Lock | None:
    """The lock of the restic repository ``argv`` names (per event loop: a lock belongs to
    one), None for other tools."""
    if len(argv) < 2 or argv[0] != "restic" or not argv[1].startswith("--repo="):
        return None
    key = (id(asyncio.get_running_loop()), argv[1])
    return _TAGGING.setdefault(key, asyncio.Lock())


def unlock_argv(tool: Tool, policy: Policy) -> list[str]:
    """The command that removes a restic repository's stale locks: those of restic
    processes gone from this host (one killed outright leaves its lock behind, and every
    later ``restic tag`` would wait on it), never a live one's."""
    return ["restic", _restic_repo(tool, policy), "unlock"]


def backups_argv(tool: Tool, policy: Policy, transfer_id: str | None = None) -> list[str]:
    """The command that lists nbdnats's restic snapshots: all, one disk's (``tool.node``
    and ``tool.disk``), or one transfer's."""
    if tool.kind != "restic":
        raise UsageError(f"listing backups needs restic, not {tool.kind}")
    repo = _restic_repo(tool, policy)
    wanted = ["nbdnats"]
    if tool.node is not None or tool.disk is not None:
        if tool.node is None or tool.disk is None:
            raise UsageError("name the disk as NODE:DISK")
        node = subjects.check_token(tool.node, "node name")
        wanted += [f"node={node}", f"disk={disk_tag(tool.disk)}"]
    if transfer_id is not None:
        wanted.append(f"transfer={subjects.check_token(transfer_id, 'transfer id')}")
    return ["restic", repo, "snapshots", "--json", f"--tag={','.join(wanted)}"]


def restore_argv(tool: Tool, policy: Policy) -> list[str]:
    """The command that writes the stored image on stdout."""
    if tool.kind == "restic":
        repo = _restic_repo(tool, policy)
        snapshot = restic_snapshot(_need(tool.snapshot, "a snapshot", "restic restore"))
        return ["restic", repo, "dump", "--", snapshot, IMAGE_NAME]
    if tool.kind == "kopia":
        return ["kopia", "show", "--", kopia_object(_need(tool.object, "an object id", "kopia"))]
    return pipe_argv(tool, policy)


def size_argv(tool: Tool, policy: Policy) -> list[str]:
    """The command that lists the stored image with its size (restic, kopia)."""
    if tool.kind == "restic":
        repo = _restic_repo(tool, policy)
        snapshot = restic_snapshot(_need(tool.snapshot, "a snapshot", "restic restore"))
        return ["restic", repo, "ls", "--json", "--", snapshot, f"/{IMAGE_NAME}"]
    if tool.kind == "kopia":
        obj = kopia_object(_need(tool.object, "an object id", "kopia"))
        parent = obj.rpartition("/")[0]
        if not parent:
            raise UsageError(f"cannot tell the size of kopia object {obj}: pass --size")
        return ["kopia", "ls", "-l", "--", parent]
    raise UsageError("a --pipe restore needs --size (the image's size in bytes)")


def pipe_argv(tool: Tool, policy: Policy) -> list[str]:
    """A pipe command runs without a shell, in a private empty directory; its program
    must be on the allow-list and the paths its arguments name under it."""
    if not tool.command:
        raise UsageError("--pipe needs a command")
    return policy.pipe_argv(tool.command)


def shown(argv: list[str]) -> str:
    """A command line as events and logs show it: repository passwords as ***."""
    return " ".join(redact_url(a) for a in argv)


def scrub(text: str, env: Mapping[str, str]) -> str:
    """A tool's message as it may be shown: URL passwords and the values of secret
    variables of its environment (``RESTIC_PASSWORD``, ...) replaced by ***."""
    text = redact_url(text)
    for name, value in env.items():
        if (
            len(value) >= SECRET_MIN
            and _SECRET_NAME.search(name)
            and not name.upper().endswith(("_FILE", "_COMMAND"))  # where, not what
            and value in text
        ):
            text = text.replace(value, "***")
    return text


@contextlib.contextmanager
def _workdir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="nbdnats-tool-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


async def _run(argv: list[str], env: Mapping[str, str]) -> str:
    with _workdir() as cwd:
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                env=dict(env),
                cwd=cwd,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        except FileNotFoundError:
            raise EndpointError(_not_installed(argv[0])) from None
        out, err = await proc.communicate()
    if proc.returncode != 0:
        raise EndpointError(f"{shown(argv[:3])} failed: {scrub(last_line(err), env)}")
    return out.decode(errors="replace")


async def image_size(tool: Tool, policy: Policy, env: Mapping[str, str]) -> int:
    """The size of the stored image, asked of the tool (a pipe must be told it)."""
    argv = size_argv(tool, policy)
    out = await _run(argv, env)
    if tool.kind == "restic":
        for line in out.splitlines():
            with contextlib.suppress(ValueError):
                node = json.loads(line)
                if node.get("path") == f"/{IMAGE_NAME}" and "size" in node:
                    return int(node["size"])
        raise EndpointError(
            f"restic snapshot {tool.snapshot} in {redact_url(tool.repo or '')} "
            f"holds no {IMAGE_NAME}"
        )
    name = (tool.object or "").rpartition("/")[2]
    for line in out.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[-1] == name and fields[1].isdigit():
            return int(fields[1])
    raise UsageError(f"cannot tell the size of kopia object {tool.object}: pass --size")


def parse_backups(output: str) -> tuple[list[Backup], int]:
    """``restic snapshots --json`` as ``Backup``s, oldest first, and how many snapshots
    were left out because their id, time or an nbdnats tag did not pass the checks."""
    try:
        raw = json.loads(output or "[]")
    except ValueError:
        raise EndpointError("restic snapshots answered something that is not JSON") from None
    if not isinstance(raw, list):
        raise EndpointError("restic snapshots answered something that is not a list")
    found: list[Backup] = []
    skipped = 0
    for snap in raw:
        backup = _backup(snap)
        if backup is None:
            skipped += 1
        else:
            found.append(backup)
    found.sort(key=lambda b: (b.time, b.id))
    return found, skipped


_TAG_FIELDS = {"node": "node", "disk": "disk", "digest": "digest", "size": "size"}
_TAG_FIELDS["transfer"] = "transfer_id"
_TAG_FIELDS |= {"kind": "kind", "checkpoint": "checkpoint", "parent": "parent"}


def _backup(snap: object) -> Backup | None:
    """One snapshot of restic's listing, checked; None when anything in it is not."""
    if not isinstance(snap, dict) or not isinstance(snap.get("tags", []), list):
        return None
    fields: dict[str, object] = {k: snap.get(k) for k in ("id", "short_id", "time")}
    for tag in snap.get("tags") or []:
        if not isinstance(tag, str):
            return None
        key, sep, value = tag.partition("=")
        if not sep or key not in _TAG_FIELDS:
            continue
        name = _TAG_FIELDS[key]
        if name in fields:  # a tag given twice: which one is true?
            return None
        if key == "disk" and (value := disk_of_tag(value) or "") == "":
            return None
        fields[name] = int(value) if key == "size" and value.isdigit() else value
    try:
        return msgspec.convert(fields, Backup)
    except msgspec.ValidationError:
        return None


async def list_backups(
    tool: Tool, policy: Policy, env: Mapping[str, str], transfer_id: str | None = None
) -> tuple[list[Backup], int]:
    """nbdnats's snapshots in a restic repository (see ``backups_argv``)."""
    return parse_backups(await _run(backups_argv(tool, policy, transfer_id), env))


def done_tags(digest: str | None, size: int) -> dict[str, str]:
    """What a backup's snapshot is tagged with once its transfer has ended: the size and
    the digest its stats report (left out when it is not one a listing would accept)."""
    tags = {"size": str(size)}
    with contextlib.suppress(msgspec.ValidationError):
        tags["digest"] = msgspec.convert(digest, DigestText)
    return tags


async def tag_backup(
    tool: Tool,
    policy: Policy,
    env: Mapping[str, str],
    transfer_id: str,
    output: str,
    tags: Mapping[str, str],
) -> str:
    """Add ``tags`` to the snapshot a backup just saved (``output``: what ``finish``
    reported); returns what to report: its new id. ``restic tag`` needs the repository to
    itself: while another backup holds it, it is tried again for a few seconds, then the
    snapshot is kept as saved (its ``node`` and ``disk`` tags are there from the start)
    and what is reported says which tags it lacks."""
    snapshot = output.removeprefix("snapshot ")
    if not output.startswith("snapshot ") or not _RESTIC_SNAPSHOT.fullmatch(snapshot):
        raise EndpointError(f"restic reported no snapshot id ({output or 'nothing'})")
    argv = tag_argv(tool, policy, snapshot, tags)
    lock = _tagging(argv)
    assert lock is not None
    for delay in (*TAG_RETRIES, None):
        try:
            async with lock:
                await _run(argv, env)
            break
        except EndpointError as e:
            if delay is None:
                return f"{output} (without its {', '.join(tags)} tags: {e})"
            if delay == TAG_RETRIES[0]:  # a killed restic's lock would never go by itself
                with contextlib.suppress(EndpointError):
                    async with lock:
                        await _run(unlock_argv(tool, policy), env)
            await asyncio.sleep(delay)
    mine, _ = await list_backups(tool, policy, env, transfer_id)
    if not mine:
        raise EndpointError(
            f"restic tag left no snapshot of transfer {transfer_id}: its image is stored "
            f"as snapshot {snapshot[:8]}, without its digest tag"
        )
    return f"snapshot {mine[-1].id}"


def last_line(stderr: bytes) -> str:
    lines = [x.strip() for x in stderr.decode(errors="replace").splitlines() if x.strip()]
    return lines[-1] if lines else "no message"


def _tied_to_agent(argv: list[str], env: Mapping[str, str]) -> list[str]:
    """``argv`` run so that the tool is killed when its agent dies. An agent killed outright
    (SIGKILL, the OOM killer) cannot stop its tool first, and a restic or kopia whose input
    just ends stores what it got as a snapshot; setpriv (util-linux) sets the parent-death
    signal and runs the tool. Without setpriv the tool runs as it is."""
    path = os.pathsep.join(os.get_exec_path(dict(env)))
    if "/" not in argv[0] and shutil.which(argv[0], path=path) is None:
        raise FileNotFoundError(argv[0])
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "KILL", "--", *argv] if setpriv else argv


@dataclass
class ToolRun:
    """A running tool and the pipe the core streams through."""

    argv: list[str]
    proc: asyncio.subprocess.Process
    held: int
    endpoint: str
    direction: str
    workdir: str
    env: Mapping[str, str] = field(repr=False)
    _stderr: asyncio.Task[bytes] = field(repr=False)
    _stdout: asyncio.Task[bytes] | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return os.path.basename(self.argv[0])

    @classmethod
    async def start(cls, argv: list[str], direction: str, env: Mapping[str, str]) -> ToolRun:
        """Start ``argv`` with a pipe on stdin (backup) or stdout (restore), in a private
        empty working directory (removed when it ends)."""
        r, w = os.pipe()
        # A 64 KiB pipe makes restic and the core take turns in small steps: with 1 MiB
        # `restic dump | restic backup --stdin` of a 2 GiB image ran in 10 s instead of 15.
        with contextlib.suppress(OSError):
            fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        theirs, ours = (r, w) if direction == "backup" else (w, r)
        workdir = tempfile.mkdtemp(prefix="nbdnats-tool-")
        tagging = _tagging(argv)
        try:
            # Not while our `restic tag` holds the repository (the lock is held until the
            # tool has started, not while it runs).
            async with tagging if tagging is not None else contextlib.nullcontext():
                proc = await asyncio.create_subprocess_exec(
                    *_tied_to_agent(argv, env),
                    stdin=theirs if direction == "backup" else asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.PIPE if direction == "backup" else theirs,
                    stderr=asyncio.subprocess.PIPE,
                    env=dict(env),
                    cwd=workdir,
                    start_new_session=True,
                )
        except OSError as e:
            os.close(ours)
            shutil.rmtree(workdir, ignore_errors=True)
            if isinstance(e, FileNotFoundError):
                raise EndpointError(_not_installed(argv[0])) from None
            raise EndpointError(f"cannot start {argv[0]}: {e.strerror}") from None
        finally:
            os.close(theirs)
        assert proc.stderr is not None
        stdout = asyncio.ensure_future(proc.stdout.read()) if proc.stdout else None
        return cls(
            argv=argv,
            proc=proc,
            held=ours,
            endpoint=f"pipe:/proc/self/fd/{ours}",
            direction=direction,
            workdir=workdir,
            env=env,
            _stderr=asyncio.ensure_future(proc.stderr.read()),
            _stdout=stdout,
        )

    def _release(self) -> None:
        if self.held >= 0:
            os.close(self.held)
            self.held = -1

    async def finish(self) -> str:
        """The stream succeeded: let the tool see the end and wait for it; returns what it
        reported (a snapshot id when it says one), or raises with its own error."""
        self._release()
        rc = await self.proc.wait()
        err = await self._stderr
        out = await self._stdout if self._stdout else b""
        left = self._clean()
        if rc != 0:
            raise EndpointError(f"{self.name} failed (exit {rc}): {self._said(err)}")
        if left:
            raise EndpointError(
                f"{self.name} left {', '.join(left[:3])} in its private working directory, "
                "which is removed: name its files by absolute paths under the allow-list"
            )
        return snapshot_id(self.name, out.decode(errors="replace") + err.decode(errors="replace"))

    async def abort(self) -> str | None:
        """The stream failed: stop the tool before its pipe closes, so it saves nothing.
        Returns the tool's own error when it had already failed (often the real cause)."""
        # A tool that failed by itself (and broke the stream) may not be reaped yet: give it
        # a moment, so its own exit status and message are what we report.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.proc.wait()), EXIT_GRACE)
        early = self.proc.returncode
        if early is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), STOP_GRACE)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                await self.proc.wait()
        self._release()
        err = await self._stderr
        if self._stdout:
            await self._stdout
        self._clean()
        if early not in (None, 0):
            return f"{self.name} failed (exit {early}): {self._said(err)}"
        return None

    def _said(self, stderr: bytes) -> str:
        return scrub(last_line(stderr), self.env)

    def _clean(self) -> list[str]:
        """Remove the private working directory; what the tool had left in it."""
        try:
            left = sorted(os.listdir(self.workdir))
        except OSError:
            left = []
        shutil.rmtree(self.workdir, ignore_errors=True)
        return left


def snapshot_id(tool: str, output: str) -> str:
    """What to report from a tool's output: restic's snapshot id, kopia's root object."""
    if tool == "restic":
        for line in reversed(output.splitlines()):
            with contextlib.suppress(ValueError):
                msg = json.loads(line)
                if isinstance(msg, dict) and msg.get("snapshot_id"):
                    return f"snapshot {msg['snapshot_id']}"
    if tool == "kopia" and (m := re.search(r"root (\S+)", output)):
        return f"root {m.group(1)}"
    return ""
