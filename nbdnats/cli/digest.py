"""``nbd-nats digest``: the digest of an image's contents: its sha256, as approvals name it,
or its content digest, as a transfer of it reports."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from nbdnats import _core
from nbdnats.cli.options import add_command, add_size_option
from nbdnats.transfer import image_digest


def add_parser(sub: Any) -> None:
    p = add_command(
        sub,
        "digest",
        help="print the digest of an image's contents (sha256, as approvals name it)",
        description="The digest of the raw disk SRC holds (an NBD URI, file or device); holes "
        "are hashed without being read. sha256 (the default) is what sha256sum prints for the "
        f"raw image; {_core.CONTENT_ALGORITHM} is what a transfer of the image reports as its "
        "digest (docs/protocol.md defines it).",
    )
    p.add_argument("src", metavar="SRC")
    add_size_option(p, "--length", "hash only the first BYTES")
    p.add_argument(
        "--algo",
        choices=_core.DIGEST_ALGORITHMS,
        default="sha256",
        help="the digest to print (default: %(default)s)",
    )


async def run(args: argparse.Namespace) -> None:
    digest, _ = await image_digest(
        args.src, length=args.length, allow_local_file=True, algo=args.algo
    )
    sys.stdout.write(f"{digest}  {args.src}\n")
