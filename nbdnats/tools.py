"""Backup tools at one end of a stream: restic, kopia, or any command, run by the agent.

backup   the image arrives over NATS and goes into the tool's stdin, stored as disk.img:
           restic backup --stdin --stdin-filename disk.img
           kopia snapshot create SOURCE --stdin-file disk.img
restore  the tool's stdout goes back over NATS into a target:
           restic dump SNAPSHOT disk.img
           kopia show OBJECT

The core reads or writes the tool's pipe as ``pipe:/proc/self/fd/N``; the agent keeps its
own copy of that pipe end until the transfer's outcome is known. So a failed transfer never
looks like a short image to the tool: the agent stops the tool first, then lets the pipe
close, and nothing partial is saved as a snapshot. Credentials (``RESTIC_PASSWORD``,
``KOPIA_PASSWORD``, ...) come from the agent's environment and its config's ``[env]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
from collections.abc import Mapping
from dataclasses import dataclass, field

from nbdnats.errors import EndpointError, UsageError
from nbdnats.policy import Policy
from nbdnats.schemas import Tool

IMAGE_NAME = "disk.img"
STOP_GRACE = 5.0  # SIGTERM, then this long before SIGKILL
EXIT_GRACE = 0.3  # how long a tool that broke the stream gets to exit by itself


def _need(value: str | None, option: str, kind: str) -> str:
    if not value:
        raise UsageError(f"{kind} needs {option}")
    return value


def backup_argv(tool: Tool, policy: Policy, tags: list[str]) -> list[str]:
    """The command that reads the image on stdin and stores it as disk.img."""
    if tool.kind == "restic":
        repo = policy.location(_need(tool.repo, "a repository", "restic"), "restic repository")
        tag_args = [a for t in tags for a in ("--tag", t)]
        return [
            "restic", "-r", repo, "backup", "--stdin", "--stdin-filename", IMAGE_NAME,
            "--json", *tag_args,
        ]  # fmt: skip
    if tool.kind == "kopia":
        source = _need(tool.source, "a source path", "kopia")
        return ["kopia", "snapshot", "create", source, "--stdin-file", IMAGE_NAME]
    return pipe_argv(tool, policy)


def restore_argv(tool: Tool, policy: Policy) -> list[str]:
    """The command that writes the stored image on stdout."""
    if tool.kind == "restic":
        repo = policy.location(_need(tool.repo, "a repository", "restic"), "restic repository")
        return ["restic", "-r", repo, "dump", tool.snapshot, IMAGE_NAME]
    if tool.kind == "kopia":
        return ["kopia", "show", _need(tool.object, "an object id", "kopia")]
    return pipe_argv(tool, policy)


def pipe_argv(tool: Tool, policy: Policy) -> list[str]:
    """A pipe command runs without a shell; its program must be on the allow-list."""
    if not tool.command:
        raise UsageError("--pipe needs a command")
    return [policy.executable(tool.command[0]), *tool.command[1:]]


async def _run(argv: list[str], env: Mapping[str, str]) -> str:
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, env=dict(env), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
    except FileNotFoundError:
        raise EndpointError(f"{argv[0]} is not installed on this node") from None
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise EndpointError(f"{' '.join(argv[:4])} failed: {last_line(err)}")
    return out.decode(errors="replace")


async def image_size(tool: Tool, policy: Policy, env: Mapping[str, str]) -> int:
    """The size of the stored image, asked of the tool (a pipe must be told it)."""
    if tool.kind == "restic":
        repo = policy.location(_need(tool.repo, "a repository", "restic"), "restic repository")
        out = await _run(
            ["restic", "-r", repo, "ls", "--json", tool.snapshot, f"/{IMAGE_NAME}"], env
        )
        for line in out.splitlines():
            with contextlib.suppress(ValueError):
                node = json.loads(line)
                if node.get("path") == f"/{IMAGE_NAME}" and "size" in node:
                    return int(node["size"])
        raise EndpointError(f"restic snapshot {tool.snapshot} in {repo} holds no {IMAGE_NAME}")
    if tool.kind == "kopia":
        obj = _need(tool.object, "an object id", "kopia")
        parent, _, name = obj.rpartition("/")
        if parent:
            out = await _run(["kopia", "ls", "-l", parent], env)
            for line in out.splitlines():
                fields = line.split()
                if len(fields) >= 3 and fields[-1] == name and fields[1].isdigit():
                    return int(fields[1])
        raise UsageError(f"cannot tell the size of kopia object {obj}: pass --size")
    raise UsageError("a --pipe restore needs --size (the image's size in bytes)")


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
    _stderr: asyncio.Task[bytes] = field(repr=False)
    _stdout: asyncio.Task[bytes] | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return os.path.basename(self.argv[0])

    @classmethod
    async def start(cls, argv: list[str], direction: str, env: Mapping[str, str]) -> ToolRun:
        """Start ``argv`` with a pipe on stdin (backup) or stdout (restore)."""
        r, w = os.pipe()
        theirs, ours = (r, w) if direction == "backup" else (w, r)
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=theirs if direction == "backup" else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE if direction == "backup" else theirs,
                stderr=asyncio.subprocess.PIPE,
                env=dict(env),
                start_new_session=True,
            )
        except OSError as e:
            os.close(ours)
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
        if rc != 0:
            raise EndpointError(f"{self.name} failed (exit {rc}): {last_line(err)}")
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
        if early not in (None, 0):
            return f"{self.name} failed (exit {early}): {last_line(err)}"
        return None


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
