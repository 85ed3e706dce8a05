"""The Tiltfile: it parses, and run under each profile with stand-ins for Tilt's builtins
(Starlark is close enough to Python for this Tiltfile), everything it references exists:
the compose file, the compose services it names, the scripts it runs, the resources it
depends on. The vm scripts are checked for syntax and dry-run with a stand-in QEMU; no
image is fetched and no VM is booted here."""

from __future__ import annotations

import ast
import os
import shutil
import stat
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.compose_file import ROOT, load

TILTFILE = ROOT / "Tiltfile"


class TiltFail(Exception):
    pass


@dataclass
class Tilt:
    """What a run of the Tiltfile asked Tilt to do."""

    args: dict[str, str]
    env: dict[str, str] = field(default_factory=dict)
    compose: list[str] = field(default_factory=list)
    dc: dict[str, dict[str, Any]] = field(default_factory=dict)
    local: dict[str, dict[str, Any]] = field(default_factory=dict)

    def run(self) -> Tilt:
        tilt = self
        defined: list[str] = []

        class Config:
            def define_string(self, name: str, args: bool = False, usage: str = "") -> None:
                assert usage, f"--{name} has no usage text"
                defined.append(name)

            def parse(self) -> dict[str, str]:
                unknown = set(tilt.args) - set(defined)
                assert not unknown, f"not defined: {unknown}"
                return dict(tilt.args)

        class Os:
            def getenv(self, key: str, default: str = "") -> str:
                return tilt.env.get(key, default)

        def fail(message: str) -> None:
            raise TiltFail(message)

        def docker_compose(path: str) -> None:
            self.compose.append(path)

        def dc_resource(name: str, **kw: Any) -> None:
            assert name not in self.dc, name
            self.dc[name] = kw

        def local_resource(name: str, **kw: Any) -> None:
            assert name not in self.local, name
            self.local[name] = kw

        builtins = {
            "config": Config(),
            "os": Os(),
            "fail": fail,
            "docker_compose": docker_compose,
            "dc_resource": dc_resource,
            "local_resource": local_resource,
            "TRIGGER_MODE_MANUAL": "manual",
            "TRIGGER_MODE_AUTO": "auto",
        }
        code = compile(TILTFILE.read_text(), str(TILTFILE), "exec")
        exec(code, {"__builtins__": __builtins__, **builtins})
        return self


def check_references(tilt: Tilt) -> None:
    services = set(load()["services"])
    for path in tilt.compose:
        assert (ROOT / path).is_file(), path
    assert set(tilt.dc) <= services, set(tilt.dc) - services
    if tilt.compose:
        assert set(tilt.dc) == services, f"services without a resource: {services - set(tilt.dc)}"
    resources = set(tilt.dc) | set(tilt.local) | (services if tilt.compose else set())
    for name, kw in [*tilt.dc.items(), *tilt.local.items()]:
        assert kw.get("labels"), name
        for dep in kw.get("resource_deps", []):
            assert dep in resources, f"{name} depends on unknown {dep}"
    for name, kw in tilt.local.items():
        for key in ("cmd", "serve_cmd"):
            if key in kw:
                program = ROOT / kw[key].split()[0]
                assert program.is_file(), f"{name}: {kw[key]}"
                assert os.access(program, os.X_OK), f"{name}: {program} is not executable"
        for dep in kw.get("deps", []):
            assert (ROOT / dep).exists(), f"{name}: deps {dep}"


def test_parses_as_python() -> None:
    tree = ast.parse(TILTFILE.read_text())
    calls = {
        n.func.id
        for n in ast.walk(tree)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
    }
    assert {"docker_compose", "dc_resource", "local_resource"} <= calls
    assert not any(isinstance(n, ast.Import | ast.ImportFrom) for n in ast.walk(tree))


def test_every_repository_path_it_names_exists() -> None:
    strings = [
        n.value
        for n in ast.walk(ast.parse(TILTFILE.read_text()))
        if isinstance(n, ast.Constant) and isinstance(n.value, str)
    ]
    paths = [s.split()[0] for s in strings if s.startswith(("compose/", "scripts/", "control/"))]
    assert paths
    for path in paths:
        assert (ROOT / path).exists(), path


@pytest.mark.parametrize(
    "args",
    [
        {},
        {"profile": "compose"},
        {"profile": "vm"},
        {"profile": "vm", "vm-os": "talos", "vm-count": "3"},
        {"profile": "lab", "ctl-url": "nats://ctl:4222", "data-url": "nats://data:4222"},
    ],
)
def test_profiles_reference_what_exists(args: dict[str, str]) -> None:
    tilt = Tilt(args).run()
    check_references(tilt)
    profile = args.get("profile", "compose")
    assert bool(tilt.compose) == (profile != "lab")
    vms = [n for n in tilt.local if n.startswith("vm-node")]
    assert len(vms) == (int(args.get("vm-count", "2")) if profile == "vm" else 0)
    assert "smoke-transfer" in tilt.local


def test_lab_urls_from_the_environment() -> None:
    env = {"NBDNATS_CTL_URL": "nats://c:4222", "NBDNATS_DATA_URL": "nats://d:4222"}
    tilt = Tilt({"profile": "lab"}, env=env).run()
    assert tilt.local["smoke-transfer"]["env"]["NBDNATS_DATA_URL"] == "nats://d:4222"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"profile": "kube"}, "unknown profile"),
        ({"profile": "lab"}, "needs --ctl-url and --data-url"),
        ({"profile": "vm", "vm-os": "windows"}, "unknown --vm-os"),
    ],
)
def test_an_unknown_profile_or_os_or_a_lab_without_urls_fails(
    args: dict[str, str], message: str
) -> None:
    with pytest.raises(TiltFail, match=message):
        Tilt(args).run()


@pytest.mark.parametrize("script", sorted((ROOT / "scripts").glob("*.sh")))
def test_scripts_are_executable_bash(script: Path) -> None:
    assert script.stat().st_mode & stat.S_IXUSR
    subprocess.run(["bash", "-n", str(script)], check=True)


@pytest.mark.parametrize("vm_os", ["kairos", "talos"])
def test_vm_node_writes_the_seed_and_boots_the_overlay_disk(tmp_path: Path, vm_os: str) -> None:
    """scripts/vm-node.sh up to QEMU: with stand-ins for qemu-system-x86_64, genisoimage,
    talosctl and docker, it writes the NoCloud seed and boots the overlay disk."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    log = tmp_path / "calls.log"
    for tool in ("qemu-system-x86_64", "genisoimage", "docker"):
        (stubs / tool).write_text(f'#!/bin/sh\necho "{tool} $*" >> "{log}"\n')
        (stubs / tool).chmod(0o755)
    vm = tmp_path / "vm"
    images = vm / "images"
    images.mkdir(parents=True)
    image = images / ("kairos.iso" if vm_os == "kairos" else "talos.raw")
    image.write_bytes(b"\0" * 65536)
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    path = [str(stubs), *(d for d in os.environ["PATH"].split(":") if d)]
    env = {**os.environ, "PATH": ":".join(path), "NBDNATS_VM_DIR": str(vm)}
    env["NBDNATS_VM_CA"] = str(ca)
    if shutil.which("talosctl", path=env["PATH"]):  # pragma: no cover - not installed here
        pytest.skip("a real talosctl is installed")
    done = subprocess.run(
        [str(ROOT / "scripts" / "vm-node.sh"), vm_os, "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    calls = log.read_text()
    assert "-volid cidata" in calls
    qemu = next(line for line in calls.splitlines() if line.startswith("qemu-system-x86_64"))
    assert f"file={vm}/node2/disk.qcow2" in qemu
    assert "hostname=node2" in qemu
    seed = vm / "node2" / "cidata"
    assert "local-hostname: node2" in (seed / "meta-data").read_text()
    if vm_os == "kairos":
        config = yaml.safe_load((seed / "user-data").read_text())
        assert config["install"]["auto"] is True
        files = {f["path"]: f["content"] for f in config["stages"]["boot"][0]["files"]}
        assert (
            "NBDNATS_DATA_URL=tls://node2:node2-dev@10.0.2.2:4322"
            in files["/etc/nbdnats/agent.env"]
        )
        assert files["/etc/nbdnats/ca.pem"] == ca.read_text()
        assert "-cdrom" in qemu
    else:
        assert "hostfwd=tcp:127.0.0.1:50002-:50000" in qemu
        backing = subprocess.run(
            ["qemu-img", "info", "--output=json", str(vm / "node2" / "disk.qcow2")],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert "talos.raw" in backing


def test_the_vm_profile_boots_debian_by_default() -> None:
    tilt = Tilt({"profile": "vm"}).run()
    assert tilt.local["vm-image"]["cmd"] == "scripts/vm-image.sh debian"
    assert tilt.local["vm-node2"]["serve_cmd"] == "scripts/vm-node.sh debian 2"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"NBDNATS_VM_CTL_URL": "nats://node1:secret@10.0.2.2:4222"}, "without a user"),
        ({"NBDNATS_VM_DATA_URL": "nats://10.0.2.2:4322 quiet"}, "without a user"),
        ({"NBDNATS_PASSWORD_NODE1": "a b"}, "NBDNATS_PASSWORD_NODE1: letters"),
        ({"VM_ACCEL": "hvf"}, "VM_ACCEL=hvf: use kvm or tcg"),
    ],
)
def test_vm_node_debian_refuses_a_login_on_the_command_line_in_one_line(
    tmp_path: Path, env: dict[str, str], message: str
) -> None:
    """Credentials belong in the node's agent.env, never the kernel command line (readable
    by all in /proc/cmdline): a URL with a user, or an unsafe value, stops before anything
    is written."""
    vm = tmp_path / "vm"
    done = subprocess.run(
        [str(ROOT / "scripts" / "vm-node.sh"), "debian", "1"],
        env={**os.environ, "NBDNATS_VM_DIR": str(vm), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and message in done.stderr, done.stderr
    assert "secret" not in done.stderr
    assert not (vm / "node1" / "agent.env").exists()
