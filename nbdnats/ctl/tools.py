"""Backup tools at one end of a stream: restic, kopia, or any command, run by the agent.

backup   the image arrives over NATS and goes into the tool's stdin, stored as disk.img:
           restic --repo=REPO backup --stdin --stdin-filename disk.img --json --tag=...
           kopia snapshot create --stdin-file disk.img -- SOURCE
restore  the tool's stdout goes back over NATS into a target:
           restic --repo=REPO dump -- SNAPSHOT disk.img
           kopia show -- OBJECT

Every value a command supplies is checked before it joins an argv, and comes after ``--``:
nothing from the network can be read as a tool's option. Every tool runs in a private
empty working directory, removed when it ends.

The core reads or writes the tool's pipe as ``pipe:/proc/self/fd/N``; the agent keeps its
own copy of that pipe end until the transfer's outcome is known. So a failed transfer never
looks like a short image to the tool: the agent stops the tool first, then lets the pipe
close, and nothing partial is saved as a snapshot. Credentials (``RESTIC_PASSWORD``,
``KOPIA_PASSWORD``, ...) come from the agent's environment and its config's ``[env]``;
they, and passwords in repository URLs, are shown as ``***`` in what the agent reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from nbdnats.ctl.policy import Policy
from nbdnats.errors import EndpointError, UsageError
from nbdnats.planes import redact_url
from nbdnats.schemas import Tool

IMAGE_NAME = "disk.img"
STOP_GRACE = 5.0  # SIGTERM, then this long before SIGKILL
EXIT_GRACE = 0.3  # how long a tool that broke the stream gets to exit by itself

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


def _restic_repo(tool: Tool, policy: Policy) -> str:
    repo = _need(tool.repo, "a repository", "restic")
    return "--repo=" + policy.location(repo, "restic repository")


def backup_argv(tool: Tool, policy: Policy, tags: list[str]) -> list[str]:
    """The command that reads the image on stdin and stores it as disk.img."""
    if tool.kind == "restic":
        repo = _restic_repo(tool, policy)
        tag_args = [f"--tag={t}" for t in tags]
        stdin = ["--stdin", "--stdin-filename", IMAGE_NAME]
        return ["restic", repo, "backup", *stdin, "--json", *tag_args]
    if tool.kind == "kopia":
        source = kopia_source(_need(tool.source, "a source path", "kopia"))
        return ["kopia", "snapshot", "create", "--stdin-file", IMAGE_NAME, "--", source]
    return pipe_argv(tool, policy)


def restore_argv(tool: Tool, policy: Policy) -> list[str]:
    """The command that writes the stored image on stdout."""
    if tool.kind == "restic":
        repo = _restic_repo(tool, policy)
        return ["restic", repo, "dump", "--", restic_snapshot(tool.snapshot), IMAGE_NAME]
    if tool.kind == "kopia":
        return ["kopia", "show", "--", kopia_object(_need(tool.object, "an object id", "kopia"))]
    return pipe_argv(tool, policy)


def size_argv(tool: Tool, policy: Policy) -> list[str]:
    """The command that lists the stored image with its size (restic, kopia)."""
    if tool.kind == "restic":
        repo = _restic_repo(tool, policy)
        snapshot = restic_snapshot(tool.snapshot)
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


def last_line(stderr: bytes) -> str:
    lines = [x.strip() for x in stderr.decode(errors="replace").splitlines() if x.strip()]
    return lines[-1] if lines else "no message"


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
        theirs, ours = (r, w) if direction == "backup" else (w, r)
        workdir = tempfile.mkdtemp(prefix="nbdnats-tool-")
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
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
