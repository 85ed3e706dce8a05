"""What several command groups' parsers share: the subcommand shape, login and size options.

Here rather than in ``main`` so that each command's module can use them without importing
the module that imports it.
"""

from __future__ import annotations

import argparse
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
