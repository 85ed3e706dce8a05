"""Striping: ``--streams 1, 2, 4``, each with ``--compress off`` and ``auto``, over a
3-server nats-server cluster, with the number of cores recorded.

    python -m bench.streams [--rounds N] [--size MIB] [--streams 1,2,4] [--compress off,auto]
                            [--images random,ext4] [--out DIR]

Setup: three nats-servers meshed on loopback (the embedded default's config: ``max_payload``
8 MiB, ``max_pending`` 64 MiB, ``GOGC=400``, and a monitoring port each), two images on
tmpfs (``/dev/shm`` when there is one) as ``bench.compress`` makes them: **random**, ``--size``
MiB of random bytes, and **ext4**, about half full of text. Each run is ``nbd-nats recv
TARGET --json`` and ``nbd-nats send IMAGE --streams N --compress MODE --json`` as two
processes (so each side is measured on its own), both given the three servers as their
data URL; TARGET is a fresh sparse file on tmpfs (a stream such as ``null:`` would not be
striped). Every combination runs once per round, interleaved, after an unrecorded warm-up
round.

Figures per run: MB/s of the image over the sender's wall time (process start to exit), CPU
seconds per GiB of the image of the sender, of the receiver (``wait4``: all threads, exact)
and of the three nats-servers together (``/proc/PID/stat``), and the share of the bytes
each server's clients published (``/connz``, closed connections included): a third each
when three sub-streams spread over three servers. Reported: the median of each over the
rounds per image, number of streams and compression, each one's MB/s over one stream's,
and the machine's core count. On a machine with fewer cores than sub-streams, sender,
receiver and servers share them and striping cannot show a gain: the figures are recorded
so that a bigger machine can be compared.

Writes ``results.json`` and ``summary.md`` into ``bench/results/<UTC time>-streams/`` unless
``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.request import urlopen

from bench.compress import make_ext4, make_random
from bench.harness import first_line
from nbdnats.embedded import (
    EmbeddedServer,
    bulk_env,
    die_with_parent,
    free_port,
    nats_server_binary,
)

REPO = Path(__file__).resolve().parent.parent
NBD_NATS = str(Path(sys.executable).parent / "nbd-nats")
MiB = 1 << 20
GiB = 1 << 30
SCHEMA = 1
SERVERS = 3
FIGURES = (
    "mb_s",
    "cpu_s_per_gib_sender",
    "cpu_s_per_gib_receiver",
    "cpu_s_per_gib_servers",
    "busiest_server_share",
)
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def say(text: str) -> None:
    print(f"bench.streams: {text}", file=sys.stderr, flush=True)


@dataclass
class Server:
    url: str
    monitor: int
    proc: subprocess.Popen[bytes]

    def monitoring(self, endpoint: str) -> dict[str, Any]:
        with urlopen(f"http://127.0.0.1:{self.monitor}/{endpoint}", timeout=5) as r:
            return json.load(r)  # type: ignore[no-any-return]

    def published(self) -> int:
        """What its clients have published into it so far, closed connections included."""
        conns = self.monitoring("connz?state=all&limit=100000").get("connections") or []
        return sum(int(c["in_bytes"]) for c in conns)

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime


@contextlib.contextmanager
def cluster(work: Path, n: int = SERVERS) -> Iterator[list[Server]]:
    """``n`` nats-servers routed to each other, each with the embedded default's config."""
    ports = [free_port() for _ in range(n)]
    routes = [free_port() for _ in range(n)]
    servers: list[Server] = []
    try:
        for i in range(n):
            cfg = EmbeddedServer()
            cfg.port = ports[i]
            others = ", ".join(f"nats-route://127.0.0.1:{routes[j]}" for j in range(n) if j != i)
            monitor = free_port()
            conf = work / f"n{i}.conf"
            conf.write_text(
                cfg.config(work / f"js{i}")
                + f"server_name: n{i}\n"
                + f'http: "127.0.0.1:{monitor}"\n'
                + f'cluster {{ name: bench, listen: "127.0.0.1:{routes[i]}", '
                + f"routes: [{others}] }}\n"
            )
            with (work / f"n{i}.log").open("wb") as log:
                proc = subprocess.Popen(
                    [nats_server_binary(), "-c", str(conf)],
                    stdout=log,
                    stderr=log,
                    env={**os.environ, **bulk_env()},
                    preexec_fn=die_with_parent(),
                )
            servers.append(Server(cfg.url, monitor, proc))
        deadline = time.monotonic() + 30
        while not _meshed(servers, n - 1):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the {n} nats-servers did not mesh within 30 s (see {work})")
            time.sleep(0.1)
        yield servers
    finally:
        for s in servers:
            s.proc.terminate()
        for s in servers:
            s.proc.wait(10)


def _meshed(servers: list[Server], routes: int) -> bool:
    try:
        return all(s.monitoring("routez")["num_routes"] >= routes for s in servers)
    except OSError:
        return False


def run_once(
    servers: list[Server], image: Path, target: Path, streams: int, compress: str, tid: str
) -> dict[str, Any]:
    """One transfer of ``image`` into a fresh ``target``; its figures."""
    target.unlink(missing_ok=True)
    url = ",".join(s.url for s in servers)
    common = ["--id", tid, "--data-url", url, "--json", "-q"]
    published = [s.published() for s in servers]
    server_cpu = sum(s.cpu_seconds() for s in servers)
    recv = subprocess.Popen(
        [NBD_NATS, "recv", str(target), *common], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    start = time.monotonic()
    send = subprocess.Popen(
        [NBD_NATS, "send", str(image), *common, "--streams", str(streams), "--compress", compress],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out: dict[str, dict[str, Any]] = {}
    usage: dict[str, float] = {}
    seconds = 0.0
    for name, proc in (("sender", send), ("receiver", recv)):
        _, status, ru = os.wait4(proc.pid, 0)
        if name == "sender":
            seconds = time.monotonic() - start
        assert proc.stdout is not None and proc.stderr is not None
        text, err = proc.stdout.read(), proc.stderr.read()
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            raise RuntimeError(f"{name} failed: {err.decode().strip()}")
        out[name] = json.loads(text.decode().strip().splitlines()[-1])
        usage[name] = ru.ru_utime + ru.ru_stime
    carried = [s.published() - b for s, b in zip(servers, published, strict=True)]
    server_cpu = sum(s.cpu_seconds() for s in servers) - server_cpu
    size = image.stat().st_size
    sender = out["sender"]
    return {
        "image": image.stem,
        "streams": streams,
        "compress": compress,
        "agreed_streams": sender.get("streams", 1),
        "mb_s": size / seconds / 1e6,
        "cpu_s_per_gib_sender": usage["sender"] * GiB / size,
        "cpu_s_per_gib_receiver": usage["receiver"] * GiB / size,
        "cpu_s_per_gib_servers": server_cpu * GiB / size,
        "server_shares": [c / max(1, sum(carried)) for c in carried],
        "busiest_server_share": max(carried) / max(1, sum(carried)),
        "wire_bytes": sender.get("wire_bytes"),
        "sent_bytes": sender.get("sent_bytes"),
        "digest": sender["digest"],
    }


def key(streams: int, compress: str) -> str:
    return f"{streams}/{compress}"


def summarise(
    runs: list[dict[str, Any]], streams: Sequence[int], modes: Sequence[str]
) -> dict[str, Any]:
    """Per image, per ``streams/compress``: the median of each figure over the rounds, the
    digests seen (one per image when every run moved the same bytes), and MB/s over one
    stream's with the same compression (``vs_one_stream``)."""
    table: dict[str, Any] = {}
    for image in sorted({r["image"] for r in runs}):
        rows: dict[str, Any] = {}
        for n in streams:
            for mode in modes:
                mine = [
                    r for r in runs if (r["image"], r["streams"], r["compress"]) == (image, n, mode)
                ]
                if not mine:
                    continue
                row: dict[str, Any] = {f: statistics.median(r[f] for r in mine) for f in FIGURES}
                row["agreed_streams"] = sorted({r["agreed_streams"] for r in mine})
                row["digests"] = sorted({r["digest"] for r in mine})
                rows[key(n, mode)] = row
        for k, row in rows.items():
            one = rows.get(key(1, k.split("/")[1]))
            row["vs_one_stream"] = row["mb_s"] / one["mb_s"] if one else None
        table[image] = rows
    return table


def markdown(table: dict[str, Any], cores: int) -> str:
    lines = [
        f"{cores} cores, {SERVERS} nats-servers; medians.",
        "",
        "| image | --streams | --compress | MB/s | vs 1 stream | sender CPU s/GiB "
        "| receiver CPU s/GiB | servers CPU s/GiB | busiest server |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for image, rows in table.items():
        for k, r in rows.items():
            n, mode = k.split("/")
            vs = "n/a" if r.get("vs_one_stream") is None else f"{r['vs_one_stream']:.2f}"
            lines.append(
                f"| {image} | {n} | {mode} | {r['mb_s']:.0f} | {vs} | "
                f"{r['cpu_s_per_gib_sender']:.2f} | {r['cpu_s_per_gib_receiver']:.2f} | "
                f"{r['cpu_s_per_gib_servers']:.2f} | {r['busiest_server_share']:.0%} |"
            )
    return "\n".join(lines)


def measure(
    servers: list[Server],
    images: list[Path],
    target: Path,
    streams: Sequence[int],
    modes: Sequence[str],
    rounds: int,
) -> list[dict[str, Any]]:
    """Every run, combinations interleaved round by round; round 0 warms up, not kept."""
    runs = []
    for rnd in range(rounds + 1):
        for image in images:
            for n in streams:
                for mode in modes:
                    tid = f"bs{rnd}{image.stem}{n}{mode}"
                    run = run_once(servers, image, target, n, mode, tid)
                    say(
                        f"round {rnd} {image.stem} --streams {n} --compress {mode}: "
                        f"{run['mb_s']:.0f} MB/s, sender {run['cpu_s_per_gib_sender']:.2f} "
                        f"s/GiB, busiest server {run['busiest_server_share']:.0%}"
                    )
                    if rnd > 0:
                        runs.append(run)
    return runs


def _list(kind: type[Any], allowed: Sequence[Any] | None = None) -> Any:
    def parse(text: str) -> list[Any]:
        try:
            values = [kind(x) for x in text.split(",") if x]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: a comma-separated list") from None
        bad = [v for v in values if allowed is not None and v not in allowed]
        if not values or bad:
            raise argparse.ArgumentTypeError(f"{text!r}: choose from {allowed}")
        return values

    return parse


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.streams", description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--size", type=int, default=1024, help="MiB of each image (default 1024)")
    p.add_argument("--streams", type=_list(int, range(1, 9)), default=[1, 2, 4])
    p.add_argument(
        "--compress", type=_list(str, ("off", "auto", "zstd", "lz4")), default=["off", "auto"]
    )
    p.add_argument("--images", type=_list(str, ("random", "ext4")), default=["random", "ext4"])
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.rounds < 1 or args.size < 1:
        p.error("--rounds and --size must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    out = args.out or REPO / "bench" / "results" / f"{stamp}-streams"
    shm = Path("/dev/shm")
    with tempfile.TemporaryDirectory(dir=shm if shm.is_dir() else None) as tmp:
        work = Path(tmp)
        size = args.size * MiB
        images = [work / f"{name}.img" for name in args.images]
        say(f"making {len(images)} image(s) of {args.size} MiB")
        for image in images:
            if image.stem == "ext4":
                make_ext4(image, size, work)
            else:
                make_random(image, size)
        with cluster(work) as servers:
            runs = measure(
                servers, images, work / "target.img", args.streams, args.compress, args.rounds
            )
    cores = os.cpu_count() or 0
    table = summarise(runs, args.streams, args.compress)
    doc = {
        "schema": SCHEMA,
        "cores": cores,
        "servers": SERVERS,
        "size_mib": args.size,
        "nbdnats": first_line([NBD_NATS, "--version"]),
        "nats_server": first_line([nats_server_binary(), "--version"]),
        "table": table,
        "runs": runs,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
    (out / "summary.md").write_text(markdown(table, cores) + "\n")
    print(markdown(table, cores))
    return 0


if __name__ == "__main__":
    sys.exit(main())
