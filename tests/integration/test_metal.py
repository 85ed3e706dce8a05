"""Bare-metal provisioning end to end, a VM standing in for the machine: OVMF boots the
installer UKI from its ESP (the target disk is blank), swtpm is its TPM, its agent dials the
ctl plane over IPv6 and the data plane over IPv4. The controller enrolls the TPM, records
golden PCR values, attests it, and an approval bound to that attestation lets it write the
VM's virtio disk; the installer reboots and the machine boots the new disk (a GPT disk with
an ESP and a UKI that prints a marker). Then the same machine boots a different installer
UKI: its PCR 4 is not the golden one, and the provision is refused with the disk untouched.

Slow under TCG (three boots); the installer image is built once per run and cached by its
inputs (tests/metal_images.py). The other refusals run against swtpm on the host
(test_attestation.py); /init's own refusals in test_installer_image.py."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from nbdnats.metal.approval import new_key
from tests.cli import one_line_error, run_cli
from tests.ctl import AgentProc, ctl, ok, stored_events
from tests.images import MiB, sha256_file
from tests.metal_images import (
    InstallerBase,
    esp_image,
    installer_deployment,
    marker_disk,
)
from tests.metal_vm import HOST_V4, HOST_V6, MetalVm, Swtpm
from tests.nats_server import NatsServer
from tests.waits import wait_for

BOOT_TIMEOUT = 300  # firmware to agent under TCG on a loaded 2-core machine
MARKER = "nbdnats-provisioned-disk-booted-5c1e"


def blank(path: Path, size: int) -> Path:
    with path.open("wb") as f:
        f.truncate(size)
    return path


def up_with_ak(url: str, vm: MetalVm, since: float) -> dict[str, object]:
    """Wait until installer inst1 announced itself (after ``since``) with its AK."""
    found: dict[str, object] = {}

    def announced() -> bool:
        if vm.proc is not None and vm.proc.poll() is not None:
            raise AssertionError(f"the machine stopped; serial: {vm.serial_text()[-3000:]}")
        proc = ctl(url, "--json", "nodes")
        nodes = {n["node"]: n for n in json.loads(proc.stdout or b"[]")}
        n = nodes.get("inst1")
        if n and n["state"] == "up" and n.get("ak_name") and n["started"] > since_iso:
            found.update(n)
            return True
        return False

    since_iso = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(since))
    try:
        wait_for(announced, "installer inst1 to announce itself", BOOT_TIMEOUT)
    except TimeoutError as e:
        raise AssertionError(f"no announcement; serial: {vm.serial_text()[-3000:]}") from e
    return found


@pytest.mark.timeout(1500)
def test_an_attested_installer_writes_its_disk_and_the_machine_boots_it(
    installer: InstallerBase,
    tmp_path: Path,
    start_nats: Callable[..., NatsServer],
    start_agent: Callable[..., AgentProc],
    machines: Callable[..., MetalVm],
) -> None:
    # The ctl plane over IPv6 (SLAAC in the guest), the data plane over IPv4 (DHCP).
    server = start_nats(host="::1", jetstream=True)
    data = start_nats()
    url = f"nats://[::1]:{server.port}"
    guest_ctl = f"nats://[{HOST_V6}]:{server.port}"
    guest_data = f"nats://{HOST_V4}:{data.port}"
    keys = tmp_path / "trusted"
    keys.mkdir()
    new_key(tmp_path / "ops")
    shutil.copy(tmp_path / "ops.pub", keys / "ops.pub")
    cmdline = f"nbdnats.node=inst1 nbdnats.ctl={guest_ctl} nbdnats.data={guest_data}"
    genuine = installer_deployment(tmp_path / "deploy", cmdline=cmdline, trusted_keys=keys)

    # The image to provision: a bootable GPT disk whose UKI prints MARKER.
    images = tmp_path / "images"
    images.mkdir()
    image = marker_disk(images / "os.raw", MARKER, installer.vmlinuz)
    want = sha256_file(image)
    start_agent("images", url, "--data-url", data.url, "--allow", str(images))

    tpm = Swtpm(tmp_path / "tpm")
    tpm.start()
    target = blank(tmp_path / "target.raw", 256 * MiB)
    store = ("--enrollments", str(tmp_path / "enrolled"))

    # 1. The installer boots from its ESP (the target is blank) and announces its AK.
    t0 = time.time()
    vm = machines(
        "installer", disk=target, esp=esp_image(tmp_path / "esp.img", genuine.efi), tpm=tpm
    )
    node = up_with_ak(url, vm, t0 - 1)
    caps = node["capabilities"]
    assert node["role"] == "installer" and isinstance(caps, list) and "attest" in caps
    print(f"\ninstaller up in {time.time() - t0:.0f} s")

    # 2. Enrollment, golden values from this (trusted) boot, an approval bound to them.
    ok(ctl(url, "enroll", "inst1", "--ek-ca", str(tpm.ca_bundle), *store))
    enrolled = json.loads((tmp_path / "enrolled" / "inst1.json").read_text())
    assert enrolled["ak_name"] == node["ak_name"]
    golden = tmp_path / "installer.golden"
    ok(ctl(url, "attest", "inst1", "--record-golden", str(golden), *store))
    attestation = tmp_path / "inst1.attestation"
    attestation.write_text(
        ok(ctl(url, "--json", "attest", "inst1", "--golden", str(golden), *store))
    )
    approval = tmp_path / "approval.json"
    for_it = ("--node", "inst1", "--device", "/dev/vda", "--image", str(image))
    ok(
        run_cli(
            "approve",
            "--key",
            str(tmp_path / "ops.key"),
            *for_it,
            "--attestation",
            str(attestation),
            "-o",
            str(approval),
        )
    )

    def provision(approval: Path) -> subprocess.CompletedProcess[bytes]:
        reboot = ("--golden", str(golden), "--then", "reboot", *store)
        return ctl(
            url,
            "provision",
            f"images:{image}",
            "inst1:/dev/vda",
            "--approval",
            str(approval),
            *reboot,
            timeout=600,
        )

    # 3. The attested provision: written, read back, verified; the installer reboots.
    proc = provision(approval)
    out = ok(proc) + proc.stderr.decode()
    assert f"verified sha256:{want}" in out and "inst1 reboots" in out, out
    assert sha256_file(target, image.stat().st_size) == want

    # 4. The machine reboots into the disk it was given.
    seconds = vm.wait_for_serial(MARKER, timeout=BOOT_TIMEOUT)
    print(f"provisioned disk's marker {seconds:.0f} s after the first firmware start")
    assert vm.wait_exit(120) == 0  # the marker's /init powers off

    # 5. The same machine boots a different installer UKI (one more word on its command
    # line): PCR 4 is not the golden value, and nothing is written.
    other = installer_deployment(
        tmp_path / "deploy2", cmdline=cmdline + " nbdnats.note=changed", trusted_keys=keys
    )
    target2 = blank(tmp_path / "target2.raw", 256 * MiB)
    zeros = hashlib.sha256(bytes(256 * MiB)).hexdigest()
    tpm.start()  # the same TPM (its state kept): swtpm ended with the machine's power-off
    t1 = time.time()
    vm2 = machines(
        "tampered", disk=target2, esp=esp_image(tmp_path / "esp2.img", other.efi), tpm=tpm
    )
    up_with_ak(url, vm2, t1 - 1)
    plain = tmp_path / "plain.json"
    ok(run_cli("approve", "--key", str(tmp_path / "ops.key"), *for_it, "-o", str(plain)))
    proc = provision(plain)
    assert proc.returncode == 1
    line = one_line_error(proc)
    assert "PCR 4 differs from the golden value" in line, line
    assert sha256_file(target2) == zeros
    refused = [e for e in stored_events(url, "refused") if e["node"] == "inst1"]
    assert refused and refused[-1]["code"] == "attestation"
    assert vm2.proc is not None and vm2.proc.poll() is None  # still in the installer
