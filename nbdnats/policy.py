"""What an agent may open: paths, devices, sockets and NBD servers under its allow-list.

An agent is driven by commands from the network, so every endpoint a command names is
checked here before anything is opened:

- an export name the agent announces (``--export NAME=URI``) stands for its URI;
- an absolute path (file, block device) must resolve, symlinks followed, to a place under
  an allowed directory prefix (``/var/lib/images`` allows ``/var/lib/images/a.qcow2``,
  not ``/var/lib/images2``);
- ``nbd+unix://...?socket=PATH``: the socket path is checked like a file;
- any other URI (``nbd://host:port/x``, a restic ``rest:`` repository) must start with an
  allowed entry that is itself a URI (``nbd://127.0.0.1:10809/``);
- streams and test endpoints (``-``, ``pipe:``, ``null:``, ``pattern:``) and relative
  paths are never accepted from a command.
"""

from __future__ import annotations

import os
import shutil
import urllib.parse
from dataclasses import dataclass, field

from nbdnats.errors import PolicyError

_NEVER = ("pipe:", "null:", "pattern:")


def _is_uri(entry: str) -> bool:
    return "://" in entry or (":" in entry and not entry.startswith("/"))


@dataclass
class Policy:
    allow: list[str] = field(default_factory=list)
    exports: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._dirs = [os.path.realpath(a) for a in self.allow if a.startswith("/")]
        self._uris = [a for a in self.allow if _is_uri(a)]

    def _path_allowed(self, path: str) -> bool:
        real = os.path.realpath(path)
        return any(real == d or real.startswith(d.rstrip("/") + "/") for d in self._dirs)

    def path(self, path: str, what: str = "path") -> str:
        """An allowed absolute path, resolved; ``PolicyError`` otherwise."""
        if not path.startswith("/"):
            raise PolicyError(f"{what} {path!r} is not an absolute path; name it in full")
        real = os.path.realpath(path)
        if not self._path_allowed(path):
            shown = path if real == path else f"{path} (that is {real})"
            raise PolicyError(
                f"{what} {shown} is outside this agent's allow-list; "
                "start the agent with --allow covering it"
            )
        return real

    def endpoint(self, spec: str) -> str:
        """The core endpoint for what a command named, once allowed."""
        if spec in self.exports:
            return self.exports[spec]
        if spec == "-" or spec.startswith(_NEVER):
            raise PolicyError(f"endpoint {spec!r} cannot be named in a command")
        if spec.startswith(("nbd+unix://", "nbds+unix://")):
            query = urllib.parse.parse_qs(urllib.parse.urlsplit(spec).query)
            sockets = query.get("socket", [])
            if len(sockets) != 1:
                raise PolicyError(f"NBD URI {spec} must name exactly one socket=PATH")
            self.path(sockets[0], "NBD socket")
            return spec
        if _is_uri(spec):
            return self.uri(spec)
        return self.path(spec)

    def uri(self, uri: str, what: str = "endpoint") -> str:
        """A URI-like target (NBD over TCP, a remote repository) under an allowed prefix."""
        if not any(uri.startswith(prefix) for prefix in self._uris):
            raise PolicyError(
                f"{what} {uri} is outside this agent's allow-list; add its URI prefix with --allow"
            )
        return uri

    def location(self, where: str, what: str) -> str:
        """A tool's repository or file: a path or a URI, each checked as such."""
        return self.path(where, what) if where.startswith("/") else self.uri(where, what)

    def executable(self, name: str) -> str:
        """A pipe command's program: resolved on PATH, and allowed."""
        found = name if name.startswith("/") else shutil.which(name)
        if not found:
            raise PolicyError(f"pipe command {name!r} is not installed on this node")
        return self.path(found, "pipe command")
