"""``nbd-nats approve``: make a signing key pair, or sign a provisioning approval with one.

The keys, signatures and their checks are ``nbdnats.metal.approval``'s; this is their command line.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path
from typing import Any

import msgspec

from nbdnats.cli.options import add_command
from nbdnats.errors import UsageError
from nbdnats.metal.approval import load_private, new_key, sign
from nbdnats.schemas import encode
from nbdnats.transfer import image_digest
from nbdnats.units import parse_duration

EPILOG = """\
examples:
  nbd-nats approve --new-key ops
  nbd-nats approve --key ops.key --node rack1-07 --device /dev/sda \\
      --image /srv/images/debian.raw --expires 2h -o approval.json"""


def add_parser(sub: Any) -> None:
    p = add_command(
        sub,
        "approve",
        help="create a signed provisioning approval (or a key pair)",
        description="Sign an approval that lets installer NODE write one image onto DEVICE "
        "until it expires; or, with --new-key, make an Ed25519 key pair.",
        epilog=EPILOG,
    )
    p.add_argument("--new-key", metavar="STEM", help="write STEM.key and STEM.pub, then exit")
    p.add_argument("--key", metavar="FILE", help="the private key to sign with (PEM)")
    p.add_argument("--node", help="the installer node the approval is for")
    p.add_argument("--device", help="the device the image may be written to")
    img = p.add_mutually_exclusive_group()
    img.add_argument("--image", metavar="SRC", help="compute the digest of this image")
    img.add_argument("--digest", metavar="sha256:HEX", help="the image's digest (nbd-nats digest)")
    p.add_argument(
        "--expires", default="1h", metavar="DURATION", help="validity, e.g. 30m, 2h, 1d (1h)"
    )
    p.add_argument("-o", "--output", metavar="FILE", help="write here instead of stdout")


async def run(args: argparse.Namespace) -> None:
    if args.new_key:
        key_path, pub_path = new_key(Path(args.new_key))
        sys.stderr.write(
            f"wrote {key_path} (keep it secret) and {pub_path} (copy it into installers' "
            "--trusted-keys)\n"
        )
        return
    missing = [f"--{n}" for n in ("key", "node", "device") if not getattr(args, n)]
    if not (args.image or args.digest):
        missing.append("--image or --digest")
    if missing:
        raise UsageError(f"approve needs {', '.join(missing)}")
    key = load_private(Path(args.key))
    if args.digest:
        if not args.digest.startswith("sha256:") or len(args.digest) != 71:
            raise UsageError("--digest must be sha256: and 64 hex digits (see nbd-nats digest)")
        digest = args.digest
    else:
        digest, _ = await image_digest(args.image, allow_local_file=True)
    expires = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=parse_duration(args.expires))
    approval = sign(key, node=args.node, image_digest=digest, device=args.device, expires=expires)
    # Not a --json line: a document people keep and read, so indented.
    text = msgspec.json.format(encode(approval)).decode() + "\n"
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
