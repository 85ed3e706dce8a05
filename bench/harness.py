"""Pure logic of the benchmark suite: one measured run, statistics over rounds, the results
document (``results.json``) and the evaluation of the project's performance targets.

Nothing here starts a process or reads the clock, so it is checked by unit tests on
made-up numbers (``tests/unit/test_bench_harness.py``).

Conventions (also in bench/README.md):

- MB/s is decimal (10^6 bytes per second) of the image's *virtual* size over the wall-clock
  time of the whole command (for nbd-nats: from starting the sender until both sender and
  receiver have exited, so interpreter start-up and the handshake count).
- CPU s/GiB is user+system CPU seconds of one process divided by the image's virtual size
  in GiB.
- Top-level figures are medians over the rounds; ratios are medians of the ratios of runs
  in the same round (paired, so slow drift of the machine cancels). Peak RSS and target
  allocation are bounds, so the top level shows the worst (largest) run; ``detail`` has
  median, min and max of every figure.
"""

from __future__ import annotations

import statistics
import subprocess
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

SCHEMA = 1

# The three ways of moving the bytes, and the processes each run measures.
NBDCOPY, NBDNATS, CEILING = "nbdcopy", "nbdnats", "ceiling"
PATHS = (NBDCOPY, NBDNATS, CEILING)
ROLES = ("nbdcopy", "sender", "receiver", "nats_server", "qemu_nbd_src", "qemu_nbd_dst")

# Workloads: the two images of the macro benchmark and the two sweeps (over the random image).
RANDOM, SPARSE, CHUNK_SWEEP, WINDOW_SWEEP = "random", "sparse", "chunk", "window"
# A 1 MiB pattern: -> null: transfer, whose wall time is the fixed cost of one transfer.
STARTUP = "startup"
STARTUP_SIZE = 1 * MiB

# The targets of issue 4.
MIN_RATIO_VS_CEILING = 0.9
MIN_RATIO_VS_NBDCOPY = 0.75
MAX_SPARSE_TIME_RATIO = 1.5
MAX_CPU_RATIO = 1.5
RSS_HEADROOM = 64 * MiB
# A run during which other processes used more than this share of the machine is disturbed.
DISTURBED = 0.10


@dataclass
class Run:
    """One measured transfer."""

    workload: str
    path: str
    round: int
    size: int
    """Virtual size of the image in bytes."""
    seconds: float
    """Wall clock of the whole command (both processes for nbd-nats)."""
    chunk: int | None = None
    """Chunk size (nbd-nats) or request size (nbdcopy) asked for; None: the default."""
    window: int | None = None
    """Window asked for; None: the default."""
    core_seconds: float | None = None
    """Transfer time nbd-nats itself reports (--json), from the handshake to the end."""
    granted_chunk: int | None = None
    granted_window: int | None = None
    cpu: dict[str, float] = field(default_factory=dict)
    """User+system CPU seconds by role (see ROLES)."""
    peak_rss: dict[str, int] = field(default_factory=dict)
    """Peak resident set size in bytes by role (processes started for this run only)."""
    faults: dict[str, int] = field(default_factory=dict)
    """Minor page faults by role (a sign of buffers allocated afresh for every chunk)."""
    pids: dict[str, int] = field(default_factory=dict)
    """Process ids by role, to match the run with a profile."""
    target_allocated: int | None = None
    """Bytes allocated to the target file after the run (sparse workload)."""
    foreign_cpu: float | None = None
    """CPU seconds that other processes of the machine used during the run (disturbance)."""
    identical: bool | None = None
    """The target was compared byte for byte with the source (None: not compared)."""
    error: str | None = None
    discarded: str | None = None
    """Why the run was repeated and left out of the figures (disturbed by other processes)."""

    @property
    def ok(self) -> bool:
        return self.error is None and self.discarded is None and self.seconds > 0

    @property
    def mb_s(self) -> float:
        return self.size / 1e6 / self.seconds if self.seconds > 0 else 0.0

    @property
    def core_mb_s(self) -> float | None:
        if not self.core_seconds:
            return None
        return self.size / 1e6 / self.core_seconds

    def cpu_per_gib(self, *roles: str) -> float | None:
        """CPU seconds per GiB of the image, summed over ``roles``; None if one is missing."""
        if self.size <= 0 or any(r not in self.cpu for r in roles):
            return None
        return sum(self.cpu[r] for r in roles) / (self.size / GiB)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["mb_s"] = round(self.mb_s, 1) if self.ok else None
        out["cpu_s_per_gib"] = {r: round(v / (self.size / GiB), 4) for r, v in self.cpu.items()}
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Run:
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass(frozen=True)
class Spread:
    median: float
    min: float
    max: float
    n: int

    def to_json(self) -> dict[str, float | int]:
        return {"median": self.median, "min": self.min, "max": self.max, "n": self.n}


def spread(values: Iterable[float | None]) -> Spread | None:
    """Median, min and max of the values that are there; None when there are none."""
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return None
    return Spread(statistics.median(xs), min(xs), max(xs), len(xs))


def first_line(args: list[str]) -> str:
    """The first line a program prints (a version), or "unknown"; bounded."""
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


def summarize_figures(runs: Sequence[dict[str, Any]], figures: Sequence[str]) -> dict[str, Any]:
    """Each figure's spread over rounds (a dict per round), as JSON; None when no round has
    it. The figure benchmarks (migrate, incremental, ctl_load) summarize this way."""
    out: dict[str, Any] = {}
    for name in figures:
        s = spread(r.get(name) for r in runs)
        out[name] = s.to_json() if s else None
    return out


def figure_table(summary: dict[str, Any], figures: Sequence[str], digits: int = 2) -> str:
    """A markdown table of ``summarize_figures``: median, min - max per figure."""

    def num(v: float) -> str:
        return str(int(v)) if float(v).is_integer() else f"{v:.{digits}f}"

    lines = ["| figure | median | min - max |", "|---|---|---|"]
    for name in figures:
        s = summary.get(name)
        if s:
            lines.append(f"| {name} | {num(s['median'])} | {num(s['min'])} - {num(s['max'])} |")
    return "\n".join(lines)


def select(runs: Iterable[Run], workload: str, path: str, **match: int | None) -> list[Run]:
    """The successful runs of one workload and path, optionally with chunk/window equal."""
    return [
        r
        for r in runs
        if r.ok
        and r.workload == workload
        and r.path == path
        and all(getattr(r, k) == v for k, v in match.items())
    ]


def paired(
    runs: Sequence[Run], workload: str, a: str, b: str, f: Callable[[Run, Run], float]
) -> list[float]:
    """``f(run of a, run of b)`` for every round in which both succeeded."""
    by_round = {r.round: r for r in select(runs, workload, b)}
    return [f(ra, by_round[ra.round]) for ra in select(runs, workload, a) if ra.round in by_round]


def _per_gib(run: Run, value: float | None) -> float | None:
    return None if value is None else value / (run.size / GiB)


def _ratio(x: float | None, y: float | None) -> float | None:
    return x / y if x is not None and y else None


def build_results(
    runs: Sequence[Run],
    *,
    machine: dict[str, Any],
    config: dict[str, Any],
    source_allocated: int | None = None,
    micro: dict[str, Any] | None = None,
    floor: dict[str, float] | None = None,
) -> dict[str, Any]:
    """The results document: headline figures, their spread, sweeps, targets and runs."""
    detail: dict[str, Spread | None] = {}

    def put(key: str, values: Iterable[float | None]) -> None:
        detail[key] = spread(values)

    rnd = {p: select(runs, RANDOM, p) for p in PATHS}
    sparse = {p: select(runs, SPARSE, p) for p in (NBDCOPY, NBDNATS)}

    put("nbdcopy_mb_s", (r.mb_s for r in rnd[NBDCOPY]))
    put("nbdnats_mb_s", (r.mb_s for r in rnd[NBDNATS]))
    put("nats_ceiling_mb_s", (r.mb_s for r in rnd[CEILING]))
    put("nbdnats_core_mb_s", (r.core_mb_s for r in rnd[NBDNATS]))
    put("nats_ceiling_core_mb_s", (r.core_mb_s for r in rnd[CEILING]))
    put("ratio_vs_nbdcopy", paired(runs, RANDOM, NBDNATS, NBDCOPY, lambda a, b: a.mb_s / b.mb_s))
    put("ratio_vs_ceiling", paired(runs, RANDOM, NBDNATS, CEILING, lambda a, b: a.mb_s / b.mb_s))
    put("sparse_seconds_nbdcopy", (r.seconds for r in sparse[NBDCOPY]))
    put("sparse_seconds_nbdnats", (r.seconds for r in sparse[NBDNATS]))
    put(
        "sparse_time_ratio",
        paired(runs, SPARSE, NBDNATS, NBDCOPY, lambda a, b: a.seconds / b.seconds),
    )
    put("startup_seconds_nbdnats", (r.seconds for r in select(runs, STARTUP, CEILING)))
    put("sparse_target_allocated_nbdnats", (r.target_allocated for r in sparse[NBDNATS]))
    put("sparse_target_allocated_nbdcopy", (r.target_allocated for r in sparse[NBDCOPY]))
    for role in ("sender", "receiver", "nats_server", "qemu_nbd_src", "qemu_nbd_dst"):
        put(f"cpu_s_per_gib_{role}", (r.cpu_per_gib(role) for r in rnd[NBDNATS]))
    put(
        "cpu_s_per_gib_sender_receiver", (r.cpu_per_gib("sender", "receiver") for r in rnd[NBDNATS])
    )
    put("cpu_s_per_gib_nbdcopy", (r.cpu_per_gib("nbdcopy") for r in rnd[NBDCOPY]))
    for path in PATHS:
        # Every process of the run: what bounds throughput when they share a few cores.
        put(f"cpu_s_per_gib_all_{path}", (r.cpu_per_gib(*r.cpu) for r in rnd[path]))
    for role in ("sender", "receiver", "qemu_nbd_src", "qemu_nbd_dst"):
        put(f"faults_per_gib_{role}", (_per_gib(r, r.faults.get(role)) for r in rnd[NBDNATS]))
    put("faults_per_gib_nbdcopy", (_per_gib(r, r.faults.get("nbdcopy")) for r in rnd[NBDCOPY]))
    put("peak_rss_sender", (r.peak_rss.get("sender") for r in rnd[NBDNATS]))
    put("peak_rss_receiver", (r.peak_rss.get("receiver") for r in rnd[NBDNATS]))
    put("peak_rss_nbdcopy", (r.peak_rss.get("nbdcopy") for r in rnd[NBDCOPY]))

    worst = {
        "peak_rss_sender",
        "peak_rss_receiver",
        "peak_rss_nbdcopy",
        "sparse_target_allocated_nbdnats",
        "sparse_target_allocated_nbdcopy",
    }
    results: dict[str, Any] = {"schema": SCHEMA}
    for key, s in detail.items():
        results[key] = None if s is None else (s.max if key in worst else s.median)
    cpu_ratio = _ratio(results["cpu_s_per_gib_sender_receiver"], results["cpu_s_per_gib_nbdcopy"])
    results["cpu_ratio_vs_nbdcopy"] = cpu_ratio
    results["sparse_source_allocated"] = source_allocated
    results["target_allocated"] = results["sparse_target_allocated_nbdnats"]
    granted = [r for r in rnd[NBDNATS] if r.granted_chunk and r.granted_window]
    results["chunk_size"] = granted[0].granted_chunk if granted else None
    results["window"] = granted[0].granted_window if granted else None
    results["cpu_s_per_gib"] = cpu_table(runs)
    results["sweep"] = sweeps(runs)
    results["machine"] = machine
    results["config"] = config
    results["detail"] = {k: None if s is None else s.to_json() for k, s in detail.items()}
    results["micro"] = micro or {}
    results["floor"] = floor or {}
    results["bounds"] = bounds(results)
    results["targets"] = evaluate_targets(results, runs)
    results["failed_runs"] = sum(1 for r in runs if r.error is not None)
    results["discarded_runs"] = sum(1 for r in runs if r.discarded is not None)
    shares = [foreign_share(r, machine.get("cores") or 1) for r in runs if r.ok]
    results["disturbed_runs"] = sum(1 for x in shares if x is not None and x > DISTURBED)
    s = spread(shares)
    results["foreign_cpu_share"] = None if s is None else s.to_json()
    results["runs"] = [r.to_json() for r in runs]
    return results


def bounds(results: dict[str, Any]) -> dict[str, Any]:
    """What the measured CPU costs allow, derived (not measured) from the medians:

    - ``all_cores_busy``: no path moves more than the machine's cores over the CPU seconds
      all of its processes need per GiB; ``nbdnats_mb_s`` is that most for nbd-nats, and the
      ratios divide it by the other paths' measured MB/s: upper bounds of the measured ratios.
    - ``core_per_process``: with a core for every process, the busiest process of a path
      sets its pace; the projected ratio is the inverse ratio of the busiest processes.
    - ``cpu_floor_vs_nbdcopy``: the kernel's socket costs alone for sender + receiver
      (``floor``) over nbdcopy's measured CPU per GiB.
    """
    allp = {p: results.get(f"cpu_s_per_gib_all_{p}") for p in PATHS}
    cores = (results.get("machine") or {}).get("cores")
    most = cores * GiB / 1e6 / allp[NBDNATS] if cores and allp[NBDNATS] else None
    table = (results.get("cpu_s_per_gib") or {}).get(RANDOM) or {}
    busiest = {
        p: max((table.get(p) or {}).items(), key=lambda kv: kv[1], default=None) for p in PATHS
    }
    floor = (results.get("floor") or {}).get("sender_receiver")

    def inverse(a: float | None, b: float | None) -> float | None:
        return round(a / b, 3) if a is not None and b else None

    def busy(p: str) -> float | None:
        b = busiest[p]
        return None if b is None else b[1]

    return {
        "all_cores_busy": {
            "nbdnats_mb_s": None if most is None else round(most, 1),
            "ratio_vs_ceiling": inverse(most, results.get("nats_ceiling_mb_s")),
            "ratio_vs_nbdcopy": inverse(most, results.get("nbdcopy_mb_s")),
        },
        "core_per_process": {
            "ratio_vs_ceiling": inverse(busy(CEILING), busy(NBDNATS)),
            "ratio_vs_nbdcopy": inverse(busy(NBDCOPY), busy(NBDNATS)),
            "busiest": {p: None if b is None else b[0] for p, b in busiest.items()},
        },
        "cpu_floor_vs_nbdcopy": inverse(floor, results.get("cpu_s_per_gib_nbdcopy")),
    }


def foreign_share(run: Run, cores: int) -> float | None:
    """The share of the machine's CPU that other processes took during the run."""
    if run.foreign_cpu is None or run.seconds <= 0:
        return None
    return run.foreign_cpu / (run.seconds * cores)


def cpu_table(runs: Sequence[Run]) -> dict[str, dict[str, dict[str, float] | None]]:
    """CPU s/GiB by workload, path and role: the medians behind the stacked plot."""
    table: dict[str, dict[str, dict[str, float] | None]] = {}
    for workload, paths in ((RANDOM, PATHS), (SPARSE, (NBDCOPY, NBDNATS))):
        for path in paths:
            chosen = select(runs, workload, path)
            roles: dict[str, float] = {}
            for role in ROLES:
                s = spread(r.cpu_per_gib(role) for r in chosen if role in r.cpu)
                if s is not None:
                    roles[role] = round(s.median, 4)
            table.setdefault(workload, {})[path] = roles or None
    return table


def sweeps(runs: Sequence[Run]) -> dict[str, list[dict[str, Any]]]:
    """Throughput by chunk size and by window for each path: median, min, max MB/s."""
    out: dict[str, list[dict[str, Any]]] = {CHUNK_SWEEP: [], WINDOW_SWEEP: []}
    for workload, key in ((CHUNK_SWEEP, "chunk"), (WINDOW_SWEEP, "window")):
        points = sorted({(r.path, getattr(r, key)) for r in runs if r.workload == workload})
        for path, value in points:
            chosen = select(runs, workload, path, **{key: value})
            s = spread(r.mb_s for r in chosen)
            cpu = spread(r.cpu_per_gib(*sorted(r.cpu)) for r in chosen)
            out[workload].append(
                {
                    "path": path,
                    key: value,
                    "mb_s": None if s is None else s.to_json(),
                    "cpu_s_per_gib_total": None if cpu is None else round(cpu.median, 4),
                }
            )
    return out


def _target(
    name: str, met: bool, value: float | None, limit: float | None, text: str
) -> dict[str, Any]:
    return {"name": name, "met": met, "value": value, "limit": limit, "text": text}


def evaluate_targets(results: dict[str, Any], runs: Sequence[Run]) -> list[dict[str, Any]]:
    """Met or missed, for each target of issue 4. A target without data is missed."""
    out: list[dict[str, Any]] = []
    b = results.get("bounds") or {}
    busy = b.get("all_cores_busy") or {}
    cores = (results.get("machine") or {}).get("cores")

    def at_least(name: str, key: str, limit: float, what: str) -> None:
        v = results.get(key)
        met = v is not None and v >= limit
        text = f"{what}: {_fmt(v)} (need >= {limit})"
        bound, most = busy.get(key), busy.get("nbdnats_mb_s")
        if bound is not None and most is not None:
            text += (
                f"; the CPU it takes allows at most {_fmt(bound)} "
                f"({most:.0f} MB/s with all {cores} cores busy)"
            )
        out.append(_target(name, met, v, limit, text))

    at_least(
        "throughput_vs_ceiling",
        "ratio_vs_ceiling",
        MIN_RATIO_VS_CEILING,
        "nbd-nats / raw NATS ceiling, random image",
    )
    at_least(
        "throughput_vs_nbdcopy",
        "ratio_vs_nbdcopy",
        MIN_RATIO_VS_NBDCOPY,
        "nbd-nats / nbdcopy, random image",
    )

    v = results.get("sparse_time_ratio")
    out.append(
        _target(
            "sparse_time",
            v is not None and v <= MAX_SPARSE_TIME_RATIO,
            v,
            MAX_SPARSE_TIME_RATIO,
            f"sparse image, nbd-nats time / nbdcopy time: {_fmt(v)} "
            f"(need <= {MAX_SPARSE_TIME_RATIO})",
        )
    )

    alloc, src = results.get("target_allocated"), results.get("sparse_source_allocated")
    chunk = max((r.granted_chunk or 0 for r in select(runs, SPARSE, NBDNATS)), default=0)
    limit = None if src is None or not chunk else src + chunk
    out.append(
        _target(
            "sparse_allocation",
            alloc is not None and limit is not None and alloc <= limit,
            alloc,
            limit,
            f"sparse target allocation, worst run: {_mib(alloc)} "
            f"(need <= source {_mib(src)} + one chunk {_mib(chunk)})",
        )
    )

    v = results.get("cpu_ratio_vs_nbdcopy")
    text = (
        f"(sender + receiver) CPU/GiB / nbdcopy CPU/GiB: {_fmt(v)} "
        f"({_fmt(results.get('cpu_s_per_gib_sender_receiver'))} vs "
        f"{_fmt(results.get('cpu_s_per_gib_nbdcopy'))} s/GiB; need <= {MAX_CPU_RATIO})"
    )
    floor, floor_ratio = (
        (results.get("floor") or {}).get("sender_receiver"),
        b.get("cpu_floor_vs_nbdcopy"),
    )
    if floor is not None and floor_ratio is not None:
        text += (
            f"; their sockets and checksums alone cost {_fmt(floor)} s/GiB ({_fmt(floor_ratio)}x)"
        )
    out.append(_target("cpu_per_gib", v is not None and v <= MAX_CPU_RATIO, v, MAX_CPU_RATIO, text))

    for role in ("sender", "receiver"):
        out.append(_rss_target(role, runs))
    return out


def _rss_target(role: str, runs: Sequence[Run]) -> dict[str, Any]:
    """Peak RSS <= granted window + 64 MiB, over every nbd-nats copy (all workloads and
    sweeps). Not the ceiling runs: their ``pattern:`` source holds a fill buffer of its own
    that a real source does not have. The text also names the worst run at the default
    chunk size, when that is not the worst run overall."""

    def worst_of(chosen: Iterable[Run]) -> tuple[int, Run] | None:
        worst: tuple[int, Run] | None = None
        for r in chosen:
            if not r.ok or r.path != NBDNATS or role not in r.peak_rss or not r.granted_window:
                continue
            excess = r.peak_rss[role] - (r.granted_window + RSS_HEADROOM)
            if worst is None or excess > worst[0]:
                worst = (excess, r)
        return worst

    worst = worst_of(runs)
    if worst is None:
        return _target(f"peak_rss_{role}", False, None, None, f"peak RSS of the {role}: no data")
    excess, r = worst
    default = worst_of(x for x in runs if x.chunk is None)
    rss, limit = r.peak_rss[role], (r.granted_window or 0) + RSS_HEADROOM
    sweep = {CHUNK_SWEEP: f"chunk {_mib(r.chunk)}", WINDOW_SWEEP: f"window {_mib(r.window)}"}
    where = f"{r.path}, " + sweep.get(r.workload, f"{r.workload} image")
    text = (
        f"peak RSS of the {role}, worst run ({where}): {_mib(rss)} "
        f"(need <= window {_mib(r.granted_window)} + 64 MiB)"
    )
    if default is not None and default[1] is not r:
        d = default[1]
        text += (
            f"; at the default chunk size worst {_mib(d.peak_rss[role])} "
            f"({d.workload}, limit {_mib((d.granted_window or 0) + RSS_HEADROOM)})"
        )
    return _target(f"peak_rss_{role}", excess <= 0, rss, limit, text)


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3g}"


def _mib(v: float | None) -> str:
    return "n/a" if v is None else f"{v / MiB:.1f} MiB"


def summary(results: dict[str, Any]) -> dict[str, Any]:
    """The results without the per-run list: small enough to commit as latest.json."""
    return {k: v for k, v in results.items() if k != "runs"}


def format_report(results: dict[str, Any]) -> str:
    """The text the suite prints at the end: figures with their spread, then the targets."""
    d = results["detail"]
    lines = ["", "figure                              median      min      max    n"]
    for key, s in d.items():
        if s is None:
            lines.append(f"{key:<32} {'n/a':>9}")
            continue
        scale, unit = (MiB, " MiB") if "rss" in key or "allocated" in key else (1, "")
        digits = 0 if s["max"] / scale >= 10_000 else 3
        med, lo, hi = (f"{s[k] / scale:.{digits}f}" for k in ("median", "min", "max"))
        lines.append(f"{key:<32} {med:>9} {lo:>8} {hi:>8} {s['n']:>4}{unit}")
    micro = results.get("micro") or {}
    if micro:
        lines += ["", "micro benchmark                       GB/s"]
        lines += [f"{name:<36} {m['gb_s']:>6.2f}" for name, m in micro.items()]
    lines += ["", "targets:"]
    for t in results["targets"]:
        lines.append(f"  {'MET   ' if t['met'] else 'MISSED'} {t['name']}: {t['text']}")
    if results.get("failed_runs"):
        lines.append(f"  ({results['failed_runs']} runs failed; see runs[].error)")
    if results.get("disturbed_runs"):
        share = results["foreign_cpu_share"]
        lines.append(
            f"  warning: in {results['disturbed_runs']} runs other processes took more than "
            f"{DISTURBED:.0%} of the machine (worst {share['max']:.0%}); see runs[].foreign_cpu"
        )
    return "\n".join(lines)


def format_markdown(results: dict[str, Any]) -> str:
    """The README table: headline figures and targets, with the machine they came from."""
    d, m = results["detail"], results["machine"]

    def row(label: str, key: str, scale: float = 1.0, digits: int = 1) -> str:
        s = d.get(key)
        if s is None:
            return f"| {label} | n/a | |"
        f = f"{{:.{digits}f}}"
        return (
            f"| {label} | {f.format(s['median'] / scale)} | "
            f"{f.format(s['min'] / scale)} - {f.format(s['max'] / scale)} |"
        )

    cfg = results["config"]
    out = [
        f"Machine: {m.get('cores')} cores ({m.get('cpu_model')}), {m.get('memory_gib')} GiB, "
        f"Linux {m.get('kernel')}; images on {m.get('workdir_fs')}; "
        f"{m.get('nbdcopy')}, {m.get('qemu_nbd')}, nats-server {m.get('nats_server')}, "
        f"nbd-nats {m.get('nbdnats')} ({m.get('commit')}). "
        f"{cfg.get('rounds')} rounds, random image {_gib(cfg.get('random_size'))}, sparse image "
        f"{_gib(cfg.get('sparse_size'))} with {_mib(cfg.get('sparse_data'))} of data.",
        "",
        "| figure | median | min - max |",
        "|---|---|---|",
        row("nbdcopy, random image (MB/s)", "nbdcopy_mb_s"),
        row("nbd-nats send → recv, random image (MB/s)", "nbdnats_mb_s"),
        row("raw NATS ceiling, pattern: → null: (MB/s)", "nats_ceiling_mb_s"),
        row("nbd-nats / nbdcopy", "ratio_vs_nbdcopy", digits=2),
        row("nbd-nats / ceiling", "ratio_vs_ceiling", digits=2),
        row("sparse image, nbdcopy (s)", "sparse_seconds_nbdcopy", digits=2),
        row("sparse image, nbd-nats (s)", "sparse_seconds_nbdnats", digits=2),
        row("one 1 MiB nbd-nats transfer, start to exit (s)", "startup_seconds_nbdnats", digits=2),
        row("CPU s/GiB, nbdcopy", "cpu_s_per_gib_nbdcopy", digits=3),
        row("CPU s/GiB, nbd-nats sender", "cpu_s_per_gib_sender", digits=3),
        row("CPU s/GiB, nbd-nats receiver", "cpu_s_per_gib_receiver", digits=3),
        row("CPU s/GiB, nats-server", "cpu_s_per_gib_nats_server", digits=3),
        row("CPU s/GiB, qemu-nbd source (nbd-nats run)", "cpu_s_per_gib_qemu_nbd_src", digits=3),
        row("CPU s/GiB, qemu-nbd target (nbd-nats run)", "cpu_s_per_gib_qemu_nbd_dst", digits=3),
        row("CPU s/GiB, all processes, nbdcopy", "cpu_s_per_gib_all_nbdcopy", digits=3),
        row("CPU s/GiB, all processes, nbd-nats", "cpu_s_per_gib_all_nbdnats", digits=3),
        row("CPU s/GiB, all processes, ceiling", "cpu_s_per_gib_all_ceiling", digits=3),
        row("peak RSS sender (MiB)", "peak_rss_sender", MiB),
        row("peak RSS receiver (MiB)", "peak_rss_receiver", MiB),
        *_derived_rows(results),
        "",
        "| target | | |",
        "|---|---|---|",
    ]
    out += [
        f"| {t['name']} | {'met' if t['met'] else '**missed**'} | {t['text']} |"
        for t in results["targets"]
    ]
    return "\n".join(out) + "\n"


def _derived_rows(results: dict[str, Any]) -> list[str]:
    """The floor and the bounds, as rows of the README table (single values, no spread)."""
    rows = []
    floor = results.get("floor") or {}
    if floor:
        rows.append(
            "| kernel floor, CPU s/GiB: sockets + checksum, sender + receiver / nbdcopy "
            f"| {floor['sender_receiver']:.3f} / {floor['nbdcopy']:.3f} | measured |"
        )
    b = results.get("bounds") or {}
    cores = (results.get("machine") or {}).get("cores")
    for key, label in (
        ("all_cores_busy", f"best nbd-nats / nbdcopy, / ceiling with all {cores} cores busy"),
        ("core_per_process", "projected nbd-nats / nbdcopy, / ceiling with a core per process"),
    ):
        v = b.get(key) or {}
        if v.get("ratio_vs_nbdcopy") is not None and v.get("ratio_vs_ceiling") is not None:
            rows.append(
                f"| {label} | {v['ratio_vs_nbdcopy']:.2f} / {v['ratio_vs_ceiling']:.2f} "
                "| derived from CPU s/GiB |"
            )
    return rows


def _gib(v: float | None) -> str:
    return "n/a" if v is None else f"{v / GiB:g} GiB"
