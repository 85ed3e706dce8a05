"""The RAM-booted installer and the boot media, on a QEMU machine with OVMF and swtpm.

The installer image is built once per run (and cached by its inputs across runs); each
test boots a machine under TCG and watches its serial console or the NATS servers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import nats
import pytest

from nbdnats.metal.approval import new_key
from nbdnats.schemas import NodeInfo, decode
from nbdnats.subjects import ctl_event
from tests.metal_images import (
    InstallerBase,
    esp_image,
    installer_base,
    installer_deployment,
    marker_disk,
)
from tests.metal_vm import HOST_V6, MetalVm, Swtpm
from tests.nats_server import NatsServer

# Booting Debian's kernel and a Python agent under TCG on a shared 2-core machine.
BOOT_TIMEOUT = 180


@pytest.fixture(scope="session")
def installer() -> InstallerBase:
    started = time.monotonic()
    base = installer_base()
    print(f"\ninstaller base image ready in {time.monotonic() - started:.1f} s: {base.dir}")
    return base


@pytest.fixture
def machines(tmp_path: Path) -> Iterator[Callable[..., MetalVm]]:
    """Start machines (and their TPMs); stop them all at teardown."""
    started: list[MetalVm | Swtpm] = []

    def start(name: str, **kw: object) -> MetalVm:
        vm = MetalVm(tmp_path / name, **kw)  # type: ignore[arg-type]
        started.append(vm)
        vm.start()
        return vm

    yield start
    for thing in reversed(started):
        thing.stop()
        if isinstance(thing, MetalVm) and thing.tpm is not None:
            thing.tpm.stop()


@pytest.mark.timeout(900)
def test_marker_disk_boots_under_ovmf_and_prints_its_marker(
    installer: InstallerBase, tmp_path: Path, machines: Callable[..., MetalVm]
) -> None:
    disk = marker_disk(tmp_path / "disk.raw", "nbdnats-marker-7f3a", installer.vmlinuz)
    vm = machines("marker", disk=disk)
    seconds = vm.wait_for_serial("nbdnats-marker-7f3a", timeout=BOOT_TIMEOUT)
    print(f"\nmarker disk: firmware to marker in {seconds:.1f} s")
    assert vm.wait_exit(60) == 0  # /init powered the machine off


@pytest.mark.timeout(900)
def test_installer_boots_from_esp_on_blank_disk_and_announces_over_ipv6(
    installer: InstallerBase,
    tmp_path: Path,
    start_nats: Callable[..., NatsServer],
    machines: Callable[..., MetalVm],
) -> None:
    server = start_nats(host="::1")
    url = f"nats://[{HOST_V6}]:{server.port}"
    keys = tmp_path / "trusted"
    keys.mkdir()
    new_key(keys / "ops")
    (keys / "ops.key").unlink()  # the installer holds approvers' public keys only
    env = tmp_path / "agent.env"
    env.write_text("NBDNATS_ANNOUNCE_NOTE=unused\n")
    dep = installer_deployment(
        tmp_path / "deploy",
        cmdline=f"nbdnats.node=inst1 nbdnats.ctl={url} nbdnats.data={url}",
        trusted_keys=keys,
        env_file=env,
    )
    esp = esp_image(tmp_path / "esp.img", dep.efi)
    target = tmp_path / "target.raw"
    with target.open("wb") as f:
        f.truncate(1024**3)  # blank: the firmware finds nothing to boot and moves on
    tpm = Swtpm(tmp_path / "tpm")
    tpm.start()
    assert tpm.ca_bundle.read_bytes().count(b"BEGIN CERTIFICATE") == 2

    async def announced() -> NodeInfo:
        nc = await nats.connect(server.url)
        try:
            sub = await nc.subscribe(ctl_event("inst1", "announce"))
            vm = machines("installer", disk=target, esp=esp, tpm=tpm)
            deadline = time.monotonic() + BOOT_TIMEOUT
            while True:
                try:
                    msg = await sub.next_msg(timeout=2)
                    break
                except TimeoutError as e:
                    assert vm.proc is not None
                    if vm.proc.poll() is not None or time.monotonic() > deadline:
                        qemu = (vm.dir / "qemu.log").read_text(errors="replace")
                        raise AssertionError(
                            f"no announcement (QEMU: {qemu[-500:]!r}); serial: "
                            f"{vm.serial_text()[-3000:]}"
                        ) from e
            print(
                f"\ninstaller: firmware to announcement in {time.monotonic() - vm.started_at:.1f} s"
            )
            return decode(NodeInfo, msg.data, "announcement")
        finally:
            await nc.close()

    info = asyncio.run(announced())
    assert (info.node, info.role, info.state) == ("inst1", "installer", "up")
    assert "provision" in info.capabilities


@pytest.mark.timeout(600)
def test_installer_refuses_a_url_that_is_not_nats_and_powers_off(
    installer: InstallerBase, tmp_path: Path, machines: Callable[..., MetalVm]
) -> None:
    bad = "http://10.0.2.2:4222"
    dep = installer_deployment(tmp_path / "deploy", cmdline=f"nbdnats.node=inst1 nbdnats.ctl={bad}")
    vm = machines(
        "refuses",
        kernel=dep.vmlinuz,
        initrd=dep.initrd,
        append=f"console=ttyS0 panic=-1 nbdnats.node=inst1 nbdnats.ctl={bad}",
    )
    seconds = vm.wait_for_serial(f"refusing URL '{bad}'", timeout=BOOT_TIMEOUT)
    print(f"\ndirect kernel boot to /init's refusal in {seconds:.1f} s")
    assert vm.wait_exit(60) == 0  # powered off, no agent started
    assert "nbd-nats agent" not in vm.serial_text()
