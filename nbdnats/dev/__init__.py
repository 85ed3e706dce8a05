"""The development topology as local processes, behind ``nbd-nats dev`` (``nbdnats.cli.dev``).

``dev up`` starts what compose and the Tiltfile describe, without Docker: a ctl cluster
(three nats-servers, JetStream), a data cluster (three nats-servers, no JetStream), a
leafnode per rack, and per node a qemu-nbd export of a small sample disk and the node's
agent (``nbd-nats agent``, with that node's credentials). Every server
runs one of the configs in ``control/`` unchanged; what differs per server (name, ports,
routes, TLS files, passwords) is passed in its environment, as compose does. Everything
listens on loopback (``--ipv6``: ``[::1]``) on free ports. ``dev up`` records each
process it started (pid and command line) in ``STATE/dev.json``; ``dev down`` stops
exactly those and removes what ``up`` made; ``dev status`` shows what runs.

Each agent may open only its node's directory, announces the sample disk as export
``disk`` and serves Prometheus metrics on a port of its own; drive them with
``nbd-nats ctl`` (the controller's login is in ``STATE/dev.json``).

One module per job:

- ``topology``: the topology as data (servers, nodes, ports, processes) and its record;
- ``config``: which nats-server config each server runs and the environment it reads;
- ``accounts``: the users and permissions of ``accounts-*.conf``, rendered per topology;
- ``tls``: the TLS files;
- ``processes``: starting, recognising and stopping processes;
- ``lifecycle``: ``up``, ``down`` and ``status``, and waiting until each part is ready.
"""

from nbdnats.dev.accounts import render_accounts, write_accounts
from nbdnats.dev.config import CONFIGS, config_of, control_dir, server_env
from nbdnats.dev.lifecycle import down, status, up
from nbdnats.dev.topology import CLUSTER_SIZE, COMPOSE_RACKS, Node, Proc, Server, State, load, plan

__all__ = [
    "CLUSTER_SIZE",
    "COMPOSE_RACKS",
    "CONFIGS",
    "Node",
    "Proc",
    "Server",
    "State",
    "config_of",
    "control_dir",
    "down",
    "load",
    "plan",
    "render_accounts",
    "server_env",
    "status",
    "up",
    "write_accounts",
]
