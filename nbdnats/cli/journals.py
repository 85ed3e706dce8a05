"""``nbd-nats journals``: what interrupted transfers left in the state dir, and discarding it."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from nbdnats import _core
from nbdnats.cli.options import add_command, add_state_dir_option
from nbdnats.cli.output import print_json, print_result
from nbdnats.transfer import discard_journal, journals, resolve_state_dir
from nbdnats.units import human


def add_parser(sub: Any) -> None:
    p = add_command(
        sub,
        "journals",
        help="list interrupted transfers that can be resumed, or discard one",
        description="The interrupted transfers in the state dir: each receiver's journal "
        "(transfer id, target, progress, age of its last checkpoint; 'running' while a "
        "receiver still works on it) and each sender's key. A transfer listed here continues "
        "with the same recv/send and --resume; --discard ID removes its files instead, so it "
        "starts over.",
    )
    add_state_dir_option(p, "the state dir of the recv/send")
    p.add_argument(
        "--discard",
        metavar="ID",
        help="remove transfer ID's journal and sender key (refused while its receiver runs)",
    )
    p.add_argument("--json", action="store_true", help="print JSON for scripts")


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _progress(e: _core.JournalEntry) -> str:
    if e.done_bytes is None or e.size is None:
        return "-"
    pct = 100.0 * e.done_bytes / e.size if e.size else 100.0
    return f"{human(e.done_bytes)}/{human(e.size)} ({pct:.0f}%)"


def _doc(e: _core.JournalEntry, now: float) -> dict[str, Any]:
    return {
        "id": e.transfer_id,
        "role": e.role,
        "target": e.target,
        "size": e.size,
        "done_bytes": e.done_bytes,
        "modified": e.modified,
        "age_s": None if e.modified is None else round(max(0.0, now - e.modified), 1),
        "running": e.running,
        "file": e.file,
        "error": e.error,
    }


def _table(entries: list[_core.JournalEntry], now: float) -> str:
    rows = [("ID", "ROLE", "PROGRESS", "AGE", "TARGET")]
    for e in entries:
        age = "-" if e.modified is None else _age(now - e.modified)
        if e.error is not None:
            rows.append((e.transfer_id or "?", e.role or "?", "unreadable", age, e.file))
            continue
        state = " running" if e.running else ""
        target = (e.target or "-") if e.role == "recv" else "(sender key)"
        rows.append((e.transfer_id or "?", (e.role or "?") + state, _progress(e), age, target))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(r[:4], widths, strict=True)) + "  " + r[4]
        for r in rows
    ]
    errors = [f"  {e.file}: {e.error}" for e in entries if e.error is not None]
    return "\n".join(lines + (["unreadable files:", *errors] if errors else [])) + "\n"


async def run(args: argparse.Namespace) -> None:
    state_dir = resolve_state_dir(args.state_dir)
    if args.discard is not None:
        removed = await discard_journal(args.discard, str(state_dir))
        print_result(
            {"id": args.discard, "removed": removed},
            f"discarded transfer {args.discard}: removed {', '.join(removed)}",
            as_json=args.json,
        )
        return
    entries = await journals(str(state_dir))
    now = time.time()
    if args.json:
        print_json([_doc(e, now) for e in entries])
    elif entries:
        sys.stdout.write(_table(entries, now))
    else:
        sys.stderr.write(f"no interrupted transfers in {state_dir}\n")
