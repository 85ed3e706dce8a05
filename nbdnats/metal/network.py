"""Bare-metal networking, the host's side: its service addresses as IPv6 /128s on ``lo``,
what each uplink looks like (its link-local address, a default route through the ToR's
link-local address, the ToR that LLDP says is at the other end), and the reporter that
publishes all of it as ``ctl.evt.<node>.adjacency`` for a route injector (docs/networking.md).

The kernel is read and changed through ``ip -j`` and LLDP read through ``lldpcli -f json0``,
each run from an argv list (never a shell) with a timeout. What lldpd reports came from
frames anyone on the link can send, so every value is cut to the schema's bounds here, once:
a value with control characters is dropped, a longer one cut to 255 bytes, and an address
that does not parse is left out. A missing or broken lldpd is reported, never fatal: the
adjacency then has no neighbours.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import json
import logging
import re
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

import msgspec

from nbdnats import subjects
from nbdnats.errors import SchemaError, UsageError
from nbdnats.metal.tool import run_tool
from nbdnats.schemas import MAX_ADJACENCY_BYTES, AdjacencyEvent, Uplink, decode, encode

log = logging.getLogger("nbdnats.metal.network")

LLDPD_SOCKET = "/run/lldpd.socket"  # lldpd's own control socket (lldpcli's default)
TOOL_TIMEOUT = 5.0  # seconds an `ip` or `lldpcli` run may take
MAX_TOOL_OUTPUT = 4 * 1024 * 1024  # more than this from lldpcli is not read as neighbours
PROBE_EVERY = 2.0  # seconds between probes (or the interval, when shorter)
STOP_BOUND = 10.0  # stop(): how long the probe in flight may take to end
MAX_LOOPBACKS = 64  # AdjacencyEvent.loopbacks
MAX_UPLINKS = 16  # AdjacencyEvent.uplinks
MAX_MANAGEMENT = 8  # management addresses kept per neighbour
MAX_LLDP_BYTES = 255  # an LLDP string TLV's longest value

_IFNAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:@-]{0,14}")  # fullmatch: as schemas.IfName
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_LLDPCLI_LOG = re.compile(r"^\S+ \[\w+/\w+\] ")  # "2026-12-03T14:07:28 [WARN/control] "

Publish = Callable[[str, bytes], Awaitable[None]]


# -- parsing what the user gives -------------------------------------------------------------


def parse_loopback(text: str, what: str = "--loopback") -> str:
    """An IPv6 /128 (a bare address means /128) as normalised text, e.g.
    ``2001:db8:100::7/128``; anything else is a ``UsageError``."""
    shown = repr(text) if len(text) <= 80 else repr(text[:80] + "...")
    raw = text.strip()
    if not raw or raw.startswith("-"):
        raise UsageError(f"{what} {shown}: give an IPv6 address or /128, e.g. 2001:db8:100::7/128")
    try:
        if "%" in raw:  # a scoped (link-local) address is no service address
            raise ValueError(raw)
        net = ipaddress.ip_interface(raw).network  # a bare address is a /128 (or an IPv4 /32)
    except ValueError:
        raise UsageError(
            f"{what} {shown}: not an IPv6 address or /128 prefix (e.g. 2001:db8:100::7/128)"
        ) from None
    if net.version != 6:
        raise UsageError(f"{what} {shown}: loopbacks are IPv6 /128s, not IPv4")
    if net.prefixlen != 128:
        raise UsageError(
            f"{what} {shown}: a loopback is one address, a /128 (not /{net.prefixlen})"
        )
    addr = net.network_address
    if addr.is_link_local or addr.is_multicast or addr.is_loopback or addr.is_unspecified:
        raise UsageError(f"{what} {shown}: a loopback must be a global or unique-local address")
    return f"{addr}/128"


def parse_uplink(text: str, what: str = "--uplink") -> str:
    """An interface name (as Linux allows one, never starting with '-')."""
    if not _IFNAME.fullmatch(text):
        shown = repr(text) if len(text) <= 40 else repr(text[:40] + "...")
        raise UsageError(
            f"{what} {shown}: not an interface name (up to 15 letters, digits, '_.:@-')"
        )
    return text


# -- parsing what `ip -j` and `lldpcli -f json0` print ---------------------------------------


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _dicts(value: Any) -> list[dict[str, Any]]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def parse_link_locals(text: str) -> dict[str, str | None]:
    """``ip -j addr show``: every interface by name, with its (first usable) IPv6
    link-local address or None."""
    found: dict[str, str | None] = {}
    for link in _dicts(_json(text)):
        name = link.get("ifname")
        if not isinstance(name, str):
            continue
        found.setdefault(name, None)
        for a in _dicts(link.get("addr_info")):
            if found[name] is not None:
                break
            if a.get("family") != "inet6" or a.get("scope") != "link":
                continue
            if a.get("tentative") or a.get("dadfailed"):
                continue
            found[name] = _address(a.get("local"), link_local=True)
    return found


def parse_default_routes(text: str) -> set[str]:
    """``ip -j -6 route show default``: the interfaces with a default route through a
    link-local next hop on them."""
    devs: set[str] = set()
    for route in _dicts(_json(text)):
        if route.get("dst") != "default" or route.get("type", "unicast") != "unicast":
            continue
        hops = _dicts(route.get("nexthops")) or [route]
        for hop in hops:
            gateway, dev = hop.get("gateway"), hop.get("dev")
            if isinstance(dev, str) and _address(gateway, link_local=True):
                devs.add(dev)
    return devs


def parse_neighbours(text: str) -> dict[str, Uplink]:
    """``lldpcli -f json0 show neighbors``: per local interface, its (first) LLDP
    neighbour as the fields of an ``Uplink`` (name, tor, chassis_id, port,
    port_description, management). Untrusted: values are cut to the schema (``lldp_text``),
    anything of another shape ignored."""
    found: dict[str, Uplink] = {}
    for lldp in _dicts(_dict(_json(text)).get("lldp")):
        for entry in _dicts(lldp.get("interface")):
            name = entry.get("name")
            if not isinstance(name, str) or not _IFNAME.fullmatch(name) or name in found:
                continue
            chassis = _first(entry.get("chassis"))
            port = _first(entry.get("port"))
            port_id = _first(port.get("id"))
            management = []
            for m in _dicts(chassis.get("mgmt-ip")):
                addr = _address(m.get("value"))
                if addr and addr not in management:
                    management.append(addr)
            found[name] = Uplink(
                name=name,
                tor=lldp_text(_first(chassis.get("name")).get("value")),
                chassis_id=lldp_text(_first(chassis.get("id")).get("value")),
                port=lldp_text(port_id.get("value")),
                port_description=lldp_text(_first(port.get("descr")).get("value")),
                management=management[:MAX_MANAGEMENT],
            )
    return found


def lldp_text(value: Any) -> str | None:
    """An LLDP string as an adjacency may carry it: None unless a string without control
    characters, cut to 255 bytes (UTF-8, on a character boundary)."""
    if not isinstance(value, str) or not value or _CONTROL.search(value):
        return None
    raw = value.encode("utf-8", "replace")
    if len(raw) > MAX_LLDP_BYTES:
        return raw[:MAX_LLDP_BYTES].decode("utf-8", "ignore") or None
    return value


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _first(value: Any) -> dict[str, Any]:
    items = _dicts(value)
    return items[0] if items else {}


def _address(value: Any, *, link_local: bool = False) -> str | None:
    """An IP address as normalised text, or None (not one, scoped, or not link-local when
    ``link_local``)."""
    if not isinstance(value, str) or len(value) > 64 or "%" in value:
        return None
    try:
        addr = ipaddress.ip_address(value)
    except ValueError:
        return None
    if link_local and not (addr.version == 6 and addr.is_link_local):
        return None
    return str(addr)


# -- running the tools -----------------------------------------------------------------------


async def _run(argv: Sequence[str], timeout: float = TOOL_TIMEOUT) -> tuple[int, str, str]:
    """Run a tool (an argv, no shell): (exit status, stdout, stderr's last line). A tool
    that is missing or does not finish in time is exit status 127 or 124."""
    try:
        rc, out, err = await run_tool(argv, timeout=timeout)
    except FileNotFoundError:
        return 127, "", f"{argv[0]} not found"
    except TimeoutError:
        return 124, "", f"{argv[0]} did not finish in {timeout:g} s"
    lines = [ln.strip() for ln in err.decode(errors="replace").splitlines() if ln.strip()]
    if len(out) > MAX_TOOL_OUTPUT:
        return 1, "", f"{argv[0]} printed more than {MAX_TOOL_OUTPUT} bytes"
    return rc, out.decode(errors="replace"), lines[-1] if lines else ""


async def existing_interfaces() -> set[str]:
    """The names of this namespace's interfaces (``ip -j link show``)."""
    rc, out, err = await _run(["ip", "-j", "link", "show"])
    if rc != 0:
        raise UsageError(f"cannot list interfaces: {err or f'ip exited {rc}'} (install iproute2)")
    return {n for link in _dicts(_json(out)) if isinstance(n := link.get("ifname"), str)}


async def check_uplinks(uplinks: Iterable[str]) -> None:
    """Every uplink exists now (a typo is a usage error at start, not a silent gap)."""
    have = await existing_interfaces()
    missing = [u for u in uplinks if u not in have]
    if missing:
        known = ", ".join(sorted(have))
        raise UsageError(f"--uplink {', '.join(missing)}: no such interface here (have: {known})")


class Loopbacks:
    """The /128s on ``lo``: ``ensure`` adds the missing ones and says which it added;
    ``release`` removes exactly those (an address that was there before is never touched)."""

    def __init__(self, dev: str = "lo") -> None:
        self.dev = dev

    async def present(self) -> set[str]:
        rc, out, err = await _run(["ip", "-j", "-6", "addr", "show", "dev", self.dev])
        if rc != 0:
            raise UsageError(f"cannot read the addresses of {self.dev}: {err or f'ip exited {rc}'}")
        have = set()
        for link in _dicts(_json(out)):
            for a in _dicts(link.get("addr_info")):
                addr = _address(a.get("local"))
                if addr and a.get("prefixlen") == 128:
                    have.add(f"{addr}/128")
        return have

    async def ensure(self, prefixes: Sequence[str]) -> list[str]:
        """Add each of ``prefixes`` (normalised /128s) that ``lo`` lacks; the ones added.
        A failure removes what this call added and is a ``UsageError``."""
        have = await self.present()
        added: list[str] = []
        for prefix in prefixes:
            if prefix in have or prefix in added:
                continue
            rc, _, err = await _run(["ip", "-6", "addr", "add", prefix, "dev", self.dev])
            if rc == 2 and "File exists" in err:  # added by someone else meanwhile
                continue
            if rc != 0:
                await self.release(added)
                raise UsageError(
                    f"cannot add {prefix} to {self.dev}: {err or f'ip exited {rc}'} "
                    "(the agent needs CAP_NET_ADMIN)"
                )
            added.append(prefix)
        return added

    async def release(self, added: Iterable[str]) -> None:
        """Remove ``added`` from ``lo``; one already gone is no failure."""
        for prefix in added:
            rc, _, err = await _run(["ip", "-6", "addr", "del", prefix, "dev", self.dev])
            if rc != 0 and "Cannot assign" not in err:
                log.warning("cannot remove %s from %s: %s", prefix, self.dev, err)


# -- probing the uplinks ---------------------------------------------------------------------


def lldp_argv(lldp_socket: str | None) -> list[str]:
    sock = ["-u", lldp_socket] if lldp_socket else []
    return ["lldpcli", *sock, "-f", "json0", "show", "neighbors"]


async def probe(
    uplinks: Sequence[str], lldp_socket: str | None, problems: dict[str, str] | None = None
) -> list[Uplink]:
    """Each uplink as it is now: its link-local address, whether a default route goes
    through a link-local next hop on it, and its LLDP neighbour. An interface that is gone
    has neither. What could not be read is left out, and said in ``problems`` (by source:
    addresses, routes, lldp)."""
    problems = problems if problems is not None else {}
    (rc_a, addrs, err_a), (rc_r, routes, err_r), (rc_l, lldp, err_l) = await asyncio.gather(
        _run(["ip", "-j", "addr", "show"]),
        _run(["ip", "-j", "-6", "route", "show", "default"]),
        _run(lldp_argv(lldp_socket)),
    )
    if rc_a != 0:
        problems["addresses"] = f"cannot read addresses: {err_a or f'ip exited {rc_a}'}"
    if rc_r != 0:
        problems["routes"] = f"cannot read routes: {err_r or f'ip exited {rc_r}'}"
    if rc_l != 0:
        where = lldp_socket or LLDPD_SOCKET
        problems["lldp"] = (
            f"cannot read LLDP neighbours from lldpd ({where}): "
            f"{_LLDPCLI_LOG.sub('', err_l) or f'lldpcli exited {rc_l}'}; is lldpd running?"
        )
    present = parse_link_locals(addrs) if rc_a == 0 else {}
    defaults = parse_default_routes(routes) if rc_r == 0 else set()
    neighbours = parse_neighbours(lldp) if rc_l == 0 else {}
    out = []
    for name in uplinks:
        if name not in present:  # vanished (or unreadable): nothing about it is known
            out.append(Uplink(name=name))
            continue
        seen = neighbours.get(name) or Uplink(name=name)
        out.append(
            msgspec.structs.replace(seen, link_local=present[name], default_route=name in defaults)
        )
    return out


# -- the reporter ----------------------------------------------------------------------------


class AdjacencyReporter:
    """Puts the loopbacks on ``lo`` and publishes this host's adjacency: at start, whenever
    anything but its time changed (probed every ``min(2 s, interval)``), at least every
    ``interval`` seconds, and once withdrawn at stop (which removes the loopbacks it added
    when ``release``)."""

    def __init__(
        self,
        node: str,
        loopbacks: Sequence[str],
        uplinks: Sequence[str],
        interval: float,
        publish: Publish,
        lldp_socket: str | None = None,
        release: bool = False,
    ) -> None:
        self.node = subjects.check_token(node, "node name")
        self.loopbacks = list(dict.fromkeys(parse_loopback(p) for p in loopbacks))
        self.uplinks = list(dict.fromkeys(parse_uplink(u) for u in uplinks))
        if len(self.loopbacks) > MAX_LOOPBACKS:
            raise UsageError(f"--loopback: at most {MAX_LOOPBACKS} loopbacks")
        if len(self.uplinks) > MAX_UPLINKS:
            raise UsageError(f"--uplink: at most {MAX_UPLINKS} uplinks")
        if not interval > 0:
            raise UsageError("--adjacency-interval must be more than 0 seconds")
        self.interval = interval
        self.publish = publish
        self.lldp_socket = lldp_socket
        self.release = release
        self.lo = Loopbacks()
        self.added: list[str] = []
        self.last: list[Uplink] | None = None
        self._sent_at = 0.0
        self._task: asyncio.Task[None] | None = None
        self._problems: set[str] = set()
        self._no_route_warned = False
        self._state = "new"  # new -> up -> stopped

    async def check(self) -> None:
        """What start needs, checked before the agent connects: ``ip`` works and every
        uplink exists."""
        await check_uplinks(self.uplinks)

    async def start(self) -> None:
        if self._state != "new":
            return
        await self.check()
        self.added = await self.lo.ensure(self.loopbacks)
        if self.added:
            log.info("added %s to lo", ", ".join(self.added))
        self._state = "up"
        await self.tick()
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Publish the withdrawal; remove the loopbacks this reporter added when asked."""
        if self._state != "up":
            self._state = "stopped"
            return
        self._state = "stopped"
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task], timeout=STOP_BOUND)
        await self._send("withdrawn", [], self.last or [])
        if self.release and self.added:
            await self.lo.release(self.added)
            log.info("removed %s from lo", ", ".join(self.added))
            self.added = []

    async def _run(self) -> None:
        every = min(PROBE_EVERY, self.interval)
        while True:
            await asyncio.sleep(every)
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug here must not end the reports
                log.exception("adjacency probe failed")

    async def tick(self) -> None:
        """Probe once; publish when anything changed or ``interval`` has passed."""
        problems: dict[str, str] = {}
        uplinks = await probe(self.uplinks, self.lldp_socket, problems)
        self._report(problems, uplinks)
        now = asyncio.get_running_loop().time()
        if uplinks != self.last or now - self._sent_at >= self.interval:
            self.last = uplinks
            await self._send("up", self.loopbacks, uplinks)

    async def _send(self, state: str, loopbacks: list[str], uplinks: list[Uplink]) -> None:
        self._sent_at = asyncio.get_running_loop().time()
        event = AdjacencyEvent(
            node=self.node,
            state=state,  # type: ignore[arg-type]
            loopbacks=loopbacks,
            uplinks=uplinks,
            interval=self.interval,
            at=dt.datetime.now(dt.UTC),
        )
        payload = encode(event)
        try:  # what is cut here should always fit; a bug must not send a bad event
            decode(AdjacencyEvent, payload, "adjacency")
            if len(payload) > MAX_ADJACENCY_BYTES:
                raise SchemaError(f"adjacency of {len(payload)} bytes")
        except SchemaError as e:
            log.warning("adjacency not sent without its neighbours: %s", e)
            event.uplinks = [
                Uplink(name=u.name, link_local=u.link_local, default_route=u.default_route)
                for u in uplinks
            ]
            payload = encode(event)
        await self.publish(subjects.ADJACENCY, payload)

    def _report(self, problems: dict[str, str], uplinks: list[Uplink]) -> None:
        """Log each kind of problem once (until it clears), and once when no uplink has a
        default route through a link-local next hop."""
        for source, text in problems.items():
            if source not in self._problems:
                log.warning("adjacency: %s", text)
        for source in self._problems - set(problems):
            log.info("adjacency: %s read again", source)
        self._problems = set(problems)
        routed = [u.name for u in uplinks if u.default_route]
        if not routed and uplinks and not self._no_route_warned:
            log.warning(
                "no default route via a link-local next hop on %s: this host cannot reach "
                "the fabric (add one: ip -6 route add default via fe80::… dev %s)",
                ", ".join(self.uplinks),
                self.uplinks[0],
            )
            self._no_route_warned = True
        elif routed and self._no_route_warned:
            log.info("default route via a link-local next hop on %s", ", ".join(routed))
            self._no_route_warned = False
