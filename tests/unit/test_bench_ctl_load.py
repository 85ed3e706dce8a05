"""The ctl-under-load benchmark's own figures (bench/ctl_load.py), on made-up round trips:
percentiles, the summary over rounds and its table. No timing here."""

from __future__ import annotations

import pytest

from bench import ctl_load


def test_latency_figures_are_percentiles_of_the_samples() -> None:
    samples = [float(ms) for ms in range(1, 101)]  # 1 .. 100 ms
    figures = ctl_load.latency(samples)
    assert figures["p50"] == 50.5 and figures["max"] == 100.0 and figures["n"] == 100
    assert figures["p99"] == pytest.approx(99.01)


def test_one_slow_answer_in_a_thousand_does_not_move_the_p99() -> None:
    samples = [1.0] * 999 + [500.0]
    assert ctl_load.latency(samples)["p99"] == 1.0
    assert ctl_load.latency(samples)["max"] == 500.0


def test_summary_takes_median_min_and_max_over_rounds() -> None:
    rounds = [
        {"idle_p99_ms": 1.0, "loaded_p99_ms": 40.0, "p99_ratio": 40.0, "load_mb_s": 350.0},
        {"idle_p99_ms": 2.0, "loaded_p99_ms": 60.0, "p99_ratio": 30.0, "load_mb_s": 370.0},
        {"idle_p99_ms": 1.5, "loaded_p99_ms": 50.0, "p99_ratio": 33.3, "load_mb_s": 360.0},
    ]
    summary = ctl_load.summarize(rounds)
    assert summary["loaded_p99_ms"] == {"median": 50.0, "min": 40.0, "max": 60.0, "n": 3}
    assert summary["loaded_max_ms"] is None  # a figure no round has
    table = ctl_load.format_table(summary)
    assert "| loaded_p99_ms | 50 | 40 - 60 |" in table
    assert "loaded_max_ms" not in table


def test_a_bad_size_is_a_usage_error_not_a_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        ctl_load.main(["--size", "lots"])
    assert e.value.code == 2
    assert "invalid size" in capsys.readouterr().err
