"""PNG plots of a results document (matplotlib, the ``bench`` extra).

- ``throughput_vs_chunk.png``: MB/s against chunk size (nbdcopy: its request size) for the
  three paths, median with min-max bars; nbd-nats and the ceiling also at 2^k - 4 KiB
  (dashed), the shape of the default chunk.
- ``throughput_vs_window.png``: MB/s against the window for nbd-nats and the NATS ceiling.
- ``cpu_per_gib.png``: CPU seconds per GiB, stacked by process, for each path and image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

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


def _sweep_plot(
    points: list[dict[str, Any]], key: str, scale: int, unit: str, title: str, path: Path
) -> Path | None:
    fig, ax = plt.subplots(figsize=(7, 4.2))
    drawn = False
    for name in PATHS:
        ours = [p for p in points if p["path"] == name and p["mb_s"]]
        # Chunk sizes come as powers of two and 4 KiB short of them: one line each.
        for short in (False, True):
            mine = sorted((p for p in ours if _short(p[key]) == short), key=lambda p: p[key])
            if not mine:
                continue
            xs = [p[key] / scale for p in mine]
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
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xscale("log", base=2)
    ax.set_xlabel(f"{key} ({unit})")
    ax.set_ylabel("MB/s (median, min-max)")
    ax.set_ylim(bottom=0)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _cpu_plot(table: dict[str, dict[str, dict[str, float] | None]], path: Path) -> Path | None:
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
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def draw(results: dict[str, Any], out_dir: Path) -> list[Path]:
    sweep = results.get("sweep", {})
    made = [
        _sweep_plot(
            sweep.get(CHUNK_SWEEP, []),
            "chunk",
            KiB,
            "KiB",
            "Throughput against chunk size (random image)",
            out_dir / "throughput_vs_chunk.png",
        ),
        _sweep_plot(
            sweep.get(WINDOW_SWEEP, []),
            "window",
            MiB,
            "MiB",
            "Throughput against window (random image)",
            out_dir / "throughput_vs_window.png",
        ),
        _cpu_plot(results.get("cpu_s_per_gib", {}), out_dir / "cpu_per_gib.png"),
    ]
    return [p for p in made if p is not None]
