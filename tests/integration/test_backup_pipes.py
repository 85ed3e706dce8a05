"""The backup shapes through real restic: `recv - | restic backup --stdin` and
`restic dump | send -` restore the exact bytes."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.cli import NBD_NATS, cli_env, start_cli
from tests.images import MiB, make_image, sha256_file

SIZE = 24 * MiB


def test_backup_into_restic_and_restore(tmp_path: Path, nats_url: str, qemu_nbd) -> None:
    env = cli_env({"RESTIC_REPOSITORY": str(tmp_path / "repo"), "RESTIC_PASSWORD": "pw"})
    subprocess.run(["restic", "init", "-q"], env=env, check=True)
    src = tmp_path / "vm42.img"
    want = make_image(src, SIZE, [(0, 2 * MiB), (10 * MiB, 3 * MiB)])

    # Backup: the receiver streams the image in offset order into restic's stdin.
    backup = subprocess.Popen(
        f"{NBD_NATS} recv - --id bk1 --data-url {nats_url} -q"
        " | restic backup -q --stdin --stdin-filename disk.img",
        shell=True,
        env=env,
        stderr=subprocess.PIPE,
    )
    send = start_cli("send", qemu_nbd(src, read_only=True), "--id", "bk1", "--data-url", nats_url)
    assert send.communicate(timeout=120)[0] is not None and send.returncode == 0
    _, err = backup.communicate(timeout=120)
    assert backup.returncode == 0, err.decode()

    # Restore: restic dump into a sender reading stdin, received into a fresh NBD target.
    dst = tmp_path / "restored.img"
    make_image(dst, SIZE, [])
    recv = start_cli("recv", qemu_nbd(dst), "--id", "rs1", "--data-url", nats_url)
    restore = subprocess.run(
        f"restic dump -q latest disk.img | {NBD_NATS} send - --id rs1 --size {SIZE}"
        f" --data-url {nats_url} -q",
        shell=True,
        env=env,
        capture_output=True,
        timeout=120,
    )
    assert restore.returncode == 0, restore.stderr.decode()
    recv.communicate(timeout=60)
    assert recv.returncode == 0
    assert sha256_file(dst) == want
