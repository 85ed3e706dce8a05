"""The dev topology's TLS files: a CA, a server and a client certificate, made by
``control/gen-dev-tls.sh`` into ``STATE/tls``."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import NamedTuple

from nbdnats.errors import DevError

TLS_DIR = "tls"  # in the state directory


class TlsFiles(NamedTuple):
    cert: Path
    key: Path
    ca: Path


def tls_files(root: Path) -> TlsFiles:
    """The servers' certificate and key, and the CA that clients verify them with."""
    tls = root / TLS_DIR
    return TlsFiles(tls / "server.pem", tls / "server.key", tls / "ca.pem")


def make_tls(control: Path, root: Path) -> None:
    """Make fresh TLS files for the topology in ``root`` (with openssl, by control/'s script)."""
    script = control / "gen-dev-tls.sh"
    if not shutil.which("openssl"):
        raise DevError("openssl not found; install it (Debian: openssl) to make dev TLS files")
    done = subprocess.run(
        [str(script), str(root / TLS_DIR)], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise DevError(f"{script.name} failed: {done.stderr.strip() or done.returncode}")
