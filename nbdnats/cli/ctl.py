"""``nbd-nats agent``, ``nbd-nats ctl ...`` and ``nbd-nats digest``: the control plane's CLI.

Endpoints are node-qualified: ``NODE:SRC`` where SRC is an export the node announces, an
absolute path (file, block device) or an NBD URI, all checked by that node's allow-list.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import shlex
import sys
import tomllib
from pathlib import Path
from typing import Any

import msgspec

from nbdnats import _core
from nbdnats.approval import load_approval
from nbdnats.cli.main import add_login_options
from nbdnats.ctl.agent import (
    ANNOUNCE_INTERVAL,
    DRAIN_TIMEOUT,
    PROGRESS_INTERVAL,
    AgentConfig,
    run_agent,
)
from nbdnats.ctl.controller import Controller, OperationResult, parse_endpoint
from nbdnats.errors import UsageError
from nbdnats.planes import Login, default_node
from nbdnats.schemas import MigrationEvent, Tool, TransferEvent, TransferOptions
from nbdnats.units import (
    MAX_TIMEOUT,
    count_arg,
    human,
    interval_arg,
    parse_duration,
    parse_timeout,
    size_arg,
    timeout_arg,
)

AGENT_EPILOG = """\
config file (TOML; command-line options win, --allow and --export add to it):
  node = "rack1-07"
  ctl_url = "nats://ctl1:4222"
  data_url = "nats://data1:4222"
  role = "host"                       # or "installer"
  allow = ["/var/lib/images", "/dev/disk/by-id", "/run/vm"]
  trusted_keys = "/etc/nbdnats/trusted"
  metrics_addr = "127.0.0.1:9464"
  [exports]
  vm1 = "nbd+unix:///vm1?socket=/run/vm/vm1.nbd"
  [vms]                               # VMs to migrate or receive: name = QMP socket
  vm1 = "/run/vm/vm1.qmp"
  [env]                               # for restic/kopia; never sent in commands
  RESTIC_PASSWORD_FILE = "/etc/nbdnats/restic.pass"

examples:
  nbd-nats agent --node a --allow /var/lib/images --export vm1=/var/lib/images/vm1.raw
  nbd-nats agent --node inst1 --role installer --trusted-keys /etc/nbdnats/trusted \\
      --allow /dev/sda
"""

CTL_EPILOG = """\
examples:
  nbd-nats ctl nodes
  nbd-nats ctl copy a:vm1 b:/dev/sdb
  nbd-nats ctl backup a:vm1 b --restic /backups/repo
  nbd-nats ctl restore b a:/var/lib/images/vm1.raw --restic /backups/repo --snapshot 1a2b3c4d
  nbd-nats ctl provision a:/srv/images/debian.raw inst1:/dev/sda --approval approval.json
  nbd-nats ctl events --since 10m
"""


# -- agent ----------------------------------------------------------------------------------


def add_agent_parser(sub: Any) -> None:
    p = sub.add_parser(
        "agent",
        help="run this node's agent (serves ctl commands and queries)",
        description="Serve ctl.cmd.NODE.* and ctl.qry.NODE.*, announce the node, publish "
        "its events; SIGTERM drains running transfers and stops.",
        epilog=AGENT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
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
    p.add_argument("--metrics-addr", metavar="HOST:PORT", help="serve Prometheus /metrics here")
    p.add_argument("--state-dir", metavar="DIR", help="where receivers keep their journals")
    p.add_argument("--config", metavar="FILE", help="a TOML config file (see below)")
    p.add_argument(
        "--announce-interval", type=interval_arg, metavar="S",
        help=f"seconds between announcements (default {ANNOUNCE_INTERVAL:.0f})",
    )  # fmt: skip
    p.add_argument(
        "--drain-timeout", type=timeout_arg, metavar="S",
        help=f"on SIGTERM, how long running transfers may finish (default {DRAIN_TIMEOUT:.0f})",
    )  # fmt: skip


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
            role=args.role or conf.get("role", "host"),
            allow=[*conf.get("allow", []), *args.allow],
            exports=exports,
            trusted_keys=Path(trusted) if trusted else None,
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
        )
    except TypeError as e:
        raise UsageError(f"--config: {e}") from None


async def run_agent_command(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.INFO, format="nbd-nats agent: %(message)s", stream=sys.stderr)
    config = agent_config(args)
    if config.role not in ("host", "installer"):
        raise UsageError(f"role {config.role!r}: use host or installer")
    await run_agent(config)


# -- ctl ------------------------------------------------------------------------------------


def add_ctl_parser(sub: Any) -> None:
    p = sub.add_parser(
        "ctl",
        help="drive agents: nodes, copy, backup, restore, provision, migrate, transfers, events",
        description="The controller: commands to agents over the ctl plane.",
        epilog=CTL_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--ctl-url", metavar="URL", help="ctl-plane servers ($NBDNATS_CTL_URL)")
    add_login_options(p)
    p.add_argument("--json", action="store_true", help="print results as JSON")
    actions = p.add_subparsers(dest="ctl_command", metavar="ACTION", required=True)

    n = actions.add_parser(
        "nodes", help="the nodes whose agents announced themselves (lost: silent too long)"
    )
    n.add_argument("--all", action="store_true", help="include nodes that stopped")

    def op(name: str, help_: str, *ends: tuple[str, str]) -> argparse.ArgumentParser:
        a: argparse.ArgumentParser = actions.add_parser(name, help=help_, description=help_)
        for end, text in ends:
            a.add_argument(end, help=text)
        a.add_argument(
            "--id", dest="transfer_id", metavar="ID", help="transfer id (default: random)"
        )
        a.add_argument("--window", type=size_arg, metavar="BYTES", help="bytes in flight (32M)")
        a.add_argument(
            "--timeout",
            type=timeout_arg,
            metavar="S",
            help=f"peer timeout ({_core.DEFAULT_TIMEOUT:.0f}; 0: none; at most {MAX_TIMEOUT:.0f})",
        )
        a.add_argument("--verify", action="store_true", help="read the target back and compare")
        a.add_argument("--detach", action="store_true", help="print the id and do not wait")
        return a

    c = op("copy", "copy a disk from one node to another",
           ("src", "NODE:SRC  export name, path or NBD URI on the sending node"),
           ("dst", "NODE:DST  export name, path or NBD URI on the receiving node"))  # fmt: skip
    c.add_argument("--chunk-size", type=size_arg, metavar="BYTES", help="bytes per frame")
    c.add_argument("--target-is-zero", action="store_true", help="skip writing zero ranges")

    b = op("backup", "stream a node's disk into a backup tool on another node, as disk.img",
           ("src", "NODE:SRC  the disk"), ("node", "the node running the tool"))  # fmt: skip
    t = b.add_mutually_exclusive_group(required=True)
    t.add_argument("--restic", metavar="REPO", help="restic backup --stdin into REPO")
    t.add_argument("--kopia", metavar="SOURCE", help="kopia snapshot create SOURCE --stdin-file")
    t.add_argument("--pipe", metavar="CMD", help="a command reading the image on stdin")

    r = op("restore", "stream a backup from a node's backup tool into a target",
           ("node", "the node that runs the backup tool"),
           ("dst", "NODE:DST  the target"))  # fmt: skip
    t = r.add_mutually_exclusive_group(required=True)
    t.add_argument("--restic", metavar="REPO", help="restic dump SNAPSHOT disk.img from REPO")
    t.add_argument("--kopia", metavar="OBJECT", help="kopia show OBJECT (ROOT/disk.img)")
    t.add_argument("--pipe", metavar="CMD", help="a command writing the image on stdout")
    r.add_argument("--snapshot", default="latest", help="restic snapshot (default: latest)")
    r.add_argument("--size", type=size_arg, metavar="BYTES", help="image size (needed for --pipe)")
    r.add_argument("--target-is-zero", action="store_true", help="skip writing zero ranges")

    v = op("provision", "write an image onto an installer's disk under a signed approval",
           ("src", "NODE:IMAGE  the image"), ("dst", "NODE:DEVICE  its disk"))  # fmt: skip
    v.add_argument("--approval", required=True, metavar="FILE", help="from nbd-nats approve")

    m = actions.add_parser(
        "migrate",
        help="live-migrate a VM from one node's agent to another's",
        description="Live-migrate VM (its QMP socket known to NODE's agent as --vm VM=...) "
        "into the QEMU that DEST's agent knows by the same name, started with "
        "-incoming defer. QMP, NBD and migration sockets stay local; the disks and the "
        "RAM cross NATS.",
    )
    m.add_argument("src", metavar="NODE:VM")
    m.add_argument("dst", metavar="DEST")
    m.add_argument("--id", dest="transfer_id", metavar="ID", help="migration id (random)")
    m.add_argument(
        "--timeout",
        type=timeout_arg,
        default=_core.DEFAULT_TIMEOUT,
        metavar="S",
        help=f"fail when a step makes no progress for S seconds ({_core.DEFAULT_TIMEOUT:.0f})",
    )
    m.add_argument("--mirror-speed", type=size_arg, default=0, metavar="BYTES",
                   help="cap the disks' bulk copy, bytes/s (default: none)")  # fmt: skip
    m.add_argument("--return-path", action="store_true",
                   help="turn on QEMU's return path (see nbd-nats migrate --help)")  # fmt: skip
    m.add_argument("--detach", action="store_true", help="print the id and do not wait")
    ts = actions.add_parser("transfers", help="running and recent transfers")
    ts.add_argument("--node", action="append", help="only these nodes (repeatable)")

    x = actions.add_parser("cancel", help="cancel a transfer wherever it runs")
    x.add_argument("transfer_id", metavar="ID")

    e = actions.add_parser("events", help="show events live (or replay stored ones)")
    e.add_argument("--since", metavar="DURATION", help="replay from this long ago (10m, 2h)")
    e.add_argument("--seq", type=count_arg, metavar="N", help="replay from stream sequence N")
    e.add_argument("--all", action="store_true", help="replay everything stored")
    e.add_argument("--node", default="*", help="only this node's events")
    e.add_argument("--kind", default="*", help="only this kind (announce, transfer, refused)")
    e.add_argument("--no-follow", action="store_true", help="stop after the stored events")
    e.add_argument("--count", type=count_arg, metavar="N", help="stop after N events")


def _tool(args: argparse.Namespace, restore: bool) -> Tool:
    if args.restic:
        return Tool(kind="restic", repo=args.restic, snapshot=getattr(args, "snapshot", "latest"))
    if args.kopia:
        return (
            Tool(kind="kopia", object=args.kopia)
            if restore
            else Tool(kind="kopia", source=args.kopia)
        )
    try:
        argv = shlex.split(args.pipe)
    except ValueError as e:
        raise UsageError(f"--pipe {args.pipe!r}: {e}") from None
    if not argv:
        raise UsageError("--pipe needs a command")
    return Tool(kind="pipe", command=argv)


class _Progress:
    """Both ends' progress on one terminal line; silent when stderr is not a terminal."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self.ends: dict[str, TransferEvent] = {}

    def __call__(self, ev: TransferEvent) -> None:
        if not self.enabled:
            return
        self.ends[ev.role] = ev
        parts = [
            f"{e.node} {e.role} {human(e.done_bytes)}/{human(e.size)} {e.state}"
            for e in self.ends.values()
        ]
        sys.stderr.write("\r" + "  ".join(parts) + "   ")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.ends:
            sys.stderr.write("\n")


def _summary(verb: str, r: OperationResult) -> str:
    rx, tx = r.receiver, r.sender
    text = (
        f"{verb} {r.transfer_id}: {human(rx.size)} ({human(rx.data_bytes)} data) "
        f"{tx.node} -> {rx.node} in {rx.seconds:.2f} s, {rx.mb_per_s:.1f} MB/s"
    )
    for ev in (tx, rx):
        if ev.tool_output:
            text += f"; {ev.tool} {ev.tool_output}"
    if rx.image_digest:
        text += f"; verified {rx.image_digest}"
    elif rx.digest:
        text += f", {rx.digest}"
    return text


def _json(obj: Any) -> str:
    return msgspec.json.encode(obj).decode()


async def run_ctl(args: argparse.Namespace) -> None:
    out = sys.stdout.write
    async with await Controller.connect(
        args.ctl_url, login=Login.resolve(args.creds, args.nkey)
    ) as c:
        cmd = args.ctl_command
        if cmd == "nodes":
            nodes = await c.nodes(include_stopped=args.all)
            if args.json:
                out(_json(nodes) + "\n")
            for n in [] if args.json else nodes:
                exports = ", ".join(f"{k}={v}" for k, v in n.exports.items()) or "-"
                out(f"{n.node:16} {n.role:9} {n.state:8} v{n.version:8} running={n.running} "
                    f"caps={','.join(n.capabilities)} exports={exports}\n")  # fmt: skip
            return
        if cmd == "transfers":
            rows = await c.transfers(args.node)
            if args.json:
                out(_json(rows) + "\n")
            for t in [] if args.json else rows:
                out(f"{t.transfer_id:18} {t.node:12} {t.op or t.role:9} {t.state:9} "
                    f"{human(t.done_bytes)}/{human(t.size)} {t.endpoint or ''}"
                    f"{'  ' + t.error if t.error else ''}\n")  # fmt: skip
            return
        if cmd == "cancel":
            where = await c.cancel(args.transfer_id)
            out(f"cancelled {args.transfer_id} on {', '.join(where)}\n")
            return
        if cmd == "events":
            await _events(c, args)
            return
        if cmd == "migrate":
            await _migrate(c, args)
            return
        await _operation(c, args)


async def _operation(c: Controller, args: argparse.Namespace) -> None:
    opts = TransferOptions(window=args.window, timeout=args.timeout, verify=args.verify)
    progress = _Progress(not args.json and not args.detach)
    common: dict[str, Any] = {
        "transfer_id": args.transfer_id,
        "options": opts,
        "wait": not args.detach,
        "on_event": progress,
    }
    cmd = args.ctl_command
    try:
        if cmd == "copy":
            result = await c.copy(
                parse_endpoint(args.src), parse_endpoint(args.dst), chunk_size=args.chunk_size,
                target_is_zero=args.target_is_zero, **common,
            )  # fmt: skip
        elif cmd == "backup":
            result = await c.backup(parse_endpoint(args.src), args.node, _tool(args, False),
                                    **common)  # fmt: skip
        elif cmd == "restore":
            result = await c.restore(
                args.node, parse_endpoint(args.dst), _tool(args, True), size=args.size,
                target_is_zero=args.target_is_zero, **common,
            )  # fmt: skip
        else:
            approval = load_approval(Path(args.approval))
            result = await c.provision(
                parse_endpoint(args.src), parse_endpoint(args.dst), approval, **common
            )
    finally:
        progress.close()
    if isinstance(result, str):
        sys.stdout.write((_json({"transfer_id": result}) if args.json else result) + "\n")
        return
    if args.json:
        doc = {"transfer_id": result.transfer_id, "ok": result.ok,
               "sender": result.sender, "receiver": result.receiver}  # fmt: skip
        sys.stdout.write(_json(doc) + "\n")
    else:
        verb = {"copy": "copied", "backup": "backed up", "restore": "restored",
                "provision": "provisioned"}[cmd]  # fmt: skip
        sys.stderr.write(_summary(verb, result) + "\n")


async def _migrate(c: Controller, args: argparse.Namespace) -> None:
    node, vm = parse_endpoint(args.src)
    quiet = args.json or args.detach

    def show(ev: MigrationEvent) -> None:
        if not quiet and ev.state not in ("done", "failed", "cancelled"):
            sys.stderr.write(f"nbd-nats: migration {ev.migration_id}: {ev.state}\n")

    result = await c.migrate(
        (node, vm), args.dst, migration_id=args.transfer_id, timeout=args.timeout,
        mirror_speed=args.mirror_speed, return_path=args.return_path, wait=not args.detach,
        on_event=show,
    )  # fmt: skip
    if isinstance(result, str):
        sys.stdout.write((_json({"migration_id": result}) if args.json else result) + "\n")
    elif args.json:
        sys.stdout.write(_json(result) + "\n")
    else:
        sys.stderr.write(
            f"migrated {vm} {node} -> {args.dst}: {human(result.disk_bytes)} of disk and "
            f"{human(result.ram_bytes)} of RAM in {result.total_seconds:.2f} s, downtime "
            f"{result.downtime_ms} ms\n"
        )


async def _events(c: Controller, args: argparse.Namespace) -> None:
    since = None
    if args.since:
        since = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=parse_duration(args.since))
    seq = 1 if args.all else args.seq
    follow = not args.no_follow
    n = 0
    async for ev in c.events(since_seq=seq, since=since, node=args.node, kind=args.kind,
                             follow=follow):  # fmt: skip
        if args.json:
            line = _json({"seq": ev.seq, "subject": ev.subject, "time": ev.time, "data": ev.data})
        else:
            d = ev.data
            detail = " ".join(
                f"{k}={d[k]}" for k in ("transfer_id", "op", "state", "done_bytes", "error")
                if k in d and d[k] not in (None, "")
            )  # fmt: skip
            line = f"{ev.time:%H:%M:%S} #{ev.seq} {ev.node} {ev.kind} {detail}"
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
        n += 1
        if args.count and n >= args.count:
            return


# -- digest ---------------------------------------------------------------------------------


def add_digest_parser(sub: Any) -> None:
    p = sub.add_parser(
        "digest",
        help="print the sha256 of an image's contents (as approvals name it)",
        description="The sha256 of the raw disk SRC holds (an NBD URI, file or device), as "
        "sha256sum prints it for the raw image; holes are hashed without being read.",
    )
    p.add_argument("src", metavar="SRC")
    p.add_argument("--length", type=size_arg, metavar="BYTES", help="hash only the first BYTES")


async def run_digest(args: argparse.Namespace) -> None:
    from nbdnats.transfer import image_digest

    digest, _ = await image_digest(args.src, length=args.length, allow_local_file=True)
    sys.stdout.write(f"{digest}  {args.src}\n")
