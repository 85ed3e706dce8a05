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
from nbdnats.schemas import HexDigest, HexName, encode
from nbdnats.transfer import image_digest
from nbdnats.units import parse_duration

EPILOG = """\
examples:
  nbd-nats approve --new-key ops
  nbd-nats approve --key ops.key --node rack1-07 --device /dev/sda \\
      --image /srv/images/debian.raw --expires 2h -o approval.json
  nbd-nats ctl attest inst1 --golden installer.golden --json > inst1.attestation
  nbd-nats approve --key ops.key --node inst1 --device /dev/vda \
      --image /srv/images/debian.raw --attestation inst1.attestation -o approval.json"""


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
    p.add_argument(
        "--attestation",
        metavar="FILE",
        help="bind the approval to the installer's TPM: its attestation key and boot PCR "
        "digest, as 'nbd-nats ctl attest NODE --json' printed them; the installer then "
        "writes only after a quote showing exactly those",
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
    binding = _binding(Path(args.attestation), args.node) if args.attestation else {}
    approval = sign(
        key, node=args.node, image_digest=digest, device=args.device, expires=expires, **binding
    )
    # Not a --json line: a document people keep and read, so indented.
    text = msgspec.json.format(encode(approval)).decode() + "\n"
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)


class _Attested(msgspec.Struct, kw_only=True):
    """What ``ctl attest --json`` prints (other fields are ignored)."""

    node: str
    ak_name: HexName
    pcr_digest: HexDigest
    pcrs: dict[str, str]


def _binding(path: Path, node: str) -> dict[str, Any]:
    try:
        found = msgspec.json.decode(path.read_bytes(), type=_Attested)
    except OSError as e:
        raise UsageError(f"cannot read --attestation {path}: {e.strerror}") from None
    except (msgspec.ValidationError, msgspec.DecodeError) as e:
        raise UsageError(
            f"--attestation {path} is not what 'nbd-nats ctl attest NODE --json' prints: {e}"
        ) from None
    if found.node != node:
        raise UsageError(f"--attestation {path} is of node {found.node}, not --node {node}")
    try:
        pcrs = sorted(int(i) for i in found.pcrs)
    except ValueError:
        raise UsageError(f"--attestation {path}: PCR indexes must be numbers") from None
    if not pcrs or any(not 0 <= i <= 23 for i in pcrs):
        raise UsageError(f"--attestation {path}: PCR indexes must be 0 to 23")
    return {"ak_name": found.ak_name, "pcr_digest": found.pcr_digest, "pcrs": pcrs}
