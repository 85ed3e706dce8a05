"""Adaptive compression: ``--compress auto`` against ``off`` (and each codec), on an image
that compresses (an ext4 file system holding text) and one that does not (random bytes).

    python -m bench.compress [--rounds N] [--size MIB] [--modes off,auto,zstd,lz4] [--out DIR]

Setup: one nats-server (the embedded default's config), two images on tmpfs (``/dev/shm``
when there is one): **ext4**, ``mke2fs -t ext4 -d`` of ``--size`` MiB filled with copies of
Python's standard library sources (text) until about half full; **random**, ``--size`` MiB
of random bytes. Each run is ``nbd-nats recv null: --json`` and ``nbd-nats send IMAGE
--compress MODE --json`` as two processes (so each side is measured on its own), the modes
interleaved round by round.

Figures per run: MB/s of the image over the sender's wall time (process start to exit),
CPU seconds per GiB of the image of the sender and of the receiver (``wait4``: all threads,
exact), the sender's ``wire_bytes`` over its ``sent_bytes``. Reported: the median of each
over the rounds, per image and mode, the sender's CPU per GiB of each mode over ``off``'s,
and the machine's core count (on 2 cores the sender, receiver and nats-server share them,
so throughput there says less than CPU per GiB).

Writes ``results.json`` into ``bench/results/<UTC time>-compress/`` unless ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nbdnats.embedded import EmbeddedServer

REPO = Path(__file__).resolve().parent.parent
NBD_NATS = str(Path(sys.executable).parent / "nbd-nats")
MiB = 1 << 20
GiB = 1 << 30
SCHEMA = 1


def say(text: str) -> None:
    print(f"bench.compress: {text}", file=sys.stderr, flush=True)


def make_ext4(path: Path, size: int, work: Path) -> None:
    """An ext4 image of ``size`` bytes about half full of text files."""
    tree = work / "tree"
    lib = sysconfig.get_paths()["stdlib"]
    n, held = 0, 0
    while held < size // 2:
        shutil.copytree(
            lib,
            tree / f"copy{n}",
            ignore=shutil.ignore_patterns("__pycache__", "site-packages", "test", "*.so"),
        )
        n += 1
        held = sum(f.stat().st_size for f in tree.rglob("*") if f.is_file())
    subprocess.run(
        ["mke2fs", "-q", "-F", "-t", "ext4", "-d", str(tree), str(path), f"{size // MiB}M"],
        check=True,
    )
    shutil.rmtree(tree)


def make_random(path: Path, size: int) -> None:
    with path.open("wb") as f:
        for _ in range(size // (64 * MiB)):
            f.write(os.urandom(64 * MiB))
        f.write(os.urandom(size % (64 * MiB)))


def run_once(url: str, image: Path, mode: str, tid: str) -> dict[str, Any]:
    """One transfer of ``image`` with ``--compress mode``; its figures."""
    common = ["--id", tid, "--data-url", url, "--json", "-q"]
    recv = subprocess.Popen(
        [NBD_NATS, "recv", "null:", *common], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    start = time.monotonic()
    send = subprocess.Popen(
        [NBD_NATS, "send", str(image), "--compress", mode, *common],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out = {}
    usage = {}
    for name, proc in (("sender", send), ("receiver", recv)):
        _, status, ru = os.wait4(proc.pid, 0)
        if name == "sender":
            seconds = time.monotonic() - start
        assert proc.stdout is not None and proc.stderr is not None
        text, err = proc.stdout.read(), proc.stderr.read()
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(f"{name} failed: {err.decode().strip()}")
        out[name] = json.loads(text.decode().strip().splitlines()[-1])
        usage[name] = ru.ru_utime + ru.ru_stime
        proc.returncode = os.waitstatus_to_exitcode(status)
    size = image.stat().st_size
    sender = out["sender"]
    return {
        "image": image.stem,
        "mode": mode,
        "mb_s": size / seconds / 1e6,
        "cpu_s_per_gib_sender": usage["sender"] * GiB / size,
        "cpu_s_per_gib_receiver": usage["receiver"] * GiB / size,
        "wire_ratio": sender["wire_bytes"] / max(1, sender["sent_bytes"]),
        "wire_bytes": sender["wire_bytes"],
        "sent_bytes": sender["sent_bytes"],
        "digest": sender["digest"],
    }


def summarise(runs: list[dict[str, Any]], modes: Sequence[str]) -> dict[str, Any]:
    figures = ("mb_s", "cpu_s_per_gib_sender", "cpu_s_per_gib_receiver", "wire_ratio")
    table: dict[str, Any] = {}
    for image in sorted({r["image"] for r in runs}):
        table[image] = {}
        for mode in modes:
            mine = [r for r in runs if r["image"] == image and r["mode"] == mode]
            table[image][mode] = {f: statistics.median(r[f] for r in mine) for f in figures}
            table[image][mode]["digests"] = sorted({r["digest"] for r in mine})
        off = table[image].get("off")
        for mode in modes:
            row = table[image][mode]
            if off:
                row["sender_cpu_vs_off"] = row["cpu_s_per_gib_sender"] / off["cpu_s_per_gib_sender"]
    return table


def markdown(table: dict[str, Any], cores: int) -> str:
    lines = [
        f"{cores} cores; medians.",
        "",
        "| image | --compress | MB/s | sender CPU s/GiB | vs off | receiver CPU s/GiB "
        "| wire / data |",
        "|---|---|---|---|---|---|---|",
    ]
    for image, modes in table.items():
        for mode, r in modes.items():
            lines.append(
                f"| {image} | {mode} | {r['mb_s']:.0f} | {r['cpu_s_per_gib_sender']:.2f} | "
                f"{r.get('sender_cpu_vs_off', 1.0):.2f} | {r['cpu_s_per_gib_receiver']:.2f} | "
                f"{r['wire_ratio']:.3f} |"
            )
    return "\n".join(lines)


async def measure(images: list[Path], modes: Sequence[str], rounds: int) -> list[dict[str, Any]]:
    """Every run, modes interleaved round by round; round 0 warms up and is not kept."""
    runs = []
    async with EmbeddedServer() as url:
        for rnd in range(rounds + 1):
            for image in images:
                for mode in modes:
                    run = run_once(url, image, mode, f"bc{rnd}{image.stem}{mode}")
                    say(
                        f"round {rnd} {image.stem} {mode}: {run['mb_s']:.0f} MB/s, "
                        f"sender {run['cpu_s_per_gib_sender']:.2f} s/GiB, "
                        f"wire {run['wire_ratio']:.3f}"
                    )
                    if rnd > 0:
                        runs.append(run)
    return runs


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.compress", description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--size", type=int, default=1024, help="MiB of each image (default 1024)")
    p.add_argument("--modes", default="off,auto,zstd,lz4")
    p.add_argument("--out", type=Path)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    modes = args.modes.split(",")
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    out = args.out or REPO / "bench" / "results" / f"{stamp}-compress"
    shm = Path("/dev/shm")
    with tempfile.TemporaryDirectory(dir=shm if shm.is_dir() else None) as tmp:
        work = Path(tmp)
        size = args.size * MiB
        images = [work / "ext4.img", work / "random.img"]
        say(f"making two {args.size} MiB images")
        make_ext4(images[0], size, work)
        make_random(images[1], size)
        runs = asyncio.run(measure(images, modes, args.rounds))
    cores = os.cpu_count() or 0
    table = summarise(runs, modes)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"schema": SCHEMA, "cores": cores, "size_mib": args.size, "table": table, "runs": runs}
    (out / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
    (out / "summary.md").write_text(markdown(table, cores) + "\n")
    print(markdown(table, cores))
    return 0


if __name__ == "__main__":
    sys.exit(main())
