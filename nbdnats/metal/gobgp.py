"""Re-announce the /128s the route injector installed on a ToR to the spine, through gobgpd.

The injector programs a host's loopback on its ToR as a static route; the spine learns it
from a gobgpd that peers with it and carries each /128 with the ToR's loopback as next hop
(``GobgpAnnouncer`` is the injector's ``Announcer``). gobgpd is driven through its
``gobgp`` client, one argv per call (never a shell), and every change is read back:
``gobgp global rib add`` answers 0 for a path it did not keep as much as for one it did.

Our paths are the locally originated ones carrying our community (``COMMUNITY`` unless told
otherwise): ``announce`` replaces one of ours (say, after the ToR's loopback changed) but
never a local path without it, which someone else added; ``withdraw`` removes only ours;
``announced`` lists the prefixes of ours whose next hop is this announcer's, what a
reconcile compares with the routes it keeps.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json

from nbdnats.errors import EndpointError, UsageError
from nbdnats.metal.tool import run_tool

DEFAULT_API = "127.0.0.1:50051"
# A community of a private AS (RFC 6996): marks the paths this announcer owns in gobgpd's
# RIB. (65535:x, the other obvious pick, is RFC 1997's reserved well-known range.)
COMMUNITY = "64512:4242"
DEFAULT_TIMEOUT = 10.0  # one gobgp call; it gives up on an absent gobgpd after ~1s itself

_PATH_ATTR_COMMUNITIES = 8
_PATH_ATTR_MP_REACH = 14


def parse_api(api: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` of gobgpd's gRPC API, the host an IP address."""
    host, sep, port = api.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    if bracketed:
        host = host[1:-1]
    try:
        if not sep or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(api)
        if ":" in host and not bracketed:  # "::1:50051" is an address, not ::1 port 50051
            raise ValueError(api)
        addr = ipaddress.ip_address(host)
    except ValueError:
        raise UsageError(
            f"bad gobgpd API address {api!r}: give HOST:PORT or [V6]:PORT, "
            f"the host an IP address (default {DEFAULT_API})"
        ) from None
    return str(addr), int(port)


def parse_next_hop(value: str) -> str:
    """A ToR loopback: a global IPv6 unicast address (a link-local one means nothing to
    the spine)."""
    try:
        addr = ipaddress.IPv6Address(value)
    except ValueError:
        raise UsageError(
            f"bad next hop {value!r}: give the ToR's loopback, an IPv6 address"
        ) from None
    if (
        addr.is_link_local
        or addr.is_multicast
        or addr.is_unspecified
        or addr.is_loopback
        or addr.ipv4_mapped is not None
    ):
        raise UsageError(
            f"bad next hop {value!r}: the ToR's loopback must be a global unicast IPv6 address"
        )
    return addr.compressed


def parse_prefix(value: str) -> str:
    """A host's loopback as ``ADDR/128`` (a bare address is taken as its /128)."""
    try:
        net = ipaddress.IPv6Network(value, strict=True)
    except ValueError:
        raise UsageError(f"bad prefix {value!r}: give an IPv6 /128") from None
    if net.prefixlen != 128:
        raise UsageError(f"bad prefix {value!r}: only /128s are announced")
    if net.network_address.is_multicast or net.network_address.is_unspecified:
        raise UsageError(f"bad prefix {value!r}: not a unicast address")
    return net.with_prefixlen


def parse_community(value: str) -> tuple[str, int]:
    """``ASN:VALUE`` (16 bits each) as gobgp takes it and as its JSON shows it (a uint32)."""
    high, sep, low = value.partition(":")
    if not (sep and high.isdigit() and low.isdigit() and int(high) < 65536 and int(low) < 65536):
        raise UsageError(f"bad community {value!r}: give ASN:VALUE, each 0-65535")
    return f"{int(high)}:{int(low)}", int(high) << 16 | int(low)


class GobgpAnnouncer:
    """Announce and withdraw /128s with ``next_hop`` through the gobgpd at ``api``.

    Every value is checked here, before it reaches an argv; a gobgpd that is down, slow or
    that does not keep a change raises ``EndpointError``.
    """

    def __init__(
        self,
        api: str = DEFAULT_API,
        *,
        next_hop: str,
        community: str = COMMUNITY,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.host, self.port = parse_api(api)
        self.next_hop = parse_next_hop(next_hop)
        self.community, self._community_value = parse_community(community)
        if not timeout > 0:
            raise UsageError(f"bad gobgp timeout {timeout!r}: give a positive number of seconds")
        self.timeout = timeout

    @property
    def api(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    async def announce(self, prefix: str) -> None:
        """Announce ``prefix`` (a /128) with our next hop and community; idempotent."""
        prefix = parse_prefix(prefix)
        path = await self._local_path(prefix)
        if path is not None and not self._is_ours(path):
            raise EndpointError(
                f"gobgpd at {self.api} already originates {prefix} for someone else "
                f"(no community {self.community}): remove that path or choose another community"
            )
        await self._gobgp(
            "global",
            "rib",
            "add",
            "-a",
            "ipv6",
            prefix,
            "nexthop",
            self.next_hop,
            "community",
            self.community,
        )
        path = await self._local_path(prefix)
        if path is None or not self._is_ours(path) or _next_hop(path) != self.next_hop:
            raise EndpointError(
                f"gobgpd at {self.api} did not keep {prefix} via {self.next_hop}: "
                "check its log and policies"
            )

    async def withdraw(self, prefix: str) -> None:
        """Withdraw ``prefix`` if we announced it (with any next hop); idempotent."""
        prefix = parse_prefix(prefix)
        path = await self._local_path(prefix)
        if path is None or not self._is_ours(path):
            return
        await self._gobgp("global", "rib", "del", "-a", "ipv6", prefix)
        path = await self._local_path(prefix)
        if path is not None and self._is_ours(path):
            raise EndpointError(
                f"gobgpd at {self.api} still originates {prefix} after its withdrawal: "
                "check its log"
            )

    async def announced(self) -> set[str]:
        """The /128s gobgpd originates for us: our community, our next hop."""
        rib = await self._rib()
        found = set()
        for prefix, paths in rib.items():
            if any(self._is_ours(p) and _next_hop(p) == self.next_hop for p in _local(paths)):
                with contextlib.suppress(UsageError):
                    found.add(parse_prefix(prefix))
        return found

    # -- gobgp ---------------------------------------------------------------------------

    def _is_ours(self, path: dict[str, object]) -> bool:
        return self._community_value in _communities(path)

    async def _local_path(self, prefix: str) -> dict[str, object] | None:
        """The path gobgpd originates itself for exactly ``prefix`` (gobgpd keeps one)."""
        rib = await self._rib(prefix)
        for path in _local(rib.get(prefix, [])):
            return path
        return None

    async def _rib(self, prefix: str | None = None) -> dict[str, list[dict[str, object]]]:
        """gobgpd's IPv6 unicast RIB (or its entry for exactly ``prefix``, a /128)."""
        out = await self._gobgp("global", "rib", "-a", "ipv6", *([prefix] if prefix else []), "-j")
        try:
            rib = json.loads(out or "{}")
        except ValueError:
            rib = None
        if not isinstance(rib, dict) or not all(
            isinstance(paths, list) and all(isinstance(p, dict) for p in paths)
            for paths in rib.values()
        ):
            raise EndpointError(
                f"gobgpd at {self.api} answered its RIB with something else than gobgp's "
                "JSON: check that gobgp and gobgpd are the same version"
            )
        return rib

    async def _gobgp(self, *args: str) -> str:
        argv = ["gobgp", "-u", self.host, "-p", str(self.port), *args]
        try:
            rc, out, err = await run_tool(argv, timeout=self.timeout)
        except FileNotFoundError:
            raise UsageError("gobgp not found: install gobgpd's client (Debian: gobgpd)") from None
        except TimeoutError:
            raise EndpointError(
                f"gobgpd at {self.api} did not answer in {self.timeout:g}s: check that it runs"
            ) from None
        text = out.decode(errors="replace")
        if rc != 0:
            raise EndpointError(self._failure(args, text + err.decode(errors="replace")))
        return text

    def _failure(self, args: tuple[str, ...], output: str) -> str:
        lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
        why = lines[0] if lines else "no output"
        with contextlib.suppress(ValueError, AttributeError):
            why = str(json.loads(why)["error"])  # -j reports {"error": "..."}
        why = why.removeprefix("error: ")
        if "deadline exceeded" in why or "connection refused" in why or "Unavailable" in why:
            return (
                f"gobgpd at {self.api} is not answering ({why}): start gobgpd "
                "or point the announcer at its API address"
            )
        return f"gobgp {' '.join(args[:3])} at {self.api} failed: {why}"


def _local(paths: list[dict[str, object]]) -> list[dict[str, object]]:
    """The paths gobgpd originates itself: a path learned from a peer names its neighbour."""
    return [p for p in paths if not p.get("neighbor-ip") and not p.get("source-id")]


def _attrs(path: dict[str, object]) -> list[dict[str, object]]:
    attrs = path.get("attrs")
    return [a for a in attrs if isinstance(a, dict)] if isinstance(attrs, list) else []


def _communities(path: dict[str, object]) -> list[object]:
    for a in _attrs(path):
        values = a.get("communities")
        if a.get("type") == _PATH_ATTR_COMMUNITIES and isinstance(values, list):
            return values
    return []


def _next_hop(path: dict[str, object]) -> str | None:
    for a in _attrs(path):
        if a.get("type") == _PATH_ATTR_MP_REACH and isinstance(a.get("nexthop"), str):
            try:
                return ipaddress.IPv6Address(str(a["nexthop"])).compressed
            except ValueError:
                return None
    return None
