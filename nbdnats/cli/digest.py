"""``nbd-nats digest``: the digest of an image's contents: its sha256, as approvals name it,
or its content digest, as a transfer of it reports."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from nbdnats import _core
from nbdnats.cli.options import add_command, add_size_option
from nbdnats.cli.output import print_json
from nbdnats.transfer import image_digest


def add_parser(sub: Any) -> None:
    p = add_command(
        sub,
        "digest",
        help="print the digest of an image's contents (sha256, as approvals name it)",
        description="The digest of the raw disk SRC holds (an NBD URI, file or device); holes "
        "are hashed without being read. sha256 (the default) is what sha256sum prints for the "
        f"raw image; {_core.CONTENT_ALGORITHM} is what a transfer of the image reports as its "
        "digest (docs/protocol.md defines it). A qcow2 (vmdk, vhdx, ...) file is read through "
        "a private qemu-nbd unless --raw.",
    )
    p.add_argument("src", metavar="SRC")
    add_size_option(p, "--length", "hash only the first BYTES")
    p.add_argument(
        "--algo",
        choices=_core.DIGEST_ALGORITHMS,
        default="sha256",
        help="the digest to print (default: %(default)s)",
    )
    p.add_argument(
        "--raw",
        action="store_true",
        help="hash a qcow2 (vmdk, ...) file's bytes as they are, not the disk it holds",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print one JSON line: digest, bytes (how many were hashed), src",
    )


async def run(args: argparse.Namespace) -> None:
    digest, hashed = await image_digest(
        args.src,
        length=args.length,
        allow_local_file=True,
        raw=args.raw,
        algo=args.algo,
    )
    if args.json:
        print_json({"digest": digest, "bytes": hashed, "src": args.src})
    else:
        sys.stdout.write(f"{digest}  {args.src}\n")
