"""compose/compose.yaml: valid against the Compose Specification's JSON schema (as
shipped in the check-jsonschema package), structurally sound, every file it references
present, and the same topology as `nbd-nats dev up`.

No Docker engine is needed: nothing here runs a container.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from nbdnats import dev, subjects
from nbdnats.cli.agent import agent_config
from nbdnats.cli.main import build_parser
from nbdnats.ctl.metrics import HELP
from nbdnats.dev import lifecycle
from nbdnats.embedded import nats_server_binary
from tests.compose_file import COMPOSE, COMPOSE_DIR, ROOT, bind_mounts, container_path, load

TOP_LEVEL = {"name", "services", "networks", "volumes", "configs", "secrets", "include"}
PORT = re.compile(r"^(?:(?P<ip>[0-9.]+):)?(?:\d+(?:-\d+)?:)?\d+(?:-\d+)?(?:/(?:tcp|udp))?$")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load()


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def test_valid_against_the_compose_spec_schema() -> None:
    tool = Path(sys.executable).parent / "check-jsonschema"
    done = subprocess.run(
        [str(tool), "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_only_compose_spec_top_level_keys_and_some_services(compose: dict[str, Any]) -> None:
    keys = {k for k in compose if not k.startswith("x-")}
    assert keys <= TOP_LEVEL, keys - TOP_LEVEL
    assert compose["services"]


def test_every_service_has_image_or_build(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        assert "image" in service or "build" in service, name


def test_networks_and_volumes_are_declared(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    networks = set(compose.get("networks") or {}) | {"default"}
    volumes = set(compose.get("volumes") or {})
    used = set()
    for name, service in services.items():
        for net in service.get("networks", []):
            assert net in networks, f"{name}: network {net} is not declared"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith((".", "/")):
                assert source in volumes, f"{name}: volume {source} is not declared"
                used.add(source)
    assert used == volumes, f"declared but unused: {volumes - used}"


def test_depends_on_names_exist(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        for dep in service.get("depends_on", []):
            assert dep in services, f"{name} depends on unknown {dep}"
            assert dep != name


def test_ports_are_published_on_loopback_only(services: dict[str, dict[str, Any]]) -> None:
    seen: set[str] = set()
    for name, service in services.items():
        for port in service.get("ports", []):
            m = PORT.match(str(port))
            assert m, f"{name}: bad port {port!r}"
            assert m.group("ip") == "127.0.0.1", f"{name}: {port} is not on loopback"
            host = str(port).rsplit(":", 1)[0]
            assert host not in seen, f"{name}: {host} published twice"
            seen.add(host)


def test_referenced_files_exist(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        for host, _ in bind_mounts(service):
            assert host.exists(), f"{name}: bind mount {host} does not exist"
            assert ROOT in host.parents, f"{name}: {host} is outside the repository"
        build = service.get("build")
        if build:
            context = (COMPOSE_DIR / build["context"]).resolve()
            assert (context / build["dockerfile"]).is_file(), name
        command = service.get("command", [])
        if str(service.get("image")).startswith("nats:"):  # -c FILE: control/, via a mount
            conf = container_path(service, command[command.index("-c") + 1])
            assert conf is not None and conf.is_file(), f"{name}: {command}"
        for arg in " ".join(map(str, command)).split():
            if arg.startswith("/src/"):  # scripts copied into the image from the repository
                assert (ROOT / arg.removeprefix("/src/")).is_file(), f"{name}: {arg}"
            local = container_path(service, arg)  # files of bind mounts
            assert local is None or local.exists(), f"{name}: {arg}"
        for value in (service.get("environment") or {}).values():
            path = str(value)
            if path.startswith("/") and path.endswith((".json", ".yml", ".yaml")):
                local = container_path(service, path)
                assert local is not None and local.is_file(), f"{name}: {path}"


def test_dockerfile_copies_what_exists() -> None:
    text = (COMPOSE_DIR / "Dockerfile").read_text()
    copies = re.findall(r"^COPY (?!--from)(.+)$", text, re.MULTILINE)
    assert copies
    for line in copies:
        *sources, _ = line.split()
        for source in sources:
            assert (ROOT / source).exists(), source
    ignore = (COMPOSE_DIR / "Dockerfile.dockerignore").read_text().split()
    for source in (s for line in copies for s in line.split()[:-1]):
        assert f"!{source}" in ignore, f"{source} is copied but excluded from the context"


def test_same_topology_as_dev_up(services: dict[str, dict[str, Any]]) -> None:
    """The nats services are the servers `dev up` starts for the compose racks, each on
    the same config; one agent per node."""
    state = dev.plan(Path("/nonexistent"), "127.0.0.1", dev.COMPOSE_RACKS, None)
    nats = {n: s for n, s in services.items() if str(s.get("image", "")).startswith("nats:")}
    assert sorted(nats) == sorted(f"nats-{s.name}" for s in state.servers)
    for server in state.servers:
        service = nats[f"nats-{server.name}"]
        assert service["command"] == ["-c", f"/etc/nats/{dev.config_of(server)}"]
        assert service["environment"]["NBDNATS_SERVER_NAME"] == server.name
        names = set(service["environment"])
        assert names >= set(dev.server_env(state, server)), server.name
    agents = [s for n, s in services.items() if n.startswith("agent-")]
    assert [a["command"][a["command"].index("--node") + 1] for a in agents] == [
        n.name for n in state.nodes
    ]
    parser = build_parser()
    for agent in agents:
        # The command parses as the CLI has it, and the agent may open only its volume.
        args = parser.parse_args(agent["command"][1:])
        assert args.command == "agent" and args.allow == ["/var/lib/nbdnats"]
        assert any(v.endswith(":/var/lib/nbdnats") for v in agent["volumes"])


def test_prometheus_scrapes_the_agents(services: dict[str, dict[str, Any]]) -> None:
    config = yaml.safe_load((COMPOSE_DIR / "prometheus" / "prometheus.yml").read_text())
    targets = [
        t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]
    ]
    agents = sorted(n for n in services if n.startswith("agent-"))
    assert sorted(t.split(":")[0] for t in targets) == agents
    for agent in agents:
        command = services[agent]["command"]
        port = command[command.index("--metrics-addr") + 1].rsplit(":", 1)[1]
        assert f"{agent}:{port}" in targets


def test_grafana_provisioning_and_dashboard(services: dict[str, dict[str, Any]]) -> None:
    prov = COMPOSE_DIR / "grafana" / "provisioning"
    sources = yaml.safe_load((prov / "datasources" / "prometheus.yaml").read_text())
    (source,) = sources["datasources"]
    assert source["type"] == "prometheus"
    assert source["url"].split("//")[1].split(":")[0] in services
    providers = yaml.safe_load((prov / "dashboards" / "nbdnats.yaml").read_text())
    path = providers["providers"][0]["options"]["path"]
    dashboards = container_path(services["grafana"], path)
    assert dashboards is not None
    files = sorted(dashboards.glob("*.json"))
    assert files
    for file in files:
        board = json.loads(file.read_text())
        assert board["uid"] and board["title"] and board["panels"]
        for panel in board["panels"]:
            assert panel["datasource"]["uid"] == source["uid"]
            for target in panel["targets"]:
                assert "nbdnats_" in target["expr"]
    throughput = json.loads((dashboards / "transfer-throughput.json").read_text())
    assert any(
        "rate(nbdnats_transfer_bytes_total" in t["expr"] for t in throughput["panels"][0]["targets"]
    )


def test_nats_image_matches_the_tested_server() -> None:
    """compose runs the nats-server minor version the control/ tests run."""
    version = subprocess.run(
        [nats_server_binary(), "--version"], capture_output=True, text=True, check=True
    ).stdout
    major_minor = ".".join(version.split("v")[-1].split(".")[:2])
    images = {
        s["image"] for s in load()["services"].values() if s.get("image", "").startswith("nats:")
    }
    assert images == {f"nats:{major_minor}-alpine"}


def test_the_events_stream_keeps_every_ctl_event_across_the_cluster() -> None:
    """control/streams/: JetStream API stream configs; CTL_EVENTS keeps every ctl event."""
    streams = sorted((ROOT / "control" / "streams").glob("*.json"))
    configs = {json.loads(p.read_text())["name"]: json.loads(p.read_text()) for p in streams}
    events = configs["CTL_EVENTS"]
    assert events["subjects"] == [f"{subjects.CTL_EVT}.>"]
    assert events["num_replicas"] == dev.CLUSTER_SIZE


def test_dashboard_queries_only_metrics_the_agent_serves() -> None:
    board = (COMPOSE_DIR / "grafana" / "dashboards" / "transfer-throughput.json").read_text()
    used = set(re.findall(r"nbdnats_[a-z_]+", board))
    assert used and used <= set(HELP), used - set(HELP)


def test_agents_export_a_sample_disk_as_dev_up_does(
    services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`ctl copy nodeN:disk …` works right after `up`: each agent exports a file in its
    volume that a one-shot service made, under the export names `dev up` gives its agents."""
    state = dev.plan(tmp_path, "127.0.0.1", dev.COMPOSE_RACKS, None)
    started: list[list[str]] = []
    monkeypatch.setattr(lifecycle, "spawn", lambda argv, log, env: started.append(argv) or 1)
    dev_names = set()
    for node in state.nodes:
        lifecycle._start_agent(state, node, tmp_path)
        dev_names |= set(agent_config(build_parser().parse_args(started[-1][3:])).exports)
    assert dev_names == {"disk"}
    for name, agent in sorted(services.items()):
        if not name.startswith("agent-"):
            continue
        config = agent_config(build_parser().parse_args(agent["command"][1:]))
        assert set(config.exports) == dev_names, name
        path = config.exports["disk"]
        assert path.startswith("/var/lib/nbdnats/"), path
        maker = agent["depends_on"][name.replace("agent-", "disk-")]
        assert maker["condition"] == "service_completed_successfully"
        disk = services[name.replace("agent-", "disk-")]
        assert disk["volumes"] == [v for v in agent["volumes"] if v.endswith(":/var/lib/nbdnats")]
        assert Path(path).name in " ".join(disk["command"])
