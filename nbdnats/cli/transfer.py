"""``nbd-nats send``, ``recv`` and ``copy``: the data commands' options and their run.

This module is all a transfer's command line imports of the CLI (see ``main``): it must not
bring the control plane with it.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Awaitable
from typing import Any

from nbdnats import _core, formats, subjects
from nbdnats.cli.options import (
    add_compress_option,
    add_login_options,
    add_progress_option,
    add_rate_option,
    add_size_option,
    add_state_dir_option,
    add_streams_option,
    add_timeout_option,
    login_from,
)
from nbdnats.cli.output import PercentLines, ProgressBar, fan_out, print_result
from nbdnats.planes import resolve_urls, urls_given
from nbdnats.schemas import Report, from_stats
from nbdnats.transfer import CopyStats, copy_ends
from nbdnats.units import MAX_TIMEOUT, human, rate

EPILOG = """\
SRC and DST: an NBD URI as libnbd takes it (nbd://host:port/export,
nbd+unix:///export?socket=PATH), a file or block device (a file target is created
or extended to the source size), or '-' for stdin/stdout as a raw image in offset
order ('pipe:PATH' likewise for a FIFO). DST may also be 'null:' (discard) or
'unix:PATH' (a listening unix socket, connected on the first byte). A file whose
header says qcow2, vmdk, vhdx, vdi, qed or vhd is read or written through a private
qemu-nbd of that format (the disk it holds, not the file's bytes) unless --raw.

environment: NBDNATS_DATA_URL, NBDNATS_CTL_URL, NATS_URL (comma-separated server
lists; a server may carry user:password@ or token@), NBDNATS_CREDS, NBDNATS_NKEY,
NATS_CREDS, NATS_NKEY, NATS_CERT, NATS_KEY, NATS_CA; an option wins over its variable
"""


# name, help, description, positional endpoints, has sender options, has receiver options
COMMANDS = [
    (
        "send",
        "send a disk image as transfer ID",
        "Send SRC as transfer ID to the receiver of that id.",
        ["SRC"],
        True,
        False,
    ),
    (
        "recv",
        "receive transfer ID into a target",
        "Receive transfer ID into DST.",
        ["DST"],
        False,
        True,
    ),
    (
        "copy",
        "copy SRC to DST through NATS in one command",
        "Copy SRC to DST through NATS (both ends in this process). "
        "Without --data-url an embedded nats-server is started.",
        ["SRC", "DST"],
        True,
        True,
    ),
]
NAMES = {name for name, *_ in COMMANDS}
VERBS = {"send": "sent", "recv": "received", "copy": "copied"}


def add_parsers(sub: Any) -> None:
    """``send``, ``recv`` and ``copy``."""
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
        _add_options(p, sender=sender, receiver=receiver)


def _add_options(p: argparse.ArgumentParser, *, sender: bool, receiver: bool) -> None:
    g = p.add_argument_group("NATS")
    g.add_argument(
        "--data-url",
        metavar="URL",
        help="data-plane servers (default: $NBDNATS_DATA_URL, $NATS_URL, else "
        "nats://127.0.0.1:4222; copy: an embedded server)",
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
        add_size_option(t, "--size", "image size; required when SRC is '-' (stdin); below 2^63")
        add_size_option(
            t,
            "--chunk-size",
            "bytes per frame (default: 1020K, or what the server's max_payload allows)",
        )
        add_rate_option(t)
    add_size_option(
        t,
        "--window",
        "bytes in flight before an ack (default: 32M, max 48M)",
        default=_core.DEFAULT_WINDOW,
    )
    add_timeout_option(
        t,
        "how long to wait for the peer to appear or answer; 0 waits forever, at most "
        f"{MAX_TIMEOUT:.0f} (7 days) (default: {_core.DEFAULT_TIMEOUT:.0f})",
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
    add_state_dir_option(
        t, "where the receiver keeps its journal and the sender its key for --resume"
    )
    t.add_argument(
        "--raw",
        action="store_true",
        help="copy a qcow2 (vmdk, vhdx, ...) file's bytes as they are, not the disk it holds",
    )
    if sender:
        t.add_argument(
            "--dirty-bitmap",
            metavar="NAME",
            help="send only what this dirty bitmap marks changed: SRC is an NBD export "
            "offering it (qemu-nbd -B NAME) or a qcow2 file holding it; the target must hold "
            "the previous image (or recv merges it with --base)",
        )
        add_compress_option(t)
        add_streams_option(t)
    if receiver:
        t.add_argument(
            "--base",
            metavar="FILE",
            help="DST is a stream ('-' or pipe:PATH): write this previous image (a file or "
            "pipe, read once) with a dirty-bitmap transfer's ranges merged in; the digest is "
            "the merged image's",
        )
        t.add_argument(
            "--target-is-zero",
            action="store_true",
            help="the target already reads as zeros: skip writing zero ranges",
        )
    o = p.add_argument_group("output")
    o.add_argument("--json", action="store_true", help="print one JSON line with the results")
    o.add_argument("--quiet", "-q", action="store_true", help="no progress bar or summary")
    add_progress_option(o)


def _report(
    stats: _core.Stats, sender: _core.Stats | None = None, fmts: tuple[str | None, ...] = ()
) -> Report:
    """The ``--json`` line; ``copy`` adds its sender's own report as ``sender``. ``fmts``:
    this end's endpoint format, then the sender's."""
    return from_stats(
        Report,
        stats,
        id=stats.transfer_id,
        seconds=round(stats.seconds, 3),
        mb_per_s=round(stats.mb_per_s, 1),
        format=fmts[0] if fmts else None,
        sender=_report(sender, None, fmts[1:]) if sender else None,
    )


def _summary(verb: str, stats: _core.Stats) -> str:
    verified = ", verified" if stats.verified else ""
    streams = f" over {stats.streams} streams" if stats.streams > 1 else ""
    moved, what = stats.done_bytes, human(stats.size)
    if stats.dirty_bytes:
        # A dirty transfer moved only what its bitmap marked; its rate is over those bytes.
        moved, what = stats.dirty_bytes, f"{human(stats.dirty_bytes)} changed of {what}"
    return (
        f"{verb} {what} ({human(stats.data_bytes)} data, "
        f"{human(stats.zero_bytes)} zeros){streams} in {stats.seconds:.2f} s, "
        f"{rate(moved, stats.seconds)}, {stats.digest}{verified}"
    )


async def run(args: argparse.Namespace) -> _core.Stats:
    import nbdnats

    # What the library only warns about (a lost ctl plane): one line, no traceback.
    logging.basicConfig(
        level=logging.WARNING, format="nbd-nats: warning: %(message)s", stream=sys.stderr
    )
    to_stdout = getattr(args, "dst", None) == "-"
    login = login_from(args)
    if args.command == "copy" and not args.transfer_id:
        # Chosen here so that a failure's --json line can name it too.
        args.transfer_id = subjects.new_id()
    # The bar: with --progress anywhere, else on a terminal unless --quiet, --json or
    # --progress=FD (which takes its place) says otherwise.
    shown: bool | None = None
    if args.progress:
        shown = True
    elif args.quiet or args.json or args.progress_fd is not None:
        shown = False
    # What the waiting line names; copy without URLs runs its own server: nothing to name.
    where = None
    if args.command != "copy" or urls_given(args.data_url, args.ctl_url):
        where = resolve_urls(args.data_url, args.ctl_url)[0]
    bar = ProgressBar(enabled=shown, where=where, timeout=args.timeout)
    lines = PercentLines(args.progress_fd) if args.progress_fd is not None else None
    common: dict[str, Any] = {
        "data_url": args.data_url,
        "ctl_url": args.ctl_url,
        "node": args.node,
        "login": login,
        "on_progress": fan_out(bar, lines),
        "window": args.window,
        "timeout": args.timeout,
        "verify": args.verify,
        "resume": args.resume,
        "state_dir": args.state_dir,
        "raw": args.raw,
    }
    # Each end's image format, as it is opened (recv's and copy's target first).
    ends = [(getattr(args, "dst", None), True), (getattr(args, "src", None), False)]
    fmts = tuple(
        formats.format_of(e, raw=args.raw, target=target) for e, target in ends if e is not None
    )
    call: Awaitable[_core.Stats | CopyStats]
    sender: _core.Stats | None = None
    try:
        if args.command == "send":
            call = nbdnats.send(
                args.src,
                transfer_id=args.transfer_id,
                size=args.size,
                chunk_size=args.chunk_size,
                dirty_bitmap=args.dirty_bitmap,
                rate=args.rate,
                compress=args.compress,
                streams=args.streams,
                **common,
            )
        elif args.command == "recv":
            call = nbdnats.recv(
                args.dst,
                transfer_id=args.transfer_id,
                target_is_zero=args.target_is_zero,
                base=args.base,
                **common,
            )
        else:
            call = copy_ends(
                args.src,
                args.dst,
                transfer_id=args.transfer_id,
                size=args.size,
                chunk_size=args.chunk_size,
                target_is_zero=args.target_is_zero,
                dirty_bitmap=args.dirty_bitmap,
                base=args.base,
                rate=args.rate,
                compress=args.compress,
                streams=args.streams,
                **common,
            )
        result = await call
    finally:
        bar.close()
    if isinstance(result, CopyStats):
        sender, stats = result
    else:
        stats = result
    # stdout may carry the image itself; then results go to stderr.
    print_result(
        _report(stats, sender, fmts),
        None if args.quiet else _summary(VERBS[args.command], stats),
        as_json=args.json,
        out=sys.stderr if to_stdout else sys.stdout,
    )
    return stats
