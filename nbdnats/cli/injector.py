"""``nbd-nats route-injector``: program ToRs with bare-metal hosts' /128 loopbacks."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from nbdnats import subjects
from nbdnats.cli.options import add_command, add_login_options, login_from
from nbdnats.ctl.metrics import parse_addr
from nbdnats.errors import UsageError
from nbdnats.metal.frr import ROUTE_TAG
from nbdnats.metal.gobgp import DEFAULT_API, GobgpAnnouncer
from nbdnats.metal.injector import RECONCILE_INTERVAL, AllowList, InjectorConfig, run_injector
from nbdnats.planes import connect_ctl, resolve_urls
from nbdnats.units import interval_arg

EPILOG = f"""\
allow-file (TOML): what each node may announce, and which ToR ports are managed
  [nodes.bm1]
  prefixes = ["2001:db8:100::/64"]     # each loopback bm1 announces must be a /128 inside
  [tors.tor1]
  ports = ["swp1", "swp2"]             # optional; default: every FRR interface but lo

A ToR is named as its LLDP system name; VTY is the directory of its FRR vty sockets (what
`vtysh --vty_socket VTY` takes). Routes are `ipv6 route LOOPBACK/128 HOST-LL PORT tag
{ROUTE_TAG}`: the tag marks the injector's, and no other static route is touched.

examples:
  nbd-nats route-injector --tor tor1=/run/frr --allow-file /etc/nbdnats/routes.toml \\
      --ctl-url nats://ctl1:4222 --creds /etc/nbdnats/injector.creds
  nbd-nats route-injector --tor tor1=/run/frr --allow-file routes.toml \\
      --announce gobgp --next-hop 2001:db8:ff::1      # and to the spine, via gobgpd
  nbd-nats ctl adjacency            # what it installed
"""


def add_parser(sub: Any) -> None:
    p = add_command(
        sub,
        "route-injector",
        help="program ToRs (FRR) with bare-metal hosts' loopbacks from their adjacencies",
        description="Consume ctl.evt.*.adjacency through a durable JetStream consumer, check "
        "each against the allow-file and install or withdraw `ipv6 route <lo>/128 <host-ll> "
        "<port>` on the ToR named; refusals are ctl.evt.NAME.refused events. SIGTERM stops "
        "it; the routes stay and a restart reconciles them.",
        epilog=EPILOG,
    )
    p.add_argument(
        "--backend", choices=["frr"], default="frr", help="how ToRs are programmed (frr: vtysh)"
    )
    p.add_argument(
        "--tor",
        action="append",
        default=[],
        metavar="NAME=VTY",
        required=True,
        help="a ToR to program: its LLDP system name and its FRR vty socket directory; repeat",
    )
    p.add_argument(
        "--allow-file", required=True, metavar="FILE", help="what each node may announce (TOML)"
    )
    p.add_argument(
        "--name",
        default=subjects.DEFAULT_INJECTOR,
        help=f"this injector's name on the ctl plane (default {subjects.DEFAULT_INJECTOR})",
    )
    p.add_argument("--ctl-url", metavar="URL", help="ctl-plane servers")
    add_login_options(p)
    p.add_argument("--metrics-addr", metavar="HOST:PORT", help="serve Prometheus /metrics here")
    p.add_argument(
        "--announce",
        choices=["gobgp"],
        help="also announce each installed /128 to the spine through gobgpd, next hop "
        "--next-hop (the ToR's loopback)",
    )
    p.add_argument(
        "--gobgp-api",
        default=DEFAULT_API,
        metavar="HOST:PORT",
        help=f"gobgpd's API (default {DEFAULT_API}; keep it on loopback or a management net)",
    )
    p.add_argument(
        "--next-hop",
        metavar="ADDR",
        help="with --announce: the next hop the spine is given, the ToR's global loopback",
    )
    p.add_argument(
        "--reconcile-interval",
        type=interval_arg,
        default=RECONCILE_INTERVAL,
        metavar="S",
        help=f"seconds between reconciles of every ToR (default {RECONCILE_INTERVAL:.0f})",
    )


def injector_config(args: argparse.Namespace) -> InjectorConfig:
    """The command line, every value checked (a ``UsageError`` names the first bad one)."""
    name = subjects.check_token(args.name, "--name")
    tors: dict[str, Path] = {}
    for item in args.tor:
        tor, sep, vty = item.partition("=")
        if not sep or not vty:
            raise UsageError(f"--tor {item!r}: use NAME=VTY (VTY: the FRR vty socket directory)")
        subjects.check_token(tor, "ToR name in --tor")
        if tor in tors:
            raise UsageError(f"--tor {tor} is given twice")
        if not Path(vty).is_dir():
            raise UsageError(f"--tor {tor}={vty}: no such directory (FRR's vty sockets)")
        tors[tor] = Path(vty)
    allow = AllowList.load(Path(args.allow_file), tors)
    if args.metrics_addr:
        parse_addr(args.metrics_addr)
    return InjectorConfig(
        name=name,
        tors=tors,
        allow=allow,
        ctl_url=args.ctl_url,
        metrics_addr=args.metrics_addr,
        reconcile_interval=args.reconcile_interval,
    )


async def run(args: argparse.Namespace) -> None:
    logging.basicConfig(
        level=logging.INFO, format="nbd-nats route-injector: %(message)s", stream=sys.stderr
    )
    config = injector_config(args)
    login = login_from(args)
    url = resolve_urls(None, config.ctl_url)[1]
    announcer = _announcer(args)
    nc = await connect_ctl(url, f"nbd-nats {config.name} ctl", login)
    await run_injector(config, nc, announcer)


def _announcer(args: argparse.Namespace) -> GobgpAnnouncer | None:
    if args.announce is None:
        if args.next_hop:
            raise UsageError("--next-hop is for --announce gobgp")
        return None
    if not args.next_hop:
        raise UsageError("--announce gobgp needs --next-hop ADDR (the ToR's loopback)")
    return GobgpAnnouncer(args.gobgp_api, next_hop=args.next_hop)
