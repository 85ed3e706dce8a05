"""Mutual TLS on both planes: --tlscert/--tlskey/--tlsca (and $NATS_CERT/$NATS_KEY/$NATS_CA)
against a real nats-server whose ``tls`` block verifies clients. The certificates are the
dev topology's (nbdnats.dev.tls: a CA, a server and a client certificate)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from nbdnats.dev.config import control_dir
from nbdnats.dev.tls import TLS_DIR, make_tls, tls_files
from nbdnats.embedded import free_port, nats_server_binary
from tests.cli import one_line_error, run_cli
from tests.images import MiB, make_image
from tests.nats_server import port_open
from tests.waits import wait_for


class Mtls:
    """A nats-server that requires a client certificate signed by the dev CA."""

    def __init__(self, root: Path, url: str) -> None:
        self.url = url
        tls = root / TLS_DIR
        self.ca, self.cert, self.key = tls / "ca.pem", tls / "client.pem", tls / "client.key"

    def options(self, *, cert: bool = True) -> list[str]:
        """The TLS options of a client: the CA, and the client certificate unless not."""
        with_cert = ["--tlscert", str(self.cert), "--tlskey", str(self.key)] if cert else []
        return ["--tlsca", str(self.ca), *with_cert]


@pytest.fixture
def mtls(tmp_path: Path) -> Iterator[Mtls]:
    root = tmp_path / "pki"
    make_tls(control_dir(), root)
    files = tls_files(root)
    port = free_port()
    conf = tmp_path / "mtls.conf"
    conf.write_text(
        f'listen: "127.0.0.1:{port}"\nmax_payload: {8 * MiB}\n'
        f"jetstream {{ store_dir: {json.dumps(str(tmp_path / 'js'))} }}\n"
        "tls {\n"
        f"  cert_file: {json.dumps(str(files.cert))}\n"
        f"  key_file: {json.dumps(str(files.key))}\n"
        f"  ca_file: {json.dumps(str(files.ca))}\n"
        "  verify: true\n"
        "}\n"
    )
    log = (tmp_path / "mtls.log").open("wb")
    proc = subprocess.Popen([nats_server_binary(), "-c", str(conf)], stdout=log, stderr=log)
    log.close()
    try:
        wait_for(lambda: port_open("127.0.0.1", port), "nats-server")
        yield Mtls(root, f"nats://127.0.0.1:{port}")
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    src = tmp_path / "src.img"
    make_image(src, 4 * MiB, [(0, MiB), (2 * MiB, MiB)])
    return src


def test_copy_presents_the_client_certificate_on_both_planes(
    mtls: Mtls, image: Path, tmp_path: Path
) -> None:
    """With the options, then with $NATS_CERT/$NATS_KEY/$NATS_CA; refused without the
    client certificate, in one line that says so."""
    dst = tmp_path / "dst.img"
    done = run_cli("copy", str(image), str(dst), "--data-url", mtls.url, *mtls.options())
    assert done.returncode == 0, done.stderr.decode()
    assert dst.read_bytes() == image.read_bytes()

    dst.unlink()
    env = {"NATS_CERT": str(mtls.cert), "NATS_KEY": str(mtls.key), "NATS_CA": str(mtls.ca)}
    done = run_cli("copy", str(image), str(dst), "--data-url", mtls.url, env=env)
    assert done.returncode == 0, done.stderr.decode()
    assert dst.read_bytes() == image.read_bytes()

    refused = run_cli(
        "copy", str(image), str(tmp_path / "x.img"), "--data-url", mtls.url,
        *mtls.options(cert=False),
    )  # fmt: skip
    err = one_line_error(refused)
    assert f"cannot connect to NATS at {mtls.url}" in err, err
    # TLS 1.3 may lose the server's alert to the reset after it: the hint names the
    # certificate either way.
    assert "give --tlscert and --tlskey" in err, err
    unknown = run_cli("copy", str(image), str(tmp_path / "x.img"), "--data-url", mtls.url)
    assert "give its CA with --tlsca" in one_line_error(unknown)


def test_agent_and_ctl_present_the_client_certificate(
    mtls: Mtls, start_agent: Callable[..., object], image: Path, tmp_path: Path
) -> None:
    """An agent and the controller over mutual TLS: a query (nodes) and a copy between two
    agents; the controller without a client certificate is refused in one line."""
    start_agent("tls-a", mtls.url, *mtls.options(), "--allow", str(tmp_path))
    env = {"NATS_CERT": str(mtls.cert), "NATS_KEY": str(mtls.key), "NATS_CA": str(mtls.ca)}
    start_agent("tls-b", mtls.url, "--allow", str(tmp_path), env=env)
    # The global options after the action, as the nats CLI takes them.
    nodes = run_cli("ctl", "nodes", "--json", "--ctl-url", mtls.url, *mtls.options())
    assert nodes.returncode == 0, nodes.stderr.decode()
    assert sorted(n["node"] for n in json.loads(nodes.stdout)) == ["tls-a", "tls-b"]
    dst = tmp_path / "copied.img"
    copy = run_cli("ctl", "copy", f"tls-a:{image}", f"tls-b:{dst}", "--ctl-url", mtls.url, env=env)
    assert copy.returncode == 0, copy.stderr.decode()
    assert dst.read_bytes() == image.read_bytes()

    refused = run_cli("ctl", "--ctl-url", mtls.url, "nodes", *mtls.options(cert=False))
    assert refused.returncode == 1
    err = one_line_error(refused)
    assert f"cannot connect to the ctl NATS server at {mtls.url}" in err, err
    # TLS 1.3 may lose the server's alert to the reset after it: the hint names the
    # certificate either way.
    assert "give --tlscert and --tlskey" in err, err
    unknown = run_cli("ctl", "nodes", "--ctl-url", mtls.url)
    assert "give its CA with --tlsca" in one_line_error(unknown)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tlscert", "/nonexistent/c.pem", "--tlskey", "{key}"], "cannot read --tlscert"),
        (["--tlscert", "{cert}", "--tlskey", "/nonexistent/k"], "cannot read --tlskey"),
        (["--tlsca", "/nonexistent/ca.pem"], "cannot read --tlsca /nonexistent/ca.pem"),
        (["--tlscert", "{cert}"], "give --tlscert and --tlskey together"),
        (["--tlscert", "{key}", "--tlskey", "{key}"], "cannot use --tlscert"),
        (["--tlsca", "{key}"], "cannot use --tlsca"),
    ],
)
def test_tls_file_mistakes_are_one_line_before_connecting(
    mtls: Mtls, image: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    args = [a.format(cert=mtls.cert, key=mtls.key) for a in args]
    for command in (
        ["copy", str(image), str(tmp_path / "d.img"), "--data-url", mtls.url],
        ["ctl", "nodes", "--ctl-url", mtls.url],
    ):
        err = one_line_error(run_cli(*command, *args))
        assert message in err, err
        assert "cannot connect" not in err, err
    assert not (tmp_path / "d.img").exists()


def test_an_unreadable_file_named_by_the_environment_is_named_so(
    image: Path, tmp_path: Path
) -> None:
    done = run_cli(
        "copy", str(image), str(tmp_path / "d.img"), env={"NATS_CA": "/nonexistent/ca.pem"}
    )
    assert "cannot read $NATS_CA /nonexistent/ca.pem" in one_line_error(done)
