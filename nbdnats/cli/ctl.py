"""``nbd-nats ctl ...``: the controller's commands to agents over the ctl plane.

Endpoints are node-qualified: ``NODE:SRC`` where SRC is an export the node announces, an
absolute path (file, block device) or an NBD URI, all checked by that node's allow-list.
"""

from __future__ import annotations

import argparse
import datetime as dt
import shlex
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from nbdnats import _core, subjects
from nbdnats.cli.options import (
    add_actions,
    add_command,
    add_compress_option,
    add_login_options,
    add_progress_option,
    add_rate_option,
    add_size_option,
    add_streams_option,
    add_timeout_option,
    login_from,
)
from nbdnats.cli.output import (
    EndsProgress,
    PercentLines,
    print_json,
    print_result,
    print_rows,
    print_started,
    reader_gone,
)
from nbdnats.ctl.controller import (
    AttestOptions,
    BackupRun,
    Controller,
    OperationResult,
    parse_endpoint,
)
from nbdnats.ctl.events import Event
from nbdnats.errors import UsageError
from nbdnats.metal.approval import load_approval
from nbdnats.metal.attest import DEFAULT_PCRS, Golden, load_cas
from nbdnats.metal.verifier import Enrollments
from nbdnats.schemas import (
    AdjacencyView,
    Backup,
    MigrationEvent,
    NodeInfo,
    Tool,
    TransferEvent,
    TransferOptions,
)
from nbdnats.units import MAX_TIMEOUT, count_arg, human, parse_duration, rate, rate_arg

EPILOG = """\
examples:
  nbd-nats ctl nodes
  nbd-nats ctl copy a:vm1 b:/dev/sdb
  nbd-nats ctl backup a:vm1 b --restic /backups/repo
  nbd-nats ctl backup a:vm1 b --restic /backups/repo --incremental
  nbd-nats ctl backups b --restic /backups/repo
  nbd-nats ctl restore b a:/var/lib/images/vm1.raw --restic /backups/repo --disk a:vm1
  nbd-nats ctl restore b a:/var/lib/images/vm1.raw --restic /backups/repo --snapshot 1a2b3c4d
  nbd-nats ctl provision a:/srv/images/debian.raw inst1:/dev/sda --approval approval.json
  nbd-nats ctl enroll inst1 --ek-ca tpm-vendors.pem
  nbd-nats ctl attest inst1 --golden installer.golden --json > inst1.attestation
  nbd-nats ctl provision a:/srv/images/debian.raw inst1:/dev/vda --approval approval.json \
      --golden installer.golden --then reboot
  nbd-nats ctl adjacency bm1
  nbd-nats ctl events --since 10m
"""


def add_parser(sub: Any) -> None:
    p = add_command(
        sub,
        "ctl",
        help="drive agents: nodes, adjacency, copy, backup, backups, restore, provision, enroll, "
        "attest, migrate, transfers, events",
        description="The controller: commands to agents over the ctl plane.",
        epilog=EPILOG,
    )
    actions = add_actions(p, "ctl_command", _add_globals)

    n = actions.add_parser(
        "nodes", help="the nodes whose agents announced themselves (lost: silent too long)"
    )
    n.add_argument("--all", action="store_true", help="include nodes that stopped")

    adj = actions.add_parser(
        "adjacency",
        help="bare-metal nodes' loopbacks, ToR and port, and whether their routes are installed",
        description="Each bare-metal node's last adjacency (nbd-nats agent --loopback/--uplink): "
        "its /128 loopbacks, per uplink the ToR and port LLDP found and its link-local "
        "address, and what the route injector made of it (installed, refused and why). "
        "ROUTE is '?' when no injector answers.",
    )
    adj.add_argument("node", nargs="?", help="only this node")
    adj.add_argument(
        "--injector",
        default=subjects.DEFAULT_INJECTOR,
        metavar="NAME",
        help=f"the route injector to ask (default {subjects.DEFAULT_INJECTOR})",
    )

    def op(name: str, help_: str) -> argparse.ArgumentParser:
        a: argparse.ArgumentParser = actions.add_parser(name, help=help_, description=help_)
        a.add_argument(
            "--id", dest="transfer_id", metavar="ID", help="transfer id (default: random)"
        )
        add_size_option(a, "--window", "bytes in flight (32M)")
        add_timeout_option(
            a,
            f"peer timeout ({_core.DEFAULT_TIMEOUT:.0f}; 0: none; at most {MAX_TIMEOUT:.0f})",
            metavar="S",
            default=None,
        )
        a.add_argument("--verify", action="store_true", help="read the target back and compare")
        add_rate_option(
            a,
            "cap the data sent at N bytes/s (K/M/G, binary: 50M is 50 MiB/s; at most 1T); "
            "change it with 'ctl rate ID N' (default: no cap)",
        )
        a.add_argument(
            "--raw",
            action="store_true",
            help="move a qcow2 (vmdk, ...) file's bytes as they are, not the disk it holds",
        )
        add_compress_option(a)
        a.add_argument("--detach", action="store_true", help="print the id and do not wait")
        add_progress_option(a)
        return a

    # Positional arguments are listed apart from options, so adding them after the
    # options op() adds changes neither --help nor parsing.
    c = op("copy", "copy a disk from one node to another")
    c.add_argument("src", help="NODE:SRC  export name, path or NBD URI on the sending node")
    c.add_argument("dst", help="NODE:DST  export name, path or NBD URI on the receiving node")
    add_size_option(c, "--chunk-size", "bytes per frame")
    c.add_argument("--target-is-zero", action="store_true", help="skip writing zero ranges")
    add_streams_option(c)

    b = op("backup", "stream a node's disk into a backup tool on another node, as disk.img")
    b.add_argument("src", help="NODE:SRC  the disk")
    b.add_argument("node", help="the node running the tool")
    _add_tool_options(b, "backup")
    b.add_argument(
        "--incremental",
        action="store_true",
        help="restic: send only what changed since the disk's latest snapshot's checkpoint "
        "(SRC: a VM the node's agent knows, every writable disk, or a qcow2 image not in "
        "use); each snapshot still holds the whole image. Full when there is no such "
        "snapshot, and the summary says why",
    )

    r = op("restore", "stream a backup from a node's backup tool into a target")
    r.add_argument("node", help="the node that runs the backup tool")
    r.add_argument("dst", help="NODE:DST  the target")
    _add_tool_options(r, "restore")
    pick = r.add_mutually_exclusive_group()
    pick.add_argument(
        "--disk",
        metavar="NODE:DISK",
        help="restic: the latest backup of this disk (as ctl backup named it: a:vm1)",
    )
    pick.add_argument(
        "--snapshot",
        metavar="ID",
        help="restic: this snapshot (hex id; latest: the newest, whatever its disk). "
        "Neither: the latest backup of the one disk the repository holds",
    )
    add_size_option(r, "--size", "image size (needed for --pipe)")
    r.add_argument("--target-is-zero", action="store_true", help="skip writing zero ranges")

    v = op("provision", "write an image onto an installer's disk under a signed approval")
    v.add_argument("src", help="NODE:IMAGE  the image")
    v.add_argument("dst", help="NODE:DEVICE  its disk")
    v.add_argument("--approval", required=True, metavar="FILE", help="from nbd-nats approve")
    v.add_argument(
        "--then",
        choices=["stay", "reboot", "poweroff"],
        default="stay",
        help="once the image read back verified, the installer syncs and reboots (into the "
        "new disk) or powers off; a failed provision always stays (default: stay)",
    )
    v.add_argument(
        "--attest",
        action="store_true",
        help="attest the installer's TPM first (always done for an approval bound to a TPM)",
    )
    v.add_argument(
        "--golden",
        metavar="FILE",
        help="the installer image's golden PCR values (ctl attest --record-golden): the "
        "quote must show them (implies --attest)",
    )
    _add_enrollments(v)

    en = actions.add_parser(
        "enroll",
        help="enroll an installer's TPM: check its EK certificate, prove its attestation key",
        description="Ask installer NODE for its TPM's EK certificate and attestation key "
        "(AK); check the certificate chains to a CA in --ek-ca, prove the AK lives in that "
        "TPM (MakeCredential/ActivateCredential), and keep the AK under NODE's name.",
    )
    en.add_argument("node", help="the installer")
    en.add_argument(
        "--ek-ca",
        required=True,
        metavar="FILE",
        help="PEM certificates of the TPM manufacturers' CAs (roots and intermediates) "
        "trusted to certify EKs",
    )
    _add_enrollments(en)

    at = actions.add_parser(
        "attest",
        help="quote an enrolled installer's boot PCRs and verify them",
        description="Send installer NODE a fresh nonce; verify its TPM quote with the "
        "enrolled AK, the PCR digest against its event log, and (--golden) the values "
        "against the golden ones. --json prints what nbd-nats approve --attestation reads.",
    )
    at.add_argument("node", help="the installer")
    gold = at.add_mutually_exclusive_group()
    gold.add_argument("--golden", metavar="FILE", help="compare with these golden PCR values")
    gold.add_argument(
        "--record-golden",
        metavar="FILE",
        help="write the verified values as the golden ones of this installer image (do it "
        "on a machine you trust, booted from the image as built)",
    )
    at.add_argument("--label", help="a name for the golden values (default: the node's)")
    at.add_argument(
        "--pcrs",
        default=",".join(str(i) for i in DEFAULT_PCRS),
        metavar="LIST",
        help="PCRs to quote, sha256 bank (default %(default)s)",
    )
    _add_enrollments(at)

    bl = actions.add_parser(
        "backups",
        help="the backups a node's restic repository holds, per disk",
        description="The snapshots ctl backup stored in a restic repository, per disk: "
        "id, time, NODE:DISK, size and digest (an incremental run's also its kind, "
        "checkpoint and parent); disk by disk, each oldest first.",
    )
    bl.add_argument("node", help="the node that runs the backup tool")
    bl.add_argument("--restic", metavar="REPO", required=True, help="the restic repository")
    bl.add_argument("--disk", metavar="NODE:DISK", help="only this disk's backups")

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
    add_timeout_option(
        m,
        f"fail when a step makes no progress for S seconds ({_core.DEFAULT_TIMEOUT:.0f})",
        metavar="S",
    )
    add_size_option(
        m, "--mirror-speed", "cap the disks' bulk copy, bytes/s (default: none)", default=0
    )
    add_rate_option(
        m,
        "cap the migration at N bytes/s (K/M/G, binary), QEMU's own limits set to agree "
        "(see nbd-nats migrate --help); change it with 'ctl rate ID N'",
    )
    m.add_argument(
        "--return-path",
        action="store_true",
        help="turn on QEMU's return path (see nbd-nats migrate --help)",
    )
    m.add_argument("--detach", action="store_true", help="print the id and do not wait")
    ts = actions.add_parser("transfers", help="running and recent transfers")
    ts.add_argument("--node", action="append", help="only these nodes (repeatable)")

    x = actions.add_parser("cancel", help="cancel a transfer wherever it runs")
    x.add_argument("transfer_id", metavar="ID")

    r = actions.add_parser(
        "rate",
        help="change a running transfer's (or migration's) rate cap",
        description="Cap the sending end of transfer (or migration) ID at N bytes/s from now "
        "on, wherever it runs; it takes effect within a second. N: a size per second (512K, "
        "50M, 1G; binary), at most 1T, or 'off' to lift the cap.",
    )
    r.add_argument("transfer_id", metavar="ID")
    r.add_argument("rate", type=_rate_or_off, metavar="N")

    e = actions.add_parser("events", help="show events live (or replay stored ones)")
    e.add_argument("--since", metavar="DURATION", help="replay from this long ago (10m, 2h)")
    e.add_argument("--seq", type=count_arg, metavar="N", help="replay from stream sequence N")
    e.add_argument("--all", action="store_true", help="replay everything stored")
    e.add_argument("--node", default="*", help="only this node's events")
    e.add_argument(
        "--kind", default="*", help="only this kind (announce, transfer, refused, adjacency)"
    )
    e.add_argument("--no-follow", action="store_true", help="stop after the stored events")
    e.add_argument("--count", type=count_arg, metavar="N", help="stop after N events")


def _rate_or_off(text: str) -> int | None:
    """``ctl rate``'s N: a rate cap (``units.rate_arg``), or ``off`` (None: no cap)."""
    return None if text.strip().lower() == "off" else rate_arg(text)


def _add_enrollments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--enrollments",
        metavar="DIR",
        help="where enrolled TPMs are kept (default: the state dir's enrolled/)",
    )


def _add_globals(g: Any) -> None:
    """The options of every ctl action, taken before the action or after it."""
    g.add_argument(
        "--ctl-url",
        metavar="URL",
        help="ctl-plane servers (default: $NBDNATS_CTL_URL, $NBDNATS_DATA_URL, $NATS_URL, "
        "else nats://127.0.0.1:4222)",
    )
    add_login_options(g)
    g.add_argument("--json", action="store_true", help="print results as JSON")


# The backup tool, exactly one of them: (metavar, help) for backup and for restore.
_TOOL_OPTIONS = {
    "backup": {
        "--restic": ("REPO", "restic backup --stdin into REPO"),
        "--kopia": ("SOURCE", "kopia snapshot create SOURCE --stdin-file"),
        "--pipe": ("CMD", "a command reading the image on stdin"),
    },
    "restore": {
        "--restic": ("REPO", "restic dump SNAPSHOT disk.img from REPO"),
        "--kopia": ("OBJECT", "kopia show OBJECT (ROOT/disk.img)"),
        "--pipe": ("CMD", "a command writing the image on stdout"),
    },
}


def _add_tool_options(a: argparse.ArgumentParser, op: str) -> None:
    t = a.add_mutually_exclusive_group(required=True)
    for flag, (metavar, help_) in _TOOL_OPTIONS[op].items():
        t.add_argument(flag, metavar=metavar, help=help_)


def _tool(args: argparse.Namespace, restore: bool) -> Tool:
    if args.restic:
        return Tool(kind="restic", repo=args.restic, snapshot=getattr(args, "snapshot", None))
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


def _summary(verb: str, r: OperationResult) -> str:
    rx, tx = r.receiver, r.sender
    text = (
        f"{verb} {r.transfer_id}: {human(rx.size)} ({human(rx.data_bytes)} data) "
        f"{tx.node} -> {rx.node} in {rx.seconds:.2f} s, {rate(rx.done_bytes, rx.seconds)}"
    )
    for ev in (tx, rx):
        if ev.tool_output:
            text += f"; {ev.tool} {ev.tool_output}"
    if rx.image_digest:
        text += f"; verified {rx.image_digest}"
    elif rx.digest:
        text += f", {rx.digest}"
    if rx.verified:
        # --verify read the target back (as the local copy's summary says it).
        text += ", verified"
    if r.snapshot is not None:
        text += f"; from snapshot {r.snapshot.short_id} of {_backup_line(r.snapshot)}"
    return text


def _backup_line(b: Backup) -> str:
    """``a:vm1 2026-12-02 16:40:01 UTC 20.0 MiB sha256:...``, then an incremental run's
    ``incremental nbdnats-... parent 1a2b3c4d``."""
    size = human(b.size) if b.size is not None else "size ?"
    when = f"{b.time.astimezone(dt.UTC):%Y-%m-%d %H:%M:%S} UTC"
    text = f"{b.name} {when} {size} {b.digest or 'digest ?'}"
    if b.checkpoint is not None:
        text += f" {b.kind or 'kind ?'} {b.checkpoint}"
    if b.parent is not None:
        text += f" parent {b.parent[:8]}"
    return text


def _run_summary(run: BackupRun) -> str:
    """An incremental run, one line: the checkpoint, then per disk its kind (and why
    full), dirty and wire bytes, seconds and snapshot."""
    start = f"since {run.since}" if run.since else f"full: {run.reason}"
    parts = []
    for d in run.disks:
        tx, rx = d.result.sender, d.result.receiver
        why = f" ({d.sent.reason})" if d.sent.reason and d.sent.reason != run.reason else ""
        kind = d.sent.mode + why
        dirty = f"{human(tx.dirty_bytes)} dirty, " if d.sent.mode == "incremental" else ""
        parts.append(
            f"{d.sent.disk} {kind}: {dirty}{human(tx.sent_bytes)} sent in {rx.seconds:.2f} s, "
            f"snapshot {(d.snapshot or '?')[:8]}, {rx.digest or 'digest ?'}"
        )
    return f"backed up {run.transfer_id} at checkpoint {run.checkpoint} ({start}): " + "; ".join(
        parts
    )


def _run_doc(run: BackupRun) -> dict[str, Any]:
    """An incremental run as ``--json`` prints it."""
    return {
        "transfer_id": run.transfer_id,
        "ok": run.ok,
        "checkpoint": run.checkpoint,
        "since": run.since,
        "kind": "incremental" if run.since else "full",
        "reason": run.reason,
        "disks": [
            {
                "disk": d.sent.disk,
                "transfer_id": d.sent.transfer_id,
                "kind": d.sent.mode,
                "reason": d.sent.reason,
                "checkpoint": d.sent.checkpoint,
                "size": d.sent.size,
                "dirty_bytes": d.result.sender.dirty_bytes,
                "sent_bytes": d.result.sender.sent_bytes,
                "seconds": d.result.receiver.seconds,
                "snapshot": d.snapshot,
                "parent": d.parent.id if d.parent is not None else None,
                "digest": d.result.receiver.digest,
                "sender": d.result.sender,
                "receiver": d.result.receiver,
            }
            for d in run.disks
        ],
    }


def _node_line(n: NodeInfo) -> str:
    exports = ", ".join(f"{k}={v}" for k, v in n.exports.items()) or "-"
    line = (
        f"{n.node:16} {n.role:9} {n.state:8} v{n.version:8} running={n.running} "
        f"caps={','.join(n.capabilities)} exports={exports}"
    )
    return line + (f" ak={n.ak_name}" if n.ak_name else "")


def _adjacency_line(v: AdjacencyView) -> str:
    """One line per uplink: node, state, loopbacks, uplink, link-local, ToR, port, route."""
    r = v.routes
    if r is None:
        route = "?"
    elif r.state == "refused":
        route = f"refused: {r.error}"
    elif r.installed:
        route = f"installed on {r.tor}/{r.port}"
    else:
        route = "not installed" + (f": {r.error}" if r.error else f" ({r.state})")
    loopbacks = ",".join(v.loopbacks) or "-"
    rows = [
        f"{v.node:16} {v.state:9} {loopbacks:24} {u.name:10} {u.link_local or '-':26} "
        f"{u.tor or '-':14} {u.port or '-':10} {route}"
        for u in v.uplinks
    ] or [f"{v.node:16} {v.state:9} {loopbacks:24} {'-':10} {'-':26} {'-':14} {'-':10} {route}"]
    return "\n".join(rows)


def _transfer_line(t: TransferEvent) -> str:
    error = "  " + t.error if t.error else ""
    return (
        f"{t.transfer_id:18} {t.node:12} {t.op or t.role:9} {t.state:9} "
        f"{human(t.done_bytes)}/{human(t.size)} {t.endpoint or ''}{error}"
    )


VERBS = {"copy": "copied", "backup": "backed up", "restore": "restored", "provision": "provisioned"}


async def run(args: argparse.Namespace) -> None:
    out = sys.stdout.write
    async with await Controller.connect(args.ctl_url, login=login_from(args)) as c:
        cmd = args.ctl_command
        if cmd == "nodes":
            nodes = await c.nodes(include_stopped=args.all)
            print_rows(nodes, _node_line, as_json=args.json)
            return
        if cmd == "transfers":
            print_rows(await c.transfers(args.node), _transfer_line, as_json=args.json)
            return
        if cmd == "adjacency":
            views = await c.adjacency(args.node, injector=args.injector)
            print_rows(views, _adjacency_line, as_json=args.json)
            if not views:
                sys.stderr.write("no adjacency announced (agents: --loopback, --uplink)\n")
            elif not args.json and views[0].routes is None and views[0].injector:
                sys.stderr.write(views[0].injector + "\n")
            return
        if cmd == "backups":
            disk = parse_endpoint(args.disk) if args.disk else None
            found = await c.backups(args.node, Tool(kind="restic", repo=args.restic), disk=disk)
            found.sort(key=lambda b: (b.name, b.time))
            print_rows(found, lambda b: f"{b.short_id}  {_backup_line(b)}", as_json=args.json)
            return
        if cmd == "cancel":
            where = await c.cancel(args.transfer_id)
            out(f"cancelled {args.transfer_id} on {', '.join(where)}\n")
            return
        if cmd == "rate":
            where = await c.rate(args.transfer_id, args.rate)
            cap = f"{human(args.rate)}/s" if args.rate else "no cap"
            out(f"rate of {args.transfer_id} on {', '.join(where)}: {cap}\n")
            return
        if cmd == "events":
            await _events(c, args)
            return
        if cmd == "migrate":
            await _migrate(c, args)
            return
        if cmd == "enroll":
            await _enroll(c, args)
            return
        if cmd == "attest":
            await _attest(c, args)
            return
        await _operation(c, args)


def _store(args: argparse.Namespace) -> Enrollments:
    return Enrollments(Path(args.enrollments) if args.enrollments else None)


async def _enroll(c: Controller, args: argparse.Namespace) -> None:
    cas = load_cas(Path(args.ek_ca))
    found = await c.enroll(args.node, cas, _store(args))
    summary = (
        f"enrolled {found.node}: attestation key {found.ak_name[:20]}…, EK certificate "
        f"{found.ek_subject or '(no subject)'} issued by {found.ek_issuer}"
    )
    print_result(found, summary, as_json=args.json)


def _pcr_list(text: str) -> list[int]:
    try:
        pcrs = sorted({int(p) for p in text.split(",")})
    except ValueError:
        raise UsageError(f"--pcrs {text!r}: use PCR numbers, e.g. 0,4,7") from None
    if not pcrs or any(not 0 <= p <= 23 for p in pcrs):
        raise UsageError(f"--pcrs {text!r}: PCRs are 0 to 23")
    return pcrs


async def _attest(c: Controller, args: argparse.Namespace) -> None:
    golden = Golden.load(Path(args.golden)) if args.golden else None
    found, _ = await c.attest(args.node, _store(args), golden=golden, pcrs=_pcr_list(args.pcrs))
    if args.record_golden:
        Golden(bank="sha256", pcrs=found.pcrs, label=args.label or args.node).save(
            Path(args.record_golden)
        )
    checked = "equal to the golden values" if golden else "not compared with golden values"
    summary = (
        f"attested {found.node}: quote verified, PCRs "
        f"{','.join(str(i) for i in sorted(found.pcrs))} {checked}; PCR digest "
        f"{found.pcr_digest}"
    )
    if args.record_golden:
        summary += f"; recorded as golden in {args.record_golden}"
    print_result(found.doc(), summary, as_json=args.json)


async def _operation(c: Controller, args: argparse.Namespace) -> None:
    # Chosen here so that a failure's --json line can name it too.
    args.transfer_id = args.transfer_id or subjects.new_id()
    opts = TransferOptions(
        window=args.window,
        timeout=args.timeout,
        verify=args.verify,
        raw=args.raw,
        rate=args.rate,
        compress=args.compress,
        streams=getattr(args, "streams", 1),  # ctl copy's
    )
    quiet = args.json or args.detach or args.progress_fd is not None
    progress = EndsProgress(not quiet or args.progress, forced=args.progress)
    lines = PercentLines(args.progress_fd) if args.progress_fd is not None else None

    def on_event(ev: TransferEvent) -> None:
        progress(ev)
        if lines is not None and ev.role == "recv":  # the percent of what has landed
            lines(ev)

    common: dict[str, Any] = {
        "transfer_id": args.transfer_id,
        "options": opts,
        "wait": not args.detach,
        "on_event": on_event,
    }
    cmd = args.ctl_command
    if getattr(args, "incremental", False) and args.detach:
        raise UsageError(
            "--incremental cannot --detach: the controller confirms each snapshot before "
            "the source commits its checkpoint"
        )
    run: BackupRun | None = None
    try:
        if cmd == "copy":
            result = await c.copy(
                parse_endpoint(args.src),
                parse_endpoint(args.dst),
                chunk_size=args.chunk_size,
                target_is_zero=args.target_is_zero,
                **common,
            )
        elif cmd == "backup" and args.incremental:
            run = await c.backup(
                parse_endpoint(args.src),
                args.node,
                _tool(args, False),
                transfer_id=args.transfer_id,
                options=opts,
                wait=True,
                on_event=on_event,
                incremental=True,
            )
        elif cmd == "backup":
            result = await c.backup(
                parse_endpoint(args.src), args.node, _tool(args, False), **common
            )
        elif cmd == "restore":
            result = await c.restore(
                args.node,
                parse_endpoint(args.dst),
                _tool(args, True),
                disk=parse_endpoint(args.disk) if args.disk else None,
                size=args.size,
                target_is_zero=args.target_is_zero,
                **common,
            )
        else:
            approval = load_approval(Path(args.approval))
            attestation = None
            if args.attest or args.golden:
                golden = Golden.load(Path(args.golden)) if args.golden else None
                attestation = AttestOptions(_store(args), golden)
            elif approval.ak_name is not None:
                attestation = AttestOptions(_store(args))
            result = await c.provision(
                parse_endpoint(args.src),
                parse_endpoint(args.dst),
                approval,
                attestation=attestation,
                then=args.then,
                **common,
            )
    finally:
        progress.close()
    if run is not None:
        print_result(_run_doc(run), _run_summary(run), as_json=args.json)
        return
    if isinstance(result, str):
        print_started("transfer_id", result, as_json=args.json)
        return
    doc = {
        "transfer_id": result.transfer_id,
        "ok": result.ok,
        "sender": result.sender,
        "receiver": result.receiver,
    }
    if result.snapshot is not None:
        doc["snapshot"] = result.snapshot
    summary = _summary(VERBS[cmd], result)
    if cmd == "provision" and args.then != "stay":
        doc["then"] = args.then
        summary += (
            f"; {result.receiver.node} {'reboots' if args.then == 'reboot' else 'powers off'}"
        )
    print_result(doc, summary, as_json=args.json)


async def _migrate(c: Controller, args: argparse.Namespace) -> None:
    node, vm = parse_endpoint(args.src)
    quiet = args.json or args.detach
    args.transfer_id = args.transfer_id or subjects.new_id()

    def show(ev: MigrationEvent) -> None:
        if not quiet and ev.state not in ("done", "failed", "cancelled"):
            sys.stderr.write(f"nbd-nats: migration {ev.migration_id}: {ev.state}\n")

    result = await c.migrate(
        (node, vm),
        args.dst,
        migration_id=args.transfer_id,
        timeout=args.timeout,
        mirror_speed=args.mirror_speed,
        rate=args.rate,
        return_path=args.return_path,
        wait=not args.detach,
        on_event=show,
    )
    if isinstance(result, str):
        print_started("migration_id", result, as_json=args.json)
        return
    summary = (
        f"migrated {vm} {node} -> {args.dst}: {human(result.disk_bytes)} of disk and "
        f"{human(result.ram_bytes)} of RAM in {result.total_seconds:.2f} s, downtime "
        f"{result.downtime_ms} ms"
    )
    print_result(result, summary, as_json=args.json)


async def _events(c: Controller, args: argparse.Namespace) -> None:
    since = None
    if args.since:
        since = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=parse_duration(args.since))
    seq = 1 if args.all else args.seq
    follow = not args.no_follow
    events = c.events(since_seq=seq, since=since, node=args.node, kind=args.kind, follow=follow)
    try:
        await _show_events(events, args)
    except BrokenPipeError:
        reader_gone()


async def _show_events(events: AsyncIterator[Event], args: argparse.Namespace) -> None:
    n = 0
    async for ev in events:
        if args.json:
            print_json({"seq": ev.seq, "subject": ev.subject, "time": ev.time, "data": ev.data})
        else:
            d = ev.data
            shown = ("transfer_id", "op", "state", "done_bytes", "error")
            detail = " ".join(f"{k}={d[k]}" for k in shown if k in d and d[k] not in (None, ""))
            sys.stdout.write(f"{ev.time:%H:%M:%S} #{ev.seq} {ev.node} {ev.kind} {detail}\n")
            sys.stdout.flush()
        n += 1
        if args.count and n >= args.count:
            return
