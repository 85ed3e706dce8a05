"""What several command groups' parsers share: the subcommand shape, login and size options.

Here rather than in ``main`` so that each command's module can use them without importing
the module that imports it.
"""

from __future__ import annotations

import argparse
import fcntl
import os
from typing import Any

from nbdnats import _core
from nbdnats.units import size_arg, timeout_arg


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


def add_login_options(g: Any) -> None:
    """--creds and --nkey: how a command logs in on both planes (besides credentials in
    its URLs); the agent and ctl parsers take them too."""
    g.add_argument(
        "--creds",
        metavar="FILE",
        help="log in to NATS with this .creds file (user JWT and seed; default: $NBDNATS_CREDS)",
    )
    g.add_argument(
        "--nkey",
        metavar="FILE",
        help="log in to NATS with the user NKey seed in FILE (default: $NBDNATS_NKEY)",
    )


def add_size_option(g: Any, flag: str, help: str, **kwargs: Any) -> None:
    """An option taking a size as people type it (4096, 4K, 1.5G), checked as it is parsed."""
    g.add_argument(flag, type=size_arg, metavar="BYTES", help=help, **kwargs)


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
