"""nats-server processes as the tests run them (from the wheel), and what their monitoring
endpoint tells about them."""

from __future__ import annotations

import json
import socket
import subprocess
from dataclasses import dataclass
from typing import Any
from urllib.request import urlopen


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


@dataclass
class NatsServer:
    url: str
    proc: subprocess.Popen[bytes]
    port: int
    monitor: int = 0

    def monitoring(self, endpoint: str) -> dict[str, Any]:
        """The JSON of a monitoring endpoint: ``varz``, ``connz``, ``subsz``..."""
        url = f"http://127.0.0.1:{self.monitor}/{endpoint}"
        return json.load(urlopen(url, timeout=2))  # type: ignore[no-any-return]

    def subscriptions(self) -> int:
        """How many subscriptions the server holds (its monitoring endpoint)."""
        return int(self.monitoring("subsz")["num_subscriptions"])

    def has_subscription(self, subject: str) -> bool:
        """Whether some client has subscribed to exactly ``subject``: a receiver listening
        on its transfer's open subject is ready for a sender."""
        # The server leaves the list out when it is empty.
        subs = self.monitoring("subsz?subs=1&limit=100000").get("subscriptions_list", [])
        return any(s["subject"] == subject for s in subs)

    def connections(self) -> int:
        return int(self.monitoring("connz")["num_connections"])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
