"""The ctl plane under load: the round trip of ctl queries to an agent, idle and while
uncapped transfers saturate the nats-server that carries both planes.

    python -m bench.ctl_load [--copies N] [--size BYTES] [--rounds N] [--load-nice N]

Each round starts a nats-server (the embedded default's config, with JetStream and its
monitoring port) and a real ``nbd-nats agent``, asks the agent ``ctl.qry.<node>.info``
through a ``Controller`` one query after another (``--idle-samples`` of them), then starts
``--copies`` processes of ``nbd-nats copy pattern:SIZE null:`` on the same server (every
byte goes through it twice, in and out, and nothing else limits them) and keeps asking
until the last copy has ended. Figures per round:

- idle and loaded round trip in ms: p50, p99, max, and the number of samples
- p99_ratio: loaded p99 / idle p99
- load_mb_s: the bytes the copies moved over the time from the first start to the last
  exit (decimal MB/s); server_in_mb_s: what the server read over that time (its ``/varz``)
- slow_consumers: the server's count after the round (a ctl connection it cut off would
  show here)

``--load-nice N`` runs the copies at that niceness: with the copies behind the agent, the
server and the sampler for the CPU, what is left of the loaded tail is the server's own
(bench/README.md and docs/shaping.md: the tail on a small machine is CPU scheduling).

Writes ``results.json`` (every round, median/min/max of each figure, the machine) into
``bench/results/<UTC time>-ctl/`` unless ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.request import urlopen

from bench import harness
from nbdnats import _core
from nbdnats.ctl.controller import Controller
from nbdnats.embedded import EmbeddedServer, bulk_env, free_port, nats_server_binary
from nbdnats.errors import UsageError
from nbdnats.units import parse_size

REPO = Path(__file__).resolve().parent.parent
NBD_NATS = str(Path(sys.executable).parent / "nbd-nats")
NODE = "bench"
SCHEMA = 1
FIGURES = (
    "idle_p50_ms",
    "idle_p99_ms",
    "loaded_p50_ms",
    "loaded_p99_ms",
    "loaded_max_ms",
    "p99_ratio",
    "load_mb_s",
    "server_in_mb_s",
)
START_TIMEOUT = 20.0


def say(text: str) -> None:
    print(f"bench.ctl_load: {text}", file=sys.stderr, flush=True)


def percentile(samples: Sequence[float], pct: int) -> float:
    return statistics.quantiles(samples, n=100, method="inclusive")[pct - 1]


def latency(samples: Sequence[float]) -> dict[str, float]:
    return {
        "p50": round(statistics.median(samples), 3),
        "p99": round(percentile(samples, 99), 3),
        "max": round(max(samples), 3),
        "n": len(samples),
    }


async def round_trips(
    controller: Controller, *, count: int = 0, until: Callable[[], bool] | None = None
) -> list[float]:
    """Milliseconds of info queries one after another: ``count`` of them, or as many as are
    answered before ``until()`` holds."""
    out: list[float] = []
    while (until is None and len(out) < count) or (until is not None and not until()):
        start = time.perf_counter()
        await controller.info(NODE)
        out.append((time.perf_counter() - start) * 1000)
    return out


def wait_until(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not come up within {START_TIMEOUT:.0f} s")
        time.sleep(0.05)


def varz(monitor: int) -> dict[str, Any]:
    with urlopen(f"http://127.0.0.1:{monitor}/varz", timeout=5) as r:
        return json.load(r)  # type: ignore[no-any-return]


def one_round(work: Path, round_: int, args: argparse.Namespace) -> dict[str, Any]:
    d = work / f"round{round_}"
    d.mkdir()
    cfg = EmbeddedServer(jetstream=True)
    cfg.port = free_port()
    monitor = free_port()
    conf = d / "nats.conf"
    conf.write_text(cfg.config(d / "js") + f'http: "127.0.0.1:{monitor}"\n')
    procs: list[subprocess.Popen[bytes]] = []
    with (d / "nats.log").open("wb") as log:
        server = subprocess.Popen(
            [nats_server_binary(), "-c", str(conf)],
            stdout=log,
            stderr=log,
            env={**os.environ, **bulk_env()},
        )
    procs.append(server)
    try:
        wait_until(lambda: _up(monitor), "nats-server")
        agent_log = d / "agent.log"
        with agent_log.open("wb") as log:
            argv = [NBD_NATS, "agent", "--node", NODE, "--ctl-url", cfg.url, "--data-url", cfg.url]
            procs.append(subprocess.Popen(argv, stdout=log, stderr=log))
        wait_until(lambda: b" up on " in agent_log.read_bytes(), "the agent")
        nice = ["nice", "-n", str(args.load_nice)] if args.load_nice else []
        load_argv = [*nice, NBD_NATS, "copy", f"pattern:{args.size}", "null:"]
        load_argv += ["--data-url", cfg.url, "--json", "-q"]

        async def measure() -> tuple[list[float], list[float], float, list[str]]:
            async with await Controller.connect(cfg.url) as controller:
                await round_trips(controller, count=20)
                idle = await round_trips(controller, count=args.idle_samples)
                before = varz(monitor)["in_bytes"]
                start = time.monotonic()
                loads = [
                    subprocess.Popen(load_argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                    for _ in range(args.copies)
                ]
                procs.extend(loads)
                loaded = await round_trips(
                    controller, until=lambda: all(p.poll() is not None for p in loads)
                )
                seconds = time.monotonic() - start
                server_in = varz(monitor)["in_bytes"] - before
                outputs = []
                for p in loads:
                    out, err = p.communicate()
                    if p.returncode != 0:
                        raise RuntimeError(f"round {round_}: copy failed: {err.decode().strip()}")
                    outputs.append(out.decode())
                return idle, loaded, seconds, [str(server_in), *outputs]

        idle, loaded, seconds, (server_in, *reports) = asyncio.run(measure())
        copies = [json.loads(r.strip().splitlines()[-1]) for r in reports]
        moved = sum(int(c["size"]) for c in copies)
        slow = varz(monitor)["slow_consumers"]
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
    i, lo = latency(idle), latency(loaded)
    return {
        "round": round_,
        "idle": i,
        "loaded": lo,
        "idle_p50_ms": i["p50"],
        "idle_p99_ms": i["p99"],
        "loaded_p50_ms": lo["p50"],
        "loaded_p99_ms": lo["p99"],
        "loaded_max_ms": lo["max"],
        "p99_ratio": round(lo["p99"] / i["p99"], 1),
        "load_seconds": round(seconds, 3),
        "load_mb_s": round(moved / 1e6 / seconds, 1),
        "server_in_mb_s": round(int(server_in) / 1e6 / seconds, 1),
        "copies_mb_s": [c["mb_per_s"] for c in copies],
        "slow_consumers": slow,
        "loadavg_after": os.getloadavg()[0],
    }


def _up(monitor: int) -> bool:
    try:
        varz(monitor)
    except OSError:
        return False
    return True


def machine() -> dict[str, Any]:
    return {
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "nats_server": harness.first_line([nats_server_binary(), "--version"]),
        "core": _core.__version__,
        "commit": harness.first_line(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]),
    }


def summarize(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    return harness.summarize_figures(runs, FIGURES)


def format_table(summary: dict[str, Any]) -> str:
    return harness.figure_table(summary, FIGURES, digits=2)


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ctl_load", description=__doc__.split("\n")[0])
    p.add_argument("--copies", type=int, default=2, help="uncapped copies at once (default: 2)")
    p.add_argument(
        "--size",
        type=_size,
        default=4 << 30,
        metavar="BYTES",
        help="bytes each copy moves, K/M/G suffixes (default: 4G)",
    )
    p.add_argument("--rounds", type=int, default=3, help="rounds (default: 3)")
    p.add_argument(
        "--idle-samples", type=int, default=500, metavar="N", help="idle queries (default: 500)"
    )
    p.add_argument(
        "--load-nice",
        type=int,
        default=0,
        metavar="N",
        help="run the copies at this niceness, 0-19 (default: 0, as the agent)",
    )
    p.add_argument("--out", type=Path, help="results directory")
    args = p.parse_args(argv)
    if args.copies < 1 or args.rounds < 1 or args.idle_samples < 100:
        p.error("--copies and --rounds must be at least 1, --idle-samples at least 100")
    if not 0 <= args.load_nice <= 19:
        p.error("--load-nice takes 0 to 19")
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    out_dir = args.out or REPO / "bench" / "results" / f"{stamp}-ctl"
    info = machine()
    say(
        f"{args.rounds} rounds, {args.copies} copies of {args.size} bytes each, "
        f"{info['cores']} cores, load nice {args.load_nice}"
    )
    runs = []
    with tempfile.TemporaryDirectory(prefix="nbdnats-bench-ctl-") as work:
        for i in range(1, args.rounds + 1):
            run = one_round(Path(work), i, args)
            say(
                f"round {i}: idle p99 {run['idle_p99_ms']} ms, loaded p50 "
                f"{run['loaded_p50_ms']} p99 {run['loaded_p99_ms']} max "
                f"{run['loaded_max_ms']} ms ({run['loaded']['n']} samples), load "
                f"{run['load_mb_s']} MB/s"
            )
            runs.append(run)
    summary = summarize(runs)
    results = {
        "schema": SCHEMA,
        "benchmark": "ctl_load",
        "config": {
            "copies": args.copies,
            "size": args.size,
            "rounds": args.rounds,
            "idle_samples": args.idle_samples,
            "load_nice": args.load_nice,
        },
        "machine": info,
        "summary": summary,
        "runs": runs,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(format_table(summary), flush=True)
    say(f"wrote {out_dir / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
