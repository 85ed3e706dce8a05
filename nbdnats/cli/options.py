"""What several command groups' parsers share: the subcommand shape, login and size options.

Here rather than in ``main`` so that each command's module can use them without importing
the module that imports it.
"""

from __future__ import annotations

import argparse
import fcntl
import os
from collections.abc import Callable
from typing import Any, get_args

from nbdnats import _core
from nbdnats.planes import Login
from nbdnats.schemas import Compress
from nbdnats.units import rate_arg, size_arg, timeout_arg

GLOBAL_OPTIONS = "global options (before or after ACTION)"


def add_command(
    sub: Any, name: str, *, help: str, description: str, epilog: str | None = None
) -> argparse.ArgumentParser:
    """A subcommand; one with an epilog (examples, config files) keeps that epilog's and the
    description's line breaks."""
    extra: dict[str, Any] = {}
    if epilog is not None:
        extra = {"epilog": epilog, "formatter_class": argparse.RawDescriptionHelpFormatter}
    p: argparse.ArgumentParser = sub.add_parser(name, help=help, description=description, **extra)
    return p


class _Actions(argparse._SubParsersAction):  # type: ignore[type-arg]
    """Subcommands that each take their group's global options too (``shared``)."""

    def __init__(self, *args: Any, shared: argparse.ArgumentParser, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.shared = shared

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        kwargs["parents"] = [*kwargs.get("parents", []), self.shared]
        parser: argparse.ArgumentParser = super().add_parser(name, **kwargs)
        return parser


def add_actions(p: argparse.ArgumentParser, dest: str, add_globals: Callable[[Any], None]) -> Any:
    """The ACTION subcommands of group ``p``, with the group's global options (those
    ``add_globals`` adds) taken before ACTION and after it, as the nats CLI takes its
    own: ``ctl nodes --json`` is ``ctl --json nodes``. After ACTION they default to
    nothing (``SUPPRESS``), so a value given before is kept; given both before and
    after, the later one wins."""
    add_globals(p.add_argument_group(GLOBAL_OPTIONS))
    shared = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    add_globals(shared.add_argument_group(GLOBAL_OPTIONS))
    # add_subparsers hands what it does not know (shared) to the action class.
    extra: dict[str, Any] = {"shared": shared}
    return p.add_subparsers(action=_Actions, dest=dest, metavar="ACTION", required=True, **extra)


def add_login_options(g: Any) -> None:
    """How a command logs in on both planes (besides credentials in its URLs) and its TLS
    files, named and read from the environment as the nats tools do (``Login.resolve``)."""
    g.add_argument(
        "--creds",
        metavar="FILE",
        help="log in to NATS with this .creds file (user JWT and seed; default: "
        "$NBDNATS_CREDS, else $NATS_CREDS)",
    )
    g.add_argument(
        "--nkey",
        metavar="FILE",
        help="log in to NATS with the user NKey seed in FILE (default: $NBDNATS_NKEY, "
        "else $NATS_NKEY)",
    )
    g.add_argument(
        "--tlscert",
        metavar="FILE",
        help="TLS client certificate, for servers that verify clients (default: $NATS_CERT)",
    )
    g.add_argument("--tlskey", metavar="FILE", help="the key of --tlscert (default: $NATS_KEY)")
    g.add_argument(
        "--tlsca",
        metavar="FILE",
        help="verify servers with this CA instead of the system's (default: $NATS_CA)",
    )


def login_from(args: argparse.Namespace) -> Login:
    """The login options of ``add_login_options``, checked, with the environment's."""
    return Login.resolve(args.creds, args.nkey, args.tlscert, args.tlskey, args.tlsca)


def add_size_option(g: Any, flag: str, help: str, **kwargs: Any) -> None:
    """An option taking a size as people type it (4096, 4K, 1.5G), checked as it is parsed."""
    g.add_argument(flag, type=size_arg, metavar="BYTES", help=help, **kwargs)


RATE_HELP = (
    "cap the data sent at N bytes per second (K/M/G suffixes, binary: 50M is 50 MiB/s; "
    "more than 0, at most 1T) (default: no cap)"
)


def add_rate_option(g: Any, help: str = RATE_HELP) -> None:
    """--rate: a cap in bytes/s, checked as it is parsed (``units.rate_arg``)."""
    g.add_argument("--rate", type=rate_arg, metavar="N", help=help)


def add_compress_option(g: Any) -> None:
    """``--compress`` of a sending command (send, copy; ctl copy, backup and restore)."""
    g.add_argument(
        "--compress",
        choices=get_args(Compress),
        default=None,
        help="compress data frames where that saves a tenth: auto (what the receiver can), "
        "zstd or lz4 (fails if the receiver cannot), off "
        f"(default: {_core.DEFAULT_COMPRESS})",
    )


def streams_arg(text: str) -> int:
    """argparse ``type`` of ``--streams``: a whole number from 1 to the core's maximum."""
    try:
        n = int(text, 10)
    except ValueError:
        n = 0
    if not 1 <= n <= _core.MAX_STREAMS:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number of streams: use a whole number from 1 to {_core.MAX_STREAMS}"
        )
    return n


def add_streams_option(g: Any) -> None:
    """``--streams`` of a sending command (send, copy; ctl copy)."""
    g.add_argument(
        "--streams",
        type=streams_arg,
        default=1,
        metavar="N",
        help="split the transfer into N sub-streams (at most "
        f"{_core.MAX_STREAMS}), each with its own connection to another server of the data "
        f"URL list, its own window and acks, over {_core.STRIPE_SIZE // 2**20} MiB stripes of "
        "the disk; the receiver's target must be a file, device or NBD export, else it runs as "
        "one stream (default: 1)",
    )


def add_timeout_option(
    g: Any, help: str, *, metavar: str = "SECONDS", default: float | None = _core.DEFAULT_TIMEOUT
) -> None:
    """--timeout in seconds (0: no limit), checked as it is parsed; the default is the core's."""
    g.add_argument("--timeout", type=timeout_arg, default=default, metavar=metavar, help=help)


# ``--progress=3`` reaches the parser as ``--progress=FD 3`` (see ``progress_argv``): a bare
# ``--progress`` then never swallows the positional argument after it, and an error names
# the option as the user wrote it.
PROGRESS_FD_FLAG = "--progress=FD"


def progress_argv(argv: list[str]) -> list[str]:
    """``argv`` with each ``--progress=N`` (before a ``--``) written as ``--progress=FD N``."""
    out: list[str] = []
    for i, arg in enumerate(argv):
        if arg == "--":
            return out + argv[i:]
        if arg.startswith("--progress=") and arg != PROGRESS_FD_FLAG:
            out += [PROGRESS_FD_FLAG, arg.partition("=")[2]]
        else:
            out.append(arg)
    return out


def fd_arg(text: str) -> int:
    """argparse ``type`` of ``--progress=FD``: a file descriptor open for writing."""
    try:
        fd = int(text)
    except ValueError:
        fd = -1
    if fd < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a file descriptor (a number, e.g. 3)")
    try:
        mode = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
    except OSError:
        raise argparse.ArgumentTypeError(
            f"file descriptor {fd} is not open: open it for the command, e.g. 3>progress.txt"
        ) from None
    if mode == os.O_RDONLY:
        raise argparse.ArgumentTypeError(
            f"file descriptor {fd} is open for reading only: open it for writing, e.g. 3>FILE"
        )
    return fd


def add_progress_option(g: Any) -> None:
    """``-p``/``--progress`` (a bar on stderr, terminal or not) and ``--progress=FD``
    (``N/100`` lines on FD, as nbdcopy)."""
    g.add_argument(
        "-p",
        "--progress",
        action="store_true",
        help="draw the progress bar on stderr even when it is not a terminal; "
        "--progress=FD instead writes 'N/100' lines to file descriptor FD (as nbdcopy)",
    )
    g.add_argument(
        PROGRESS_FD_FLAG, dest="progress_fd", type=fd_arg, metavar="FD", help=argparse.SUPPRESS
    )


STATE_DIR_DEFAULT = "$NBDNATS_STATE_DIR, else $XDG_STATE_HOME/nbdnats or ~/.local/state/nbdnats"


def add_state_dir_option(g: Any, what: str) -> None:
    """--state-dir: where receivers keep their journals and senders their keys (resolved by
    ``nbdnats.transfer.resolve_state_dir``); ``what`` says what this command does there."""
    g.add_argument("--state-dir", metavar="DIR", help=f"{what} (default: {STATE_DIR_DEFAULT})")
