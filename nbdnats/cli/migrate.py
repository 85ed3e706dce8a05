"""``nbd-nats migrate``: live-migrate a running QEMU VM (``nbdnats.migration``), directly
or through NATS, and ``--cancel`` one."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import AsyncIterator
from typing import Any

import msgspec

from nbdnats import _core, subjects
from nbdnats.cli.options import (
    add_command,
    add_login_options,
    add_rate_option,
    add_timeout_option,
    login_from,
)
from nbdnats.cli.output import print_result
from nbdnats.embedded import EmbeddedServer
from nbdnats.errors import NbdNatsError, UsageError
from nbdnats.migration.paths import DirectPath, NatsPath, Path
from nbdnats.migration.record import cancel, recorded
from nbdnats.migration.run import MigrationReport, Progress, State, migrate
from nbdnats.planes import Planes, urls_given
from nbdnats.schemas import MigrationEvent
from nbdnats.units import human, parse_size


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``migrate`` to the ``nbd-nats`` subcommands."""
    p = add_command(
        subparsers,
        "migrate",
        help="live-migrate a running QEMU VM (RAM and disks)",
        description="Live-migrate the VM behind --src-qmp into the QEMU behind --dst-qmp, "
        "started with -incoming defer and disks of the same sizes. The disks are found "
        "through QMP. See docs/migration.md.",
    )
    p.add_argument("--src-qmp", metavar="SOCK", help="the source QEMU's QMP unix socket")
    p.add_argument("--dst-qmp", metavar="SOCK", help="the destination QEMU's QMP unix socket")
    p.add_argument("--id", dest="migration_id", metavar="ID", help="migration id (default: random)")
    p.add_argument(
        "--direct",
        action="store_true",
        help="join the two QEMUs' sockets directly, no NATS (the baseline)",
    )
    p.add_argument(
        "--data-url",
        metavar="URL",
        help="data-plane servers for the streams (default: $NBDNATS_DATA_URL, $NATS_URL, "
        "else an embedded nats-server)",
    )
    p.add_argument(
        "--ctl-url",
        metavar="URL",
        help="ctl-plane servers for the migration's event (default: $NBDNATS_CTL_URL, else "
        "the data URL)",
    )
    p.add_argument("--node", help="this node's name in ctl.evt.NODE.migration (default: hostname)")
    add_login_options(p)
    add_timeout_option(
        p,
        "fail when a step makes no progress for this long; 0 waits forever "
        f"(default: {_core.DEFAULT_TIMEOUT:g})",
    )
    p.add_argument(
        "--cancel",
        action="store_true",
        help="cancel migration --id run by another nbd-nats migrate, or roll back what a "
        "migration left behind through --src-qmp (and --dst-qmp)",
    )
    p.add_argument(
        "--mirror-speed",
        default="0",
        metavar="BYTES",
        help="cap the disks' bulk copy at BYTES per second, like 50M (default: no cap)",
    )
    add_rate_option(
        p,
        "cap the migration at N bytes/s (K/M/G, binary: 50M is 50 MiB/s; at most 1T): "
        "QEMU's max-bandwidth and the RAM's NATS stream take N, the disks' mirror jobs and "
        "their streams share it (N / disks, or --mirror-speed when lower) (default: no cap)",
    )
    p.add_argument(
        "--return-path",
        action="store_true",
        help="turn on QEMU's return path: a destination that fails to load tells the source "
        "(costs downtime: the source waits for the destination to have loaded)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON line with the results")
    p.add_argument("--quiet", "-q", action="store_true", help="no state lines or summary")
    return p


@contextlib.asynccontextmanager
async def _data_path(args: argparse.Namespace, migration_id: str) -> AsyncIterator[Path]:
    """--direct, or NATS: the given data plane (or $NBDNATS_DATA_URL), else an embedded
    nats-server for the duration."""
    if args.direct:
        yield DirectPath()
        return
    async with contextlib.AsyncExitStack() as stack:
        url = args.data_url
        if not urls_given(url, None):
            url = await stack.enter_async_context(EmbeddedServer())
        ctl = args.ctl_url or (None if args.data_url else url)
        planes = await Planes.connect(url, ctl, args.node, login_from(args))
        stack.push_async_callback(planes.close)
        timeout = args.timeout or _core.DEFAULT_TIMEOUT
        yield NatsPath(planes, migration_id, timeout=timeout)


async def _announce(path: Path, migration_id: str, state: str, **fields: Any) -> None:
    """Report the end as ``ctl.evt.<node>.migration`` on the NATS path's ctl connection."""
    planes = getattr(path, "planes", None)
    if planes is None:
        return
    fields = {k: v for k, v in fields.items() if k in MigrationEvent.__struct_fields__}
    fields.update(migration_id=migration_id, node=planes.node, state=state, mode=path.mode)
    with contextlib.suppress(Exception):
        event = msgspec.json.encode(MigrationEvent(**fields))
        await planes.ctl.publish(subjects.ctl_event(planes.node, "migration"), event)
        await planes.ctl.flush(timeout=2)


def _summary(r: MigrationReport) -> str:
    return (
        f"migrated {r.disks} disk{'s' if r.disks != 1 else ''} ({human(r.disk_bytes)}) and "
        f"{human(r.ram_bytes)} of RAM in {r.total_seconds:.2f} s, downtime {r.downtime_ms} ms "
        f"(paused {r.paused_ms} ms), {r.mode}"
    )


async def run(args: argparse.Namespace) -> None:
    if args.migration_id is not None:
        # It names a file here, and subjects once the migration travels over NATS.
        subjects.check_token(args.migration_id, "migration id")
    if args.cancel:
        message = await cancel(args.migration_id, args.src_qmp, args.dst_qmp)
        if not args.quiet:
            sys.stderr.write(f"nbd-nats: {message}\n")
        return
    # Chosen here so that a failure's --json line can name it too.
    args.migration_id = migration_id = args.migration_id or subjects.new_id()
    if not args.src_qmp or not args.dst_qmp:
        raise UsageError("migrate needs --src-qmp and --dst-qmp")
    if args.direct and args.data_url:
        raise UsageError("--direct joins the sockets without NATS: drop --data-url")
    if args.timeout < 0:
        raise UsageError("--timeout must be 0 (no limit) or more seconds")
    speed = parse_size(args.mirror_speed, "--mirror-speed")
    seen: list[State] = []

    def show(p: Progress) -> None:
        # One line per state on stderr: what a person (or a script waiting for a state)
        # needs; --json and --quiet keep stderr for errors.
        if not seen or seen[-1] != p.state:
            seen.append(p.state)
            sys.stderr.write(f"nbd-nats: migration {migration_id}: {p.state.value}\n")

    with recorded(migration_id, args.src_qmp, args.dst_qmp):
        async with _data_path(args, migration_id) as path:
            try:
                report = await migrate(
                    args.src_qmp,
                    args.dst_qmp,
                    path=path,
                    migration_id=migration_id,
                    timeout=args.timeout,
                    mirror_speed=speed,
                    rate=args.rate,
                    return_path=args.return_path,
                    on_progress=None if (args.quiet or args.json) else show,
                )
            except NbdNatsError as e:
                await _announce(path, migration_id, "failed", error_code=e.code, error=str(e))
                raise
            await _announce(path, migration_id, "done", **msgspec.structs.asdict(report))
    print_result(report, None if args.quiet else _summary(report), as_json=args.json)
