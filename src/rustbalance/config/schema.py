"""The validated configuration: frozen, typed dataclasses, one per TOML section.

Instances are built by :func:`rustbalance.config.parser.parse_config`, which has already checked
every value, so code that receives a :class:`Config` never re-validates. Field defaults here are
the documented defaults (docs/config.md); defaults that depend on other keys (``status_socket``,
the tor endpoints and directories) are filled in by the parser.

Durations are ``float`` seconds (TOML ints and floats are both accepted). Paths are absolute
``Path`` objects: relative paths in the file are resolved against the config file's folder.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

__all__ = [
    "Config",
    "CoordinationConfig",
    "Endpoint",
    "HealthConfig",
    "IdentityMode",
    "JoinConfig",
    "MasterConfig",
    "MetricsConfig",
    "NodeConfig",
    "ProxyConfig",
    "ProxyMode",
    "PublishConfig",
    "TargetConfig",
    "TorConfig",
    "TorMode",
    "WireGuardConfig",
    "WireGuardMode",
]

TorMode = Literal["managed", "system"]
# "shared": every node's tor hosts the master key; "instance": a node's tor hosts its own key as
# an Onionbalance instance of the master (tor.md §11).
IdentityMode = Literal["shared", "instance"]
ProxyMode = Literal["http", "tcp"]
WireGuardMode = Literal["auto", "kernel", "userspace"]


@dataclass(frozen=True)
class Endpoint:
    """A TCP or UDP ``host:port``. ``host`` is an IPv4/IPv6 literal (no brackets), a DNS name
    or a v3 ``.onion`` address in lower case."""

    host: str
    port: int

    @property
    def is_onion(self) -> bool:
        return self.host.endswith(".onion")

    def __str__(self) -> str:
        # An IPv6 literal needs brackets, otherwise its colons are ambiguous with the port's.
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class NodeConfig:
    id: str
    state_dir: Path
    status_socket: Path
    priority: int = 10
    publisher_eligible: bool = True
    identity_mode: IdentityMode = "shared"
    # Instance mode: the node's own onion service key (a 32-byte seed, generated 0600 in a
    # 0700 folder if missing). The parser fills ``<state_dir>/keys/instance.key``.
    instance_key_path: Path | None = None


@dataclass(frozen=True)
class MasterConfig:
    # None only for a node in instance mode that is not publisher-eligible (it never signs).
    identity_key_path: Path | None
    # Lower-case ``<56 chars>.onion``; None if the operator did not state it (the daemon derives
    # it from the key; when given, the daemon checks that it matches the key).
    onion_address: str | None = None
    # Raw 32-byte x25519 public keys of the clients allowed to discover the service
    # (restricted discovery). Empty = anyone who knows the address.
    authorized_clients: tuple[bytes, ...] = ()
    # Plain tor onion services (Onionbalance instances of the master, no RustBalance on them):
    # lower-case ``<56 chars>.onion``, distinct, never the master itself.
    backends: tuple[str, ...] = ()
    # How often the publisher HSFETCHes and probes each backend.
    backend_poll_secs: float = 60.0
    # A backend with no successful fetch and probe for this long drops out of the descriptor.
    backend_max_age_secs: float = 900.0


@dataclass(frozen=True)
class TargetConfig:
    address: Endpoint
    use_tls: bool = False
    connect_timeout_secs: float = 30.0
    idle_timeout_secs: float = 300.0
    # 0 = no limit on a session's total duration.
    session_timeout_secs: float = 0.0

    @property
    def is_onion(self) -> bool:
        return self.address.is_onion


@dataclass(frozen=True)
class TorConfig:
    data_dir: Path
    hidden_service_dir: Path
    mode: TorMode = "managed"
    extra_torrc: tuple[str, ...] = ()
    binary: str = "tor"
    # System mode only (managed mode picks its own control port): a TCP endpoint or a unix
    # socket path.
    control: Endpoint | Path | None = None
    # None in managed mode = tor picks a free port and we ask it which one.
    socks: Endpoint | None = None
    # System mode only: the torrc fragment we write and the system tor includes.
    torrc_include: Path | None = None
    num_intro_points: int = 3
    pow_enabled: bool = False
    pow_queue_rate: int = 250
    pow_queue_burst: int = 2500
    intro_dos_enabled: bool = False
    intro_dos_rate_per_sec: int = 25
    intro_dos_burst_per_sec: int = 200
    watchdog_interval_secs: float = 15.0
    bootstrap_timeout_secs: float = 120.0
    # --- the front door (issue 15): tor's own per-circuit stream limit -------------------
    # HiddenServiceMaxStreams: streams one rendezvous circuit may hold at once (0 = no limit;
    # the proxy's own proxy.circuit_max_connections applies, with a log line and a metric).
    max_streams_per_circuit: int = 0
    # HiddenServiceMaxStreamsCloseCircuit: over that limit tor closes the circuit (else it
    # refuses the stream).
    max_streams_close_circuit: bool = True


@dataclass(frozen=True)
class ProxyConfig:
    listen_host: str = "127.0.0.1"
    # 0 = let the OS pick a free port (the daemon tells tor which one it got).
    listen_port: int = 8080
    virtual_port: int = 80
    mode: ProxyMode = "http"
    max_connections: int = 1024
    drain_timeout_secs: float = 3.0
    # --- the front door (issue 15) --------------------------------------------------------
    # Listen on this unix socket (0660) instead of listen_host:listen_port; tor's
    # HiddenServicePort then points at unix:PATH.
    listen_unix: Path | None = None
    # A whole request head must arrive within this (from accept for the first request, from
    # its first byte for a later one): 408, then close.
    request_head_timeout_secs: float = 10.0
    # A kept-alive connection may wait this long for its next request.
    keep_alive_timeout_secs: float = 30.0
    # The longest pause inside a request body: 408 (or a close once the answer started).
    request_body_timeout_secs: float = 30.0
    # Request heads: at most this many bytes and field lines (431; 414 for a request line).
    max_head_bytes: int = 16 * 1024
    max_head_fields: int = 100
    # tor writes a PROXY line naming the rendezvous circuit of each stream
    # (HiddenServiceExportCircuitID haproxy), so the limits below apply per circuit.
    export_circuit_id: bool = True
    # A circuit holding more streams at once is cut (0 = no limit).
    circuit_max_connections: int = 32
    # Every new stream and request takes a token; per second (0 = no limit) and burst.
    circuit_request_rate: float = 20.0
    circuit_request_burst: int = 200
    # How long a cut circuit's new streams are refused.
    circuit_cut_secs: float = 60.0
    # Send the circuit id to the target in this request header ("" = off).
    circuit_id_header: str = ""


@dataclass(frozen=True)
class PublishConfig:
    refresh_interval_secs: float = 600.0
    max_intro_points: int = 20
    descriptor_lifetime_mins: int = 180
    retries: int = 3
    retry_base_secs: float = 5.0
    retry_max_secs: float = 30.0
    first_publish_poll_secs: float = 5.0
    first_publish_max_wait_secs: float = 120.0
    descriptor_max_age_secs: float = 900.0
    upload_timeout_secs: float = 60.0


@dataclass(frozen=True)
class CoordinationConfig:
    cluster_token_path: Path | None = None
    listen: Endpoint = field(default_factory=lambda: Endpoint("127.0.0.1", 51821))
    peers: tuple[Endpoint, ...] = ()
    heartbeat_interval_secs: float = 5.0
    heartbeat_timeout_secs: float = 15.0
    takeover_grace_secs: float = 15.0
    clock_skew_tolerance_secs: float = 5.0
    max_datagram_bytes: int = 65000
    # The address peers should use for this node (NAT, a relay); None = listen.
    advertise: Endpoint | None = None

    @property
    def is_multi_node(self) -> bool:
        return bool(self.peers)


@dataclass(frozen=True)
class MetricsConfig:
    enabled: bool = True
    listen: Endpoint = field(default_factory=lambda: Endpoint("127.0.0.1", 9100))


@dataclass(frozen=True)
class HealthConfig:
    http_probe_enabled: bool = False
    http_probe_path: str = "/"
    http_probe_interval_secs: float = 60.0
    http_probe_timeout_secs: float = 5.0
    probe_expected_status: int = 200
    probe_failure_threshold: int = 3


@dataclass(frozen=True)
class WireGuardConfig:
    """The node's WireGuard interface of the coordination mesh (system.md §11.1, W4, W9).

    ``enabled`` = the daemon brings the interface up at start and down at exit. The key, the
    address and the endpoint also describe this node to joiners when only ``[join]`` is on (a
    tunnel managed outside rustbalance, or a private test network on loopback).
    """

    enabled: bool = False
    interface: str = "wg-rb"
    # The base64 private key file (0600, as `wg genkey` writes it); never inline.
    private_key_path: Path | None = None
    # This node's tunnel address with the tunnel network's prefix, e.g. 10.99.0.1/24.
    address: ipaddress.IPv4Interface | None = None
    listen_port: int = 51820
    mode: WireGuardMode = "auto"
    # Persisted mesh peers (JSON, 0600); the parser fills <state_dir>/wireguard_peers.json.
    peers_path: Path | None = None
    # The public HOST:PORT other nodes reach this node's WireGuard at (told to joiners).
    endpoint: Endpoint | None = None


@dataclass(frozen=True)
class JoinConfig:
    """Joins over the master onion (``POST /.rb/<join secret>``, node/join.py)."""

    enabled: bool = False
    # File holding the join secret (0600); never inline.
    secret_path: Path | None = None
    # Where joiners' tunnel addresses come from; the parser fills wireguard.address's network.
    tunnel_network: ipaddress.IPv4Network | None = None


@dataclass(frozen=True)
class Config:
    node: NodeConfig
    master: MasterConfig
    target: TargetConfig
    tor: TorConfig
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    publish: PublishConfig = field(default_factory=PublishConfig)
    coordination: CoordinationConfig = field(default_factory=CoordinationConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    wireguard: WireGuardConfig = field(default_factory=WireGuardConfig)
    join: JoinConfig = field(default_factory=JoinConfig)

    @property
    def is_multi_node(self) -> bool:
        return self.coordination.is_multi_node

    def summary(self) -> str:
        """One line for logs and ``rustbalance config check``; contains no secrets."""
        mode = "multi-node" if self.is_multi_node else "single-node"
        peers = f" ({len(self.coordination.peers)} peers)" if self.is_multi_node else ""
        return (
            f"node {self.node.id}, {mode}{peers}, tor {self.tor.mode}, "
            f"target {self.target.address}{' (tls)' if self.target.use_tls else ''}"
        )
