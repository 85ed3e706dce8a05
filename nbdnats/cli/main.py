"""``nbd-nats``: stream block devices over NATS.

Every user mistake ends as one line on stderr (``nbd-nats: error: ...``) and a non-zero
exit: 2 for bad usage, 1 for a failed transfer, 130 when interrupted. No tracebacks. With
``--json`` a failure also prints one JSON line, ``{"error", "code", "id"}``, where the
command's report would have gone.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from types import ModuleType
from typing import Any, NoReturn

from nbdnats import __version__
from nbdnats.cli import transfer
from nbdnats.cli.options import progress_argv
from nbdnats.cli.output import print_json
from nbdnats.errors import NbdNatsError, TransferCancelled, UsageError


class UsageExit(SystemExit):
    """What a parser's error raises (exit 2), with the message its error line said."""

    def __init__(self, message: str) -> None:
        super().__init__(2)
        self.message = message


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One shape for every error line, whichever subcommand's parser found it.
        line = f"{message} (see: {self.prog} --help)"
        sys.stderr.write(f"nbd-nats: error: {line}\n")
        raise UsageExit(line)


# The other commands' modules bring nats-py's JetStream API, cryptography and qemu.qmp with
# them; a command line that names one of these is parsed without importing them, so a
# transfer starts that much sooner (and smaller).
DATA_COMMANDS = transfer.NAMES


def _other_commands() -> dict[str, ModuleType]:
    """The commands besides the data commands, in the order --help lists them; each module
    has ``add_parser(sub)`` and ``async run(args)``."""
    from nbdnats.cli import agent, approve, ctl, dev, digest, injector, journals, migrate

    return {
        "agent": agent,
        "ctl": ctl,
        "approve": approve,
        "digest": digest,
        "journals": journals,
        "dev": dev,
        "migrate": migrate,
        "route-injector": injector,
    }


def _command_word(argv: Sequence[str]) -> str | None:
    """The subcommand a command line names (the first word that is not an option)."""
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(*, full: bool = True) -> argparse.ArgumentParser:
    """The whole CLI; ``full=False`` only ``send``, ``recv`` and ``copy``."""
    parser = _Parser(
        prog="nbd-nats",
        description="Stream block devices over NATS: NBD semantics on the data plane.",
        epilog=transfer.EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-V", "--version", action="version", version=f"nbd-nats {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    transfer.add_parsers(sub)
    if full:
        for module in _other_commands().values():
            module.add_parser(sub)
    return parser


def _loop_runner() -> Callable[[Awaitable[Any]], Any]:
    try:
        import uvloop

        return lambda coro: uvloop.run(coro)  # type: ignore[arg-type]
    except ImportError:  # pragma: no cover - uvloop is a dependency
        return lambda coro: asyncio.run(coro)  # type: ignore[arg-type]


async def _main(args: argparse.Namespace) -> None:
    # SIGTERM drains like Ctrl-C: the transfer is cancelled and the peer told, not left
    # to time out.
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    if args.command in DATA_COMMANDS:
        await transfer.run(args)
    else:
        await _other_commands()[args.command].run(args)


def _json_wanted(argv: Sequence[str]) -> bool:
    return "--json" in argv[: argv.index("--")] if "--" in argv else "--json" in argv


def _id_given(argv: Sequence[str]) -> str | None:
    """The ``--id`` of a command line the parser refused (the last one, as argparse takes)."""
    given = None
    for i, arg in enumerate(argv):
        if arg == "--":
            break
        if arg == "--id" and i + 1 < len(argv):
            given = argv[i + 1]
        elif arg.startswith("--id="):
            given = arg.partition("=")[2]
    return given


def _failed(
    args: argparse.Namespace | None, argv: Sequence[str], message: str, code: str, status: int
) -> int:
    """A failure's end: its ``--json`` line when asked for, and the exit status. The line
    goes where the command's report goes (stderr when stdout carries the image)."""
    if args is None:
        wanted, ident, out = _json_wanted(argv), _id_given(argv), sys.stdout
    else:
        wanted = bool(getattr(args, "json", False))
        ident = getattr(args, "transfer_id", None) or getattr(args, "migration_id", None)
        image_out = args.command in DATA_COMMANDS and getattr(args, "dst", None) == "-"
        out = sys.stderr if image_out else sys.stdout
    if wanted:
        print_json({"error": message, "code": code, "id": ident}, out)
    return status


def main(argv: Sequence[str] | None = None) -> int:
    argv = progress_argv(sys.argv[1:] if argv is None else list(argv))
    full = _command_word(argv) not in DATA_COMMANDS
    try:
        args = build_parser(full=full).parse_args(argv)
    except UsageExit as e:
        return _failed(None, argv, e.message, UsageError.code, 2)
    try:
        _loop_runner()(_main(args))
    except NbdNatsError as e:
        sys.stderr.write(f"nbd-nats: error: {e}\n")
        return _failed(args, argv, str(e), e.code, 2 if isinstance(e, UsageError) else 1)
    except KeyboardInterrupt:
        sys.stderr.write("nbd-nats: interrupted\n")
        return _failed(args, argv, "interrupted", TransferCancelled.code, 130)
    except asyncio.CancelledError:
        sys.stderr.write("nbd-nats: terminated\n")
        return _failed(args, argv, "terminated", TransferCancelled.code, 143)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
