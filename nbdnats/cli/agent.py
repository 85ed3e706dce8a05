"""``nbd-nats agent``: this node's agent, configured from the command line and a TOML file."""

from __future__ import annotations

import argparse
import logging
import sys
import tomllib
from pathlib import Path
from typing import Any

from nbdnats.cli.options import add_command, add_login_options, add_state_dir_option
from nbdnats.ctl.agent import run_agent
from nbdnats.ctl.config import (
    ADJACENCY_INTERVAL,
    ANNOUNCE_INTERVAL,
    DRAIN_TIMEOUT,
    PROGRESS_INTERVAL,
    AgentConfig,
)
from nbdnats.errors import UsageError
from nbdnats.metal.network import LLDPD_SOCKET, parse_loopback, parse_uplink
from nbdnats.planes import default_node
from nbdnats.units import interval_arg, parse_timeout, timeout_arg

EPILOG = """\
config file (TOML; command-line options win; --allow, --export, --loopback and --uplink
add to it):
  node = "rack1-07"
  ctl_url = "nats://ctl1:4222"
  data_url = "nats://data1:4222"
  creds = "/etc/nbdnats/node.creds"   # or nkey = FILE; tls_cert, tls_key, tls_ca = FILE
  role = "host"                       # or "installer"
  allow = ["/var/lib/images", "/dev/disk/by-id", "/run/vm"]
  trusted_keys = "/etc/nbdnats/trusted"
  tpm = "device"                      # installer: "none", or a TCTI (swtpm:port=2321)
  metrics_addr = "127.0.0.1:9464"
  loopbacks = ["2001:db8:100::7/128"] # bare metal: /128s put on lo and announced
  uplinks = ["eth0", "eth1"]          # the interfaces towards the ToR(s)
  lldp_socket = "/run/lldpd.socket"
  release_loopbacks = true
  adjacency_interval = 30
  [exports]
  vm1 = "nbd+unix:///vm1?socket=/run/vm/vm1.nbd"
  [vms]                               # VMs to migrate or receive: name = QMP socket
  vm1 = "/run/vm/vm1.qmp"
  [env]                               # for restic/kopia; never sent in commands
  RESTIC_PASSWORD_FILE = "/etc/nbdnats/restic.pass"

examples:
  nbd-nats agent --node a --allow /var/lib/images --export vm1=/var/lib/images/vm1.raw
  nbd-nats agent --node inst1 --role installer --trusted-keys /etc/nbdnats/trusted \\
      --allow /dev/sda --then-file /run/nbdnats/then
  nbd-nats agent --node bm7 --allow /dev/disk/by-id --loopback 2001:db8:100::7/128 \\
      --uplink eth0 --uplink eth1 --release-loopbacks
"""


def add_parser(sub: Any) -> None:
    p = add_command(
        sub,
        "agent",
        help="run this node's agent (serves ctl commands and queries)",
        description="Serve ctl.cmd.NODE.* and ctl.qry.NODE.*, announce the node, publish "
        "its events; SIGTERM drains running transfers and stops.",
        epilog=EPILOG,
    )
    p.add_argument("--node", help="this node's name (default: config, else the hostname)")
    p.add_argument("--ctl-url", metavar="URL", help="ctl-plane servers")
    p.add_argument("--data-url", metavar="URL", help="data-plane servers")
    add_login_options(p)
    p.add_argument(
        "--allow",
        action="append",
        default=[],
        metavar="PREFIX",
        help="a directory (paths, devices, sockets under it) or URI prefix this agent may "
        "open; repeat for more. Nothing else is opened",
    )
    p.add_argument(
        "--export",
        action="append",
        default=[],
        metavar="NAME=URI",
        help="announce an endpoint by name (an NBD URI or path); repeatable",
    )
    p.add_argument(
        "--vm",
        action="append",
        default=[],
        metavar="NAME=QMP",
        help="a VM this node may migrate away or receive (ctl migrate), by its QMP unix "
        "socket; repeatable",
    )
    p.add_argument("--role", choices=["host", "installer"], help="host (default) or installer")
    p.add_argument("--trusted-keys", metavar="DIR", help="Ed25519 public keys (*.pub) of approvers")
    p.add_argument(
        "--tpm",
        metavar="TCTI",
        help="installer: its TPM for attestation: 'device' (/dev/tpmrm0, the default when it "
        "exists), 'none', or a tpm2-tools TCTI such as swtpm:host=127.0.0.1,port=2321",
    )
    p.add_argument(
        "--event-log",
        metavar="FILE",
        help="installer: the firmware's TPM event log (default "
        "/sys/kernel/security/tpm0/binary_bios_measurements)",
    )
    p.add_argument(
        "--then-file",
        metavar="FILE",
        help="installer: after a provision with --then reboot|poweroff verified, write the "
        "word here and stop (the installer's /init reads it and does it); without it such "
        "provisions are refused",
    )
    p.add_argument("--metrics-addr", metavar="HOST:PORT", help="serve Prometheus /metrics here")
    p.add_argument(
        "--loopback",
        action="append",
        default=[],
        metavar="PREFIX",
        help="bare metal: an IPv6 /128 (a service address) to put on lo and announce in "
        "ctl.evt.NODE.adjacency; repeatable",
    )
    p.add_argument(
        "--uplink",
        action="append",
        default=[],
        metavar="IFACE",
        help="bare metal: an interface towards a ToR, reported with its link-local address, "
        "default route and LLDP neighbour; repeatable; it must exist at start",
    )
    p.add_argument(
        "--lldp-socket",
        metavar="PATH",
        help=f"lldpd's control socket (default {LLDPD_SOCKET}); without lldpd the "
        "adjacency has no neighbours",
    )
    p.add_argument(
        "--release-loopbacks",
        action="store_true",
        help="on stop, remove the /128s this agent added to lo (never ones already there)",
    )
    p.add_argument(
        "--adjacency-interval",
        type=interval_arg,
        metavar="S",
        help="seconds between adjacency events when nothing changes (default "
        f"{ADJACENCY_INTERVAL:.0f}; changes are published within 2 s)",
    )
    add_state_dir_option(p, "where receivers keep their journals")
    p.add_argument("--config", metavar="FILE", help="a TOML config file (see below)")
    p.add_argument(
        "--announce-interval",
        type=interval_arg,
        metavar="S",
        help=f"seconds between announcements (default {ANNOUNCE_INTERVAL:.0f})",
    )
    p.add_argument(
        "--drain-timeout",
        type=timeout_arg,
        metavar="S",
        help=f"on SIGTERM, how long running transfers may finish (default {DRAIN_TIMEOUT:.0f})",
    )


def _load_config(path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise UsageError(f"cannot read --config {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"--config {path} is not valid TOML: {e}") from None
    known = set(AgentConfig.__dataclass_fields__)
    unknown = sorted(set(data) - known)
    if unknown:
        raise UsageError(f"--config {path}: unknown setting(s) {', '.join(unknown)}")
    return data


def _seconds(conf: dict[str, Any], key: str, default: float, *, zero: bool) -> float:
    """A number of seconds from the config file, checked as the command line's are."""
    value = conf.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise UsageError(f"--config: {key} must be a number of seconds")
    return parse_timeout(repr(value), f"--config {key}", zero=zero)


def _strings(conf: dict[str, Any], key: str) -> list[str]:
    value = conf.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise UsageError(f"--config: {key} must be a list of strings")
    return value


def _adjacency(args: argparse.Namespace, conf: dict[str, Any]) -> dict[str, Any]:
    """The bare-metal networking settings: loopbacks and uplinks from both (checked here,
    so a bad one is one line and exit 2), the rest the command line's over the file's."""
    loopbacks = [parse_loopback(p, "loopbacks") for p in _strings(conf, "loopbacks")]
    loopbacks += [parse_loopback(p) for p in args.loopback]
    uplinks = [parse_uplink(u, "uplinks") for u in _strings(conf, "uplinks")]
    uplinks += [parse_uplink(u) for u in args.uplink]
    release = conf.get("release_loopbacks", False)
    if not isinstance(release, bool):
        raise UsageError("--config: release_loopbacks must be true or false")
    sock = args.lldp_socket or conf.get("lldp_socket")
    if sock is not None and (not isinstance(sock, str) or not sock or sock.startswith("-")):
        raise UsageError("lldp_socket: give the path of lldpd's socket")
    return {
        "loopbacks": list(dict.fromkeys(loopbacks)),
        "uplinks": list(dict.fromkeys(uplinks)),
        "lldp_socket": sock,
        "release_loopbacks": bool(args.release_loopbacks) or release,
        "adjacency_interval": args.adjacency_interval
        or _seconds(conf, "adjacency_interval", ADJACENCY_INTERVAL, zero=False),
    }


def agent_config(args: argparse.Namespace) -> AgentConfig:
    conf = _load_config(args.config)
    exports = dict(conf.get("exports", {}))
    for item in args.export:
        name, sep, uri = item.partition("=")
        if not sep or not name or not uri:
            raise UsageError(f"--export {item!r}: use NAME=URI")
        exports[name] = uri
    vms = {str(k): str(v) for k, v in conf.get("vms", {}).items()}
    for item in args.vm:
        name, sep, qmp = item.partition("=")
        if not sep or not name or not qmp:
            raise UsageError(f"--vm {item!r}: use NAME=QMP_SOCKET")
        vms[name] = qmp
    trusted = args.trusted_keys or conf.get("trusted_keys")
    try:
        return AgentConfig(
            node=args.node or conf.get("node") or default_node(),
            ctl_url=args.ctl_url or conf.get("ctl_url"),
            data_url=args.data_url or conf.get("data_url"),
            creds=args.creds or conf.get("creds"),
            nkey=args.nkey or conf.get("nkey"),
            tls_cert=args.tlscert or conf.get("tls_cert"),
            tls_key=args.tlskey or conf.get("tls_key"),
            tls_ca=args.tlsca or conf.get("tls_ca"),
            role=args.role or conf.get("role", "host"),
            allow=[*conf.get("allow", []), *args.allow],
            exports=exports,
            trusted_keys=Path(trusted) if trusted else None,
            tpm=args.tpm or conf.get("tpm"),
            event_log=args.event_log or conf.get("event_log"),
            then_file=args.then_file or conf.get("then_file"),
            metrics_addr=args.metrics_addr or conf.get("metrics_addr"),
            state_dir=args.state_dir or conf.get("state_dir"),
            env={str(k): str(v) for k, v in conf.get("env", {}).items()},
            vms=vms,
            announce_interval=args.announce_interval
            or _seconds(conf, "announce_interval", ANNOUNCE_INTERVAL, zero=False),
            progress_interval=_seconds(conf, "progress_interval", PROGRESS_INTERVAL, zero=False),
            drain_timeout=args.drain_timeout
            if args.drain_timeout is not None
            else _seconds(conf, "drain_timeout", DRAIN_TIMEOUT, zero=True),
            **_adjacency(args, conf),
        )
    except TypeError as e:
        raise UsageError(f"--config: {e}") from None


async def run(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.INFO, format="nbd-nats agent: %(message)s", stream=sys.stderr)
    config = agent_config(args)
    if config.role not in ("host", "installer"):
        raise UsageError(f"role {config.role!r}: use host or installer")
    await run_agent(config)
