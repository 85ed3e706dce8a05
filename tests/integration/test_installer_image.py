"""The RAM-booted installer's /init on a QEMU machine (direct kernel boot). Booting it under
OVMF with swtpm, announcing over IPv6, provisioning and booting a marker disk are
tests/integration/test_metal.py's.

The installer image is built once per run (and cached by its inputs across runs); each
test boots a machine under TCG and watches its serial console or the NATS servers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.metal_images import (
    InstallerBase,
    installer_deployment,
)
from tests.metal_vm import MetalVm

# Booting Debian's kernel and a Python agent under TCG on a shared 2-core machine.
BOOT_TIMEOUT = 180


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
