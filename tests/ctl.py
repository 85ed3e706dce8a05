"""The ctl plane as the ctl tests drive it: the command line and its output, stored events,
raw requests (crafted, as an attacker would send them) and agent processes."""

from __future__ import annotations

import asyncio
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.cli import run_cli


def ctl(url: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
    return run_cli("ctl", "--ctl-url", url, *args, timeout=timeout)


def ok(proc: subprocess.CompletedProcess[bytes]) -> str:
    """A command's stdout, once it has exited 0."""
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout.decode()


def stored_events(url: str, kind: str) -> list[dict[str, object]]:
    """The ctl events of ``kind`` that JetStream holds, oldest first."""
    out = ok(ctl(url, "--json", "events", "--all", "--no-follow", "--kind", kind))
    return [json.loads(x)["data"] for x in out.splitlines()]


async def ctl_ask(url: str, subject: str, payload: bytes, timeout: float = 20) -> dict[str, object]:
    """One raw request on the ctl plane (a crafted message, as an attacker would send it);
    the reply decoded."""
    import msgspec
    import nats

    nc = await nats.connect(url)
    try:
        msg = await nc.request(subject, payload, timeout=timeout)
        return dict(msgspec.json.decode(msg.data))
    finally:
        await nc.close()


def ctl_request(url: str, subject: str, payload: bytes, timeout: float = 20) -> dict[str, object]:
    """``ctl_ask`` from synchronous code."""
    return asyncio.run(ctl_ask(url, subject, payload, timeout))


@dataclass
class AgentProc:
    node: str
    proc: subprocess.Popen[bytes]
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, as an init system stops it; the exit code."""
        if self.proc.poll() is None:
            self.proc.terminate()
        return self.proc.wait(timeout)


def schema_before(cls: type[Any], option: str) -> type[Any]:
    """``cls`` (a command with ``options``) as an agent from before ``TransferOptions.<option>``
    decodes it: the same fields without that option, unknown fields refused, as ``Message``
    refuses them."""
    import msgspec

    from nbdnats.schemas import TransferOptions

    def without(struct: type[Any], drop: str, **types: type[Any]) -> type[Any]:
        fields: list[Any] = []
        for f in msgspec.structs.fields(struct):
            if f.name == drop:
                continue
            typ = types.get(f.name, f.type)
            if f.required:
                fields.append((f.name, typ))
            elif f.default_factory is not msgspec.NODEFAULT:
                factory = types.get(f.name, f.default_factory)
                fields.append((f.name, typ, msgspec.field(default_factory=factory)))
            else:
                fields.append((f.name, typ, f.default))
        return msgspec.defstruct(struct.__name__, fields, kw_only=True, forbid_unknown_fields=True)

    return without(cls, "", options=without(TransferOptions, option))
