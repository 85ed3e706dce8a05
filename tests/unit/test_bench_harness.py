"""The benchmark harness's own logic (bench/harness.py), on made-up numbers: statistics,
paired ratios, the results document and met/missed for each target. No timing here."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from bench import floor, harness
from bench.harness import CEILING, NBDCOPY, NBDNATS, RANDOM, SPARSE, STARTUP, GiB, MiB, Run
from bench.report import rebuild
from bench.run import kernel_version, micro_summary, sparse_layout

MACHINE = {"cores": 2, "kernel": "6.1", "cpu_model": "test"}
CONFIG = {"rounds": 3, "random_size": 2 * GiB, "sparse_size": 4 * GiB, "sparse_data": 256 * MiB}
WINDOW, CHUNK = 32 * MiB, 4 * MiB


def nbdcopy(workload: str, rnd: int, seconds: float, cpu: float) -> Run:
    size = 2 * GiB if workload == RANDOM else 4 * GiB
    cpus = {"nbdcopy": cpu, "qemu_nbd_src": 0.5, "qemu_nbd_dst": 0.5}
    rss = {"nbdcopy": 90 * MiB}
    target = 256 * MiB if workload == SPARSE else None
    return Run(
        workload, NBDCOPY, rnd, size, seconds, cpu=cpus, peak_rss=rss, target_allocated=target
    )


def nbdnats(
    workload: str,
    rnd: int,
    seconds: float,
    *,
    sender: float = 1.0,
    receiver: float = 1.0,
    rss: int = 80 * MiB,
    allocated: int = 256 * MiB,
    path: str = NBDNATS,
) -> Run:
    size = 4 * GiB if workload == SPARSE else 2 * GiB
    return Run(
        workload,
        path,
        rnd,
        size,
        seconds,
        core_seconds=seconds * 0.9,
        granted_chunk=CHUNK,
        granted_window=WINDOW,
        cpu={"sender": sender, "receiver": receiver, "nats_server": 1.0},
        peak_rss={"sender": rss, "receiver": rss},
        target_allocated=allocated if workload == SPARSE and path == NBDNATS else None,
    )


def good_runs() -> list[Run]:
    """Three rounds in which nbd-nats meets every target."""
    runs: list[Run] = []
    for rnd, (copy_s, nats_s, ceil_s) in enumerate(
        [(2.0, 2.4, 2.2), (2.2, 2.5, 2.3), (1.8, 2.6, 2.4)]
    ):
        runs += [
            nbdcopy(RANDOM, rnd, copy_s, cpu=1.0),
            nbdnats(RANDOM, rnd, nats_s),
            nbdnats(RANDOM, rnd, ceil_s, path=CEILING),
            nbdcopy(SPARSE, rnd, 1.0, cpu=0.2),
            nbdnats(SPARSE, rnd, 1.2),
            Run(
                STARTUP,
                CEILING,
                rnd,
                MiB,
                0.3,
                granted_window=WINDOW,
                peak_rss={"sender": 50 * MiB, "receiver": 50 * MiB},
            ),
        ]
    return runs


def build(runs: list[Run], source_allocated: int = 256 * MiB) -> dict[str, object]:
    return harness.build_results(
        runs, machine=MACHINE, config=CONFIG, source_allocated=source_allocated
    )


def targets(results: dict[str, object]) -> dict[str, bool]:
    return {t["name"]: t["met"] for t in results["targets"]}  # type: ignore[attr-defined]


def test_spread_ignores_missing_values() -> None:
    s = harness.spread([3.0, None, 1.0, 2.0])
    assert s == harness.Spread(median=2.0, min=1.0, max=3.0, n=3)
    assert harness.spread([None]) is None


def test_run_figures_and_json_round_trip() -> None:
    r = nbdnats(RANDOM, 0, 2.0, sender=1.0, receiver=3.0)
    assert r.mb_s == pytest.approx(2 * GiB / 1e6 / 2.0)
    assert r.cpu_per_gib("sender", "receiver") == pytest.approx(2.0)
    assert r.cpu_per_gib("nbdcopy") is None
    doc = json.loads(json.dumps(r.to_json()))
    assert doc["cpu_s_per_gib"]["receiver"] == pytest.approx(1.5)
    assert Run.from_json(doc) == r


def test_headline_figures_are_medians_and_paired_ratios() -> None:
    res = build(good_runs())
    assert res["nbdcopy_mb_s"] == pytest.approx(2 * GiB / 1e6 / 2.0)
    assert res["nbdnats_mb_s"] == pytest.approx(2 * GiB / 1e6 / 2.5)
    # Per-round ratios 2.0/2.4, 2.2/2.5, 1.8/2.6: their median, not the ratio of medians.
    assert res["ratio_vs_nbdcopy"] == pytest.approx(2.0 / 2.4)
    assert res["ratio_vs_ceiling"] == pytest.approx(2.3 / 2.5)
    assert res["sparse_time_ratio"] == pytest.approx(1.2)
    assert res["cpu_s_per_gib_sender"] == pytest.approx(0.5)
    assert res["cpu_s_per_gib_nbdcopy"] == pytest.approx(0.5)
    assert res["cpu_ratio_vs_nbdcopy"] == pytest.approx(2.0)
    assert res["startup_seconds_nbdnats"] == pytest.approx(0.3)
    assert res["window"] == WINDOW and res["chunk_size"] == CHUNK
    for key in (
        "nbdcopy_mb_s",
        "nbdnats_mb_s",
        "nats_ceiling_mb_s",
        "ratio_vs_nbdcopy",
        "ratio_vs_ceiling",
        "sparse_seconds_nbdcopy",
        "sparse_seconds_nbdnats",
        "cpu_s_per_gib_sender",
        "cpu_s_per_gib_receiver",
        "peak_rss_sender",
        "peak_rss_receiver",
        "target_allocated",
        "machine",
    ):
        assert res[key] is not None, key
    assert len(res["runs"]) == len(good_runs())  # type: ignore[arg-type]
    json.dumps(res)


def test_all_targets_met_except_cpu() -> None:
    met = targets(build(good_runs()))
    assert met == {
        "throughput_vs_ceiling": True,
        "throughput_vs_nbdcopy": True,
        "sparse_time": True,
        "sparse_allocation": True,
        "cpu_per_gib": False,  # 2 s/GiB for both ends vs nbdcopy's 0.5
        "peak_rss_sender": True,
        "peak_rss_receiver": True,
    }


def test_cpu_target_met_when_both_ends_are_cheap() -> None:
    runs = [
        nbdnats(r.workload, r.round, r.seconds, sender=0.6, receiver=0.8)
        if r.path == NBDNATS and r.workload == RANDOM
        else r
        for r in good_runs()
    ]
    res = build(runs)
    assert res["cpu_ratio_vs_nbdcopy"] == pytest.approx(1.4 / 2 / 0.5)
    assert targets(res)["cpu_per_gib"] is True


def test_slow_runs_miss_throughput_and_sparse_targets() -> None:
    runs = [
        nbdnats(r.workload, r.round, r.seconds * 2)
        if r.path == NBDNATS and r.workload in (RANDOM, SPARSE)
        else r
        for r in good_runs()
    ]
    met = targets(build(runs))
    assert not met["throughput_vs_ceiling"]
    assert not met["throughput_vs_nbdcopy"]
    assert not met["sparse_time"]


def test_allocation_and_rss_bounds_use_the_worst_run() -> None:
    runs = good_runs()
    runs[4] = nbdnats(SPARSE, 0, 1.2, allocated=256 * MiB + CHUNK + 4096)
    runs[1] = nbdnats(RANDOM, 0, 2.4, rss=WINDOW + 64 * MiB + 1)
    res = build(runs)
    met = targets(res)
    assert res["target_allocated"] == 256 * MiB + CHUNK + 4096
    assert not met["sparse_allocation"]
    assert res["peak_rss_sender"] == WINDOW + 64 * MiB + 1
    assert not met["peak_rss_sender"] and not met["peak_rss_receiver"]
    # Exactly on the bound is still met.
    runs[4] = nbdnats(SPARSE, 0, 1.2, allocated=256 * MiB + CHUNK)
    runs[1] = nbdnats(RANDOM, 0, 2.4, rss=WINDOW + 64 * MiB)
    met = targets(build(runs))
    assert met["sparse_allocation"] and met["peak_rss_sender"]


def test_failed_runs_are_left_out_and_missing_data_misses() -> None:
    runs = good_runs()
    for r in runs:
        if r.path == NBDNATS:
            r.error = "send exited 1"
    res = build(runs)
    assert res["nbdnats_mb_s"] is None
    assert res["failed_runs"] == 6
    met = targets(res)
    assert not met["throughput_vs_nbdcopy"] and not met["sparse_time"]
    assert not met["sparse_allocation"]
    assert "MISSED" in harness.format_report(res)


def test_reports_show_every_target() -> None:
    res = build(good_runs())
    text = harness.format_report(res)
    assert "MET    throughput_vs_ceiling" in text
    assert "MISSED cpu_per_gib" in text
    md = harness.format_markdown(res)
    assert "| cpu_per_gib | **missed** |" in md
    assert "2 cores" in md
    assert "runs" not in harness.summary(res)


def test_micro_summary_reports_gb_per_second() -> None:
    doc = {
        "benchmarks": [
            {
                "name": "test_checksum[4M]",
                "stats": {"median": 0.001},
                "extra_info": {"bytes": 4 * MiB},
            },
            {
                "name": "test_merge_extents",
                "stats": {"median": 0.002},
                "extra_info": {"bytes": GiB, "entries": 16384},
            },
            {"name": "no_bytes", "stats": {"median": 0.001}, "extra_info": {}},
        ]
    }
    got = micro_summary(doc)
    assert got["test_checksum[4M]"]["gb_s"] == pytest.approx(4 * MiB / 0.001 / 1e9, rel=1e-3)
    assert got["test_merge_extents"]["m_entries_s"] == pytest.approx(8.19)
    assert "no_bytes" not in got


def test_sparse_layout_holds_the_data_inside_the_disk() -> None:
    pieces = sparse_layout(4 * GiB, 256 * MiB)
    assert sum(n for _, n in pieces) == 256 * MiB
    ends = [(o, o + n) for o, n in pieces]
    assert all(a < b <= 4 * GiB for a, b in ends)
    assert all(b1 <= a2 for (_, b1), (a2, _) in itertools.pairwise(ends))


def test_runs_disturbed_by_other_processes_are_counted() -> None:
    runs = good_runs()
    for r in runs:
        r.foreign_cpu = 0.0
    runs[1].foreign_cpu = 0.5 * runs[1].seconds * 2  # half of both cores
    res = build(runs)
    assert res["disturbed_runs"] == 1
    assert res["foreign_cpu_share"]["max"] == pytest.approx(0.5)  # type: ignore[index]
    assert "warning: in 1 runs other processes" in harness.format_report(res)


def test_discarded_runs_are_kept_but_left_out_of_the_figures() -> None:
    runs = good_runs()
    slow = nbdnats(RANDOM, 0, 20.0)
    slow.discarded = "disturbed: other processes took 40% of the machine"
    res = build([slow, *runs])
    assert res["discarded_runs"] == 1 and res["failed_runs"] == 0
    assert res["nbdnats_mb_s"] == pytest.approx(2 * GiB / 1e6 / 2.5)
    assert len(res["runs"]) == len(runs) + 1  # type: ignore[arg-type]


def test_cpu_of_all_processes_per_path() -> None:
    res = build(good_runs())
    # nbdcopy 1.0 + qemu 0.5 + 0.5 over 2 GiB; nbd-nats 1 + 1 + nats 1 over 2 GiB.
    assert res["cpu_s_per_gib_all_nbdcopy"] == pytest.approx(1.0)
    assert res["cpu_s_per_gib_all_nbdnats"] == pytest.approx(1.5)


def test_report_rebuilds_a_results_folder(tmp_path: Path) -> None:
    runs = good_runs()
    old = build(runs)
    old["ratio_vs_ceiling"] = 123.0  # stale derived figure: recomputed from the runs
    (tmp_path / "results.json").write_text(json.dumps(old))
    latest = tmp_path / "latest.json"
    new = rebuild(tmp_path, latest, plots=False)
    assert new["ratio_vs_ceiling"] == pytest.approx(2.3 / 2.5)
    assert "| sparse_allocation | met |" in (tmp_path / "summary.md").read_text()
    assert "runs" not in json.loads(latest.read_text())
    assert len(json.loads((tmp_path / "results.json").read_text())["runs"]) == len(runs)


def test_kernel_version_keeps_the_version_only() -> None:
    assert kernel_version("6.1.0-27-amd64") == "6.1.0"
    assert kernel_version("weird") == "weird"


def test_bounds_follow_from_the_cpu_every_path_needs() -> None:
    """good_runs: nbd-nats's processes take 1.5 CPU s/GiB (1.0 + 1.0 + 1.0 over 2 GiB), so
    2 cores move at most 2 GiB / 1.5 s = 1431.7 MB/s: 1.333 x nbdcopy's median 1073.7 MB/s
    (2.0 s) and 1.533 x the ceiling's 933.6 MB/s (2.3 s). The busiest process takes
    0.5 s/GiB on every path."""
    floor = {"sender_receiver": 0.6}
    res = harness.build_results(
        good_runs(), machine=MACHINE, config=CONFIG, source_allocated=256 * MiB, floor=floor
    )
    b = res["bounds"]
    assert b["all_cores_busy"]["nbdnats_mb_s"] == pytest.approx(1431.7, abs=0.1)
    assert b["all_cores_busy"]["ratio_vs_nbdcopy"] == pytest.approx(4 / 3, abs=1e-3)
    assert b["all_cores_busy"]["ratio_vs_ceiling"] == pytest.approx(2.3 / 1.5, abs=1e-3)
    assert b["core_per_process"]["ratio_vs_ceiling"] == pytest.approx(1.0)
    assert b["cpu_floor_vs_nbdcopy"] == pytest.approx(0.6 / 0.5)
    text = {t["name"]: t["text"] for t in res["targets"]}
    assert "allows at most 1.33 (1432 MB/s with all 2 cores busy)" in text["throughput_vs_nbdcopy"]
    assert "alone cost 0.6 s/GiB (1.2x)" in text["cpu_per_gib"]
    assert build(good_runs())["bounds"]["cpu_floor_vs_nbdcopy"] is None


def test_rss_text_names_the_default_chunk_when_a_sweep_is_worse() -> None:
    runs = good_runs()
    bad = nbdnats("chunk", 0, 2.4, rss=WINDOW + 100 * MiB)
    bad.chunk = 8 * MiB
    res = build([*runs, bad])
    t = next(t for t in res["targets"] if t["name"] == "peak_rss_sender")
    assert not t["met"]
    assert "chunk 8.0 MiB" in t["text"] and "at the default chunk size worst 80.0 MiB" in t["text"]


@pytest.mark.parametrize("kind", ["unix", "tcp"])
def test_floor_moves_every_byte_and_reports_both_ends(kind: str) -> None:
    """bench/floor.py on real sockets: a short run, checked for completeness, not speed."""
    send, recv = floor.socket_cost(kind, 16 * MiB)
    assert send > 0 and recv > 0
