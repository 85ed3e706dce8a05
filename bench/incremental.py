"""Incremental backups against full ones, in one run: a qcow2 disk whose data changes by a
fixed fraction between rounds, backed up into restic through the ctl plane both ways,
interleaved round by round (full, incremental, full, incremental, ...), with the
incremental figures reported as ratios to the full ones and to the bytes that changed.

    python -m bench.incremental [--rounds N] [--size GIB] [--change PERCENT] [--out DIR]

Setup: one nats-server (the embedded default's config, with JetStream for the ctl events),
two agents as separate processes (``a`` serves the disk, an offline qcow2 export; ``b``
runs restic into two repositories), a disk of ``--size`` GiB filled with random data (the
worst case for a full backup: nothing to skip, nothing to compress) and an unrecorded first
incremental run that starts the chain. Then each round rewrites ``--change`` percent of the
disk in scattered 64 KiB writes (``qemu-io``, random aligned offsets, fixed seed) and runs

- full: ``nbd-nats ctl backup a:disk b --restic FULL --json`` (the whole disk every time),
- incremental: ``nbd-nats ctl backup a:disk b --restic INCR --incremental --json``.

The two go to different repositories, so restic's dedup does not give either the other's
chunks, and the full runs never break the incremental chain (a plain backup is the latest
snapshot of the disk and would make the next incremental run full). Every incremental
snapshot is checked: restored with ``ctl restore``, it must equal the disk (sha256), else
the benchmark fails.

Figures per run: seconds (the ``ctl backup`` process), bytes on the wire (the sender's
``sent_bytes``), dirty bytes (what the bitmap marked), CPU seconds of both agents and their
children (restic, qemu-nbd) from /proc. Ratios: incremental wire bytes / dirty bytes (goal
<= 1.05) and incremental seconds / full seconds (goal <= 0.1), of the medians.

Writes ``results.json`` into ``bench/results/<UTC time>-incremental/`` unless ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import harness
from nbdnats.embedded import EmbeddedServer

REPO = Path(__file__).resolve().parent.parent
NBD_NATS = str(Path(sys.executable).parent / "nbd-nats")
GiB = 1 << 30
BLOCK = 64 << 10
FIGURES = ("seconds", "wire_bytes", "dirty_bytes", "cpu_seconds")
SCHEMA = 1
PASSWORD = "bench-incremental"  # a throwaway repository's password, not a secret


def say(text: str) -> None:
    print(f"bench.incremental: {text}", file=sys.stderr, flush=True)


def clock_ticks(pid: int) -> float:
    """CPU seconds of a process and its reaped children (utime, stime, cutime, cstime)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def make_disk(path: Path, size: int) -> None:
    """A qcow2 of ``size`` bytes, every byte random data."""
    raw = path.with_suffix(".raw")
    with raw.open("wb") as f:
        left = size
        while left:
            n = min(left, 64 << 20)
            f.write(os.urandom(n))
            left -= n
    subprocess.run(
        ["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(path)], check=True
    )
    raw.unlink()


def rewrite(path: Path, size: int, fraction: float, seed: int) -> int:
    """Rewrite ``fraction`` of the disk in 64 KiB writes at random aligned offsets; the
    bytes written (distinct blocks only)."""
    rng = random.Random(seed)
    blocks = rng.sample(range(size // BLOCK), max(1, int(size * fraction) // BLOCK))
    cmds: list[str] = []
    for b in sorted(blocks):
        cmds += ["-c", f"write -P {rng.randrange(1, 255)} {b * BLOCK} {BLOCK}"]
    subprocess.run(["qemu-io", "-f", "qcow2", *cmds, str(path)], check=True, capture_output=True)
    return len(blocks) * BLOCK


def sha256_of_disk(path: Path, work: Path) -> str:
    raw = work / "check.raw"
    subprocess.run(["qemu-img", "convert", "-q", "-O", "raw", str(path), str(raw)], check=True)
    try:
        return sha256_file(raw)
    finally:
        raw.unlink()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


class Agents:
    """The two agents, as separate processes, and the ctl command line against them."""

    def __init__(self, work: Path, url: str) -> None:
        self.work = work
        self.url = url
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, disk: Path) -> None:
        env = {**os.environ, "RESTIC_PASSWORD": PASSWORD, "NBDNATS_STATE_DIR": str(self.work)}
        common = ["--ctl-url", self.url, "--data-url", self.url, "--allow", str(self.work)]
        for node, extra in (("a", ["--export", f"disk={disk}"]), ("b", [])):
            log = (self.work / f"agent-{node}.log").open("wb")
            self.procs[node] = subprocess.Popen(
                [NBD_NATS, "agent", "--node", node, *common, *extra],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            nodes = self.ctl("nodes", "--json", check=False)
            if nodes.returncode == 0 and {"a", "b"} <= set(_node_names(nodes.stdout)):
                return
            time.sleep(0.2)
        raise RuntimeError("the agents did not announce themselves within 60 s")

    def cpu(self) -> float:
        return sum(clock_ticks(p.pid) for p in self.procs.values())

    def ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [NBD_NATS, "ctl", "--ctl-url", self.url, *args],
            capture_output=True,
            text=True,
            timeout=3600,
        )
        if check and proc.returncode != 0:
            raise RuntimeError(f"nbd-nats ctl {' '.join(args[:2])} failed: {proc.stderr.strip()}")
        return proc

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _node_names(text: str) -> list[str]:
    names = []
    for line in text.splitlines():
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        items = doc if isinstance(doc, list) else [doc]
        names += [str(n.get("node")) for n in items if isinstance(n, dict)]
    return names


def backup(agents: Agents, repo: Path, incremental: bool) -> dict[str, Any]:
    args = ["backup", "a:disk", "b", "--restic", str(repo), "--json"]
    args += ["--incremental"] if incremental else []
    cpu = agents.cpu()
    start = time.monotonic()
    proc = agents.ctl(*args)
    seconds = time.monotonic() - start
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"seconds": round(seconds, 3), "cpu_seconds": round(agents.cpu() - cpu, 3), **report}


def figures(report: dict[str, Any]) -> dict[str, Any]:
    """The figures of one ``ctl backup --json`` report of one disk: an incremental run's
    lists its disks; a plain backup's is the two ends' reports."""
    if "disks" in report:
        d = report["disks"][0]
        return {k: d.get(k) for k in ("dirty_bytes", "kind", "snapshot")} | {
            "wire_bytes": d.get("sent_bytes")
        }
    sender = report.get("sender") or {}
    return {
        "wire_bytes": sender.get("sent_bytes"),
        "dirty_bytes": None,
        "kind": "full",
        "snapshot": None,
    }


def check_restore(agents: Agents, repo: Path, snapshot: str, disk: Path, work: Path) -> None:
    out = work / "restored.raw"
    agents.ctl("restore", "b", f"a:{out}", "--restic", str(repo), "--snapshot", snapshot)
    try:
        if sha256_file(out) != sha256_of_disk(disk, work):
            raise RuntimeError(f"snapshot {snapshot} does not restore to the disk it backed up")
    finally:
        out.unlink(missing_ok=True)


def summarize(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    return harness.summarize_figures(runs, FIGURES)


def ratios(full: dict[str, Any], incr: dict[str, Any]) -> dict[str, float | None]:
    def median(summary: dict[str, Any], name: str) -> float | None:
        s = summary.get(name)
        return s["median"] if s else None

    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 3) if a is not None and b else None

    return {
        "incremental_wire_per_dirty": ratio(
            median(incr, "wire_bytes"), median(incr, "dirty_bytes")
        ),
        "incremental_vs_full_seconds": ratio(median(incr, "seconds"), median(full, "seconds")),
        "incremental_vs_full_cpu": ratio(median(incr, "cpu_seconds"), median(full, "cpu_seconds")),
        "incremental_vs_full_wire": ratio(median(incr, "wire_bytes"), median(full, "wire_bytes")),
    }


async def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    size = int(args.size * GiB)
    disk = work / "disk.qcow2"
    say(f"making a {args.size:g} GiB qcow2 of random data")
    make_disk(disk, size)
    repos = {"full": work / "restic-full", "incremental": work / "restic-incr"}
    for r in repos.values():
        subprocess.run(
            ["restic", "init", "--repo", str(r), "-q"],
            check=True,
            env={**os.environ, "RESTIC_PASSWORD": PASSWORD},
        )
    runs: list[dict[str, Any]] = []
    async with EmbeddedServer(jetstream=True) as url:
        agents = Agents(work, url)
        try:
            agents.start(disk)
            say("first incremental run (full, starts the chain; not recorded)")
            backup(agents, repos["incremental"], incremental=True)
            for i in range(1, args.rounds + 1):
                changed = rewrite(disk, size, args.change / 100, seed=i)
                for kind in ("full", "incremental"):
                    r = backup(agents, repos[kind], incremental=kind == "incremental")
                    run_ = {"round": i, "mode": kind, "changed_bytes": changed}
                    run_ |= {"seconds": r["seconds"], "cpu_seconds": r["cpu_seconds"]}
                    run_ |= figures(r)
                    if kind == "incremental":
                        if run_["kind"] != "incremental":
                            raise RuntimeError(f"round {i}: the incremental run was {run_['kind']}")
                        check_restore(agents, repos[kind], str(run_["snapshot"]), disk, work)
                    say(
                        f"round {i} {kind}: {run_['seconds']:.2f} s, wire {run_['wire_bytes']} B, "
                        f"dirty {run_['dirty_bytes']} B, cpu {run_['cpu_seconds']:.2f} s"
                    )
                    runs.append(run_)
        finally:
            agents.stop()
    return {"runs": runs, "size": size}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.incremental", description=__doc__.split("\n")[0]
    )
    p.add_argument("--rounds", type=int, default=3, help="rounds (default: 3)")
    p.add_argument("--size", type=float, default=2, help="disk size in GiB (default: 2)")
    p.add_argument(
        "--change", type=float, default=1, help="percent of the disk rewritten per round (1)"
    )
    p.add_argument("--out", type=Path, help="results directory")
    p.add_argument("--workdir", type=Path, help="where the disk and repositories go")
    args = p.parse_args(argv)
    if args.rounds < 1 or not 0 < args.size <= 64 or not 0 < args.change <= 50:
        p.error("--rounds >= 1, 0 < --size <= 64 and 0 < --change <= 50")
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    out_dir = args.out or REPO / "bench" / "results" / f"{stamp}-incremental"
    with tempfile.TemporaryDirectory(prefix="nbdnats-bench-incr-", dir=args.workdir) as work:
        done = asyncio.run(run(args, Path(work)))
    runs = done["runs"]
    summary = {m: summarize([r for r in runs if r["mode"] == m]) for m in ("full", "incremental")}
    results = {
        "schema": SCHEMA,
        "benchmark": "incremental",
        "config": {
            "rounds": args.rounds,
            "disk_bytes": done["size"],
            "change_percent": args.change,
        },
        "machine": {"cores": os.cpu_count(), "commit": _commit()},
        "summary": summary,
        "ratios": ratios(summary["full"], summary["incremental"]),
        "goals": {"incremental_wire_per_dirty": 1.05, "incremental_vs_full_seconds": 0.1},
        "runs": runs,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps({"summary": summary, "ratios": results["ratios"]}, indent=1), flush=True)
    say(f"wrote {out_dir / 'results.json'}")
    return 0


def _commit() -> str:
    out = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    return out.stdout.strip() or "unknown"


if __name__ == "__main__":
    sys.exit(main())
