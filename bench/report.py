"""Rebuild a results folder from its runs: figures, targets, summary.md, plots.

    python -m bench.report bench/results/<time> [--latest FILE]

The measured runs, machine, configuration and micro benchmarks of ``results.json`` are
kept as they are; everything derived from them is computed again with the current
``bench.harness`` (after a change to the figures or targets, no need to measure again).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from bench import harness
from bench.harness import Run


def rebuild(folder: Path, latest: Path | None = None, *, plots: bool = True) -> dict[str, object]:
    old = json.loads((folder / "results.json").read_text())
    results = harness.build_results(
        [Run.from_json(r) for r in old["runs"]],
        machine=old["machine"],
        config=old["config"],
        source_allocated=old.get("sparse_source_allocated"),
        micro=old.get("micro"),
    )
    (folder / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (folder / "summary.md").write_text(harness.format_markdown(results))
    if latest is not None:
        latest.write_text(json.dumps(harness.summary(results), indent=1) + "\n")
    if plots:
        try:
            from bench import plots as draw

            draw.draw(results, folder)
        except ImportError as e:
            print(f"bench: plots skipped ({e}); `make bench-deps` installs matplotlib")
    return results


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__)
    p.add_argument("folder", type=Path, help="a results folder with results.json")
    p.add_argument("--latest", type=Path, help="also write the summary (no runs) here")
    args = p.parse_args(argv)
    print(harness.format_report(rebuild(args.folder, args.latest)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
