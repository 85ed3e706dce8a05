"""``nbd-nats``: stream block devices over NATS.

Every user mistake ends as one line on stderr (``nbd-nats: error: ...``) and a non-zero
exit: 2 for bad usage, 1 for a failed transfer, 130 when interrupted. No tracebacks.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NoReturn

import msgspec

from nbdnats import __version__, _core, transfer
from nbdnats.cli.output import ProgressBar
from nbdnats.errors import NbdNatsError, UsageError
from nbdnats.planes import Login
from nbdnats.schemas import Report, from_stats
from nbdnats.units import MAX_TIMEOUT, human, size_arg, timeout_arg

EPILOG = """\
SRC and DST: an NBD URI as libnbd takes it (nbd://host:port/export,
nbd+unix:///export?socket=PATH), a file or block device (a file target is created
or extended to the source size), or '-' for stdin/stdout as a raw image in offset
order ('pipe:PATH' likewise for a FIFO). DST may also be 'null:' (discard) or
'unix:PATH' (a listening unix socket, connected on the first byte).

environment: NBDNATS_DATA_URL, NBDNATS_CTL_URL (comma-separated server lists; a
server may carry user:password@ or token@), NBDNATS_CREDS, NBDNATS_NKEY
"""


# name, help, description, positional endpoints, has sender options, has receiver options
COMMANDS = [
    ("send", "send a disk image as transfer ID",
     "Send SRC as transfer ID to the receiver of that id.", ["SRC"], True, False),
    ("recv", "receive transfer ID into a target",
     "Receive transfer ID into DST.", ["DST"], False, True),
    ("copy", "copy SRC to DST through NATS in one command",
     "Copy SRC to DST through NATS (both ends in this process). "
     "Without --data-url an embedded nats-server is started.", ["SRC", "DST"], True, True),
]  # fmt: skip


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One shape for every error line, whichever subcommand's parser found it.
        self.exit(2, f"nbd-nats: error: {message} (see: {self.prog} --help)\n")


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


def _add_common(p: argparse.ArgumentParser, *, sender: bool, receiver: bool) -> None:
    g = p.add_argument_group("NATS")
    g.add_argument(
        "--data-url",
        metavar="URL",
        help="data-plane servers (default: "
        "$NBDNATS_DATA_URL or nats://127.0.0.1:4222; copy: an embedded server)",
    )
    g.add_argument(
        "--ctl-url",
        metavar="URL",
        help="ctl-plane servers (default: $NBDNATS_CTL_URL or the data URL)",
    )
    g.add_argument("--node", help="this node's name on the ctl plane (default: the hostname)")
    add_login_options(g)
    t = p.add_argument_group("transfer")
    if sender:
        t.add_argument(
            "--size",
            type=size_arg,
            metavar="BYTES",
            help="image size; required when SRC is '-' (stdin); below 2^63",
        )
        t.add_argument(
            "--chunk-size",
            type=size_arg,
            metavar="BYTES",
            help="bytes per frame (default: 1020K, or what the server's max_payload allows)",
        )
    t.add_argument(
        "--window",
        type=size_arg,
        default=_core.DEFAULT_WINDOW,
        metavar="BYTES",
        help="bytes in flight before an ack (default: 32M, max 48M)",
    )
    t.add_argument(
        "--timeout",
        type=timeout_arg,
        default=transfer.DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help="how long to wait for the peer to appear or answer; 0 waits forever, at most "
        f"{MAX_TIMEOUT:.0f} (7 days) (default: 60)",
    )
    t.add_argument(
        "--verify", action="store_true", help="re-read the target after writing and compare"
    )
    t.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted transfer: a receiver from its journal, a sender by "
        "taking over from its predecessor",
    )
    t.add_argument(
        "--state-dir",
        metavar="DIR",
        help="where the receiver keeps its journal and the sender its key for --resume "
        "(default: $NBDNATS_STATE_DIR, else $XDG_STATE_HOME/nbdnats or ~/.local/state/nbdnats)",
    )
    if receiver:
        t.add_argument(
            "--target-is-zero",
            action="store_true",
            help="the target already reads as zeros: skip writing zero ranges",
        )
    o = p.add_argument_group("output")
    o.add_argument("--json", action="store_true", help="print one JSON line with the results")
    o.add_argument("--quiet", "-q", action="store_true", help="no progress bar or summary")


# The other commands' modules bring nats-py's JetStream API, cryptography and qemu.qmp with
# them; a command line that names one of these is parsed without importing them, so a
# transfer starts that much sooner (and smaller).
DATA_COMMANDS = {name for name, *_ in COMMANDS}


def _command_word(argv: Sequence[str]) -> str | None:
    """The subcommand a command line names (the first word that is not an option)."""
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(*, full: bool = True) -> argparse.ArgumentParser:
    """The whole CLI; ``full=False`` only ``send``, ``recv`` and ``copy``."""
    parser = _Parser(
        prog="nbd-nats",
        description="Stream block devices over NATS: NBD semantics on the data plane.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"nbd-nats {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    for name, help_, description, ends, sender, receiver in COMMANDS:
        p = sub.add_parser(
            name,
            help=help_,
            description=description,
            epilog=EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        for end in ends:
            p.add_argument(end.lower(), metavar=end)
        id_help = "transfer id (default: random)" if name == "copy" else "transfer id of both ends"
        p.add_argument(
            "--id", required=name != "copy", dest="transfer_id", metavar="ID", help=id_help
        )
        _add_common(p, sender=sender, receiver=receiver)
    if not full:
        return parser
    from nbdnats import approval
    from nbdnats.cli import ctl as ctl_cli
    from nbdnats.dev import topology as dev
    from nbdnats.migration import run as migrate

    ctl_cli.add_agent_parser(sub)
    ctl_cli.add_ctl_parser(sub)
    approval.add_parser(sub)
    ctl_cli.add_digest_parser(sub)
    dev.add_parser(sub)
    migrate.add_parser(sub)
    return parser


def _report(stats: _core.Stats, sender: _core.Stats | None = None) -> Report:
    """The ``--json`` line; ``copy`` adds its sender's own report as ``sender``."""
    return from_stats(
        Report, stats, id=stats.transfer_id, seconds=round(stats.seconds, 3),
        mb_per_s=round(stats.mb_per_s, 1), sender=_report(sender) if sender else None,
    )  # fmt: skip


def _summary(verb: str, stats: _core.Stats) -> str:
    verified = ", verified" if stats.verified else ""
    return (
        f"{verb} {human(stats.size)} ({human(stats.data_bytes)} data, "
        f"{human(stats.zero_bytes)} zeros) in {stats.seconds:.2f} s, "
        f"{stats.mb_per_s:.1f} MB/s, {stats.digest}{verified}"
    )


async def _run(args: argparse.Namespace) -> _core.Stats:
    import nbdnats

    to_stdout = getattr(args, "dst", None) == "-"
    login = Login.resolve(args.creds, args.nkey)
    bar = ProgressBar(enabled=False if (args.quiet or args.json) else None)
    common: dict[str, Any] = {
        "data_url": args.data_url,
        "ctl_url": args.ctl_url,
        "node": args.node,
        "login": login,
        "on_progress": bar,
        "window": args.window,
        "timeout": args.timeout,
        "verify": args.verify,
        "resume": args.resume,
        "state_dir": args.state_dir,
    }
    call: Awaitable[_core.Stats | transfer.CopyStats]
    sender: _core.Stats | None = None
    try:
        if args.command == "send":
            call = nbdnats.send(
                args.src,
                transfer_id=args.transfer_id,
                size=args.size,
                chunk_size=args.chunk_size,
                **common,
            )
        elif args.command == "recv":
            call = nbdnats.recv(
                args.dst,
                transfer_id=args.transfer_id,
                target_is_zero=args.target_is_zero,
                **common,
            )
        else:
            call = transfer.copy_ends(
                args.src,
                args.dst,
                transfer_id=args.transfer_id,
                size=args.size,
                chunk_size=args.chunk_size,
                target_is_zero=args.target_is_zero,
                **common,
            )
        result = await call
    finally:
        bar.close()
    if isinstance(result, transfer.CopyStats):
        sender, stats = result
    else:
        stats = result
    # stdout may carry the image itself; then results go to stderr.
    out = sys.stderr if to_stdout else sys.stdout
    if args.json:
        out.write(msgspec.json.encode(_report(stats, sender)).decode() + "\n")
    elif not args.quiet:
        verb = {"send": "sent", "recv": "received", "copy": "copied"}[args.command]
        sys.stderr.write(_summary(verb, stats) + "\n")
    return stats


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
        # What the library only warns about (a lost ctl plane): one line, no traceback.
        logging.basicConfig(
            level=logging.WARNING, format="nbd-nats: warning: %(message)s", stream=sys.stderr
        )
        await _run(args)
        return
    from nbdnats import approval
    from nbdnats.cli import ctl as ctl_cli
    from nbdnats.dev import topology as dev
    from nbdnats.migration import run as migrate

    runners = {
        "dev": dev.run,
        "agent": ctl_cli.run_agent_command,
        "ctl": ctl_cli.run_ctl,
        "approve": approval.run,
        "digest": ctl_cli.run_digest,
        "migrate": migrate.run,
    }
    await runners[args.command](args)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    full = _command_word(argv) not in DATA_COMMANDS
    args = build_parser(full=full).parse_args(argv)
    try:
        _loop_runner()(_main(args))
    except NbdNatsError as e:
        sys.stderr.write(f"nbd-nats: error: {e}\n")
        return 2 if isinstance(e, UsageError) else 1
    except KeyboardInterrupt:
        sys.stderr.write("nbd-nats: interrupted\n")
        return 130
    except asyncio.CancelledError:
        sys.stderr.write("nbd-nats: terminated\n")
        return 143
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
