"""control/: every nats-server config passes `nats-server -t`, in the environment that
`nbd-nats dev up` gives it; the committed accounts are the renderer's; dev TLS material."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from nbdnats import dev
from nbdnats.embedded import nats_server_binary
from tests import compose_file

CONTROL = Path(__file__).resolve().parents[2] / "control"
CONFIGS = sorted(p.name for p in CONTROL.glob("*.conf"))
# Which server's environment each file is checked in (the accounts files need passwords).
ROLE = {
    "ctl-cluster.conf": "ctl-1",
    "data-cluster.conf": "data-2",
    "rack-leaf.conf": "rack-1",
    "accounts-ctl.conf": "ctl-1",
    "accounts-data.conf": "data-1",
}


@pytest.fixture(scope="module")
def tls_state(tmp_path_factory: pytest.TempPathFactory) -> dev.State:
    root = tmp_path_factory.mktemp("control")
    subprocess.run([str(CONTROL / "gen-dev-tls.sh"), str(root / "tls")], check=True)
    return dev.plan(root, "127.0.0.1", 2, None)


def nats_t(path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("NBDNATS_")}
    return subprocess.run(
        [nats_server_binary(), "-t", "-c", str(path)],
        capture_output=True,
        text=True,
        env={**clean, **env},
        timeout=30,
    )


def test_every_config_has_a_role() -> None:
    assert sorted(ROLE) == CONFIGS, "add the new control/*.conf to ROLE"
    assert set(dev.CONFIGS) <= set(CONFIGS)


@pytest.mark.parametrize("name", CONFIGS)
def test_config_passes_nats_server_t(name: str, tls_state: dev.State) -> None:
    server = next(s for s in tls_state.servers if s.name == ROLE[name])
    done = nats_t(CONTROL / name, dev.server_env(tls_state, server))
    assert done.returncode == 0, done.stderr
    assert "is valid" in done.stderr


def test_config_without_its_environment_fails() -> None:
    """The variables are required: a missing one is an error, not a silent default."""
    done = nats_t(CONTROL / "data-cluster.conf", {})
    assert done.returncode != 0
    assert "NBDNATS_" in done.stderr


@pytest.mark.parametrize("plane", ["ctl", "data"])
def test_committed_accounts_are_rendered(plane: str) -> None:
    """control/accounts-*.conf is render_accounts() for the compose topology (2 racks);
    `make control` regenerates them."""
    committed = (CONTROL / f"accounts-{plane}.conf").read_text()
    assert committed == dev.render_accounts(plane, dev.COMPOSE_RACKS), "run `make control`"


def test_rendered_accounts_for_more_racks_pass(tls_state: dev.State, tmp_path: Path) -> None:
    """What `dev up --racks 5` runs: the configs beside accounts rendered for 5 racks."""
    state = dev.plan(Path(tls_state.state_dir), "::1", 5, None)
    for name in dev.CONFIGS:
        (tmp_path / name).write_text((CONTROL / name).read_text())
    for plane in ("ctl", "data"):
        (tmp_path / f"accounts-{plane}.conf").write_text(dev.render_accounts(plane, 5))
    for server in (state.servers[0], state.servers[3], state.servers[-1]):
        done = nats_t(tmp_path / dev.config_of(server), dev.server_env(state, server))
        assert done.returncode == 0, (server.name, done.stderr)


def test_dev_tls_keys_are_private_and_certificates_verify(tmp_path: Path) -> None:
    script = CONTROL / "gen-dev-tls.sh"
    subprocess.run([str(script), str(tmp_path), "extra-host"], check=True)
    for key in ("ca.key", "server.key", "client.key"):
        assert stat.S_IMODE((tmp_path / key).stat().st_mode) == 0o600
    verify = ["openssl", "verify", "-CAfile", "ca.pem", "server.pem", "client.pem"]
    assert subprocess.run(verify, cwd=tmp_path, capture_output=True).returncode == 0
    text = subprocess.run(
        ["openssl", "x509", "-in", "server.pem", "-noout", "-text"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for name in ("DNS:localhost", "IP Address:127.0.0.1", "DNS:nats-data-3", "DNS:extra-host"):
        assert name in text
    assert "TLS Web Server Authentication, TLS Web Client Authentication" in text
    before = (tmp_path / "ca.pem").read_bytes()
    subprocess.run([str(script), str(tmp_path)], check=True)  # idempotent: kept
    assert (tmp_path / "ca.pem").read_bytes() == before


def test_compose_nats_services_pass_nats_server_t(tls_state: dev.State, tmp_path: Path) -> None:
    """Each nats service of compose.yaml, in its own environment (container paths mapped
    to local ones), runs its control/ config: nothing is missing from the environment."""
    services = compose_file.load()["services"]
    tls = Path(tls_state.state_dir) / "tls"
    checked = 0
    for name, service in services.items():
        if not str(service.get("image", "")).startswith("nats:"):
            continue
        env = {
            k: str(v).replace("/tls/", f"{tls}/").replace("/data/", f"{tmp_path}/{name}/")
            for k, v in service["environment"].items()
        }
        conf = compose_file.container_path(service, service["command"][1])
        assert conf is not None
        done = nats_t(conf, env)
        assert done.returncode == 0, (name, done.stderr)
        checked += 1
    assert checked == 2 * dev.CLUSTER_SIZE + dev.COMPOSE_RACKS
