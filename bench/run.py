"""Run the benchmark suite against real programs and write results.json, plots and a summary.

    python -m bench.run [--quick] [--out DIR] [--latest FILE]

Everything runs on this machine: a nats-server started here (the embedded default's config;
the chunk sweep uses a second one with a larger max_payload), qemu-nbd on unix sockets, and
the images on tmpfs. Each path is run in turn within a round (A B C A B C ...). See
bench/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, NoReturn

import nbdnats
from bench import floor, harness
from bench.harness import (
    CEILING,
    CHUNK_SWEEP,
    NBDCOPY,
    NBDNATS,
    RANDOM,
    SPARSE,
    STARTUP,
    STARTUP_SIZE,
    WINDOW_SWEEP,
    GiB,
    KiB,
    MiB,
    Run,
    first_line,
)
from nbdnats import _core, subjects
from nbdnats.embedded import EmbeddedServer, bulk_env, free_port, nats_server_binary

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
NBD_NATS = str(BIN / "nbd-nats")
# The sweep needs 8 MiB chunks: 8 MiB + the 40-byte header must fit max_payload.
SWEEP_MAX_PAYLOAD = 16 * MiB
CLK_TCK = os.sysconf("SC_CLK_TCK")
START_TIMEOUT = 10.0  # how long a service may take to come up


@dataclass(frozen=True)
class Profile:
    name: str
    random_size: int
    sparse_size: int
    sparse_data: int
    rounds: int
    chunks: tuple[int, ...]
    windows: tuple[int, ...]
    sweep_rounds: int
    micro_max_time: float
    retries: int = 2
    """How often a run disturbed by other processes is repeated."""
    quiet_wait: float = 30.0
    """How long to wait, at most, for other processes to calm down before a run."""


FULL = Profile(
    name="full",
    random_size=2 * GiB,
    sparse_size=4 * GiB,
    sparse_data=256 * MiB,
    rounds=5,
    chunks=(256 * KiB, 512 * KiB, 1 * MiB, 2 * MiB, 4 * MiB, 8 * MiB),
    windows=(8 * MiB, 16 * MiB, 32 * MiB, 48 * MiB),
    sweep_rounds=3,
    micro_max_time=0.5,
)
QUICK = Profile(
    name="quick",
    random_size=1 * GiB,
    sparse_size=2 * GiB,
    sparse_data=128 * MiB,
    rounds=3,
    chunks=(256 * KiB, 1 * MiB, 4 * MiB, 8 * MiB),
    windows=(8 * MiB, 32 * MiB),
    sweep_rounds=2,
    micro_max_time=0.1,
    retries=1,
    quiet_wait=10.0,
)


def say(text: str) -> None:
    print(f"bench: {text}", flush=True)


def proc_stat(pid: int) -> tuple[float, int]:
    """User+system CPU seconds (all threads) and minor page faults of a live process."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK, int(fields[7])


def exited(pid: int) -> bool:
    """Has the child exited? Does not reap it (the measuring wait4 does)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:  # already reaped
        return True


@dataclass
class Exit:
    code: int
    end: float
    cpu: float
    peak_rss: int
    faults: int


def vm_hwm(pid: int) -> int | None:
    """VmHWM (peak RSS) of a live process in bytes; None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * KiB
    return None  # a zombie has no memory left


# Children started and not yet reaped; only these pids are ever signalled.
LIVE: set[int] = set()


def kill_live() -> None:
    for pid in list(LIVE):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


class Child:
    """A measured child process: CPU from wait4, peak RSS by polling its VmHWM.

    Not ru_maxrss: subprocess spawns with vfork, and Linux carries the parent's memory
    high-water mark across exec into the child's ru_maxrss, which would then show the
    harness's RSS rather than the child's. VmHWM is the child's own and only grows, so the
    last sample (every 10 ms until exit) is its peak."""

    def __init__(self, args: list[str], out: IO[bytes], env: dict[str, str] | None = None):
        self.start = time.monotonic()
        self.proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env
        )
        self.pid = self.proc.pid
        LIVE.add(self.pid)
        self.peak_rss = 0
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def _sample(self) -> None:
        while True:  # ends with the process or with wait()
            hwm = vm_hwm(self.pid)
            if hwm is None:
                return
            self.peak_rss = max(self.peak_rss, hwm)
            if self._stop.wait(0.01):
                return

    def wait(self, timeout: float) -> Exit:
        """Reap the child, killing it after ``timeout`` seconds."""
        timer = threading.Timer(timeout, self.proc.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(self.pid, 0)
        except BaseException:
            # Interrupted (Ctrl-C, SIGTERM): stop every child of the run so that the other
            # waits end too, rather than at their timeout.
            kill_live()
            raise
        finally:
            timer.cancel()
            self._stop.set()
        LIVE.discard(self.pid)
        end = time.monotonic()
        self._sampler.join(5)
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        cpu = usage.ru_utime + usage.ru_stime
        return Exit(self.proc.returncode, end, cpu, self.peak_rss, usage.ru_minflt)


def busy_seconds() -> float:
    """CPU seconds all processes of the machine have used (every core), from /proc/stat."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def own_seconds() -> float:
    """CPU seconds of the harness itself (all its threads)."""
    t = os.times()
    return t.user + t.system


def wait_for_quiet(limit: float, busy_cores: float = 0.15) -> float:
    """Wait (at most ``limit`` seconds) until other processes use less than ``busy_cores``
    of the machine, so a run does not start in the middle of someone else's work.
    Returns how long it waited."""
    start = time.monotonic()
    while time.monotonic() - start < limit:
        b0, o0, t0 = busy_seconds(), own_seconds(), time.monotonic()
        time.sleep(0.3)
        other = (busy_seconds() - b0) - (own_seconds() - o0)
        if other / (time.monotonic() - t0) < busy_cores:
            break
        time.sleep(0.7)
    return time.monotonic() - start


class Meter:
    """CPU of the long-lived processes over one run, and of everything else on the machine
    (other users' work would disturb the figures: it is recorded with the run)."""

    def start(self, roles: dict[str, int]) -> None:
        self.roles = roles
        self.before = {role: proc_stat(pid) for role, pid in roles.items()}
        self.busy, self.own = busy_seconds(), own_seconds()
        self.faults: dict[str, int] = {}

    def stop(self) -> dict[str, float]:
        """CPU seconds of each long-lived process over the run (faults in ``faults``)."""
        self.busy, self.own = busy_seconds() - self.busy, own_seconds() - self.own
        cpu = {}
        for role, pid in self.roles.items():
            now = proc_stat(pid)
            cpu[role] = now[0] - self.before[role][0]
            self.faults[role] = now[1] - self.before[role][1]
        return cpu

    def foreign(self, measured: dict[str, float]) -> float:
        """CPU seconds used during the run by processes that are not part of it."""
        return round(max(0.0, self.busy - self.own - sum(measured.values())), 3)


class Services:
    """Long-lived children (nats-server, qemu-nbd); every one is stopped by close()."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(
        self,
        name: str,
        args: list[str],
        ready: Callable[[], bool],
        env: dict[str, str] | None = None,
    ) -> int:
        log = (self.workdir / f"{name}.log").open("wb")
        proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env={**os.environ, **(env or {})},
        )
        log.close()
        self.procs.append((name, proc))
        deadline = time.monotonic() + START_TIMEOUT
        while not (ready() or proc.poll() is not None):
            if time.monotonic() >= deadline:
                raise RuntimeError(f"{name} did not come up within {START_TIMEOUT:.0f} s")
            time.sleep(0.02)
        if proc.poll() is not None:
            tail = (self.workdir / f"{name}.log").read_text(errors="replace")[-500:]
            raise RuntimeError(f"{name} exited at start: {tail}")
        return proc.pid

    def nats(self, name: str, max_payload: int) -> tuple[str, int]:
        """A nats-server with the embedded default's config (max_payload aside)."""
        cfg = EmbeddedServer("127.0.0.1", max_payload=max_payload)
        cfg.port = free_port(cfg.host)
        conf = self.workdir / f"{name}.conf"
        conf.write_text(cfg.config(self.workdir / f"{name}-js"))
        argv = [nats_server_binary(), "-c", str(conf)]
        pid = self.start(name, argv, lambda: port_open(cfg.port), env=bulk_env())
        return cfg.url, pid

    def qemu_nbd(self, name: str, image: Path, *, read_only: bool) -> tuple[str, int]:
        """Serve ``image`` on a unix socket, replacing a qemu-nbd of the same name."""
        self.stop(name)
        sock = self.workdir / f"{name}.sock"
        sock.unlink(missing_ok=True)
        args = ["qemu-nbd", "--persistent", "--shared=8", "-f", "raw", "-x", "disk"]
        args += ["--read-only"] if read_only else ["--discard=unmap"]
        args += ["-k", str(sock), str(image)]
        pid = self.start(name, args, sock.exists)
        return f"nbd+unix:///disk?socket={sock}", pid

    def stop(self, name: str) -> None:
        for i, (n, proc) in enumerate(self.procs):
            if n == name:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
                del self.procs[i]
                return

    def peak_rss(self, pid: int) -> int | None:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * KiB
        return None

    def close(self) -> None:
        for _, proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for _, proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        self.procs.clear()


def port_open(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def make_random(path: Path, size: int) -> None:
    with path.open("wb") as f:
        left = size
        while left > 0:
            n = min(left, 16 * MiB)
            f.write(os.urandom(n))
            left -= n


def sparse_layout(size: int, data: int, piece: int = 1 * MiB) -> list[tuple[int, int]]:
    """Where the sparse image holds data: ``data`` bytes in 1 MiB pieces spread evenly over
    the disk, each 64 KiB aligned but not chunk aligned (like a used filesystem)."""
    count = max(1, data // piece)
    stride = size // count
    return [(i * stride + (i % 16 + 1) * 64 * KiB, piece) for i in range(count)]


def make_sparse(path: Path, size: int, data: int) -> None:
    with path.open("wb") as f:
        f.truncate(size)
        for offset, length in sparse_layout(size, data):
            f.seek(offset)
            f.write(os.urandom(length))


def reset_target(path: Path, size: int) -> None:
    """Make the target a fresh, fully sparse file again (qemu-nbd keeps it open)."""
    with path.open("ab") as f:
        f.truncate(0)
        f.truncate(size)


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def same_content(a: Path, b: Path) -> bool:
    with a.open("rb") as fa, b.open("rb") as fb:
        for _ in range(1 + os.stat(a).st_size // (16 * MiB)):
            x, y = fa.read(16 * MiB), fb.read(16 * MiB)
            if x != y:
                return False
            if not x:
                return True
    return fa.read(1) == fb.read(1)


def last_json(path: Path) -> dict[str, Any]:
    for line in reversed(path.read_text(errors="replace").splitlines()):
        if line.startswith("{"):
            parsed: dict[str, Any] = json.loads(line)
            return parsed
    return {}


def child_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("NBDNATS_")}


async def _receiver_ready(url: str, transfer_id: str, pid: int, timeout: float) -> bool:
    """True once the receiver answers on its open subject. It answers anything that is not
    an open request with a refusal and goes on waiting, so an empty request is a safe probe."""
    import nats
    from nats.errors import NoRespondersError
    from nats.errors import TimeoutError as NatsTimeout

    nc = await nats.connect(url, allow_reconnect=False)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not exited(pid):
            try:
                await nc.request(subjects.transfer(transfer_id)[0], b"", timeout=1.0)
                return True
            except (NoRespondersError, NatsTimeout):
                await asyncio.sleep(0.02)
        return False
    finally:
        await nc.close()


@dataclass
class Bench:
    profile: Profile
    workdir: Path
    services: Services
    nats_url: str = ""
    nats_pid: int = 0
    sweep_url: str = ""
    sweep_pid: int = 0
    images: dict[str, Path] = field(default_factory=dict)
    runs: list[Run] = field(default_factory=list)
    counter: int = 0
    record: bool = True

    def timeout_for(self, size: int) -> float:
        return 120 + size / (20 * 1e6)

    def _log(self, run: Run) -> None:
        label = f"round {run.round + 1}" if run.round >= 0 else "warm-up"
        what = f"{run.workload:<6} {run.path:<8}"
        if run.chunk:
            what += f" chunk {run.chunk // KiB}K"
        if run.window:
            what += f" window {run.window // MiB}M"
        if not run.ok:
            say(f"{label} {what}: FAILED: {run.error}")
            return
        core = f" (core {run.core_mb_s:.0f})" if run.core_mb_s else ""
        cpu = " ".join(f"{k}={v:.2f}" for k, v in run.cpu.items())
        if run.foreign_cpu and run.foreign_cpu >= 0.1:
            cpu += f" (other processes: {run.foreign_cpu:.2f})"
        say(f"{label} {what}: {run.seconds:6.2f} s {run.mb_s:7.1f} MB/s{core}  cpu s: {cpu}")

    def _before(self) -> Meter:
        waited = wait_for_quiet(self.profile.quiet_wait)
        if waited > 2:
            say(f"waited {waited:.0f} s for other processes to calm down")
        return Meter()

    def fresh_endpoints(self, image: str) -> tuple[int, str, int, str, int]:
        """A fresh sparse target and a fresh qemu-nbd for each end, for every run: qemu-nbd's
        allocator state depends on the requests it served before (4 MiB requests fault in
        every page of a new buffer until glibc adapts), so a long-lived one would let one
        path's history change another path's figures. Returns size, src uri and pid, dst
        uri and pid."""
        size = os.stat(self.images[f"{image}-src"]).st_size
        reset_target(self.images[f"{image}-dst"], size)
        qemu, images = self.services.qemu_nbd, self.images
        src, src_pid = qemu(f"qemu-nbd-{image}-src", images[f"{image}-src"], read_only=True)
        dst, dst_pid = qemu(f"qemu-nbd-{image}-dst", images[f"{image}-dst"], read_only=False)
        return size, src, src_pid, dst, dst_pid

    def nbdcopy(self, workload: str, rnd: int, image: str, chunk: int | None = None) -> Run:
        size, src, src_pid, dst, dst_pid = self.fresh_endpoints(image)
        roles = {"qemu_nbd_src": src_pid, "qemu_nbd_dst": dst_pid}
        # --flush: nbd-nats flushes the target before it reports success; so must nbdcopy.
        args = ["nbdcopy", "--flush"]
        if chunk:
            args.append(f"--request-size={chunk}")
        args += [src, dst]
        out = self.workdir / "nbdcopy.out"
        meter = self._before()
        meter.start(roles)
        with out.open("wb") as f:
            child = Child(args, f)
        done = child.wait(self.timeout_for(size))
        run = Run(workload, NBDCOPY, rnd, size, done.end - child.start, chunk=chunk)
        run.cpu = {"nbdcopy": done.cpu} | meter.stop()
        run.peak_rss = {"nbdcopy": done.peak_rss}
        run.faults = {"nbdcopy": done.faults} | meter.faults
        run.pids = {"nbdcopy": child.pid} | roles
        run.foreign_cpu = meter.foreign(run.cpu)
        if done.code != 0:
            run.error = f"nbdcopy exited {done.code}: {out.read_text(errors='replace')[-300:]}"
        return self._finish(run, image)

    def nbdnats(
        self,
        workload: str,
        rnd: int,
        image: str | None,
        *,
        chunk: int | None = None,
        window: int | None = None,
        sweep: bool = False,
        pattern_size: int | None = None,
    ) -> Run:
        """nbd-nats recv and send as two processes; ``image`` None is the ceiling run
        (pattern: source, null: sink, no NBD at all)."""
        url, nats_pid = (
            (self.sweep_url, self.sweep_pid) if sweep else (self.nats_url, self.nats_pid)
        )
        roles = {"nats_server": nats_pid}
        if image is None:
            size = pattern_size or self.profile.random_size
            src, dst, path = f"pattern:{size}", "null:", CEILING
        else:
            size, src, src_pid, dst, dst_pid = self.fresh_endpoints(image)
            roles |= {"qemu_nbd_src": src_pid, "qemu_nbd_dst": dst_pid}
            path = NBDNATS
        self.counter += 1
        tid = f"bench-{self.counter}"
        common = ["--id", tid, "--data-url", url, "--json", "-q"]
        if window:
            common += ["--window", str(window)]
        send_args = [NBD_NATS, "send", src, *common]
        if chunk:
            send_args += ["--chunk-size", str(chunk)]
        if image is None:
            # The pattern compresses to almost nothing: the ceiling is of the transport.
            send_args += ["--compress", "off"]
        recv_out, send_out = self.workdir / "recv.out", self.workdir / "send.out"
        run = Run(workload, path, rnd, size, 0.0, chunk=chunk, window=window)
        timeout = self.timeout_for(size)
        meter = self._before()
        meter.start(roles)
        with recv_out.open("wb") as rf, send_out.open("wb") as sf:
            recv = Child([NBD_NATS, "recv", dst, *common], rf, child_env())
            with ThreadPoolExecutor(1) as pool:
                recv_done = pool.submit(recv.wait, timeout)
                try:
                    ready = asyncio.run(_receiver_ready(url, tid, recv.pid, 20.0))
                except OSError as e:
                    ready, run.error = False, f"cannot probe the receiver: {e}"
                # The clock starts with the sender, once the receiver listens.
                sender = Child(send_args, sf, child_env()) if ready else None
                send_exit = sender.wait(timeout) if sender else None
                if sender is None:
                    recv.proc.terminate()
                recv_exit = recv_done.result()
        run.cpu = meter.stop()
        if sender is None or send_exit is None:
            run.error = run.error or (
                "the receiver did not come up: " + recv_out.read_text(errors="replace")[-300:]
            )
            return self._finish(run, image)
        run.seconds = max(send_exit.end, recv_exit.end) - sender.start
        run.cpu = {"sender": send_exit.cpu, "receiver": recv_exit.cpu} | run.cpu
        run.peak_rss = {"sender": send_exit.peak_rss, "receiver": recv_exit.peak_rss}
        run.faults = {"sender": send_exit.faults, "receiver": recv_exit.faults} | meter.faults
        run.pids = {"sender": sender.pid, "receiver": recv.pid} | roles
        run.foreign_cpu = meter.foreign(run.cpu)
        sent, got = last_json(send_out), last_json(recv_out)
        run.core_seconds = sent.get("seconds")
        run.granted_chunk, run.granted_window = sent.get("chunk_size"), sent.get("window")
        if send_exit.code or recv_exit.code:
            logs = send_out.read_text(errors="replace") + recv_out.read_text(errors="replace")
            run.error = f"send exited {send_exit.code}, recv {recv_exit.code}: {logs[-400:]}"
        elif not sent.get("digest") or sent.get("digest") != got.get("digest"):
            run.error = f"digests differ: sent {sent.get('digest')}, received {got.get('digest')}"
        return self._finish(run, image)

    def _finish(self, run: Run, image: str | None) -> Run:
        if image is not None and run.ok:
            dst = self.images[f"{image}-dst"]
            run.target_allocated = allocated(dst)
            if run.round <= 0 and run.workload in (RANDOM, SPARSE):
                # Correct as well as fast: the first round's copies are compared byte for byte.
                run.identical = same_content(self.images[f"{image}-src"], dst)
                if not run.identical:
                    run.error = "the target differs from the source"
        if self.record:
            self.runs.append(run)
        self._log(run)
        return run

    def setup(self) -> None:
        p = self.profile
        say(f"making images in {self.workdir}")
        self.images = {
            "random-src": self.workdir / "random.img",
            "random-dst": self.workdir / "random-target.img",
            "sparse-src": self.workdir / "sparse.img",
            "sparse-dst": self.workdir / "sparse-target.img",
        }
        make_random(self.images["random-src"], p.random_size)
        make_sparse(self.images["sparse-src"], p.sparse_size, p.sparse_data)
        reset_target(self.images["random-dst"], p.random_size)
        reset_target(self.images["sparse-dst"], p.sparse_size)
        s = self.services
        self.nats_url, self.nats_pid = s.nats("nats-server", EmbeddedServer().max_payload)
        self.sweep_url, self.sweep_pid = s.nats("nats-server-sweep", SWEEP_MAX_PAYLOAD)

    def measure(self, method: Callable[..., Run], *args: Any, **kw: Any) -> Run:
        """Run once; if other processes took more than harness.DISTURBED of the machine
        meanwhile, keep the run as discarded and run it again (at most twice more)."""
        cores = os.cpu_count() or 1
        retries = self.profile.retries
        for attempt in range(1 + retries):
            run: Run = method(*args, **kw)
            share = harness.foreign_share(run, cores)
            if not run.ok or share is None or share <= harness.DISTURBED:
                break
            if attempt < retries:
                run.discarded = f"disturbed: other processes took {share:.0%} of the machine"
                say(f"  {run.discarded}; running it again")
        return run

    def warm_up(self) -> None:
        """One unrecorded round of the random image: the first transfers after making the
        images pay for the kernel settling (page allocation, compaction) and cold caches."""
        self.record = False
        try:
            self.nbdcopy(RANDOM, -1, "random")
            self.nbdnats(RANDOM, -1, "random")
            self.nbdnats(RANDOM, -1, None)
        finally:
            self.record = True

    def macro(self) -> None:
        for rnd in range(self.profile.rounds):
            self.measure(self.nbdcopy, RANDOM, rnd, "random")
            self.measure(self.nbdnats, RANDOM, rnd, "random")
            self.measure(self.nbdnats, RANDOM, rnd, None)
            self.measure(self.nbdcopy, SPARSE, rnd, "sparse")
            self.measure(self.nbdnats, SPARSE, rnd, "sparse")
            # The fixed cost of one transfer (start-up, connect, handshake, exit).
            self.measure(self.nbdnats, STARTUP, rnd, None, pattern_size=STARTUP_SIZE)

    def sweep(self) -> None:
        p = self.profile
        for rnd in range(p.sweep_rounds):
            for chunk in p.chunks:
                self.measure(self.nbdcopy, CHUNK_SWEEP, rnd, "random", chunk=chunk)
                # nbd-nats also 4 KiB short of each power of two, the shape of its default:
                # async-nats's read buffer copes with those far better (conn.rs).
                for size in (chunk, chunk - 4 * KiB):
                    self.measure(self.nbdnats, CHUNK_SWEEP, rnd, "random", chunk=size, sweep=True)
                    self.measure(self.nbdnats, CHUNK_SWEEP, rnd, None, chunk=size, sweep=True)
            for window in p.windows:
                self.measure(self.nbdnats, WINDOW_SWEEP, rnd, "random", window=window, sweep=True)
                self.measure(self.nbdnats, WINDOW_SWEEP, rnd, None, window=window, sweep=True)


def filesystem_of(path: Path) -> str:
    best, fs = "", "unknown"
    for line in Path("/proc/mounts").read_text().splitlines():
        parts = line.split()
        mount = parts[1]
        if str(path).startswith(mount) and len(mount) > len(best):
            best, fs = mount, parts[2]
    return fs


def kernel_version(release: str) -> str:
    m = re.match(r"\d+(\.\d+)*", release)
    return m.group(0) if m else release


def machine(workdir: Path) -> dict[str, Any]:
    cpu_model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu_model = line.split(":", 1)[1].strip()
            break
    mem_kib = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kib = int(line.split()[1])
    commit = first_line(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = first_line(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"])
    return {
        "cores": os.cpu_count(),
        "cpu_model": cpu_model,
        "memory_gib": round(mem_kib * KiB / GiB, 1),
        # The version only: a distribution's or builder's suffix says nothing more here.
        "kernel": kernel_version(platform.release()),
        "python": platform.python_version(),
        "workdir_fs": filesystem_of(workdir),
        "nbdcopy": first_line(["nbdcopy", "--version"]),
        "qemu_nbd": first_line(["qemu-nbd", "--version"]),
        "nats_server": first_line([nats_server_binary(), "--version"]).removeprefix(
            "nats-server: "
        ),
        "nbdnats": nbdnats.__version__,
        "core": _core.__version__,
        "commit": commit + ("+dirty" if dirty not in ("", "unknown") else ""),
    }


def micro(out_dir: Path, max_time: float) -> dict[str, Any]:
    """Run bench/micro with pytest-benchmark enabled; GB/s of each from its JSON."""
    out = out_dir / "micro.json"
    args = [
        sys.executable,
        "-m",
        "pytest",
        str(REPO / "bench" / "micro"),
        "-q",
        "-p",
        "no:cacheprovider",
        "--benchmark-enable",
        f"--benchmark-json={out}",
        f"--benchmark-max-time={max_time}",
        "--benchmark-min-rounds=5",
        "--benchmark-columns=min,median,max,rounds",
        "--benchmark-sort=name",
    ]
    code = subprocess.run(args, cwd=REPO, timeout=900, check=False).returncode
    if code != 0 or not out.exists():
        say(f"micro benchmarks failed (pytest exited {code})")
        return {}
    return micro_summary(json.loads(out.read_text()))


def micro_summary(doc: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for b in doc.get("benchmarks", []):
        nbytes = b.get("extra_info", {}).get("bytes")
        median = b["stats"]["median"]
        if not nbytes or median <= 0:
            continue
        entry = {"gb_s": round(nbytes / median / 1e9, 3), "median_s": median, "bytes": nbytes}
        entries = b["extra_info"].get("entries")
        if entries:
            entry["m_entries_s"] = round(entries / median / 1e6, 2)
        result[b["name"]] = entry
    return result


def default_workdir() -> Path:
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and os.access(shm, os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix="nbdnats-bench-", dir=base))


def _terminated(signum: int, frame: object) -> NoReturn:
    raise SystemExit(128 + signum)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller images, fewer sweep points")
    p.add_argument("--out", type=Path, help="results directory (default bench/results/<time>)")
    p.add_argument("--latest", type=Path, help="also write the summary (no runs) here")
    p.add_argument("--rounds", type=int, help="rounds of the macro benchmark (at least 3)")
    p.add_argument("--workdir", type=Path, help="where images go (default: a tmpfs folder)")
    p.add_argument("--no-sweep", action="store_true", help="skip the chunk and window sweeps")
    p.add_argument("--no-micro", action="store_true", help="skip the micro benchmarks")
    args = p.parse_args(argv)
    if args.rounds is not None and args.rounds < 3:
        p.error("--rounds must be at least 3: medians of fewer say little")
    return args


@contextlib.contextmanager
def workspace(given: Path | None) -> Iterator[Path]:
    if given is not None:
        given.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix="nbdnats-bench-", dir=given))
    else:
        work = default_workdir()
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    profile = QUICK if args.quick else FULL
    if args.rounds:
        profile = Profile(**{**profile.__dict__, "rounds": args.rounds})
    for tool in ("nbdcopy", "qemu-nbd"):
        if shutil.which(tool) is None:
            say(f"{tool} not found; run make bootstrap (Debian libnbd-bin, qemu-utils)")
            return 1
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    out_dir = args.out or REPO / "bench" / "results" / (stamp + ("-quick" if args.quick else ""))
    out_dir.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, _terminated)
    loadavg = Path("/proc/loadavg").read_text().split()[:3]
    started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    t0 = time.monotonic()
    with workspace(args.workdir) as work:
        services = Services(work)
        bench = Bench(profile, work, services)
        try:
            bench.setup()
            source_allocated = allocated(bench.images["sparse-src"])
            info = machine(work)
            say(f"{profile.name} profile on {info['cores']} cores; results in {out_dir}")
            bench.warm_up()
            bench.macro()
            if not args.no_sweep:
                bench.sweep()
            nats_rss = services.peak_rss(bench.nats_pid)
        finally:
            services.close()
    micro_results = {} if args.no_micro else micro(out_dir, profile.micro_max_time)
    say("measuring the kernel's floor (bench/floor.py)")
    floor_results = floor.measure(min(profile.random_size, 1 * GiB))
    config = {
        "profile": profile.name,
        "rounds": profile.rounds,
        "sweep_rounds": 0 if args.no_sweep else profile.sweep_rounds,
        "retries": profile.retries,
        "random_size": profile.random_size,
        "sparse_size": profile.sparse_size,
        "sparse_data": profile.sparse_data,
        "chunks": list(profile.chunks),
        "windows": list(profile.windows),
        "nats_max_payload": EmbeddedServer().max_payload,
        "sweep_nats_max_payload": SWEEP_MAX_PAYLOAD,
        "nats_server_peak_rss": nats_rss,
        "started": started,
        "loadavg_before": loadavg,
        "elapsed_s": round(time.monotonic() - t0, 1),
    }
    results = harness.build_results(
        bench.runs,
        machine=info,
        config=config,
        source_allocated=source_allocated,
        micro=micro_results,
        floor=floor_results,
    )
    (out_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out_dir / "summary.md").write_text(harness.format_markdown(results))
    if args.latest:
        args.latest.write_text(json.dumps(harness.summary(results), indent=1) + "\n")
    try:
        from bench import plots

        for png in plots.draw(results, out_dir):
            say(f"plot {png}")
    except ImportError as e:
        say(f"plots skipped ({e}); `make bench-deps` installs matplotlib (the bench extra)")
    print(harness.format_report(results), flush=True)
    say(f"wrote {out_dir / 'results.json'} in {config['elapsed_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
