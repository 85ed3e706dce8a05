"""Image files (qcow2 and the other formats of ``nbdnats.formats``) as endpoints: moved as the
disk they hold through a private qemu-nbd, as their bytes with --raw, refused with a hint
without qemu-nbd; that qemu-nbd and its directory never outlive the command. Real
qemu-img, qemu-nbd, nats-server and agents."""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.cli import finish_json, one_line_error, run_cli, start_cli
from tests.ctl import AgentProc, ctl, ok
from tests.images import MiB, make_image, sha256_file
from tests.nats_server import NatsServer
from tests.waits import wait_for

SIZE = 24 * MiB
DATA = [(0, 2 * MiB), (7 * MiB + 4096, 3 * MiB), (SIZE - 8192, 8192)]


def report(proc: subprocess.CompletedProcess[bytes]) -> dict[str, object]:
    assert proc.returncode == 0, proc.stderr.decode()
    return json.loads(proc.stdout.decode().strip().splitlines()[-1])  # type: ignore[no-any-return]


def qemu_img(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["qemu-img", *args], capture_output=True, check=True)


@pytest.fixture
def images(tmp_path: Path) -> tuple[Path, Path, str]:
    """A patterned raw image, the same disk as qcow2, and the raw image's sha256."""
    raw = tmp_path / "disk.raw"
    want = make_image(raw, SIZE, DATA)
    qcow = tmp_path / "disk.qcow2"
    qemu_img("convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(qcow))
    return raw, qcow, want


@pytest.fixture
def private_tmp(tmp_path: Path) -> dict[str, str]:
    """TMPDIR for the command, so the test sees every directory a qemu-nbd of it gets."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    return {"TMPDIR": str(tmp)}


def leftovers(tmp_path: Path) -> list[str]:
    """qemu-nbd processes serving a file of this test, and their private directories."""
    procs = subprocess.run(
        ["pgrep", "-a", "-f", f"qemu-nbd.*{tmp_path}"], capture_output=True, text=True
    ).stdout.splitlines()
    tmp = tmp_path / "tmp"
    dirs = [str(p) for p in tmp.glob("nbdnats-qemu-*")] if tmp.exists() else []
    return procs + dirs


def qemu_nbd_running(tmp_path: Path) -> bool:
    return any("qemu-nbd" in x for x in leftovers(tmp_path))


def test_copy_qcow2_source_sends_the_disk_it_holds(
    tmp_path: Path, images: tuple[Path, Path, str], private_tmp: dict[str, str]
) -> None:
    _, qcow, want = images
    assert qcow.stat().st_size != SIZE  # the container is not the disk
    out = tmp_path / "out.raw"
    doc = report(run_cli("copy", str(qcow), str(out), "--json", env=private_tmp))
    assert out.stat().st_size == SIZE  # the virtual size, as qemu-nbd serves it
    assert sha256_file(out) == want
    assert doc["size"] == SIZE
    assert doc["format"] == "raw"
    assert doc["sender"]["format"] == "qcow2"  # type: ignore[index]
    assert leftovers(tmp_path) == []


def test_raw_flag_copies_the_qcow2_files_bytes(
    tmp_path: Path, images: tuple[Path, Path, str]
) -> None:
    _, qcow, _ = images
    out = tmp_path / "out.bin"
    doc = report(run_cli("copy", str(qcow), str(out), "--raw", "--json"))
    assert out.read_bytes() == qcow.read_bytes()
    assert doc["sender"]["format"] == "raw"  # type: ignore[index]


def test_qcow2_target_receives_the_disk(
    tmp_path: Path, images: tuple[Path, Path, str], private_tmp: dict[str, str]
) -> None:
    raw, _, _ = images
    dst = tmp_path / "dst.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(dst), str(SIZE))
    doc = report(run_cli("copy", str(raw), str(dst), "--json", "--verify", env=private_tmp))
    assert doc["format"] == "qcow2" and doc["verified"]
    assert qemu_img("info", "--output=json", str(dst)).stdout.count(b'"format": "qcow2"')
    qemu_img("compare", "-q", "-f", "raw", "-F", "qcow2", str(raw), str(dst))
    back = tmp_path / "back.raw"
    qemu_img("convert", "-q", "-f", "qcow2", "-O", "raw", str(dst), str(back))
    assert back.read_bytes() == raw.read_bytes()
    assert leftovers(tmp_path) == []


def test_qcow2_to_qcow2(tmp_path: Path, images: tuple[Path, Path, str]) -> None:
    raw, qcow, _ = images
    dst = tmp_path / "dst.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(dst), str(SIZE))
    report(run_cli("copy", str(qcow), str(dst), "--target-is-zero", "--json"))
    qemu_img("compare", "-q", "-f", "raw", "-F", "qcow2", str(raw), str(dst))


def test_other_formats_are_served_too(tmp_path: Path, images: tuple[Path, Path, str]) -> None:
    """vmdk, vhdx, vdi, qed and a dynamic VHD (vpc): each its disk, by its header alone."""
    raw, _, want = images
    for fmt in ("vmdk", "vhdx", "vdi", "qed", "vpc"):
        img = tmp_path / f"disk.{fmt}"
        qemu_img("convert", "-q", "-f", "raw", "-O", fmt, str(raw), str(img))
        out = tmp_path / f"out-{fmt}.raw"
        doc = report(run_cli("copy", str(img), str(out), "--json"))
        assert doc["sender"]["format"] == fmt  # type: ignore[index]
        # vpc rounds the size up to its geometry; the disk is the same where both have it.
        assert sha256_file(out, SIZE) == want, fmt


def test_without_qemu_nbd_a_qcow2_is_refused_with_the_hint(
    tmp_path: Path, images: tuple[Path, Path, str]
) -> None:
    raw, qcow, _ = images
    empty = tmp_path / "bin"
    empty.mkdir()
    no_qemu = {"PATH": str(empty)}
    out = tmp_path / "out.raw"
    line = one_line_error(run_cli("copy", str(qcow), str(out), env=no_qemu))
    assert line == (
        f"nbd-nats: error: {qcow} is a qcow2 image: install qemu-utils, or pass --raw to "
        "copy its bytes as they are"
    )
    assert not out.exists()
    # As a target: nothing written, the raw source untouched; digest says the same.
    dst = tmp_path / "dst.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(dst), str(SIZE))
    before = dst.read_bytes()
    proc = run_cli("copy", str(raw), str(dst), env=no_qemu)
    assert f"{dst} is a qcow2 image: install qemu-utils" in one_line_error(proc)
    assert proc.returncode == 1
    assert dst.read_bytes() == before
    assert "install qemu-utils" in one_line_error(run_cli("digest", str(qcow), env=no_qemu))
    # --raw does what it says without qemu-nbd.
    report(run_cli("copy", str(qcow), str(out), "--raw", "--json", env=no_qemu))
    assert out.read_bytes() == qcow.read_bytes()


def test_qemu_nbd_that_fails_is_reported_with_its_last_line(
    tmp_path: Path, private_tmp: dict[str, str]
) -> None:
    """A qcow2 header over garbage: qemu-nbd exits; its own last line is the error, and no
    target or temporary directory is left."""
    bad = tmp_path / "bad.qcow2"
    bad.write_bytes(b"QFI\xfb\x00\x00\x00\x03" + b"\xff" * 65536)
    out = tmp_path / "out.raw"
    proc = run_cli("copy", str(bad), str(out), env=private_tmp)
    line = one_line_error(proc)
    assert proc.returncode == 1
    assert line.startswith(f"nbd-nats: error: qemu-nbd could not serve {bad} (qcow2): ")
    assert "qemu-nbd:" in line  # qemu-nbd's own words
    assert not out.exists()
    assert leftovers(tmp_path) == []


def test_digest_of_a_qcow2_is_the_disks(tmp_path: Path, images: tuple[Path, Path, str]) -> None:
    _, qcow, want = images
    proc = run_cli("digest", str(qcow))
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode() == f"sha256:{want}  {qcow}\n"
    proc = run_cli("digest", str(qcow), "--raw")
    assert proc.stdout.decode() == f"sha256:{sha256_file(qcow)}  {qcow}\n"
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_qemu_nbd_and_removes_its_directory(
    tmp_path: Path,
    images: tuple[Path, Path, str],
    private_tmp: dict[str, str],
    start_nats: Callable[..., NatsServer],
    sig: signal.Signals,
) -> None:
    """A sender waiting for its receiver, its qcow2 served: the signal ends it cleanly."""
    _, qcow, _ = images
    url = start_nats().url
    proc = start_cli("send", str(qcow), "--id", "waits", "--data-url", url, env=private_tmp)
    wait_for(lambda: qemu_nbd_running(tmp_path), "the private qemu-nbd")
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == (143 if sig == signal.SIGTERM else 130), err.decode()
    assert leftovers(tmp_path) == []


def test_failed_transfer_stops_qemu_nbd(
    tmp_path: Path,
    images: tuple[Path, Path, str],
    private_tmp: dict[str, str],
    start_nats: Callable[..., NatsServer],
) -> None:
    _, qcow, _ = images
    url = start_nats().url
    proc = run_cli(
        "send", str(qcow), "--id", "alone", "--data-url", url, "--timeout", "1", env=private_tmp
    )
    assert "nbd-nats: error: " in one_line_error(proc)
    assert leftovers(tmp_path) == []


def test_send_and_recv_between_qcow2_files(
    tmp_path: Path,
    images: tuple[Path, Path, str],
    private_tmp: dict[str, str],
    start_nats: Callable[..., NatsServer],
) -> None:
    raw, qcow, _ = images
    url = start_nats().url
    dst = tmp_path / "dst.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(dst), str(SIZE))
    recv = start_cli("recv", str(dst), "--id", "q2q", "--data-url", url, "--json", env=private_tmp)
    sent = report(run_cli("send", str(qcow), "--id", "q2q", "--data-url", url, "--json"))
    received = finish_json(recv)
    assert sent["format"] == "qcow2" and received["format"] == "qcow2"
    qemu_img("compare", "-q", "-f", "raw", "-F", "qcow2", str(raw), str(dst))
    assert leftovers(tmp_path) == []


# -- through agents -------------------------------------------------------------------------


@pytest.fixture
def url(start_nats: Callable[..., NatsServer]) -> str:
    return start_nats(jetstream=True).url


def test_ctl_copy_of_a_qcow2_export_writes_the_disk(
    url: str,
    start_agent: Callable[..., AgentProc],
    tmp_path: Path,
    images: tuple[Path, Path, str],
) -> None:
    _, qcow, want = images
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    start_agent(
        "a", url, "--allow", str(tmp_path), "--export", f"vm1={qcow}", env={"TMPDIR": str(tmp)}
    )
    start_agent("b", url, "--allow", str(tmp_path))
    target = tmp_path / "target.raw"
    doc = json.loads(ok(ctl(url, "--json", "copy", "a:vm1", f"b:{target}")))
    assert doc["ok"]
    assert doc["sender"]["format"] == "qcow2" and doc["receiver"]["format"] == "raw"
    assert sha256_file(target) == want
    # raw: the container's bytes, as asked.
    copied = tmp_path / "copied.qcow2"
    doc = json.loads(ok(ctl(url, "--json", "copy", "a:vm1", f"b:{copied}", "--raw")))
    assert doc["sender"]["format"] == "raw"
    assert copied.read_bytes() == qcow.read_bytes()
    assert leftovers(tmp_path) == []


def test_agent_refuses_an_image_whose_backing_file_is_outside_its_allow_list(
    url: str, start_agent: Callable[..., AgentProc], tmp_path: Path, images: tuple[Path, Path, str]
) -> None:
    """An image's header names files qemu would open: they must be allowed too."""
    raw, _, want = images
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    overlay = allowed / "overlay.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(raw), "-F", "raw", str(overlay))
    start_agent("a", url, "--allow", str(allowed))
    start_agent("b", url, "--allow", str(tmp_path))
    proc = ctl(url, "copy", f"a:{overlay}", f"b:{tmp_path}/out.raw")
    line = one_line_error(proc)
    assert f"{raw}" in line and "allow-list" in line
    assert not (tmp_path / "out.raw").exists()
    # An agent allowed the backing file too reads the overlay as the whole disk.
    start_agent("c", url, "--allow", str(tmp_path))
    ok(ctl(url, "copy", f"c:{overlay}", f"b:{tmp_path}/out.raw"))
    assert sha256_file(tmp_path / "out.raw") == want


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[Callable[[Path], str]]:
    """Attach files as loop block devices (root: the test suite runs as root); every device
    is detached at the end."""
    attached: list[str] = []

    def attach(backing: Path) -> str:
        dev = subprocess.run(
            ["losetup", "--find", "--show", str(backing)], capture_output=True, text=True
        )
        assert dev.returncode == 0, f"losetup (needs root and /dev/loop-control): {dev.stderr}"
        attached.append(dev.stdout.strip())
        return attached[-1]

    yield attach
    for dev in attached:
        subprocess.run(["losetup", "--detach", dev], check=False)


def test_a_qcow2_on_a_block_device_is_read_as_the_disk_it_holds_and_overwritten_as_a_target(
    tmp_path: Path,
    images: tuple[Path, Path, str],
    private_tmp: dict[str, str],
    loop_device: Callable[[Path], str],
) -> None:
    """A qcow2 kept on a logical volume (as oVirt keeps them): read as a source, the device is
    served by qemu-nbd as the disk it holds; written as a target, a device is raw whatever
    header it held, so the disk lands as its bytes (never wrapped)."""
    raw, qcow, want = images
    held = tmp_path / "lv-with-qcow2"
    held.write_bytes(qcow.read_bytes())
    with held.open("r+b") as f:
        f.truncate(SIZE)  # room for the disk when written raw
    dev = loop_device(held)
    out = tmp_path / "out.raw"
    doc = report(run_cli("copy", dev, str(out), "--json", env=private_tmp))
    assert sha256_file(out) == want and doc["sender"]["format"] == "qcow2"  # type: ignore[index]
    doc = report(run_cli("copy", str(raw), dev, "--json", env=private_tmp))
    assert doc["format"] == "raw"
    assert sha256_file(held) == want  # the device now holds the disk's bytes
    assert leftovers(tmp_path) == []
