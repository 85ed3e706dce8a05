"""An agent's configuration (``nbd-nats agent`` options and its ``--config`` file), apart
from the agent so the parts it runs (``nbdnats.ctl.jobs``) can read it without importing
the agent."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from nbdnats.schemas import Role

ANNOUNCE_INTERVAL = 30.0  # seconds between announcements (NodeInfo.announce_interval)
PROGRESS_INTERVAL = 1.0  # at most one progress event per job per this many seconds
DRAIN_TIMEOUT = 30.0  # on SIGTERM, how long running jobs may take to finish
ADJACENCY_INTERVAL = 30.0  # bare metal: seconds between adjacency events when nothing changed


@dataclass
class AgentConfig:
    node: str
    data_url: str | None = None
    ctl_url: str | None = None
    # Login and TLS files (--creds, --nkey, --tlscert, --tlskey, --tlsca; default: the
    # environment's, see nbdnats.planes.Login.resolve), read here only.
    creds: str | None = None
    nkey: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    role: Role = "host"
    allow: list[str] = field(default_factory=list)
    exports: dict[str, str] = field(default_factory=dict)
    trusted_keys: Path | None = None
    # An installer's TPM (nbdnats.metal): "device" (/dev/tpmrm0), a tpm2-tools TCTI
    # ("swtpm:host=127.0.0.1,port=2321"), or None (none; an installer with /dev/tpmrm0
    # uses it); where the firmware's event log is; the file /init reads after a provision
    # that asked to reboot or power off (the agent writes the word there and stops).
    tpm: str | None = None
    event_log: str | None = None
    then_file: str | None = None
    metrics_addr: str | None = None
    state_dir: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    # VMs this node's agent may migrate or receive: name -> QMP unix socket.
    vms: dict[str, str] = field(default_factory=dict)
    announce_interval: float = ANNOUNCE_INTERVAL
    progress_interval: float = PROGRESS_INTERVAL
    drain_timeout: float = DRAIN_TIMEOUT
    # Bare metal (nbdnats.metal.network): IPv6 /128s this agent puts on lo and announces,
    # the interfaces towards the ToR, lldpd's socket (None: lldpd's own), whether stop
    # removes the /128s it added, and how often the adjacency is published unchanged.
    loopbacks: list[str] = field(default_factory=list)
    uplinks: list[str] = field(default_factory=list)
    lldp_socket: str | None = None
    release_loopbacks: bool = False
    adjacency_interval: float = ADJACENCY_INTERVAL
