"""bench/plots.py draws every sweep point, with sizes named as people write them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

# `make test` installs the bench extra (make bench-deps): the plots are tested, not skipped.
pytest.importorskip("matplotlib")

from bench import plots
from bench.harness import CHUNK_SWEEP, WINDOW_SWEEP, KiB, MiB
from nbdnats import _core


def _point(path: str, key: str, value: int, mb_s: float) -> dict[str, Any]:
    spread = {"median": mb_s, "min": mb_s - 10, "max": mb_s + 10, "n": 3}
    return {"path": path, key: value, "mb_s": spread, "cpu_s_per_gib_total": 1.0}


WINDOWS = (8 * MiB, 16 * MiB, 32 * MiB, _core.MAX_WINDOW)
CHUNKS = (256 * KiB, 1 * MiB - 4 * KiB, 1 * MiB, 4 * MiB)
RESULTS: dict[str, Any] = {
    "sweep": {
        WINDOW_SWEEP: [
            _point(p, "window", w, 500 + i)
            for p in ("nbdnats", "ceiling")
            for i, w in enumerate(WINDOWS)
        ],
        CHUNK_SWEEP: [_point("nbdnats", "chunk", c, 400) for c in CHUNKS],
    },
    "cpu_s_per_gib": {"random": {"nbdnats": {"sender": 1.0, "receiver": 0.5}}},
}


def test_plots_are_written(tmp_path: Path) -> None:
    made = plots.draw(RESULTS, tmp_path)
    names = {"throughput_vs_chunk.png", "throughput_vs_window.png", "cpu_per_gib.png"}
    assert {p.name for p in made} == names
    for p in made:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_window_plot_shows_max_window_on_one_line_with_human_ticks() -> None:
    fig = plots.figures(RESULTS)["throughput_vs_window.png"]
    assert fig is not None
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == ["8M", "16M", "32M", "48M"]
    assert 48 * MiB == _core.MAX_WINDOW
    # nbd-nats and the ceiling: each one line (an errorbar's data line) through every window.
    lines = [c.lines[0] for c in ax.containers]
    assert len(lines) == 2
    for line in lines:
        assert list(line.get_xdata()) == list(WINDOWS)


def test_chunk_plot_ticks_read_as_sizes() -> None:
    fig = plots.figures(RESULTS)["throughput_vs_chunk.png"]
    assert fig is not None
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert labels == ["256K", "1020K", "1M", "4M"]


@pytest.mark.parametrize(
    ("size", "text"), [(1 * MiB, "1M"), (32 * MiB, "32M"), (1020 * KiB, "1020K"), (512, "512")]
)
def test_human_sizes(size: int, text: str) -> None:
    assert plots.human(size) == text


def test_full_window_sweep_ends_at_max_window() -> None:
    from bench.run import FULL

    assert FULL.windows[-1] == _core.MAX_WINDOW
