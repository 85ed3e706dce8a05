"""What an agent may open: paths, devices, sockets, NBD servers and the paths a pipe
command names, under its allow-list.

An agent is driven by commands from the network, so every endpoint a command names is
checked here before anything is opened:

- an export name the agent announces (``--export NAME=URI``) stands for its URI;
- an absolute path (file, block device) must resolve, symlinks followed, to a place under
  an allowed directory prefix (``/var/lib/images`` allows ``/var/lib/images/a.qcow2``,
  not ``/var/lib/images2``); a path that is under a prefix *as given* (lexically, with no
  ``..``) and resolves to a block device is allowed too, so ``--allow /dev/disk/by-id``
  covers its links to ``/dev/nvme0n1``;
- an NBD URI is read once, the way libnbd reads it (query split on ``&``, and on ``;``
  when no ``&`` follows; percent-decoded); its file parameters (``socket``,
  ``tls-psk-file``, ``tls-certificates``) are checked like files; a parameter given twice,
  an unknown one, a raw ``;`` or a control character is refused;
- any other URI (``nbd://host:port/x``, a restic ``rest:`` repository) must start with an
  allowed entry that is itself a URI (``nbd://127.0.0.1:10809/``), and the match must end
  at a boundary (``/``, ``?``, ``#`` or the end), so ``nbd://10.0.0.5`` allows neither
  ``nbd://10.0.0.50`` nor ``nbd://10.0.0.5:x@evil/`` (whose host is ``evil``);
- a bare name (letters, digits, ``-``, ``_``) that is no export is refused with the
  node's export names;
- streams and test endpoints (``-``, ``pipe:``, ``null:``, ``pattern:``) and relative
  paths are never accepted from a command;
- a pipe command's program must be on the allow-list, and every argument that names a
  path must name an absolute one under it (``pipe_argv``).
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import urllib.parse
from dataclasses import dataclass, field

from nbdnats import subjects
from nbdnats.errors import PolicyError
from nbdnats.planes import redact_url

_NEVER = ("pipe:", "null:", "pattern:")
_NBD_SCHEMES = ("nbd", "nbds", "nbd+unix", "nbds+unix", "nbd+vsock", "nbds+vsock")
# Parameters of an NBD URI that name local files: checked against the allow-list. libnbd
# 1.14 reads socket and tls-psk-file (the latter only if local files are enabled, which
# the core does not do); newer versions also tls-certificates. Any other is refused.
_NBD_FILE_PARAMS = ("socket", "tls-psk-file", "tls-certificates")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# A pipe argument holding a path after an option: `-o/x`, `--output=/x`, `of=/x`.
_PREFIXED_PATH = re.compile(r"(-[A-Za-z0-9]|-{0,2}[A-Za-z0-9_.-]*=)(/.*)", re.S)
# A second path inside one argument (`/ok/a:/etc/b`, a list some tools split).
_SECOND_PATH = re.compile(r"[:,;=]/")


def _is_uri(entry: str) -> bool:
    return "://" in entry or (":" in entry and not entry.startswith("/"))


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix.rstrip("/") + "/")


def nbd_query(uri: str) -> list[tuple[str, str]]:
    """The query parameters of an NBD URI exactly as libnbd 1.14 splits and decodes them
    (``parse_uri_queries``): the query runs from the first ``?`` to the first ``#``; a
    section ends at the next ``&``, or at the next ``;`` when no ``&`` follows; empty
    sections and ``=value`` are skipped; names and values are percent-decoded."""
    rest = uri.split("#", 1)[0]
    if "?" not in rest:
        return []
    query = rest.split("?", 1)[1]
    out: list[tuple[str, str]] = []
    while query:
        end = query.find("&")
        if end < 0:
            end = query.find(";")
        if end < 0:
            end = len(query)
        section, query = query[:end], query[end + 1 :]
        if not section or section.startswith("="):
            continue
        name, _, value = section.partition("=")
        out.append((_unescape(name), _unescape(value)))
    return out


def _unescape(text: str) -> str:
    # xmlURIUnescapeString: %XX to a byte, nothing else ('+' stays '+').
    return os.fsdecode(urllib.parse.unquote_to_bytes(text))


# An export name the agent does not have: how many of its own the refusal lists.
_EXPORTS_SHOWN = 10


def _names(names: list[str], limit: int = _EXPORTS_SHOWN) -> str:
    """Sorted names for a message, at most ``limit`` of them: ``a, b, … (3 more)``."""
    if not names:
        return "none"
    names = sorted(names)
    more = len(names) - limit
    shown = ", ".join(names[:limit])
    return f"{shown}, … ({more} more)" if more > 0 else shown


@dataclass
class Policy:
    allow: list[str] = field(default_factory=list)
    exports: dict[str, str] = field(default_factory=dict)
    # The node's name, for messages ("node a has no export vm2").
    node: str = "this node"

    def __post_init__(self) -> None:
        dirs = [a for a in self.allow if a.startswith("/")]
        self._dirs = [os.path.realpath(a) for a in dirs]
        self._lexical = [os.path.normpath(a) for a in dirs]
        self._uris = [a for a in self.allow if _is_uri(a)]

    def _path_allowed(self, path: str) -> bool:
        real = os.path.realpath(path)
        return any(_under(real, d) for d in self._dirs)

    def _block_link_allowed(self, path: str) -> bool:
        """A link under an allowed prefix as given (no '..') that resolves to a block
        device: ``/dev/disk/by-id/nvme-X`` -> ``/dev/nvme0n1``. The link and the
        directories from the prefix down to it must be writable only by root (or this
        agent's user), as udev's are: else anyone who may write there could point the
        agent at any disk."""
        if ".." in path.split("/"):
            return False
        lexical = os.path.normpath(path)
        prefixes = [d for d in self._lexical if _under(lexical, d)]
        if not prefixes:
            return False
        try:
            if not stat.S_ISBLK(os.stat(path).st_mode):
                return False
            owners = {0, os.geteuid()}
            node = lexical
            while True:
                st = os.lstat(node)
                if st.st_uid not in owners or (not stat.S_ISLNK(st.st_mode) and st.st_mode & 0o022):
                    return False
                if node in prefixes:
                    return True
                node = os.path.dirname(node)
        except OSError:
            return False

    def path(self, path: str, what: str = "path") -> str:
        """An allowed absolute path, resolved; ``PolicyError`` otherwise."""
        if not path.startswith("/"):
            raise PolicyError(f"{what} {path!r} is not an absolute path; name it in full")
        if _CONTROL.search(path):
            raise PolicyError(f"{what} {path!r} holds a control character")
        real = os.path.realpath(path)
        if not self._path_allowed(path) and not self._block_link_allowed(path):
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
        scheme = spec.split(":", 1)[0]
        if scheme in _NBD_SCHEMES:
            return self.nbd_uri(spec)
        if _is_uri(spec):
            return self.uri(spec)
        if subjects.is_token(spec):
            # A bare name can only be an export (a path is absolute, a URI has a scheme).
            raise PolicyError(
                f"node {self.node} has no export {spec} (it has: {_names(list(self.exports))}); "
                "name one of them, an absolute path or an NBD URI"
            )
        return self.path(spec)

    def nbd_uri(self, uri: str) -> str:
        """An NBD URI whose parameters are unambiguous, known, and under the allow-list;
        one without a unix socket must also start with an allowed URI prefix."""
        shown = redact_url(uri)
        if _CONTROL.search(uri) or _CONTROL.search(urllib.parse.unquote(uri)):
            raise PolicyError(f"NBD URI {shown!r} holds a control character")
        scheme = uri.split(":", 1)[0]
        if not uri.startswith(f"{scheme}://"):
            raise PolicyError(f"NBD URI {shown} must start with {scheme}://")
        query = uri.split("#", 1)[0].partition("?")[2]
        if ";" in query:
            raise PolicyError(
                f"NBD URI {shown} has a ';' in its query, which libnbd may read as a "
                "separator; separate parameters with '&' and write a ';' in a value as %3B"
            )
        if any(section.startswith("=") for section in query.split("&")):
            raise PolicyError(f"NBD URI {shown} has a parameter without a name")
        params: dict[str, str] = {}
        for name, value in nbd_query(uri):
            if not name:
                raise PolicyError(f"NBD URI {shown} has a parameter without a name")
            if name not in _NBD_FILE_PARAMS:
                raise PolicyError(
                    f"unknown NBD URI parameter {name!r} in {shown}; "
                    f"an agent accepts only {', '.join(_NBD_FILE_PARAMS)}"
                )
            if name in params:
                raise PolicyError(f"NBD URI {shown}: {name} is given twice")
            if not value:
                raise PolicyError(f"NBD URI {shown}: {name} is empty")
            params[name] = value
        unix = scheme.endswith("+unix")
        if unix and "socket" not in params:
            raise PolicyError(f"NBD URI {shown} names no socket: it needs exactly one socket=PATH")
        if not unix and "socket" in params:
            raise PolicyError(f"NBD URI {shown}: socket= applies only to nbd+unix://")
        if scheme.startswith("nbds") and not params.keys() & {"tls-certificates", "tls-psk-file"}:
            # libnbd would encrypt, yet accept any server: name what authenticates it.
            raise PolicyError(
                f"NBD URI {shown} uses TLS without tls-certificates=DIR or tls-psk-file=FILE, "
                "so the server would not be authenticated; name one of them"
            )
        for name, value in params.items():
            self.path(value, "NBD socket" if name == "socket" else f"NBD {name}")
        if not unix:
            self.uri(uri)
        return uri

    def _uri_allowed(self, uri: str) -> bool:
        # Not ':' or '@' as a boundary: 'nbd://10.0.0.5' + ':x@evil/' names host evil.
        return any(
            uri.startswith(prefix)
            and (prefix.endswith("/") or len(uri) == len(prefix) or uri[len(prefix)] in "/?#")
            for prefix in self._uris
        )

    def uri(self, uri: str, what: str = "endpoint") -> str:
        """A URI-like target (NBD over TCP, a remote repository) under an allowed prefix."""
        if not self._uri_allowed(uri):
            raise PolicyError(
                f"{what} {redact_url(uri)} is outside this agent's allow-list; "
                "add its URI prefix with --allow"
            )
        return uri

    def location(self, where: str, what: str) -> str:
        """A tool's repository or file: a path or a URI, each checked as such."""
        if where.startswith(("-", "@")) or _CONTROL.search(where):
            raise PolicyError(f"{what} {redact_url(where)!r} is neither a path nor a URI")
        return self.path(where, what) if where.startswith("/") else self.uri(where, what)

    def executable(self, name: str) -> str:
        """A pipe command's program: resolved on PATH, and allowed."""
        found = name if name.startswith("/") else shutil.which(name)
        if not found:
            raise PolicyError(f"pipe command {name!r} is not installed on this node")
        return self.path(found, "pipe command")

    def pipe_argv(self, command: list[str]) -> list[str]:
        """A pipe command whose program is allowed and whose arguments name no path
        outside the allow-list.

        An argument names a path when it contains ``/``: then it must be an absolute path
        (``/x``), or one after an option (``-o/x``, ``--output=/x``, ``of=/x``), under the
        allow-list, with no ``..`` component and no second path inside (``/a:/b``); or a URI
        under an allowed URI prefix. ``..`` is refused wherever it appears as a component.
        Anything else (``dir/x``, ``file:///x``) is refused. Bare names carry no ``/``:
        the tool runs in a private empty working directory, so they reach nothing."""
        if not command:
            raise PolicyError("a pipe needs a command")
        program = self.executable(command[0])
        for arg in command[1:]:
            self._pipe_argument(arg)
        return [program, *command[1:]]

    def _pipe_argument(self, arg: str) -> None:
        what = f"pipe argument {arg!r}"
        if _CONTROL.search(arg):
            raise PolicyError(f"{what} holds a control character")
        values = {arg, arg.partition("=")[2]}
        if arg.startswith("-") and not arg.startswith("--"):
            values.add(arg[2:])
        if any(".." in v.split("/") for v in values):
            raise PolicyError(f"{what} has a '..' component; name paths in full")
        if "/" not in arg:
            return
        if any(self._uri_allowed(v) for v in values if v):
            return
        if arg.startswith("/"):
            path = arg
        elif m := _PREFIXED_PATH.fullmatch(arg):
            path = m.group(2)
        else:
            raise PolicyError(
                f"{what} names a path that is not absolute; "
                "name files in full, under the agent's allow-list"
            )
        if _SECOND_PATH.search(path):
            raise PolicyError(f"{what} holds two paths in one argument; pass them separately")
        self.path(path, "pipe argument path")
