"""Image formats by their magic bytes (``nbdnats.formats``): the table, what is never probed,
and what is refused before anything is opened."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest

from nbdnats import formats
from nbdnats.errors import EndpointError, UsageError


def _file_with(tmp_path: Path, magic: formats.Magic) -> Path:
    body = bytearray(b"\0" * 8192)
    if magic.offset >= 0:
        body[magic.offset : magic.offset + len(magic.magic)] = magic.magic
    else:
        at = len(body) + magic.offset
        body[at : at + len(magic.magic)] = magic.magic
    path = tmp_path / f"{magic.format}-{magic.offset}"
    path.write_bytes(bytes(body))
    return path


@pytest.mark.parametrize("magic", formats.MAGICS, ids=lambda m: f"{m.format}@{m.offset}")
def test_each_magic_names_its_format(tmp_path: Path, magic: formats.Magic) -> None:
    assert formats.probe(str(_file_with(tmp_path, magic))) == magic.format
    assert formats.format_of(str(_file_with(tmp_path, magic)), raw=True) == "raw"


def test_qcow_version_1_is_not_qcow2(tmp_path: Path) -> None:
    v3 = tmp_path / "v3"
    v3.write_bytes(b"QFI\xfb\x00\x00\x00\x03" + bytes(100))
    v1 = tmp_path / "v1"
    v1.write_bytes(b"QFI\xfb\x00\x00\x00\x01" + bytes(100))
    assert (formats.probe(str(v3)), formats.probe(str(v1))) == ("qcow2", "qcow")


def test_what_is_raw_and_what_is_not_a_file(tmp_path: Path) -> None:
    plain = tmp_path / "plain.img"
    plain.write_bytes(b"\x55\xaa" * 4096)
    tiny = tmp_path / "tiny"
    tiny.write_bytes(b"QF")
    assert formats.format_of(str(plain)) == "raw"
    assert formats.format_of(str(tiny)) == "raw"
    assert formats.format_of(str(tmp_path / "new.img")) == "raw"  # a target to create
    assert formats.format_of("/dev/zero") == "raw"  # a device is never probed
    for spec in ("-", "null:", "/dev/null", "pipe:/x", "unix:/x", "pattern:1M", "nbd://h/x"):
        assert formats.format_of(spec) is None, spec


def test_luks_is_refused_unless_raw(tmp_path: Path) -> None:
    luks = tmp_path / "disk.luks"
    luks.write_bytes(b"LUKS\xba\xbe" + bytes(4096))
    with pytest.raises(EndpointError, match=r"LUKS-encrypted image.*or pass --raw"):
        formats.check(str(luks))
    with pytest.raises(EndpointError, match="LUKS"):
        asyncio.run(formats.serve(str(luks), target=False))
    assert formats.check(str(luks), raw=True) == "raw"


def test_missing_qemu_nbd_is_one_line_with_the_hint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    qcow = tmp_path / "vm.qcow2"
    qcow.write_bytes(b"QFI\xfb\x00\x00\x00\x03" + bytes(4096))
    monkeypatch.setenv("PATH", str(tmp_path))
    want = (
        f"{qcow} is a qcow2 image: install qemu-utils, or pass --raw to copy its bytes as they are"
    )
    with pytest.raises(EndpointError) as e:
        asyncio.run(formats.serve(str(qcow), target=False))
    assert str(e.value) == want
    served = asyncio.run(formats.serve(str(qcow), target=False, raw=True))
    assert (served.endpoint, served.format) == (str(qcow), "raw")


def test_files_an_image_names_are_listed_for_the_agent_to_check(tmp_path: Path) -> None:
    """Real qemu-img: a backing file, a qcow2's external data file, a vmdk's extent."""
    other = tmp_path / "elsewhere"
    other.mkdir()
    secret = other / "secret"
    secret.write_bytes(bytes(1 << 20))
    overlay, with_data = tmp_path / "overlay.qcow2", tmp_path / "data.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(secret), "-F", "raw", str(overlay)],
        check=True,
    )
    subprocess.run(
        [
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            f"data_file={secret}",
            str(with_data),
            "1M",
        ],
        check=True,
    )
    vmdk = tmp_path / "flat.vmdk"
    vmdk.write_text(
        "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n"
        f'createType="monolithicFlat"\nRW 2048 FLAT "{secret}" 0\n'
    )
    for image in (overlay, with_data, vmdk):
        assert asyncio.run(formats.referenced_files(str(image))) == [str(secret)], image
        assert asyncio.run(formats.referenced_files(str(image), raw=True)) == []
    plain = tmp_path / "plain.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(plain), "1M"], check=True)
    assert asyncio.run(formats.referenced_files(str(plain))) == []


def test_a_served_target_cannot_be_resumed(tmp_path: Path) -> None:
    """The receiver's journal names its endpoint, and each qemu-nbd has a socket of its own:
    refused at once, with what to do instead."""
    qcow = tmp_path / "vm.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(qcow), "1M"], check=True)
    with pytest.raises(UsageError, match=r"cannot be resumed; serve it yourself"):
        asyncio.run(formats.serve(str(qcow), target=True, resume=True))
    served = asyncio.run(formats.serve(str(qcow), target=True, resume=True, raw=True))
    assert served.endpoint == str(qcow)
