"""Profile one transfer of the benchmark with perf: where does each process spend its CPU?

    python -m bench.profile [--path nbdnats|ceiling|nbdcopy] [--size BYTES] [--out DIR]

Sets up the macro benchmark's random image, qemu-nbd endpoints and nats-server, runs the
path once unprofiled (warm-up), then once under ``perf record -a -e cpu-clock`` (the
software clock, so it works where hardware counters are missing), and writes
``DIR/perf.data``, ``DIR/run.json`` (the measured run, with each role's pid) and
``DIR/report.txt``: the share of samples by process and the hottest symbols of each role.
Needs ``perf`` (Debian linux-perf) and root or a low ``kernel.perf_event_paranoid``.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.harness import CEILING, NBDCOPY, NBDNATS, RANDOM, GiB, Run
from bench.run import FULL, REPO, Bench, Profile, Services, say, workspace

SAMPLE = re.compile(
    r"^\s*(?P<comm>.+?)\s+(?P<pid>-?\d+)/(?P<tid>-?\d+)\s+[0-9a-f]+\s+(?P<sym>.*?)\s+"
    r"\((?P<dso>[^)]*)\)\s*$"
)


@dataclass
class Samples:
    total: int = 0
    symbols: Counter[str] = field(default_factory=Counter)
    threads: Counter[str] = field(default_factory=Counter)


def samples_by_process(data: Path) -> dict[int, Samples]:
    """Samples per process (not per thread, as ``perf report --sort pid`` would)."""
    cmd = ["perf", "script", "-i", str(data), "-F", "comm,pid,tid,ip,sym,dso"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    procs: dict[int, Samples] = defaultdict(Samples)
    for line in out.stdout.splitlines():
        m = SAMPLE.match(line)
        if not m:
            continue
        s = procs[int(m["pid"])]
        s.total += 1
        dso = Path(m["dso"]).name
        s.symbols[f"{dso}: {m['sym'] or '?'}"] += 1
        s.threads[m["comm"]] += 1
    return procs


def describe(name: str, s: Samples, freq: int, top: int) -> list[str]:
    lines = [f"== {name}: {s.total} samples = {s.total / freq:.2f} CPU s"]
    lines.append(
        "   threads: " + ", ".join(f"{t} {n / s.total:.0%}" for t, n in s.threads.most_common(6))
    )
    lines += [f"   {n / s.total:6.1%}  {sym}" for sym, n in s.symbols.most_common(top)]
    return lines


def run_once(bench: Bench, path: str, rnd: int) -> Run:
    if path == NBDCOPY:
        return bench.nbdcopy(RANDOM, rnd, "random")
    return bench.nbdnats(RANDOM, rnd, None if path == CEILING else "random")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    p.add_argument("--path", choices=[NBDNATS, CEILING, NBDCOPY], default=NBDNATS)
    p.add_argument("--size", type=int, default=2 * GiB, help="random image size in bytes")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "profile")
    p.add_argument("--freq", type=int, default=999, help="samples per second per CPU")
    p.add_argument("--top", type=int, default=25, help="symbols shown per role")
    args = p.parse_args(argv)
    if shutil.which("perf") is None:
        say("perf not found: apt-get install linux-perf")
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    data = args.out / "perf.data"
    profile = Profile(
        **{
            **FULL.__dict__,
            "random_size": args.size,
            "sparse_size": 16 << 20,
            "sparse_data": 1 << 20,
        }
    )
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with workspace(None) as work:
        services = Services(work)
        bench = Bench(profile, work, services)
        try:
            bench.setup()
            run_once(bench, args.path, -1)
            perf = subprocess.Popen(
                [
                    "perf",
                    "record",
                    "-q",
                    "-a",
                    "-e",
                    "cpu-clock",
                    "-F",
                    str(args.freq),
                    "-o",
                    str(data),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(1.0)  # perf attaches to every CPU
            try:
                # Round 1: no byte-for-byte comparison after the run inside the profile.
                run = run_once(bench, args.path, 1)
            finally:
                perf.send_signal(signal.SIGINT)
                perf.wait(60)
        finally:
            services.close()
    (args.out / "run.json").write_text(json.dumps(run.to_json(), indent=1) + "\n")
    procs = samples_by_process(data)
    sections = [
        f"{args.path}: {run.size / GiB:g} GiB in {run.seconds:.2f} s = {run.mb_s:.0f} MB/s",
        "cpu s (measured): " + " ".join(f"{k}={v:.2f}" for k, v in run.cpu.items()),
        "minor faults: " + " ".join(f"{k}={v}" for k, v in run.faults.items()),
        f"perf: {sum(p.total for p in procs.values())} samples at {args.freq} Hz per CPU, "
        f"idle {procs[0].total if 0 in procs else 0}",
    ]
    roles = {pid: role for role, pid in run.pids.items()}
    for pid, s in sorted(procs.items(), key=lambda kv: -kv[1].total):
        if pid in roles:
            sections += ["", *describe(f"{roles[pid]} (pid {pid})", s, args.freq, args.top)]
    others = [(pid, s) for pid, s in procs.items() if pid not in roles and pid != 0]
    sections += [
        "",
        "== other processes: "
        + ", ".join(
            f"{s.threads.most_common(1)[0][0]}({pid}) {s.total}"
            for pid, s in sorted(others, key=lambda kv: -kv[1].total)[:8]
        ),
    ]
    text = "\n".join(sections) + "\n"
    (args.out / "report.txt").write_text(text)
    print(text)
    say(f"wrote {args.out}/report.txt and perf.data (perf report -i {data})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
