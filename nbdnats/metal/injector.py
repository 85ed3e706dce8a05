"""The route injector: bare-metal hosts' /128 loopbacks made reachable from the fabric.

Hosts run no routing daemon. Each agent publishes ``ctl.evt.<node>.adjacency`` (its
loopbacks; per uplink its link-local address and the ToR and port LLDP saw); the injector
reads them through a durable JetStream consumer and programs each ToR named with
``ipv6 route <loopback>/128 <host link-local> <port>`` (``nbdnats.metal.frr``). Only the
injector can change a ToR, and only as the allow-file lets each node: a host that lies
about its loopbacks, its ToR or its port is refused (a ``refused`` event under the
injector's name, ``about`` the node) and its routes stay as they were.

Order and restarts. Each node's table entry keeps the stream sequence of the last message
applied: an older one (a redelivery, the backlog after a restart) never undoes a newer one.
At start the injector takes the last adjacency of every node from the stream (the snapshot),
rebuilds its table, reconciles every ToR (adds what is missing, withdraws its own routes
that no node wants now: nodes that went away, withdrew or were lost) and then pulls. It
reconciles again every ``reconcile_interval`` seconds, which re-adds a route removed by hand
and retries a change that did not read back as asked.

Lost. A node whose last adjacency is older than ``LOST_AFTER`` of its intervals (clamped to
``INTERVAL_BOUNDS``), by the stream's clock (a host's own ``at`` is not trusted, and after a
restart a stale node is lost at once), has its routes withdrawn and is ``lost``.

Lifecycle, as the agent's: ``start()`` connects the pieces and reconciles; ``stop()`` stops
pulling and serving and closes; routes stay on the ToRs (a restart reconciles them).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import logging
import time
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from nbdnats import subjects
from nbdnats.ctl import events
from nbdnats.ctl.metrics import MetricsServer, Sample
from nbdnats.errors import (
    EndpointError,
    NatsError,
    NbdNatsError,
    PolicyError,
    RefusedError,
    SchemaError,
    UsageError,
)
from nbdnats.metal.frr import FrrTor, StaticRoute
from nbdnats.schemas import (
    MAX_ADJACENCY_BYTES,
    AdjacencyEvent,
    RefusedEvent,
    Reply,
    RouteEvent,
    RoutesQuery,
    RoutesReply,
    RouteStatus,
    decode,
    encode,
)

log = logging.getLogger("nbdnats.metal.injector")

LOST_AFTER = 3
"""A node is lost after this many of its intervals without an adjacency."""
INTERVAL_BOUNDS = (1.0, 300.0)
"""A node's announced interval, as the injector counts it: a host cannot make itself
unlosable (a week) nor lost between two messages (a millisecond)."""
RECONCILE_INTERVAL = 30.0
"""Seconds between reconciles of every ToR (``--reconcile-interval``)."""
TICK = 0.5
"""How often lost nodes and the reconcile timer are checked."""
FETCH_BATCH = 32
FETCH_WAIT = 1.0
ACK_WAIT = 60.0
"""A message not acked this long is redelivered (a change vtysh took long over)."""
STOP_BOUND = 30.0
"""How long ``stop()`` lets a change under way finish (and its message be acked)."""
LINK_LOCAL = ipaddress.IPv6Network("fe80::/10")


class Announcer(Protocol):
    """What announces accepted /128s beyond the ToR (``--announce gobgp``). The injector
    calls ``announce`` when a prefix first has a route installed on some ToR and
    ``withdraw`` when it has none left; a failure is logged and counted, never fatal."""

    async def announce(self, prefix: str) -> None: ...

    async def withdraw(self, prefix: str) -> None: ...

    async def announced(self) -> set[str]:
        """What is announced now (read at start, so a restart withdraws what went away)."""
        ...


# -- the allow-file --------------------------------------------------------------------------


@dataclass(frozen=True)
class AllowList:
    """What each node may announce (``nodes``: its prefixes) and which ports of each ToR
    are managed (``ports``: a set, or None for every interface FRR has but ``lo``)."""

    nodes: dict[str, tuple[ipaddress.IPv6Network, ...]]
    ports: dict[str, frozenset[str] | None]

    @classmethod
    def load(cls, path: Path, tors: Iterable[str]) -> AllowList:
        """Read and check an allow-file (TOML); every problem is a ``UsageError``."""
        what = f"--allow-file {path}"
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except OSError as e:
            raise UsageError(f"cannot read {what}: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise UsageError(f"{what} is not valid TOML: {e}") from None
        _only(data, {"nodes", "tors"}, what)
        nodes: dict[str, tuple[ipaddress.IPv6Network, ...]] = {}
        for node, entry in _table(data, "nodes", what).items():
            where = f"{what}: nodes.{node}"
            subjects.check_token(node, f"node name in {what}")
            _only(entry, {"prefixes"}, where)
            nodes[node] = tuple(_network(p, where) for p in _strings(entry, "prefixes", where))
        ports: dict[str, frozenset[str] | None] = dict.fromkeys(tors)
        for tor, entry in _table(data, "tors", what).items():
            where = f"{what}: tors.{tor}"
            if tor not in ports:
                raise UsageError(f"{where}: no --tor {tor}=VTY is given; add it or remove this")
            _only(entry, {"ports"}, where)
            names = _strings(entry, "ports", where)
            for name in names:
                try:
                    StaticRoute.check("::/128", "fe80::1", name)
                except ValueError:
                    raise UsageError(f"{where}: {name!r} is not an interface name") from None
            ports[tor] = frozenset(names)
        return cls(nodes, ports)

    def owner(self, prefix: str) -> str:
        """The node whose allowed prefixes hold ``prefix`` (a route found on a ToR), or ''."""
        net = ipaddress.IPv6Network(prefix)
        return next((n for n, allowed in self.nodes.items() if _inside(net, allowed)), "")


def _only(entry: object, keys: set[str], where: str) -> None:
    if not isinstance(entry, dict):
        raise UsageError(f"{where} must be a table")
    unknown = sorted(set(entry) - keys)
    if unknown:
        raise UsageError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {sorted(keys)}")


def _table(data: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise UsageError(f"{where}: {key} must be a table ([{key}.NAME])")
    return value


def _strings(entry: dict[str, Any], key: str, where: str) -> list[str]:
    value = entry.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise UsageError(f"{where}: {key} must be a list of strings")
    return value


def _network(text: str, where: str) -> ipaddress.IPv6Network:
    try:
        return ipaddress.IPv6Network(text)
    except ValueError:
        raise UsageError(
            f"{where}: {text!r} is not an IPv6 network (e.g. 2001:db8:100::/64)"
        ) from None


def _inside(net: ipaddress.IPv6Network, allowed: Iterable[ipaddress.IPv6Network]) -> bool:
    return any(net.subnet_of(a) for a in allowed)


# -- one adjacency, checked ------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class Route:
    """One route of a node on one ToR."""

    tor: str
    route: StaticRoute


def adjacency_routes(
    subject_node: str,
    data: bytes,
    allow: AllowList,
    ports: Mapping[str, frozenset[str]],
) -> tuple[AdjacencyEvent, frozenset[Route]]:
    """The routes an adjacency published on ``ctl.evt.<subject_node>.adjacency`` asks for,
    every value checked; a ``SchemaError`` or ``PolicyError`` refuses all of it. ``ports``:
    each managed ToR's managed ports."""
    if len(data) > MAX_ADJACENCY_BYTES:
        raise SchemaError(
            f"adjacency of {subject_node} is {len(data)} bytes; at most "
            f"{MAX_ADJACENCY_BYTES} are read"
        )
    ev = decode(AdjacencyEvent, data, f"adjacency of {subject_node}")
    if ev.node != subject_node:
        raise PolicyError(
            f"an adjacency on {subject_node}'s subject names node {ev.node}: a node speaks "
            "only for itself"
        )
    allowed = allow.nodes.get(subject_node)
    if allowed is None:
        raise PolicyError(
            f"node {subject_node} is not in the injector's allow-file: add [nodes.{subject_node}]"
        )
    if ev.state == "withdrawn":
        return ev, frozenset()
    loopbacks: list[str] = []
    for text in ev.loopbacks:
        try:
            given = ipaddress.IPv6Interface(text)
        except ValueError:
            raise PolicyError(f"loopback {text!r} of {subject_node} is not an IPv6 /128") from None
        if given.network.prefixlen != 128:
            raise PolicyError(f"loopback {text} of {subject_node} is not a /128")
        net = given.network
        if not _inside(net, allowed):
            mine = ", ".join(str(a) for a in allowed) or "none"
            raise PolicyError(
                f"loopback {text} of {subject_node} is outside its allowed prefixes ({mine})"
            )
        loopbacks.append(str(net))
    routes: set[Route] = set()
    for up in ev.uplinks:
        if up.tor is None and up.port is None and up.chassis_id is None:
            continue  # no LLDP neighbour on it: nothing to route through
        where = f"uplink {up.name} of {subject_node}"
        if up.tor is None or up.tor not in ports:
            raise PolicyError(f"{where} names ToR {up.tor!r}, which this injector does not manage")
        if up.port is None or up.port not in ports[up.tor]:
            raise PolicyError(f"{where}: port {up.port!r} of ToR {up.tor} is not a managed port")
        if up.link_local is None:
            continue  # not up yet (or no longer): nothing to route through, nothing claimed
        try:
            hop = ipaddress.IPv6Interface(up.link_local).ip
        except ValueError:
            raise PolicyError(f"{where}: {up.link_local!r} is not an IPv6 address") from None
        if hop not in LINK_LOCAL:
            raise PolicyError(f"{where}: next hop {up.link_local} is not link-local (fe80::/10)")
        for prefix in loopbacks:
            routes.add(Route(up.tor, StaticRoute.check(prefix, str(hop), up.port)))
    return ev, frozenset(routes)


# -- the table -------------------------------------------------------------------------------


@dataclass
class Node:
    """What the injector holds of one node: its last applied message (``seq``), its last
    accepted adjacency and when the stream took it (``time``), and the routes it wants."""

    name: str
    state: str = "refused"  # up, withdrawn, lost, or refused (its last message was)
    seq: int = 0
    event: AdjacencyEvent | None = None
    time: dt.datetime | None = None
    routes: frozenset[Route] = frozenset()
    live: bool = False  # its last accepted adjacency is "up" and not yet lost
    error: str | None = None

    def expired(self, now: dt.datetime) -> bool:
        if not self.live or self.event is None or self.time is None:
            return False
        low, high = INTERVAL_BOUNDS
        interval = min(max(self.event.interval, low), high)
        return (now - self.time).total_seconds() > LOST_AFTER * interval


@dataclass
class InjectorConfig:
    name: str
    tors: dict[str, Path]
    allow: AllowList
    ctl_url: str | None = None
    metrics_addr: str | None = None
    reconcile_interval: float = RECONCILE_INTERVAL


@dataclass
class _Counts:
    refusals: dict[str, int] = field(default_factory=dict)
    reconciles: int = 0
    errors: int = 0


class Injector:
    def __init__(
        self, config: InjectorConfig, nc: Client, announcer: Announcer | None = None
    ) -> None:
        self.config = config
        self.name = subjects.check_token(config.name, "injector name")
        self.nc = nc
        self.allow = config.allow
        self.tors = {name: FrrTor(name, vty) for name, vty in config.tors.items()}
        self.announcer = announcer
        self.nodes: dict[str, Node] = {}
        self.ports: dict[str, frozenset[str]] = {}
        self.counts = _Counts()
        self._rib: dict[str, dict[StaticRoute, bool]] = {}
        self._owners: dict[Route, str] = {}
        self._announced: set[str] = set()
        self._said: dict[str, str] = {}  # node -> the refusal last published for it
        self._lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self._subs: list[Any] = []
        self._stopped = asyncio.Event()
        self._closing = False
        self.metrics = (
            MetricsServer(config.metrics_addr, self._samples) if config.metrics_addr else None
        )

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        await self._resolve_ports(strict=True)
        problem = await events.ensure_stream(self.nc)
        if problem:
            raise NatsError(f"route injector {self.name}: {problem}")
        consumer = await self._ensure_consumer()
        if self.announcer is not None:
            # What a previous run announced: the reconcile below withdraws what no node
            # wants any more, as it does for the ToRs' routes.
            try:
                self._announced = set(await self.announcer.announced())
            except NbdNatsError as e:
                self._error(f"reading what is announced: {e}")
        async with self._lock:
            try:
                await self._snapshot()
            except (nats.errors.Error, TimeoutError) as e:
                raise NatsError(
                    f"route injector {self.name}: cannot read the adjacencies stored in "
                    f"{events.STREAM}: {e or type(e).__name__}; check the injector user's "
                    "permissions (subjects.injector_grants)"
                ) from None
            self._expire_all(dt.datetime.now(dt.UTC))
            await self._reconcile()
        js = self.nc.jetstream()
        pull = await js.pull_subscribe_bind(consumer, stream=events.STREAM)
        self._subs = [
            pull,
            await self.nc.subscribe(subjects.ctl_queries(self.name), cb=self._on_query),
        ]
        if self.metrics:
            await self.metrics.start()
        self._tasks = [
            asyncio.create_task(self._pull(pull)),
            asyncio.create_task(self._tick()),
        ]
        url = self.nc.connected_url
        log.info(
            "route injector %s up on ctl %s: %d ToR(s), %d node(s) allowed%s",
            self.name,
            f"{url.hostname}:{url.port}" if url else "?",
            len(self.tors),
            len(self.allow.nodes),
            f", metrics on {self.metrics.host}:{self.metrics.port}" if self.metrics else "",
        )

    async def stop(self) -> None:
        """Stop pulling and serving; the routes stay where they are. A batch of messages
        being applied is finished and acked first (else each would come again after
        ``ACK_WAIT``), within ``STOP_BOUND``."""
        self._closing = True
        if self._tasks:
            _, late = await asyncio.wait(self._tasks, timeout=STOP_BOUND)
            for t in late:
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        if self.metrics:
            await self.metrics.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.nc.drain(), 5)
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def _resolve_ports(self, *, strict: bool) -> None:
        """Each ToR's managed ports: the allow-file's, else every interface FRR has but lo
        (read again at each reconcile, so a port added later is managed)."""
        for name, tor in self.tors.items():
            given = self.allow.ports.get(name)
            if given is not None:
                self.ports[name] = given
                continue
            try:
                self.ports[name] = frozenset(await tor.interfaces())
            except EndpointError as e:
                if strict:
                    raise
                self._error(f"{e} (its managed ports stay as last read)")

    async def _ensure_consumer(self) -> str:
        """The durable pull consumer of every adjacency: created once, kept across
        restarts. New messages only: the snapshot stands in for the past."""
        js = self.nc.jetstream(timeout=5.0)
        name = subjects.injector_consumer(self.name)
        try:
            await js.consumer_info(events.STREAM, name)
            return name
        except nats.js.errors.NotFoundError:
            pass
        except (nats.errors.Error, TimeoutError) as e:
            raise NatsError(f"route injector {self.name}: consumer {name}: {e}") from None
        config = ConsumerConfig(
            name=name,
            durable_name=name,
            filter_subject=subjects.ALL_ADJACENCIES,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.NEW,
            ack_wait=ACK_WAIT,
            max_ack_pending=1024,
        )
        try:
            await js.add_consumer(events.STREAM, config)
        except (nats.errors.Error, TimeoutError) as e:
            raise NatsError(
                f"route injector {self.name}: cannot create consumer {name} on "
                f"{events.STREAM}: {e}; check the injector user's permissions"
            ) from None
        return name

    async def _snapshot(self) -> None:
        """Each node's last adjacency as the stream holds it, into the table (unprogrammed)."""
        reader = events.read(
            self.nc, subject=subjects.ALL_ADJACENCIES, last_per_subject=True, follow=False
        )
        async for ev in reader:
            await self._apply(ev.subject, ev.raw, ev.seq, ev.time, program=False)

    # -- consuming -------------------------------------------------------------------------

    async def _pull(self, pull: Any) -> None:
        failing = False  # said once per outage, not every second of it
        while not self._closing:
            try:
                msgs = await pull.fetch(FETCH_BATCH, timeout=FETCH_WAIT)
            except (TimeoutError, nats.errors.TimeoutError):
                continue
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the server away or reconnecting: try again shortly
                if not failing:
                    self._error(f"pulling adjacencies: {e or type(e).__name__}; retrying")
                failing = True
                await asyncio.sleep(1.0)
                continue
            if failing:
                log.info("pulling adjacencies again")
                failing = False
            for msg in msgs:
                async with self._lock:
                    try:
                        meta = msg.metadata
                        seq, at = meta.sequence.stream, meta.timestamp
                        await self._apply(msg.subject, msg.data, seq, at, program=True)
                    except asyncio.CancelledError:
                        raise
                    except Exception as e:  # a bug must not stop the injector; say it
                        log.exception("adjacency on %s", msg.subject)
                        self._error(f"adjacency on {msg.subject}: {type(e).__name__}: {e}")
                with contextlib.suppress(Exception):
                    await msg.ack()

    async def _apply(
        self, subject: str, data: bytes, seq: int, at: dt.datetime, *, program: bool
    ) -> None:
        """One adjacency message: checked, put in the table and, when ``program``, onto
        the ToRs it concerns."""
        try:
            node, _ = subjects.ctl_address(subject)
        except ValueError:
            return
        entry = self.nodes.get(node)
        if entry is not None and seq <= entry.seq:
            return  # older than what was applied: it may not undo it
        try:
            if not subjects.is_token(node):
                raise SchemaError(f"adjacency on {subject!r}: the node is not a valid name")
            ev, routes = adjacency_routes(node, data, self.allow, self.ports)
        except RefusedError as e:
            await self._refuse(node, seq, e)
            return
        if entry is None:
            entry = self.nodes[node] = Node(node)
        before = entry.routes
        entry.seq, entry.event, entry.time, entry.error = seq, ev, at, None
        entry.state, entry.live = ev.state, ev.state == "up"
        entry.routes = routes
        self._said.pop(node, None)
        if program and before != routes:
            reason = "withdrawn" if ev.state == "withdrawn" else "announced"
            # A prefix it keeps but through another ToR, port or address: a move.
            changed = {r.route.prefix for r in before ^ routes}
            kept = {r.route.prefix for r in before} & {r.route.prefix for r in routes}
            await self._sync({r.tor for r in before | routes}, {node: reason}, changed & kept)

    async def _refuse(self, node: str, seq: int, e: RefusedError) -> None:
        """Refuse a whole adjacency: nothing changes but the entry's note; the refused event
        is published once per distinct error per node."""
        self.counts.refusals[e.code] = self.counts.refusals.get(e.code, 0) + 1
        about = node if subjects.is_token(node) else None
        if about is not None:
            entry = self.nodes.setdefault(node, Node(node))
            entry.seq, entry.error = seq, str(e)
            entry.state = "refused"
        if self._said.get(node) == str(e):
            return
        self._said[node] = str(e)
        log.info("refused the adjacency of %s: %s", node, e)
        refused = RefusedEvent(
            node=self.name, op="adjacency", code=e.code, error=str(e), about=about
        )
        await self._publish("refused", encode(refused))

    # -- the lost and the timer ------------------------------------------------------------

    def _expire_all(self, now: dt.datetime) -> set[str]:
        """Mark nodes silent for too long lost, their routes dropped; their names."""
        lost: set[str] = set()
        for entry in self.nodes.values():
            if entry.expired(now):
                entry.live, entry.state = False, "lost"
                lost.add(entry.name)
        return lost

    async def _tick(self) -> None:
        due = time.monotonic() + self.config.reconcile_interval
        while not self._closing:
            await asyncio.sleep(TICK)
            if self._closing:
                return
            async with self._lock:
                try:
                    lost = self._expire_all(dt.datetime.now(dt.UTC))
                    if lost:
                        tors: set[str] = set()
                        for name in lost:
                            entry = self.nodes[name]
                            tors |= {r.tor for r in entry.routes}
                            entry.routes = frozenset()
                            log.info(
                                "node %s lost: no adjacency for %d intervals", name, LOST_AFTER
                            )
                        await self._sync(tors, dict.fromkeys(lost, "lost"))
                    if time.monotonic() >= due:
                        await self._resolve_ports(strict=False)
                        await self._reconcile()
                        due = time.monotonic() + self.config.reconcile_interval
                except asyncio.CancelledError:
                    raise
                except Exception as e:
                    log.exception("reconcile")
                    self._error(f"reconcile: {type(e).__name__}: {e}")

    async def _reconcile(self) -> None:
        self.counts.reconciles += 1
        for entry in self.nodes.values():
            if not entry.live:
                entry.routes = frozenset()  # a lost node found in the snapshot
        await self._sync(self.tors, {})

    # -- programming the ToRs --------------------------------------------------------------

    async def _sync(
        self, tors: Iterable[str], reasons: dict[str, str], moved: Iterable[str] = ()
    ) -> None:
        """Make each of ``tors`` carry exactly the routes the table wants of it (adding
        before removing), read it back, and say what changed (``reasons``: why, per node,
        "reconcile" for the others; ``moved``: prefixes that change place)."""
        moving = set(moved)
        for name in sorted(set(tors)):
            tor = self.tors.get(name)
            if tor is None:
                continue
            wanted = {r.route: n for n, e in self.nodes.items() for r in e.routes if r.tor == name}
            try:
                config, rib = await tor.config(), await tor.rib()
                blocked = set(wanted) & config.others
                add = sorted(r for r in wanted if r not in blocked and r not in rib)
                remove = sorted(config.ours - set(wanted))
                if add or remove:
                    await tor.change(add, remove)
                    after, after_rib = await tor.config(), await tor.rib()
                else:
                    after, after_rib = config, rib
            except EndpointError as e:
                self._error(str(e))
                continue
            self._rib[name] = after_rib
            for r in sorted(blocked):
                self._error(f"ToR {name}: {r.prefix} via {r.via} {r.port} is another static route")
            for r in add:
                if r not in after_rib:
                    self._error(f"ToR {name}: {r.line(tor.tag)} is not in the RIB as asked")
            for r in remove:
                if r in after.ours:
                    self._error(f"ToR {name}: {r.line(tor.tag)} is still configured")
            for r in add:
                if r in after_rib and r not in rib:
                    await self._route_event(name, wanted[r], r, "installed", reasons, moving)
            for r in remove:
                if r not in after.ours:
                    owner = self._owners.pop(Route(name, r), None) or self.allow.owner(r.prefix)
                    await self._route_event(name, owner, r, "withdrawn", reasons, moving)
            for r, node in wanted.items():
                self._owners[Route(name, r)] = node
        await self._announce()

    async def _route_event(
        self,
        tor: str,
        node: str,
        r: StaticRoute,
        action: str,
        reasons: dict[str, str],
        moving: set[str],
    ) -> None:
        reason = reasons.get(node, "reconcile")
        if reason == "announced" and r.prefix in moving:
            reason = "moved"
        elif reason == "announced" and action == "withdrawn":
            reason = "withdrawn"  # a loopback it no longer announces
        log.info(
            "%s %s via %s %s on %s (%s: %s)", action, r.prefix, r.via, r.port, tor, node, reason
        )
        ev = RouteEvent(
            injector=self.name,
            node=node,
            action=action,  # type: ignore[arg-type]
            prefix=r.prefix,
            tor=tor,
            port=r.port,
            via=r.via,
            reason=reason,
        )
        await self._publish("route", encode(ev))

    async def _announce(self) -> None:
        if self.announcer is None:
            return
        now = {r.prefix for rib in self._rib.values() for r, installed in rib.items() if installed}
        for prefix in sorted(now - self._announced):
            try:
                await self.announcer.announce(prefix)
                self._announced.add(prefix)
            except Exception as e:
                self._error(f"announcing {prefix}: {e}")
        for prefix in sorted(self._announced - now):
            try:
                await self.announcer.withdraw(prefix)
                self._announced.discard(prefix)
            except Exception as e:
                self._error(f"withdrawing the announcement of {prefix}: {e}")

    # -- what it tells ---------------------------------------------------------------------

    def _error(self, what: str) -> None:
        self.counts.errors += 1
        log.warning("%s", what)

    async def _publish(self, kind: str, payload: bytes) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.nc.publish(subjects.ctl_event(self.name, kind), payload), 5)

    def status(self, entry: Node) -> RouteStatus:
        routes = sorted(entry.routes)
        first = routes[0] if routes else None
        loopbacks = sorted({r.route.prefix for r in routes})
        if not loopbacks and entry.event is not None:
            loopbacks = list(entry.event.loopbacks)
        installed = bool(routes) and all(
            self._rib.get(r.tor, {}).get(r.route, False) for r in routes
        )
        return RouteStatus(
            node=entry.name,
            state=entry.state,  # type: ignore[arg-type]
            loopbacks=loopbacks,
            tor=first.tor if first else None,
            port=first.route.port if first else None,
            link_local=first.route.via if first else None,
            installed=installed,
            error=entry.error,
            at=entry.event.at if entry.event else None,
        )

    async def _on_query(self, msg: Msg) -> None:
        _, what = subjects.ctl_address(msg.subject)
        reply: Reply | RoutesReply
        try:
            if what != "routes":
                raise SchemaError(f"unknown query {what!r}; a route injector answers routes")
            query = decode(RoutesQuery, msg.data or b"{}", "routes query")
            entries = sorted(self.nodes.values(), key=lambda e: e.name)
            if query.node is not None:
                entries = [e for e in entries if e.name == query.node]
            reply = RoutesReply(
                ok=True, injector=self.name, routes=[self.status(e) for e in entries]
            )
        except NbdNatsError as e:
            reply = Reply(ok=False, code=e.code, error=str(e))
        if msg.reply:
            with contextlib.suppress(Exception):
                await msg.respond(encode(reply))

    def _samples(self) -> Iterable[Sample]:
        for tor in sorted(self.tors):
            n = sum(1 for installed in self._rib.get(tor, {}).values() if installed)
            yield ("nbdnats_injector_routes_installed", {"tor": tor}, n)
        for reason, n in sorted(self.counts.refusals.items()):
            yield ("nbdnats_injector_refusals_total", {"reason": reason}, n)
        yield ("nbdnats_injector_reconciles_total", {}, self.counts.reconciles)
        yield ("nbdnats_injector_errors_total", {}, self.counts.errors)


async def run_injector(
    config: InjectorConfig, nc: Client, announcer: Announcer | None = None
) -> None:
    """Run until SIGTERM/SIGINT, then stop (the routes stay)."""
    import signal

    injector = Injector(config, nc, announcer)
    await injector.start()
    loop = asyncio.get_running_loop()
    stopping: list[asyncio.Task[None]] = []

    def on_signal() -> None:
        if not stopping:
            stopping.append(asyncio.create_task(injector.stop()))

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    try:
        await injector.wait_stopped()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
