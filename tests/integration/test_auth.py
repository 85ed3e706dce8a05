"""Logging in to NATS on both planes: credentials in URLs, --creds/--nkey, and no secret
in any error. Against nats-servers with `authorization` blocks; every end is a real
`nbd-nats` process."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import nkeys
import pytest

from nbdnats.embedded import free_port, nats_server_binary
from tests.cli import one_line_error, run_cli, start_cli
from tests.images import MiB, make_image
from tests.nats_server import port_open
from tests.waits import wait_for

PASSWORD = "p@ss:w/rd%1"
ENCODED = "p%40ss%3Aw%2Frd%251"
TOKEN = "s3cr3t-t0ken"


@pytest.fixture
def auth_server(tmp_path: Path) -> Iterator[Callable[..., str]]:
    """Start a nats-server whose config has ``authorization { BLOCK }``; its host:port."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(block: str, jetstream: bool = False) -> str:
        port = free_port()
        conf = tmp_path / f"auth-{port}.conf"
        js = f"jetstream {{ store_dir: {json.dumps(str(tmp_path / 'js'))} }}\n" if jetstream else ""
        conf.write_text(
            f'listen: "127.0.0.1:{port}"\nmax_payload: {8 * MiB}\nauthorization {{ {block} }}\n'
            + js
        )
        log = (tmp_path / f"auth-{port}.log").open("wb")
        procs.append(
            subprocess.Popen([nats_server_binary(), "-c", str(conf)], stdout=log, stderr=log)
        )
        log.close()
        wait_for(lambda: port_open("127.0.0.1", port), "nats-server")
        return f"127.0.0.1:{port}"

    yield start
    for p in procs:
        p.terminate()
        p.wait(10)


@pytest.fixture
def alice(auth_server: Callable[..., str]) -> str:
    return auth_server(f"users = [ {{ user: alice, password: {json.dumps(PASSWORD)} }} ]")


@pytest.fixture
def image(tmp_path: Path) -> Path:
    src = tmp_path / "src.img"
    make_image(src, 6 * MiB, [(0, MiB), (3 * MiB, 2 * MiB)])
    return src


def test_copy_logs_in_with_url_user_and_percent_encoded_password(
    alice: str, image: Path, tmp_path: Path
) -> None:
    """user:password@ in the URL logs in both planes; the password's %XX are decoded
    (it holds @, :, / and %)."""
    dst = tmp_path / "dst.img"
    done = run_cli("copy", str(image), str(dst), "--data-url", f"nats://alice:{ENCODED}@{alice}")
    assert done.returncode == 0, done.stderr.decode()
    assert dst.read_bytes() == image.read_bytes()


def test_send_recv_log_in_with_a_token(
    auth_server: Callable[..., str], image: Path, tmp_path: Path
) -> None:
    server = auth_server(f"token: {json.dumps(TOKEN)}")
    url = f"nats://{TOKEN}@{server}"
    dst = tmp_path / "dst.img"
    common = ["--id", "tok1", "--timeout", "30", "--data-url", url]
    recv = start_cli("recv", str(dst), *common)
    send = start_cli("send", str(image), *common)
    _, err_s = send.communicate(timeout=60)
    _, err_r = recv.communicate(timeout=60)
    assert (send.returncode, recv.returncode) == (0, 0), (err_s, err_r)
    assert dst.read_bytes() == image.read_bytes()


def test_credentials_of_one_server_log_in_to_every_server_of_the_list(
    alice: str, image: Path, tmp_path: Path
) -> None:
    """The credentials sit on a server that is down; the live one, given bare, is logged
    in to with them (both planes)."""
    dead = f"127.0.0.1:{free_port()}"
    url = f"nats://alice:{ENCODED}@{dead},nats://{alice}"
    dst = tmp_path / "dst.img"
    done = run_cli("copy", str(image), str(dst), "--data-url", url)
    assert done.returncode == 0, done.stderr.decode()
    assert dst.read_bytes() == image.read_bytes()


def copy_with_a_bad_url(
    image: Path, dst: Path, plane: str, bad: str, alice: str
) -> subprocess.CompletedProcess[bytes]:
    """``copy`` with ``bad`` as the URL of ``plane`` and alice's good login on the other."""
    good = f"nats://alice:{ENCODED}@{alice}"
    urls = {"data": bad, "ctl": good} if plane == "data" else {"data": good, "ctl": bad}
    return run_cli(
        "copy", str(image), str(dst), "--data-url", urls["data"], "--ctl-url", urls["ctl"]
    )


@pytest.mark.parametrize("plane", ["data", "ctl"])
def test_wrong_password_is_one_line_without_the_password(
    alice: str, image: Path, tmp_path: Path, plane: str
) -> None:
    bad = f"nats://alice:WRONG-s3cret-pw@{alice}"
    done = copy_with_a_bad_url(image, tmp_path / "dst.img", plane, bad, alice)
    err = one_line_error(done)
    assert "WRONG-s3cret-pw" not in err and ENCODED not in err
    # nats-py (the ctl plane) may see the reset after the server's -ERR instead of the
    # -ERR itself (see test_agent_and_ctl_take_nkey).
    said = ["authorization violation"] + (["connection reset by peer"] if plane == "ctl" else [])
    assert any(s in err.lower() for s in said), err
    assert "nats://alice:***@" in err


def test_no_credentials_are_refused(alice: str, image: Path, tmp_path: Path) -> None:
    done = run_cli("copy", str(image), str(tmp_path / "d.img"), "--data-url", f"nats://{alice}")
    assert "authorization violation" in one_line_error(done).lower()


@pytest.mark.parametrize("plane", ["data", "ctl"])
def test_bad_url_error_has_no_password(alice: str, image: Path, tmp_path: Path, plane: str) -> None:
    bad = "nats://alice:s3cret-pw@127.0.0.1:notaport"
    done = copy_with_a_bad_url(image, tmp_path / "d.img", plane, bad, alice)
    err = one_line_error(done)
    assert "s3cret-pw" not in err and ENCODED not in err
    assert "alice:***@127.0.0.1" in err


def _nkey(tmp_path: Path) -> tuple[Path, str]:
    """A user NKey: its seed in a file (as `nk -gen user` writes it) and its public key."""
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    path = tmp_path / "user.nk"
    path.write_bytes(seed + b"\n")
    path.chmod(0o600)
    return path, nkeys.from_seed(bytearray(seed)).public_key.decode()


def test_nkey_logs_in_on_both_planes(
    auth_server: Callable[..., str], image: Path, tmp_path: Path
) -> None:
    """--nkey FILE, and $NBDNATS_NKEY, against a server that knows only that NKey: copy,
    send/recv, an agent and the controller (ctl) all log in with it."""
    seed, public = _nkey(tmp_path)
    server = auth_server(f"users = [ {{ nkey: {public} }} ]")
    url = f"nats://{server}"
    dst = tmp_path / "dst.img"
    done = run_cli("copy", str(image), str(dst), "--data-url", url, "--nkey", str(seed))
    assert done.returncode == 0, done.stderr.decode()
    assert dst.read_bytes() == image.read_bytes()

    dst2 = tmp_path / "dst2.img"
    env = {"NBDNATS_NKEY": str(seed)}
    common = ["--id", "nk1", "--timeout", "30", "--data-url", url]
    recv = start_cli("recv", str(dst2), *common, env=env)
    send = start_cli("send", str(image), *common, env=env)
    _, err_s = send.communicate(timeout=60)
    _, err_r = recv.communicate(timeout=60)
    assert (send.returncode, recv.returncode) == (0, 0), (err_s, err_r)
    assert dst2.read_bytes() == image.read_bytes()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _jwt(issuer: nkeys.KeyPair, subject: str, name: str, nats: dict[str, object]) -> str:
    """A NATS JWT (v2) of ``subject``, signed by ``issuer``, as `nsc` issues them."""
    header = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    claims = {
        "jti": _b64(os.urandom(24)).upper(),
        "iat": int(time.time()),
        "iss": issuer.public_key.decode(),
        "name": name,
        "sub": subject,
        "nats": {**nats, "version": 2},
    }
    body = _b64(json.dumps(claims).encode())
    return f"{header}.{body}.{_b64(issuer.sign(f'{header}.{body}'.encode()))}"


def _keys(prefix: int) -> tuple[bytes, nkeys.KeyPair, str]:
    seed = nkeys.encode_seed(os.urandom(32), prefix)
    pair = nkeys.from_seed(bytearray(seed))
    return seed, pair, pair.public_key.decode()


def test_creds_log_in_on_both_planes(tmp_path: Path, image: Path) -> None:
    """--creds FILE (a user JWT and its seed, as `nsc` writes them) against a server in
    operator mode, which knows no user but trusts the account that signed this one."""
    _, operator, operator_pub = _keys(nkeys.PREFIX_BYTE_OPERATOR)
    _, account, account_pub = _keys(nkeys.PREFIX_BYTE_ACCOUNT)
    user_seed, _, user_pub = _keys(nkeys.PREFIX_BYTE_USER)
    unlimited = {"subs": -1, "data": -1, "payload": -1}
    limits = {**unlimited, "imports": -1, "exports": -1, "wildcards": True, "conn": -1}
    port = free_port()
    conf = tmp_path / "operator.conf"
    conf.write_text(
        f'listen: "127.0.0.1:{port}"\nmax_payload: {8 * MiB}\n'
        f"operator: {_jwt(operator, operator_pub, 'op', {'type': 'operator'})}\n"
        "resolver: MEMORY\n"
        f"resolver_preload: {{ {account_pub}: "
        f"{_jwt(operator, account_pub, 'acc', {'type': 'account', 'limits': limits})} }}\n"
    )
    user = _jwt(account, user_pub, "u", {"type": "user", "pub": {}, "sub": {}, **unlimited})
    creds = tmp_path / "user.creds"
    creds.write_text(
        f"-----BEGIN NATS USER JWT-----\n{user}\n------END NATS USER JWT------\n\n"
        f"-----BEGIN USER NKEY SEED-----\n{user_seed.decode()}\n------END USER NKEY SEED------\n"
    )
    log = (tmp_path / "operator.log").open("wb")
    server = subprocess.Popen([nats_server_binary(), "-c", str(conf)], stdout=log, stderr=log)
    log.close()
    try:
        wait_for(lambda: port_open("127.0.0.1", port), "nats-server")
        url = f"nats://127.0.0.1:{port}"
        dst = tmp_path / "dst.img"
        done = run_cli("copy", str(image), str(dst), "--data-url", url, "--creds", str(creds))
        assert done.returncode == 0, done.stderr.decode()
        assert dst.read_bytes() == image.read_bytes()
        env = {"NBDNATS_CREDS": str(creds)}
        done = run_cli("copy", str(image), str(dst), "--data-url", url, env=env)
        assert done.returncode == 0, done.stderr.decode()
        refused = run_cli("copy", str(image), str(dst), "--data-url", url)
        assert "authorization violation" in one_line_error(refused).lower()
        not_creds = tmp_path / "not.creds"
        not_creds.write_text("hello\n")
        bad = run_cli("copy", str(image), str(dst), "--data-url", url, "--creds", str(not_creds))
        assert f"--creds {not_creds}" in one_line_error(bad)
    finally:
        server.terminate()
        server.wait(10)


def test_agent_and_ctl_take_nkey(
    auth_server: Callable[..., str],
    start_agent: Callable[..., object],
    image: Path,
    tmp_path: Path,
) -> None:
    seed, public = _nkey(tmp_path)
    url = f"nats://{auth_server(f'users = [ {{ nkey: {public} }} ]', jetstream=True)}"
    start_agent("nk-a", url, "--nkey", str(seed), "--allow", str(tmp_path))
    start_agent("nk-b", url, "--allow", str(tmp_path), env={"NBDNATS_NKEY": str(seed)})
    nodes = run_cli("ctl", "--ctl-url", url, "--nkey", str(seed), "--json", "nodes")
    assert nodes.returncode == 0, nodes.stderr.decode()
    assert sorted(n["node"] for n in json.loads(nodes.stdout)) == ["nk-a", "nk-b"]
    dst = tmp_path / "copied.img"
    copy = run_cli(
        "ctl", "--ctl-url", url, "--nkey", str(seed), "copy", f"nk-a:{image}", f"nk-b:{dst}"
    )
    assert copy.returncode == 0, copy.stderr.decode()
    assert dst.read_bytes() == image.read_bytes()
    # Refused without the key. nats-server sends "-ERR 'Authorization Violation'" and
    # closes; when the client's next write meets the closed socket, the reset can discard
    # that line before it is read, so either is what a refusal looks like.
    refused = run_cli("ctl", "--ctl-url", url, "nodes")
    assert refused.returncode == 1
    line = one_line_error(refused).lower()
    assert "authorization violation" in line or "connection reset by peer" in line, line


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--creds", "/nonexistent/x.creds"], "cannot read --creds /nonexistent/x.creds"),
        (["--nkey", "/nonexistent/x.nk"], "cannot read --nkey /nonexistent/x.nk"),
        (["--creds", "{seed}", "--nkey", "{seed}"], "give --creds or --nkey, not both"),
        (["--nkey", "{seed}", "--data-url", "nats://a:s3cret-pw@{server}"], "carries credentials"),
        (["--nkey", "{notkey}"], "no user NKey seed"),
    ],
)
def test_login_mistakes_are_one_line(
    alice: str, image: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    seed, _ = _nkey(tmp_path)
    notkey = tmp_path / "notkey.txt"
    notkey.write_text("# not a seed\nUABC\n")
    args = [a.format(seed=seed, server=alice, notkey=notkey) for a in args]
    if "--data-url" not in args:
        args += ["--data-url", f"nats://{alice}"]
    err = one_line_error(run_cli("copy", str(image), str(tmp_path / "d.img"), *args))
    assert message in err
    assert "s3cret-pw" not in err
