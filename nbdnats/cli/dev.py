"""``nbd-nats dev up|down|status``: the development topology (``nbdnats.dev``) from the
command line."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from nbdnats.cli.options import add_command
from nbdnats.cli.output import print_json
from nbdnats.dev.lifecycle import down, status, up
from nbdnats.dev.tls import tls_files
from nbdnats.dev.topology import (
    DEFAULT_STATE,
    STATE_ENV,
    STATE_FILE,
    State,
    load,
    state_dir,
    url_host,
)
from nbdnats.errors import DevError
from nbdnats.units import human, parse_size


def _describe(state: State) -> list[str]:
    root = Path(state.state_dir)
    ctl, data = state.cluster_url("ctl"), state.cluster_url("data")
    rows = [("ctl cluster", ctl), ("data cluster", data)]
    rows += [(f"{s.name} leaf", state.url(s)) for s in state.servers if s.kind == "rack"]
    rows += [(f"{n.name} ({n.rack})", n.nbd) for n in state.nodes]
    rows += [
        (f"{n.name} agent", f"metrics http://{url_host(state.host)}:{n.metrics_port}/metrics")
        for n in state.nodes
    ]
    monitors = ", ".join(f"{s.name}:{s.http_port}" for s in state.servers)
    rows.append(("monitoring", f"http://{url_host(state.host)}:PORT/varz, PORT of {monitors}"))
    rows.append(("TLS", f"tls:// URLs verify with SSL_CERT_FILE={tls_files(root).ca}"))
    rows.append(("logins", f"nats://USER:PASSWORD@..., users and passwords in {root / STATE_FILE}"))
    lines = [f"{label:<15}{value}" for label, value in rows]
    # The first server's login serves the whole list; PASSWORD: the user's, in the file.
    login = "nats://{}:PASSWORD@"
    dev_data, dev_ctl = (u.replace("nats://", login.format("dev"), 1) for u in (data, ctl))
    lines.append(f"export NBDNATS_DATA_URL={dev_data} NBDNATS_CTL_URL={dev_ctl}")
    controller = ctl.replace("nats://", login.format("controller"), 1)
    lines.append(f"nbd-nats ctl --ctl-url {controller} nodes")
    return lines


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add ``dev up|down|status`` to the ``nbd-nats`` subcommands."""
    p = add_command(
        sub,
        "dev",
        help="run the development topology as local processes",
        description="The development topology (ctl and data NATS clusters, rack leafnodes, "
        "sample NBD exports) as local processes, without Docker. See docs/dev-environment.md.",
    )
    actions = p.add_subparsers(dest="dev_command", metavar="ACTION", required=True)
    u = actions.add_parser("up", help="start the topology and print its URLs")
    u.add_argument("--racks", type=int, default=2, help="racks, one node each (default: 2)")
    u.add_argument("--ipv6", action="store_true", help="listen on [::1] instead of 127.0.0.1")
    u.add_argument(
        "--base-port",
        type=int,
        metavar="PORT",
        help="use consecutive ports from PORT (default: free ports)",
    )
    u.add_argument(
        "--disk-size", default="16M", metavar="BYTES", help="size of each node's sample disk"
    )
    u.add_argument("--json", action="store_true", help="print the state as JSON")
    d = actions.add_parser("down", help="stop what `dev up` started and remove its files")
    s = actions.add_parser("status", help="show what runs")
    s.add_argument("--json", action="store_true", help="print the state as JSON")
    for q in (u, d, s):
        q.add_argument(
            "--state-dir",
            metavar="DIR",
            help="where configs, logs, disks and the process list live "
            f"(default: ${STATE_ENV} or {DEFAULT_STATE})",
        )
    return p


async def run(args: argparse.Namespace) -> None:
    root = state_dir(args.state_dir)
    out = sys.stdout.write
    if args.dev_command == "up":
        state = await up(
            root,
            racks=args.racks,
            ipv6=args.ipv6,
            base_port=args.base_port,
            disk_size=parse_size(args.disk_size, "--disk-size"),
        )
        if args.json:
            print_json(state.to_json(with_passwords=False))
            return
        size = human(Path(state.nodes[0].image).stat().st_size)
        out(
            f"dev: up in {root}: {len(state.processes)} processes, {state.racks} "
            f"rack{'s' if state.racks != 1 else ''}, "
            f"{size} sample disks\n"
        )
        out("".join(f"  {line}\n" for line in _describe(state)))
    elif args.dev_command == "down":
        stopped, gone = await down(root)
        note = f" ({gone} had already exited)" if gone else ""
        out(f"dev: stopped {stopped} processes{note} and removed them from {root}\n")
    else:
        found = load(root)
        if found is None:
            raise DevError(f"nothing runs: no dev topology in {root}")
        rows = await asyncio.to_thread(status, found)
        if args.json:
            print_json({**found.to_json(with_passwords=False), "status": rows})
        else:
            for r in rows:
                extra = " ".join(
                    f"{k}={r[k]}"
                    for k in ("routes", "leafnodes", "connections", "streams")
                    if r.get(k)
                )
                mark = "running" if r["running"] else "EXITED "
                url = r.get("url", "")
                out(f"{r['name']:<22} pid {r['pid']:<8} {mark} {url} {extra}".rstrip() + "\n")
        dead = [r["name"] for r in rows if not r["running"]]
        if dead:
            raise DevError(
                f"{len(dead)} of {len(rows)} processes exited ({', '.join(dead)}); "
                f"see {root / 'logs'}, then `nbd-nats dev down`"
            )
