"""Live migration over NATS against its baseline, in one run: ``nbd-nats migrate`` (every
byte between the QEMUs through the core and a nats-server) and ``nbd-nats migrate --direct``
(the QEMUs' unix sockets joined, no NATS), interleaved round by round (nats, direct, nats,
direct, ...) on the test guest; the NATS path's figures are reported as ratios to the
baseline's medians.

    python -m bench.migrate [--rounds N] [--data MIB] [--out DIR] [--modes nats,direct]

Each round boots a source VM (the test guest of bench/vm.py, which keeps writing a counter
to its disk with O_DIRECT and fsync) on a 256 MiB qcow2 disk holding ``--data`` MiB of
pattern data, waits until the guest writes, starts the destination with
``-incoming defer -S`` and an empty disk of the same size, and times ``nbd-nats migrate``.
Each run is checked: the destination must run on, and its disk must hold every write the
guest saw acknowledged (a run that loses one fails the benchmark). Figures per run:

- total_seconds: the tool's own clock, first QMP command to the destination resumed
- wall_seconds: the whole ``nbd-nats migrate`` process, interpreter start included
- downtime_ms: QEMU's ``query-migrate`` downtime (source VM stopped until sent)
- paused_ms: the source's STOP event until the destination's RESUME event
- disk_bytes, ram_bytes: the mirror's progress and the RAM sent

Writes ``results.json`` (every run, median/min/max of each figure, the machine) into
``bench/results/<UTC time>-migrate/`` unless ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import harness, vm

REPO = Path(__file__).resolve().parent.parent
NBD_NATS = str(Path(sys.executable).parent / "nbd-nats")
DISK = 256 * vm.MiB
FIGURES = ("total_seconds", "wall_seconds", "downtime_ms", "paused_ms", "disk_bytes", "ram_bytes")
SCHEMA = 1


def say(text: str) -> None:
    print(f"bench.migrate: {text}", file=sys.stderr, flush=True)


def one_run(
    work: Path, round_: int, data_mib: int, mode: str, return_path: bool = False
) -> dict[str, Any]:
    d = work / f"round{round_}-{mode}"
    d.mkdir()
    source = vm.VM("src", d, vm.make_disk(d / "src.qcow2", DISK, data_mib))
    dest = vm.VM("dst", d, vm.make_disk(d / "dst.qcow2", DISK), incoming=True, paused=True)
    try:
        source.start()
        source.wait_counter(10, timeout=120)
        dest.start()
        argv = [NBD_NATS, "migrate", "--src-qmp", source.qmp, "--dst-qmp", dest.qmp, "--json"]
        argv += ["--direct"] if mode == "direct" else []
        argv += ["--return-path"] if return_path else []
        start = time.monotonic()
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=600)
        wall = time.monotonic() - start
        if proc.returncode != 0:
            raise RuntimeError(f"round {round_}: nbd-nats migrate failed: {proc.stderr.strip()}")
        report = json.loads(proc.stdout)
        # The check: the guest goes on, and no acknowledged write is missing.
        dest.wait_counter(source.last_counter() + 3, timeout=60)
        dest.command("stop")
        last = dest.last_counter()
        dest.stop()
        missing = vm.missing_writes(vm.disk_records(dest.disk, d), last)
        if missing:
            raise RuntimeError(f"round {round_}: acknowledged writes lost: {missing[:10]}")
        return {"round": round_, "mode": mode, "wall_seconds": round(wall, 3), **report}
    finally:
        source.stop()
        dest.stop()
        for f in d.glob("*.qcow2"):
            f.unlink()


def machine() -> dict[str, Any]:
    return {
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "qemu": harness.first_line([vm.QEMU, "--version"]),
        "accel": vm.accel(),
        "guest_memory_mib": vm.MEMORY_MIB,
        "commit": harness.first_line(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]),
    }


def ratios(by_mode: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """nats / direct for the medians of total time, downtime and pause."""
    out: dict[str, float | None] = {}
    for name in ("total_seconds", "wall_seconds", "downtime_ms", "paused_ms"):
        ours, base = (by_mode.get(m, {}).get(name) for m in ("nats", "direct"))
        ok = ours and base and base["median"]
        out[name] = round(ours["median"] / base["median"], 2) if ok else None  # type: ignore[index]
    return out


def summarize(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    return harness.summarize_figures(runs, FIGURES)


def format_table(summary: dict[str, Any]) -> str:
    return harness.figure_table(summary, FIGURES, digits=3)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.migrate", description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=5, help="migrations to run (default: 5)")
    p.add_argument(
        "--data",
        type=int,
        default=64,
        metavar="MIB",
        help="MiB of data on the 256 MiB source disk (default: 64)",
    )
    p.add_argument(
        "--modes",
        default="nats,direct",
        help="comma-separated, run interleaved: nats (through NATS), direct "
        "(the baseline); default both",
    )
    p.add_argument(
        "--return-path", action="store_true", help="migrate with QEMU's return path on (both paths)"
    )
    p.add_argument("--out", type=Path, help="results directory")
    p.add_argument("--workdir", type=Path, help="where the disks go (default: a temp dir)")
    args = p.parse_args(argv)
    if args.rounds < 1 or not 0 <= args.data <= 200:
        p.error("--rounds must be at least 1 and --data between 0 and 200")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in ("nats", "direct") for m in modes):
        p.error("--modes takes nats and/or direct")
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    out_dir = args.out or REPO / "bench" / "results" / f"{stamp}-migrate"
    info = machine()
    say(
        f"{args.rounds} rounds of {', '.join(modes)}, {info['accel']}, {args.data} MiB of disk data"
    )
    runs = []
    with tempfile.TemporaryDirectory(prefix="nbdnats-bench-mig-", dir=args.workdir) as work:
        for i in range(1, args.rounds + 1):
            for mode in modes:
                run = one_run(Path(work), i, args.data, mode, args.return_path)
                say(
                    f"round {i} {mode}: total {run['total_seconds']:.2f} s, downtime "
                    f"{run['downtime_ms']} ms, paused {run['paused_ms']} ms"
                )
                runs.append(run)
    summary = {m: summarize([r for r in runs if r["mode"] == m]) for m in modes}
    results = {
        "schema": SCHEMA,
        "benchmark": "migrate",
        "modes": modes,
        "config": {
            "rounds": args.rounds,
            "disk_bytes": DISK,
            "data_mib": args.data,
            "return_path": args.return_path,
        },
        "machine": info,
        "summary": summary,
        "ratio_nats_vs_direct": ratios(summary),
        "runs": runs,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    for m in modes:
        print(f"{m}:\n{format_table(summary[m])}", flush=True)
    print(f"nats / direct (medians): {results['ratio_nats_vs_direct']}", flush=True)
    say(f"wrote {out_dir / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
