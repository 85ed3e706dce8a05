"""A ToR's FRR, programmed through ``vtysh`` (the route injector's ``--backend frr``).

The injector's routes are static ``ipv6 route <loopback>/128 <host link-local> <port> tag T``
lines in staticd: the fixed tag ``ROUTE_TAG`` marks them, so an operator's own static routes
(any other tag, or none) are never changed or removed. vtysh answers 0 even to a command
staticd drops (an unknown port, a bad prefix length), so every change is read back: the
configuration (``show running-config``: what staticd holds, installed or not) and the RIB
(``show ipv6 route static json``: what zebra selected and put in the kernel).

Every value reaching vtysh's argv was parsed by ``ipaddress`` or is a port the injector
manages (``StaticRoute.check``); every call is bounded by ``VTYSH_TIMEOUT``.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nbdnats.errors import EndpointError
from nbdnats.metal.tool import run_tool

ROUTE_TAG = 28258
"""The route tag of the injector's static routes ("nb" in ASCII): its mark on a ToR."""
VTYSH_TIMEOUT = 10.0
"""How long one vtysh call may take: FRR answers in milliseconds, a hung daemon never."""
VTYSH_BATCH = 64
"""Configuration lines per vtysh call (each is one ``-c`` argument)."""
# An interface name as FRR and Linux take it (as schemas.IfName): never an option.
_PORT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:@-]{0,14}$")


@dataclass(frozen=True, order=True)
class StaticRoute:
    """One static route on a ToR: ``prefix`` (a /128, compressed) via ``via`` (a host's
    link-local) out of ``port``."""

    prefix: str
    via: str
    port: str

    @classmethod
    def check(cls, prefix: str, via: str, port: str) -> StaticRoute:
        """A route whose every part is what it claims to be, in FRR's (compressed) form."""
        net = ipaddress.IPv6Network(prefix)
        if net.prefixlen != 128:
            raise ValueError(f"{prefix} is not a /128")
        hop = ipaddress.IPv6Address(via)
        if not hop.is_link_local:
            raise ValueError(f"{via} is not a link-local address")
        if not _PORT.fullmatch(port):
            raise ValueError(f"{port!r} is not an interface name")
        return cls(str(net), str(hop), port)

    def line(self, tag: int) -> str:
        return f"ipv6 route {self.prefix} {self.via} {self.port} tag {tag}"


@dataclass
class Config:
    """The static IPv6 routes staticd holds: the injector's (its tag) and everyone else's."""

    ours: set[StaticRoute]
    others: set[StaticRoute]


class FrrTor:
    """One ToR's FRR, reached through the vty sockets in ``vty`` (``vtysh --vty_socket``)."""

    def __init__(self, name: str, vty: Path, *, tag: int = ROUTE_TAG) -> None:
        self.name = name
        self.vty = vty
        self.tag = tag

    async def vtysh(self, *commands: str) -> str:
        argv = ["vtysh", "--vty_socket", str(self.vty)]
        for c in commands:
            argv += ["-c", c]
        try:
            rc, out, err = await run_tool(argv, timeout=VTYSH_TIMEOUT)
        except FileNotFoundError:
            raise EndpointError(f"ToR {self.name}: vtysh not found: install FRR") from None
        except OSError as e:
            raise EndpointError(f"ToR {self.name}: cannot run vtysh: {e.strerror}") from None
        except TimeoutError:
            raise EndpointError(
                f"ToR {self.name}: vtysh did not answer within {VTYSH_TIMEOUT:.0f} s; "
                "check that zebra and staticd run"
            ) from None
        if rc != 0:
            why = (err or out).decode(errors="replace").strip().splitlines()
            raise EndpointError(
                f"ToR {self.name}: vtysh --vty_socket {self.vty} failed (rc {rc}): "
                f"{why[-1] if why else 'no output'}; check that FRR runs there"
            )
        return out.decode(errors="replace")

    async def _json(self, command: str) -> Any:
        text = await self.vtysh(command)
        try:
            return json.loads(text or "{}")
        except ValueError:
            raise EndpointError(f"ToR {self.name}: {command!r} did not answer JSON") from None

    async def interfaces(self) -> set[str]:
        """Every interface FRR knows but ``lo`` (the ports managed by default)."""
        data = await self._json("show interface json")
        if not isinstance(data, dict):
            raise EndpointError(f"ToR {self.name}: 'show interface json' has no interfaces")
        return {str(k) for k in data if k != "lo" and _PORT.fullmatch(str(k))}

    async def config(self) -> Config:
        """The static IPv6 routes of staticd's running configuration."""
        text = await self.vtysh("show running-config")
        ours: set[StaticRoute] = set()
        others: set[StaticRoute] = set()
        for line in text.splitlines():
            words = line.split()
            if words[:2] != ["ipv6", "route"] or len(words) < 5:
                continue
            try:
                route = StaticRoute.check(words[2], words[3], words[4])
            except ValueError:
                continue  # not a /128 via a link-local on a port: never one of ours
            tag = words[words.index("tag", 5) + 1] if "tag" in words[5:-1] else None
            (ours if tag == str(self.tag) else others).add(route)
        return Config(ours, others)

    async def rib(self) -> dict[StaticRoute, bool]:
        """The injector's routes (its tag) in zebra's RIB, and whether each is installed in
        the kernel (``installed`` and the next hop in the FIB)."""
        data = await self._json("show ipv6 route static json")
        found: dict[StaticRoute, bool] = {}
        if not isinstance(data, dict):
            return found
        for entries in data.values():
            for entry in entries if isinstance(entries, list) else []:
                if not isinstance(entry, dict) or entry.get("tag") != self.tag:
                    continue
                for hop in entry.get("nexthops") or []:
                    try:
                        route = StaticRoute.check(
                            str(entry.get("prefix")), str(hop.get("ip")), str(hop["interfaceName"])
                        )
                    except (ValueError, KeyError, TypeError, AttributeError):
                        continue
                    installed = bool(entry.get("installed")) and bool(hop.get("fib"))
                    found[route] = found.get(route, False) or installed
        return found

    async def change(self, add: Iterable[StaticRoute], remove: Iterable[StaticRoute]) -> None:
        """Configure ``add``, then unconfigure ``remove`` (make before break): in that
        order, in as few vtysh calls as the batch allows. vtysh's answer says nothing;
        the caller reads back."""
        lines = [r.line(self.tag) for r in add] + [f"no {r.line(self.tag)}" for r in remove]
        for i in range(0, len(lines), VTYSH_BATCH):
            await self.vtysh("configure terminal", *lines[i : i + VTYSH_BATCH])
