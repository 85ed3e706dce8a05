"""PNG plots of a results document (matplotlib, the ``bench`` extra).

- ``throughput_vs_chunk.png``: MB/s against chunk size (nbdcopy: its request size) for the
  three paths, median with min-max bars; nbd-nats and the ceiling also at 2^k - 4 KiB
  (dashed), the shape of the default chunk.
- ``throughput_vs_window.png``: MB/s against the window for nbd-nats and the NATS ceiling,
  every window of the sweep (48 MiB, the largest allowed, included) on one line.

Sizes on the axes read as people write them (``1M``, ``32M``, ``1020K``). ``figure_*`` build a
figure without saving it, so a test can read back what is drawn.
- ``cpu_per_gib.png``: CPU seconds per GiB, stacked by process, for each path and image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, NullLocator

from bench.harness import CHUNK_SWEEP, PATHS, ROLES, WINDOW_SWEEP, KiB, MiB

LABELS = {
    "nbdcopy": "nbdcopy (no NATS hop)",
    "nbdnats": "nbd-nats send → recv",
    "ceiling": "raw NATS ceiling (pattern: → null:)",
}
PATH_COLORS = {"nbdcopy": "#4c72b0", "nbdnats": "#dd8452", "ceiling": "#55a868"}
ROLE_COLORS = {
    "nbdcopy": "#4c72b0",
    "sender": "#dd8452",
    "receiver": "#55a868",
    "nats_server": "#c44e52",
    "qemu_nbd_src": "#8172b3",
    "qemu_nbd_dst": "#937860",
}


def _short(value: int) -> bool:
    """A chunk 4 KiB short of a power of two (the default's shape), not a power itself."""
    return value & (value - 1) != 0


def human(size: int) -> str:
    """A byte count as people write it: ``1M``, ``32M``, ``1020K``, ``512``."""
    for unit, step in (("G", 1024 * MiB), ("M", MiB), ("K", KiB)):
        if size >= step and size % step == 0:
            return f"{size // step}{unit}"
    return str(size)


def figure_sweep(
    points: list[dict[str, Any]], key: str, title: str, split_short: bool
) -> Figure | None:
    """MB/s against ``key`` (bytes) for each path; ``split_short`` draws the 2^k - 4 KiB
    chunks as their own dashed line (the window sweep has no such shape: 48 MiB is a point
    of the one line). None when there is nothing to draw."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    drawn: set[int] = set()
    for name in PATHS:
        ours = [p for p in points if p["path"] == name and p["mb_s"]]
        for short in (False, True) if split_short else (None,):
            mine = sorted(
                (p for p in ours if short is None or _short(p[key]) == short),
                key=lambda p: p[key],
            )
            if not mine:
                continue
            xs = [p[key] for p in mine]
            med = [p["mb_s"]["median"] for p in mine]
            lo = [p["mb_s"]["median"] - p["mb_s"]["min"] for p in mine]
            hi = [p["mb_s"]["max"] - p["mb_s"]["median"] for p in mine]
            ax.errorbar(
                xs,
                med,
                yerr=[lo, hi],
                marker="s" if short else "o",
                capsize=3,
                linestyle="--" if short else "-",
                color=PATH_COLORS[name],
                label=LABELS[name] + (", 2^k - 4 KiB" if short else ""),
            )
            drawn.update(xs)
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xscale("log", base=2)
    # One tick per measured size, named as people write sizes.
    ticks = sorted(drawn)
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticks(ticks, [human(t) for t in ticks])
    ax.set_xlabel(f"{key} (bytes)")
    ax.set_ylabel("MB/s (median, min-max)")
    ax.set_ylim(bottom=0)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def _save(fig: Figure | None, path: Path) -> Path | None:
    if fig is None:
        return None
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def figure_cpu(table: dict[str, dict[str, dict[str, float] | None]]) -> Figure | None:
    bars = [
        (f"{workload}\n{name}", roles)
        for workload, paths in table.items()
        for name, roles in paths.items()
        if roles
    ]
    if not bars:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    bottoms = [0.0] * len(bars)
    xs = list(range(len(bars)))
    for role in ROLES:
        heights = [roles.get(role, 0.0) for _, roles in bars]
        if not any(heights):
            continue
        ax.bar(xs, heights, bottom=bottoms, label=role, color=ROLE_COLORS[role])
        bottoms = [b + h for b, h in zip(bottoms, heights, strict=True)]
    ax.set_xticks(xs, [label for label, _ in bars])
    ax.set_ylabel("CPU seconds per GiB of image (median)")
    ax.set_title("CPU per GiB, by process")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def figures(results: dict[str, Any]) -> dict[str, Figure | None]:
    """Each plot's file name and its figure (None: nothing to draw), not yet saved."""
    sweep = results.get("sweep", {})
    return {
        "throughput_vs_chunk.png": figure_sweep(
            sweep.get(CHUNK_SWEEP, []),
            "chunk",
            "Throughput against chunk size (random image)",
            split_short=True,
        ),
        "throughput_vs_window.png": figure_sweep(
            sweep.get(WINDOW_SWEEP, []),
            "window",
            "Throughput against window (random image)",
            split_short=False,
        ),
        "cpu_per_gib.png": figure_cpu(results.get("cpu_s_per_gib", {})),
    }


def draw(results: dict[str, Any], out_dir: Path) -> list[Path]:
    made = [_save(fig, out_dir / name) for name, fig in figures(results).items()]
    return [p for p in made if p is not None]
