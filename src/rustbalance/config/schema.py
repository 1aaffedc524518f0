"""The validated configuration: one frozen, keyword-only class per TOML section.

Every key is declared here once (:func:`~rustbalance.config.keys.key`): its Python type, its
reader (TOML type and bounds), its default, its documentation and its value in the full
example. The parser (``parser.py``) reads and checks a file from these declarations and
``docs.py`` generates docs/config.md from them. Rules that relate keys of different sections
live in the parser.

Instances come from :func:`rustbalance.config.parse_config`, which has checked every value,
so code that receives a :class:`Config` never re-validates. A section's ``removed_keys`` names
keys that a former protocol had and what replaced them: a config that still sets one gets that
problem (naming the upgrade command), never "unknown key" or a silent default. Durations are
``float`` seconds; paths are absolute (relative ones are resolved against the config file's
folder).
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from rustbalance.config.addresses import parse_client_auth_key
from rustbalance.config.identity_mode import IdentityMode, effective_identity_mode
from rustbalance.config.keys import (
    Array,
    Boolean,
    Derived,
    Duration,
    Integer,
    Invalid,
    Number,
    PathValue,
    Reader,
    Relation,
    Text,
    choice,
    describe,
    key,
    path_problem,
    section,
)
from rustbalance.crypto.onion_address import decode_onion_address
from rustbalance.errors import ConfigError, InvalidKeyError
from rustbalance.rules import (
    INTERFACE_NAME_RULE,
    NODE_ID_RULE,
    Endpoint,
    is_interface_name,
    is_node_id,
    parse_endpoint,
    parse_host,
    parse_tunnel_network,
    torrc_value_problem,
)

__all__ = [
    "METRICS_PORT",
    "Config",
    "CoordinationBackend",
    "CoordinationConfig",
    "DistinctDescriptors",
    "Endpoint",
    "EtcdConfig",
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
ProxyMode = Literal["http", "tcp"]
WireGuardMode = Literal["auto", "kernel", "userspace"]
# [coordination] backend: the embedded sealed-UDP protocol, or an etcd cluster (issue 20).
CoordinationBackend = Literal["embedded", "etcd"]
DistinctDescriptors = Literal["auto", "off"]

_U32_MAX = 2**32 - 1
# tor's limit for the PoW and intro DoS defence parameters (INT32_MAX).
_I32_MAX = 2**31 - 1
# Linux sun_path is 108 bytes including the terminating NUL.
MAX_UNIX_SOCKET_PATH = 107
# /metrics' default port. Prometheus' default port allocations (its wiki) give 9100-9999 to
# exporters, a range allocated in full since 2023 (9100 is node_exporter's, our old default);
# Prometheus' "Writing exporters" asks internal applications to stay outside it. 21058 is
# outside it, below Linux's ephemeral ports (32768-60999: an outgoing connection may hold one
# at start), in no /etc/services entry, and none of our other defaults.
METRICS_PORT = 21058
_SYSTEM_SOCKS = Endpoint(host="127.0.0.1", port=9050)
_SYSTEM_CONTROL = Endpoint(host="127.0.0.1", port=9051)
# Keys of protocol v2 (one shared cluster token) that per-node identities replaced (issue 16).
_REMOVED_IN_V3 = (
    "removed with protocol v3 (per-node identities, docs/security.md); "
    "run 'rustbalance cluster upgrade --config FILE' on this node"
)


# --- value rules used by one key each --------------------------------------------------------


def _node_id(value: str) -> str:
    if not is_node_id(value):
        raise Invalid(f"must be {NODE_ID_RULE}, got {value!r}")
    return value


def _onion_address(value: str) -> str:
    """A v3 ``<56 chars>.onion``, lower-cased."""
    if not value.lower().endswith(".onion"):
        raise Invalid(f"must be '<56 characters>.onion', got {value!r}")
    try:
        decode_onion_address(value)
    except InvalidKeyError as exc:
        raise Invalid(str(exc)) from None
    return value.lower()


def _not_empty(value: str) -> str:
    if message := path_problem(value):
        raise Invalid(message)
    return value


@dataclass(frozen=True)
class TorrcPath(Reader[Path]):
    """A path the daemon writes into a torrc (or tor's ``%include``): one torrc value, by the
    rule every torrc value follows (rules.py), checked on the absolute path."""

    type_doc: str = "path"

    def read(self, value: object, base: Path) -> Path:
        path = PathValue().read(value, base)
        if problem := torrc_value_problem(str(path)):
            raise Invalid(problem)
        return path


@dataclass(frozen=True)
class SocketPath(Reader[Path]):
    """A unix socket tor connects to (``HiddenServicePort 80 unix:PATH``): a torrc value
    without spaces (tor's hs_config.c would need it quoted), and short enough for
    ``sun_path``."""

    type_doc: str = "path"

    def read(self, value: object, base: Path) -> Path:
        path = TorrcPath().read(value, base)
        if any(c.isspace() for c in str(path)):
            raise Invalid(f"must not contain spaces, got {str(path)!r}")
        return path


def default_proxy_socket(derived: Derived) -> Path:
    """``proxy.listen_unix`` when the file names no listener: the unit's runtime directory
    (systemd exports ``RUNTIME_DIRECTORY`` to the daemon and to every ``ExecStartPre=``, so
    ``rustbalance prepare`` derives the same path), else the state folder. parser.py drops it
    when ``listen_host`` or ``listen_port`` is set."""
    runtime = os.environ.get("RUNTIME_DIRECTORY", "")
    # systemd.exec(5): one path per RuntimeDirectory= entry, separated by ":".
    folder = runtime.split(":")[0]
    if folder.startswith("/"):
        return Path(folder) / "proxy.sock"
    return Path(derived.built["node"].state_dir) / "proxy.sock"


def socket_path_problem(path: Path) -> str | None:
    """Too long for a unix socket address (Linux ``sun_path``), also for a derived path."""
    length = len(os.fsencode(path))
    if length > MAX_UNIX_SOCKET_PATH:
        return f"path is {length} bytes; unix socket paths are limited to {MAX_UNIX_SOCKET_PATH}"
    return None


# RFC 9110 §5.1: a field name is a token.
_FIELD_NAME = re.compile(r"[-!#$%&'*+.^_`|~0-9A-Za-z]{1,64}")


def _field_name(value: str) -> str:
    if value and not _FIELD_NAME.fullmatch(value):
        raise Invalid(
            f"must be an HTTP header name (letters, digits, - and other token characters), "
            f"got {value!r}"
        )
    return value


def _torrc_line(value: str) -> str:
    # One item is one torrc line; a newline would smuggle in lines we never validated into
    # the torrc we write.
    if any(c in value for c in "\r\n\0"):
        raise Invalid("must be a single line (no newline or NUL)")
    return value


def _interface_name(value: str) -> str:
    if not is_interface_name(value):
        raise Invalid(f"must be {INTERFACE_NAME_RULE}, got {value!r}")
    return value


def _tunnel_address(value: str) -> ipaddress.IPv4Interface:
    example = "an IPv4 address with its network's prefix, such as '10.99.0.1/24'"
    try:
        # An address without its prefix would silently become a /32.
        interface = ipaddress.IPv4Interface(value) if "/" in value else None
    except ValueError:
        interface = None
    if interface is None:
        raise Invalid(f"must be {example}, got {value!r}")
    network = interface.network
    ends = (network.network_address, network.broadcast_address)
    if network.prefixlen < 31 and interface.ip in ends:
        raise Invalid(f"{interface.ip} is the network or broadcast address of {network}")
    return interface


def _probe_path(value: str) -> str:
    if not value.startswith("/"):
        raise Invalid(f"must start with '/', got {value!r}")
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise Invalid("must not contain spaces or control characters")
    return value


def _endpoint(*, allow_onion: bool = False) -> Text[Endpoint]:
    return Text(
        lambda value: parse_endpoint(value, allow_onion=allow_onion),
        type_doc="endpoint",
        expect="a 'HOST:PORT' string",
    )


@dataclass(frozen=True)
class ControlAddress(Reader[Endpoint | Path]):
    """``tor.control``: ``HOST:PORT``, or a unix socket path (``unix:PATH`` as in tor's
    ControlPort, or any value containing a ``/``), relative to the config's folder."""

    type_doc: str = "string"

    def read(self, value: object, base: Path) -> Endpoint | Path:
        if not isinstance(value, str):
            raise Invalid(f"must be a string, got {describe(value)}")
        if value.startswith("unix:") or "/" in value:
            return PathValue().read(value.removeprefix("unix:"), base)
        try:
            return parse_endpoint(value)
        except ConfigError as exc:
            hint = "or give a unix socket path ('/run/tor/control' or 'unix:PATH')"
            raise Invalid(f"{exc}; {hint}") from None


# --- the sections ----------------------------------------------------------------------------


@section
class NodeConfig:
    id: str = key(
        Text(_node_id),
        required=True,
        example="node-b",
        doc=f"This node's name in the cluster, unique per cluster: `{NODE_ID_RULE}`.",
    )
    priority: int = key(
        Integer(0, _U32_MAX),
        default=10,
        example=20,
        doc="Publisher election preference: the lowest number wins. In a cluster the priority "
        "that counts is the one in the node's admission record: a node that holds the master key "
        "signs its own record from this value at start; others get it from the node that "
        "admitted them.",
    )
    publisher_eligible: bool = key(
        Boolean(),
        default=True,
        doc="`false` = this node never becomes the publisher (it only serves).",
    )
    state_dir: Path = key(
        PathValue(),
        default=Path("/var/lib/rustbalance"),
        doc="Where the daemon keeps its state. Created 0700 if missing; must belong to the "
        "daemon's user and be writable by nobody else (the daemon refuses to start otherwise: "
        "everything under it is written by path).",
    )
    status_socket: Path = key(
        PathValue(),
        derive=lambda d: d.own["state_dir"] / "status.sock",
        default_doc="`<state_dir>/status.sock`",
        example="/run/rustbalance/status.sock",
        doc=f"Unix socket for `rustbalance status`. At most {MAX_UNIX_SOCKET_PATH} bytes "
        "(a unix socket limit).",
    )
    # None (left out): the default for this node's setup, Config.identity_mode.
    identity_mode: IdentityMode | None = key(
        choice("shared", "instance"),
        default=None,
        default_doc="`instance` in a cluster (coordination peers, `[join]` or `[wireguard]` "
        "on, or members admitted earlier), `shared` for a lone node",
        example="instance",
        doc="`instance` (Onionbalance-style): this node's tor hosts the node's own key with "
        "`HiddenServiceOnionbalanceInstance 1` and an `ob_config` naming the master address; "
        "only a publisher-eligible instance needs the master key. `shared`: this node's tor "
        "hosts the master key (a lone node: tor publishes the master descriptor itself, with "
        "PoW). `shared` in a cluster is refused: its intro points all die at tor's daily "
        "descriptor rotation (docs/architecture.md).",
    )
    instance_key_path: Path = key(
        PathValue(),
        derive=lambda d: d.own["state_dir"] / "keys" / "instance.key",
        default_doc="`<state_dir>/keys/instance.key`",
        example="/var/lib/rustbalance/keys/instance.key",
        doc="`instance` mode: the node's own onion service key (32-byte seed); generated "
        "(0600, folder 0700) when missing, refused when others can read it.",
    )
    node_key_path: Path = key(
        PathValue(),
        derive=lambda d: d.own["state_dir"] / "keys" / "node.key",
        default_doc="`<state_dir>/keys/node.key`",
        example="/etc/rustbalance/node.key",
        doc="The node's own cluster key (Ed25519 seed, 32 bytes): its admission record binds "
        "`id` to it, and every coordination message it sends is sealed with it. Made by "
        "`init` / `join` (or at the first start), 0600 in a 0700 folder, opened without "
        "following symlinks, refused when others can read it; never logged (only its "
        "`SHA256:` fingerprint). Multi-node only.",
    )


@section
class MasterConfig:
    # None only for a node in instance mode that is not publisher-eligible (it never signs).
    identity_key_path: Path | None = key(
        PathValue(),
        default=None,
        default_doc="**required** (optional for an `instance` node with "
        "`publisher_eligible = false`)",
        example="/etc/rustbalance/master.key",
        doc="The master onion service's identity key: a 32-byte seed, tor's "
        "`hs_ed25519_secret_key`, or a PEM PKCS#8 key. Mode 0600. A non-eligible instance "
        "node never signs, so it needs no master key at all.",
    )
    onion_address: str | None = key(
        Text(_onion_address),
        default=None,
        default_doc="unset (**required** without `identity_key_path`)",
        example="rkeohxlubhyzl7ks3mwtzos5olfgocn7dwkbeg7toseadnapn5optfad.onion",
        doc="The master `<56 chars>.onion`; when given with a key, the daemon checks that it "
        "matches the key, which catches deploying the wrong key.",
    )
    # Raw 32-byte x25519 public keys (restricted discovery).
    authorized_clients: tuple[bytes, ...] = key(
        Array(
            Text(parse_client_auth_key),
            duplicate=lambda _key: "the same key is listed twice",
        ),
        default=(),
        example=[
            "descriptor:x25519:CO7E72XK6ICMP7JTLD6JYADSDCA5C5BHQEUCE7WGOTZX677JPNWQ",
            "GHKKW2WO5SLBCN4ROA3ZG3TAOFX2YVZ272KNTWUEVABAISG7YEJA",
        ],
        doc="Restricted discovery: x25519 public keys of the clients allowed to find the "
        "service, as `descriptor:x25519:<base32>` (the line of tor's `.auth` files) or the "
        "bare 52-character base32 key. Empty = anyone who knows the address. Each key once.",
    )
    backends: tuple[str, ...] = key(
        Array(
            Text(_onion_address),
            duplicate=lambda onion: f"{onion} is listed twice",
        ),
        default=(),
        example=[
            "5jfgyy7ctrjavpxvkb5rglwf7gkuo5vox27hxescd3vgsfcg2iwfmxqd.onion",
            "compmldndjcxyun2njfv6pn5f5u7zkjscyqy3sezpzawxul5spfd5iad.onion",
        ],
        doc="Plain tor onion services (no RustBalance on them, each an Onionbalance instance "
        "of the master: `HiddenServiceOnionbalanceInstance 1` and `ob_config`) as "
        "`<56 chars>.onion`, distinct, not the master. The publisher fetches each one's "
        "descriptor (HSFETCH) and merges its intro points as one more node.",
    )
    backend_poll_secs: float = key(
        Duration(),
        default=60.0,
        doc="How often the publisher fetches each backend's descriptor and checks that the "
        "backend answers on `proxy.virtual_port` through tor (failures are retried sooner, "
        "with backoff).",
    )
    backend_max_age_secs: float = key(
        Duration(),
        default=900.0,
        # One slow poll must not drop a healthy backend.
        relation=Relation(">", "backend_poll_secs"),
        doc="A backend whose descriptor could not be fetched for this long (or for its "
        "descriptor lifetime, if shorter) drops out; so does one that failed 2 reachability "
        "checks in a row.",
    )


@section
class TargetConfig:
    address: Endpoint = key(
        _endpoint(allow_onion=True),
        required=True,
        example="qe4xodvipulv6vvdkrtmgtd6ztfy3curwtxdpis56yhvxd6jwokbr4qd.onion:80",
        doc="The operator's application: `host:port`, `[v6]:port` or `<56 chars>.onion:port` "
        "(reached through tor).",
    )
    use_tls: bool = key(Boolean(), default=False, doc="Speak TLS to the target.")
    connect_timeout_secs: float = key(
        Duration(),
        default=30.0,
        doc="Give up connecting to the target (including the SOCKS handshake for an onion target).",
    )
    idle_timeout_secs: float = key(
        Duration(),
        default=300.0,
        doc="Close a proxied connection with no traffic either way for this long.",
    )
    session_timeout_secs: float = key(
        Duration(zero_means_off=True),
        default=0.0,
        example=3600,
        doc="Close a proxied connection after this long, busy or not.",
    )

    @property
    def is_onion(self) -> bool:
        return self.address.is_onion


def _managed(derived: Derived) -> bool:
    return bool(derived.own["mode"] == "managed")


_SYSTEM_ONLY = "only used in system mode"


@section
class TorConfig:
    section_doc: ClassVar[str] = (
        '`mode = "managed"` (default): rustbalance starts and supervises its own tor process '
        'in\n`data_dir`. `mode = "system"`: rustbalance attaches to a tor run by systemd, '
        "through its\ncontrol port, and writes a torrc fragment that tor includes."
    )

    mode: TorMode = key(
        choice("managed", "system"), default="managed", example="system", doc="See above."
    )
    data_dir: Path = key(
        TorrcPath(),
        default=Path("/var/lib/rustbalance/tor"),
        doc="Managed tor's DataDirectory. Written into a torrc: one line, without control "
        'characters, `#`, `"` or `\\`.',
    )
    extra_torrc: tuple[str, ...] = key(
        Array(Text(_torrc_line)),
        default=(),
        example=["SafeLogging 1"],
        doc="Extra torrc lines, one per item (no newlines), e.g. a private network's "
        "`DirAuthority` lines.",
    )
    binary: str = key(
        Text(_not_empty),
        default="tor",
        doc="The tor executable (managed mode), a name looked up in `PATH` or a path.",
    )
    # System mode only (managed mode picks its own control port).
    control: Endpoint | Path | None = key(
        ControlAddress(),
        default=None,
        only_if=(
            "mode",
            "system",
            f"{_SYSTEM_ONLY}; managed mode runs its own tor and picks the control port "
            "(remove the key or set tor.mode = 'system')",
        ),
        derive=lambda _d: _SYSTEM_CONTROL,
        default_doc=f'system: `"{_SYSTEM_CONTROL}"`',
        example="unix:/run/tor/control",
        doc="System mode only (an error in managed mode): the control port `HOST:PORT`, or a "
        "unix socket path (`/run/tor/control` or `unix:/run/tor/control`).",
    )
    # None in managed mode = tor picks a free port and we ask it which one.
    socks: Endpoint | None = key(
        _endpoint(),
        default=None,
        derive=lambda d: None if _managed(d) else _SYSTEM_SOCKS,
        default_doc=f'system: `"{_SYSTEM_SOCKS}"`; managed: unset = tor picks a free port',
        example="127.0.0.1:9050",
        doc="tor's SOCKS port, used to reach an onion target.",
    )
    hidden_service_dir: Path = key(
        TorrcPath(),
        derive=lambda d: (
            d.own["data_dir"] / "hidden_service"
            if _managed(d)
            else Path("/var/lib/tor/rustbalance_node_hs")
        ),
        default_doc="managed: `<data_dir>/hidden_service`; system: "
        "`/var/lib/tor/rustbalance_node_hs`",
        example="/var/lib/tor/rustbalance_node_hs",
        doc="The node's onion service directory (holds the key tor hosts: the master key in "
        "`shared` mode, the node's own in `instance` mode). A torrc value like `data_dir`. "
        "System mode: in the system tor's own folder, written by `rustbalance prepare` (root) "
        "for tor's user.",
    )
    # System mode only: the torrc fragment we write and the system tor includes.
    torrc_include: Path | None = key(
        TorrcPath(),
        default=None,
        only_if=("mode", "system", f"{_SYSTEM_ONLY} (tor.mode = 'system')"),
        derive=lambda _d: Path("/etc/tor/torrc.d/rustbalance.conf"),
        default_doc="system: `/etc/tor/torrc.d/rustbalance.conf`",
        example="/etc/tor/torrc.d/rustbalance.conf",
        doc="System mode only (an error in managed mode): the torrc fragment rustbalance "
        "writes for the system tor to `%include`.",
    )
    num_intro_points: int = key(
        Integer(1, 20),
        default=3,
        doc="`HiddenServiceNumIntroductionPoints` of this node.",
    )
    pow_enabled: bool = key(
        Boolean(),
        default=False,
        example=False,
        doc="Proof-of-work DoS defence (`HiddenServicePoWDefensesEnabled`): clients solve a "
        "puzzle when tor suggests an effort and are served first. Works only on a lone node "
        'with `node.identity_mode = "shared"` and no `coordination.peers`, `master.backends` '
        "or `join.enabled` (tor then publishes the master descriptor itself); refused anywhere "
        "else, with the reason, because tor 0.4.9 cannot verify a solution made for a merged "
        "descriptor ([docs/pow.md](pow.md)). `intro_dos_enabled` works in every mode.",
    )
    pow_queue_rate: int = key(Integer(1, _I32_MAX), default=250, doc="`HiddenServicePoWQueueRate`.")
    pow_queue_burst: int = key(
        Integer(1, _I32_MAX),
        default=2500,
        relation=Relation(">=", "pow_queue_rate"),
        doc="`HiddenServicePoWQueueBurst`.",
    )
    intro_dos_enabled: bool = key(
        Boolean(),
        default=False,
        example=True,
        doc="Rate-limit INTRODUCE2 at the intro points (`HiddenServiceEnableIntroDoSDefense`).",
    )
    intro_dos_rate_per_sec: int = key(
        Integer(1, _I32_MAX),
        default=25,
        doc="`HiddenServiceEnableIntroDoSRatePerSec`.",
    )
    intro_dos_burst_per_sec: int = key(
        Integer(1, _I32_MAX),
        default=200,
        relation=Relation(">=", "intro_dos_rate_per_sec"),
        doc="`HiddenServiceEnableIntroDoSBurstPerSec`.",
    )
    watchdog_interval_secs: float = key(
        Duration(),
        default=15.0,
        doc="How often the daemon checks that tor is alive (and restarts it). A tor whose "
        "process lives but whose control port has given no working session for two intervals "
        "counts as hung and is restarted too.",
    )
    bootstrap_timeout_secs: float = key(
        Duration(),
        default=120.0,
        doc="How long tor may take to bootstrap before the daemon restarts it.",
    )
    # The front door (issue 15): tor's own per-circuit stream limit (tor's man page;
    # hs_config.c: HiddenServiceMaxStreams is 0..65535).
    max_streams_per_circuit: int = key(
        Integer(0, 65535),
        default=0,
        doc="`HiddenServiceMaxStreams`: streams one rendezvous circuit may hold at once in tor "
        "(0 = no limit: the proxy's own `proxy.circuit_max_connections` applies, with a log "
        "line and a metric).",
    )
    max_streams_close_circuit: bool = key(
        Boolean(),
        default=True,
        doc="`HiddenServiceMaxStreamsCloseCircuit`: over `max_streams_per_circuit` tor closes "
        "the circuit instead of refusing the stream.",
    )


@section
class ProxyConfig:
    section_doc: ClassVar[str] = (
        "The reverse proxy between this node's onion service and the target."
    )

    listen_host: str = key(
        Text(
            lambda value: parse_host(value, allow_onion=False), type_doc="string (IP or host name)"
        ),
        default="127.0.0.1",
        doc="Where the proxy listens (tor connects here).",
    )
    # 0 = let the OS pick a free port (the daemon tells tor which one it got).
    listen_port: int = key(
        Integer(0, 65535),
        default=8080,
        doc="0 = pick a free port. Must differ from the metrics port on the same host. "
        "Setting `listen_host` or `listen_port` makes the proxy listen on TCP instead of its "
        "default unix socket (`listen_unix`).",
    )
    virtual_port: int = key(
        Integer(1, 65535),
        default=80,
        doc="The onion service's port (what clients connect to).",
    )
    mode: ProxyMode = key(
        choice("http", "tcp"),
        default="http",
        doc="`http` understands HTTP/1.1 (health, headers); `tcp` copies bytes.",
    )
    max_connections: int = key(
        Integer(1),
        default=1024,
        doc="Most client connections busy at once. At the cap a connection found waiting (it "
        "has not sent a complete request head yet, or waits for its next request) is closed to "
        "make room: of the 16 waiting longest, one of the circuit holding most connections. "
        "Newcomers are read before they can be taken for idle, so the count may briefly reach "
        "twice the cap; a newcomer with a request when every connection is busy gets a 503 "
        "(tcp mode: a close). At start the daemon raises its open-files soft limit to the hard "
        "limit (systemd gives services 1024 soft, 524288 hard) and logs a WARNING when even "
        "the hard limit is below the 3 × `max_connections` + 256 descriptors it may need.",
    )
    drain_timeout_secs: float = key(
        Duration(),
        default=3.0,
        doc="On shutdown, how long open connections may finish.",
    )
    # --- the front door (issue 15) -------------------------------------------------------
    listen_unix: Path | None = key(
        SocketPath(),
        default=None,
        derive=default_proxy_socket,
        default_doc="`$RUNTIME_DIRECTORY/proxy.sock` under systemd (the unit's "
        "`/run/rustbalance/proxy.sock`), else `<state_dir>/proxy.sock`; none (TCP) when "
        "`listen_host` or `listen_port` is set",
        example="/run/rustbalance/proxy.sock",
        doc="The proxy listens on this unix socket (mode 0660, created owner-only first; its "
        "folder must not be writable by others; a stale socket is replaced) and tor's "
        "`HiddenServicePort` points at `unix:PATH`: no TCP port to collide with. Set "
        "`listen_host`/`listen_port` instead for TCP (with both, `listen_unix` wins). tor "
        "must reach it: a managed tor runs as the daemon's user; a `system` tor's user needs "
        "the socket's group "
        "(deploy/system-tor.conf: `Group=debian-tor`). At most "
        f"{MAX_UNIX_SOCKET_PATH} bytes, a torrc value without spaces.",
    )
    request_head_timeout_secs: float = key(
        Duration(),
        default=10.0,
        doc="A whole request head must arrive within this: from the connection's start for its "
        "first request, from its first byte for a later one. Then `408` and the connection "
        "closes. A client trickling bytes cannot hold a connection longer.",
    )
    keep_alive_timeout_secs: float = key(
        Duration(),
        default=30.0,
        doc="How long a kept-alive connection may wait for its next request.",
    )
    request_body_timeout_secs: float = key(
        Duration(),
        default=30.0,
        doc="The longest pause inside a request body (`408`, or a close once the answer began).",
    )
    max_head_bytes: int = key(
        Integer(1024, 1 << 20),
        default=16 * 1024,
        doc="Largest request head (request line and fields): `431` (`414` for a request line "
        "alone). Response heads may be 4 × larger.",
    )
    max_head_fields: int = key(
        Integer(1, 10_000),
        default=100,
        doc="Most field lines in a request head (`431`); responses 4 × as many.",
    )
    export_circuit_id: bool = key(
        Boolean(),
        default=True,
        doc="tor writes a PROXY protocol line naming the rendezvous circuit of each stream "
        "(`HiddenServiceExportCircuitID haproxy`), so the `circuit_*` limits apply per "
        "circuit. A stream that does not start with such a line (a local client, not through "
        "tor) is served without circuit limits.",
    )
    circuit_max_connections: int = key(
        Integer(0, 65535),
        default=32,
        doc="Streams one circuit may hold at the proxy at once (a browser holds at most 6 per "
        "host); one more and the circuit is **cut**: its connections are closed, its new "
        "streams refused for `circuit_cut_secs`, tor asked to close it (`CLOSECIRCUIT`), a "
        "WARNING `Cut circuit N: ...` logged and `rustbalance_proxy_circuits_cut_total` "
        "counted. 0 = no limit.",
    )
    circuit_request_rate: float = key(
        Number(0, 1_000_000, zero_means_off=True),
        default=20.0,
        doc="Every new stream and every request of a circuit takes a token; tokens refill at "
        "this many per second up to `circuit_request_burst`. With none left a request gets "
        "`429` (tcp mode: the stream is closed); a circuit that goes on until it owes a whole "
        "burst is cut. 0 = no limit.",
    )
    circuit_request_burst: int = key(
        Integer(1, 1_000_000),
        default=200,
        doc="The bucket's size (a page with many resources loads within it).",
    )
    circuit_cut_secs: float = key(
        Duration(),
        default=60.0,
        doc="How long a cut circuit's new streams are refused.",
    )
    circuit_id_header: str = key(
        Text(_field_name, type_doc="string (header name)"),
        default="",
        example="X-Tor-Circuit-Id",
        default_doc='`""` (off)',
        doc='When set (e.g. `"X-Tor-Circuit-Id"`), every request to the target carries the '
        "circuit id in this header (a field of that name from the client is dropped), for the "
        "target's own rate limiting.",
    )


@section
class PublishConfig:
    refresh_interval_secs: float = key(
        Duration(),
        default=600.0,
        doc="How often the publisher rebuilds and uploads the master descriptor.",
    )
    max_intro_points: int = key(
        Integer(1, 20),
        default=20,
        doc="Intro points in the merged descriptor (tor's limit is 20).",
    )
    descriptor_lifetime_mins: int = key(
        Integer(30, 720),
        default=180,
        doc="`descriptor-lifetime` of the descriptor (rend-spec range).",
    )
    retries: int = key(
        Integer(0, 100),
        default=3,
        doc="Retries after a failed upload before waiting for the next refresh.",
    )
    retry_base_secs: float = key(
        Duration(), default=5.0, doc="First retry delay; doubles each retry …"
    )
    retry_max_secs: float = key(
        Duration(),
        default=30.0,
        relation=Relation(">=", "retry_base_secs"),
        doc="… up to this.",
    )
    first_publish_poll_secs: float = key(
        Duration(),
        default=5.0,
        doc="At start, how often to check whether enough intro points are known …",
    )
    first_publish_max_wait_secs: float = key(
        Duration(),
        default=120.0,
        relation=Relation(">=", "first_publish_poll_secs"),
        doc="… and the longest to wait before publishing anyway.",
    )
    descriptor_max_age_secs: float = key(
        Duration(),
        default=900.0,
        doc="A published descriptor older than this is republished at once.",
    )
    upload_timeout_secs: float = key(Duration(), default=60.0, doc="Give up on one upload round.")
    distinct_descriptors: DistinctDescriptors = key(
        choice("auto", "off"),
        default="auto",
        doc="`auto`: when the live nodes' intro points exceed `max_intro_points`, each "
        "responsible HSDir gets its own descriptor with its own share of them, so clients "
        "reach every node (up to 120 intro points at a time; docs/distinct-descriptors.md); "
        "`off`: one merged descriptor for all HSDirs, capped at `max_intro_points`.",
    )


@section
class CoordinationConfig:
    section_doc: ClassVar[str] = (
        "Nodes exchange heartbeats over UDP, each datagram sealed between the sender's and "
        "the\nrecipient's own node keys (protocol v3, [security.md](security.md); the embedded "
        'backend),\nor coordinate through an etcd cluster (`backend = "etcd"` and the `[etcd]` '
        "section). Who is\na member of an embedded cluster, and where it is reached, comes from "
        "the master-signed\nadmission records, not from this section."
    )
    removed_keys: ClassVar[Mapping[str, str]] = {"cluster_token_path": _REMOVED_IN_V3}

    listen: Endpoint = key(
        _endpoint(),
        default=Endpoint(host="127.0.0.1", port=51821),
        example="10.0.0.2:51821",
        doc="UDP address this node listens on.",
    )
    peers: tuple[Endpoint, ...] = key(
        Array(
            _endpoint(),
            type_doc="array of endpoints",
            duplicate=lambda endpoint: f"{endpoint} is listed twice",
        ),
        default=(),
        example=["10.0.0.1:51821", "10.0.0.3:51821"],
        doc="Seed addresses: where to introduce this node (a signed *hello*) before it knows "
        "who is there. This node's own address may be listed and is left out, so one list "
        "serves every node. Empty (or only this node) = single node, unless the saved "
        "membership lists other members. No duplicates.",
    )
    heartbeat_interval_secs: float = key(
        Duration(), default=5.0, doc="How often a heartbeat is sent."
    )
    heartbeat_timeout_secs: float = key(
        Duration(),
        default=15.0,
        # One lost heartbeat must not look like a dead peer.
        relation=Relation(">", "heartbeat_interval_secs", factor=2),
        doc="A peer silent this long is considered down (so one lost heartbeat is not enough).",
    )
    takeover_grace_secs: float = key(
        Duration(),
        default=15.0,
        relation=Relation(">=", "heartbeat_interval_secs"),
        doc="After the publisher is considered down, wait this long before taking over.",
    )
    clock_skew_tolerance_secs: float = key(
        Duration(),
        default=5.0,
        doc="Messages whose timestamp is further than this from our clock are dropped "
        "(counted as `stale`/`future` in `rustbalance status` and `/metrics`, logged with a "
        "hint to check the clocks). A node whose clock is off by more hears no peer and serves "
        "alone, as in a partition ([docs/reliability.md](reliability.md)).",
    )
    # Largest UDP payload over IPv4; below ~1 KiB a signed heartbeat with peers does not fit.
    max_datagram_bytes: int = key(
        Integer(1024, 65507),
        default=65000,
        doc="Largest coordination datagram sent or accepted.",
    )
    # The address peers should use for this node (NAT, a relay); None = listen.
    advertise: Endpoint | None = key(
        _endpoint(),
        default=None,
        default_doc="unset (= `listen`)",
        example="203.0.113.7:51821",
        doc="The address peers reach this node at, when that is not `listen` (NAT, a relay in "
        "front of it): a node that holds the master key puts it in its own admission record.",
    )
    backend: CoordinationBackend = key(
        choice("embedded", "etcd"),
        default="embedded",
        doc="`embedded`: the sealed UDP heartbeats and election of this section. `etcd`: "
        "membership, liveness and the publisher lease live in an etcd cluster "
        "([docs/etcd.md](etcd.md)); the other keys of this section are then unused and "
        "`peers` must be empty.",
    )

    @property
    def is_multi_node(self) -> bool:
        """Peers configured, or etcd coordination (etcd knows the members)."""
        return bool(self.peers) or self.backend == "etcd"


@section
class MetricsConfig:
    enabled: bool = key(Boolean(), default=True, doc="Serve Prometheus metrics.")
    listen: Endpoint = key(
        _endpoint(),
        default=Endpoint(host="127.0.0.1", port=METRICS_PORT),
        doc="Where `/metrics` is served. The default port is outside the 9100-9999 range "
        "Prometheus allocates to exporters (9100 is node_exporter's). A port another program "
        "holds is a WARNING and the node runs without `/metrics`, not a failed start.",
    )


@section
class HealthConfig:
    http_probe_enabled: bool = key(
        Boolean(),
        default=False,
        example=True,
        doc="Probe the target over HTTP (`health` keys below); a target failing the probe "
        "counts as down.",
    )
    http_probe_path: str = key(
        Text(_probe_path, type_doc="string starting with `/`"),
        default="/",
        example="/health",
        doc="Path requested by the probe (no spaces).",
    )
    http_probe_interval_secs: float = key(Duration(), default=60.0, doc="Time between probes.")
    http_probe_timeout_secs: float = key(
        Duration(),
        default=5.0,
        relation=Relation("<=", "http_probe_interval_secs"),
        doc="Timeout of one probe.",
    )
    probe_expected_status: int = key(
        Integer(100, 599),
        default=200,
        doc="The HTTP status a healthy target answers.",
    )
    probe_failure_threshold: int = key(
        Integer(1, 1000),
        default=3,
        doc="Consecutive failures before the target counts as down.",
    )


@section
class WireGuardConfig:
    """The node's WireGuard interface of the coordination mesh (system.md §11.1, W4, W9)."""

    section_doc: ClassVar[str] = (
        "The coordination mesh's WireGuard interface. With `enabled = true` the daemon brings "
        "it up at\nstart (kernel module, or `wireguard-go` as its child process), before "
        "coordination binds (so\n`coordination.listen` may be the tunnel address), with one "
        "peer per admitted member (their\nWireGuard keys, endpoints and tunnel addresses are in "
        "the master-signed admission records of\nthe membership); the peers follow the "
        "membership as it changes (a node admitted anywhere is\nadded on every node, a revoked "
        "one removed), and the interface goes down on exit. It needs\n`CAP_NET_ADMIN`. The "
        "private key goes to `wg` on stdin, never on a command line. `rustbalance\ninit` / "
        "`join` write this section."
    )
    removed_keys: ClassVar[Mapping[str, str]] = {"peers_path": _REMOVED_IN_V3}

    enabled: bool = key(
        Boolean(),
        default=False,
        example=True,
        doc="Manage the interface. `false` = the tunnel (if any) is managed elsewhere; the keys "
        "below still describe this node to joiners when `[join]` is on.",
    )
    interface: str = key(
        Text(_interface_name),
        default="wg-rb",
        doc=f"Interface name: `{INTERFACE_NAME_RULE}` (`deploy.sh --clean` removes `wg-rb`).",
    )
    private_key_path: Path | None = key(
        PathValue(),
        default=None,
        example="/etc/rustbalance/wireguard.key",
        doc="File with the base64 private key (as `wg genkey` writes it), mode 0600. "
        "**Required when `enabled` or `join.enabled`.**",
    )
    address: ipaddress.IPv4Interface | None = key(
        Text(_tunnel_address, type_doc='IPv4 `"ADDR/PREFIX"`'),
        default=None,
        example="10.0.0.2/24",
        doc="This node's tunnel address with the tunnel network's prefix, e.g. "
        '`"10.99.0.1/24"` (not the network or broadcast address). **Required when `enabled` or '
        "`join.enabled`.**",
    )
    listen_port: int = key(Integer(1, 65535), default=51820, doc="WireGuard's UDP port.")
    mode: WireGuardMode = key(
        choice("auto", "kernel", "userspace"),
        default="auto",
        doc="`auto`: the kernel module if it works, else `wireguard-go`; `kernel`: fail if the "
        "module is missing; `userspace`: always `wireguard-go`.",
    )
    endpoint: Endpoint | None = key(
        _endpoint(),
        default=None,
        example="203.0.113.7:51820",
        doc="The public `HOST:PORT` other nodes reach this node's WireGuard at (told to "
        "joiners). **Required when `join.enabled`.**",
    )


@section
class JoinConfig:
    """Joins over the master onion (``POST /.rb/join``, node/join.py)."""

    section_doc: ClassVar[str] = (
        "New nodes join over the master onion: `rustbalance join` POSTs `/.rb/join` through "
        "tor with\nthe join grant of its token (signed with the master key) and the grant's "
        "secret; a node that\nholds the master key and has `enabled = true` checks the grant "
        "(expiry, uses, the join policy)\nand admits the joiner by signing its admission "
        "record. Every refusal before the grant checks\nout (no grant, wrong secret, expired, "
        "used up, voided by `rustbalance cluster\nrotate-join-secret`, a stale request, the "
        "rate limit of 5 admissions per 5 minutes per node, a\nnode that does not admit) is the "
        "same `404`; only a holder of a valid grant sees `400`/`409`.\nThe admitted node goes "
        "into the membership, which every member gets within a heartbeat or two,\nand into "
        "every node's WireGuard interface. Every node answers any spelling of `/.rb/...` "
        "itself\n(`404` when it does not admit), joins on or off: such a path never reaches "
        "the target."
    )
    removed_keys: ClassVar[Mapping[str, str]] = {"secret_path": _REMOVED_IN_V3}

    enabled: bool = key(
        Boolean(),
        default=False,
        example=True,
        doc="Admit joiners. Needs the master key (`master.identity_key_path`), "
        "`wireguard.private_key_path`, `wireguard.address`, `wireguard.endpoint` and "
        '`proxy.mode = "http"`.',
    )
    tunnel_network: ipaddress.IPv4Network | None = key(
        Text(parse_tunnel_network, type_doc="IPv4 network"),
        default=None,
        derive=lambda d: (
            None if d.built["wireguard"].address is None else d.built["wireguard"].address.network
        ),
        default_doc="the network of `wireguard.address`",
        example="10.0.0.0/24",
        doc="Where joiners' tunnel addresses are assigned from: a `/20` to `/30` that contains "
        "`wireguard.address`.",
    )


def _etcd_prefix(value: str) -> str:
    # Printable ASCII without spaces, so the RBAC commands of docs/etcd.md can name the
    # prefix on a command line as it is.
    if not 2 <= len(value) <= 128 or not value.startswith("/") or not value.endswith("/"):
        raise Invalid(f"must be 2-128 characters starting and ending with '/', got {value!r}")
    if any(not 0x21 <= ord(ch) <= 0x7E for ch in value):
        raise Invalid(f"must be printable ASCII without spaces, got {value!r}")
    return value


_ETCD_REQUIRED = "**Required with the etcd backend.**"


@section
class EtcdConfig:
    """The etcd coordination backend (issue 20, docs/etcd.md). With ``coordination.backend =
    "etcd"`` the parser requires the endpoints and the three TLS files; the daemon reads the
    files (the key 0600, no symlink) when it starts."""

    section_doc: ClassVar[str] = (
        'The etcd coordination backend, used when `coordination.backend = "etcd"`\n'
        "([docs/etcd.md](etcd.md): what each node reads and writes, the RBAC commands, failure\n"
        "behaviour). Each node authenticates with its own client certificate; etcd takes the "
        "user name\nfrom the certificate's CN."
    )

    endpoints: tuple[Endpoint, ...] = key(
        Array(
            _endpoint(),
            type_doc="array of endpoints",
            duplicate=lambda endpoint: f"{endpoint} is listed twice",
        ),
        default=(),
        example=["10.0.0.11:2379", "10.0.0.12:2379", "10.0.0.13:2379"],
        doc="The etcd members' client `HOST:PORT`s (TLS). " + _ETCD_REQUIRED + " The node "
        "talks to one at a time and moves to the next when it fails.",
    )
    ca_path: Path | None = key(
        PathValue(),
        default=None,
        example="/etc/rustbalance/etcd/ca.pem",
        doc="PEM file of the CA that signed the members' certificates. " + _ETCD_REQUIRED,
    )
    cert_path: Path | None = key(
        PathValue(),
        default=None,
        example="/etc/rustbalance/etcd/node-b.pem",
        doc="PEM file of this node's client certificate; its CN is the node's etcd user (by "
        "convention `node.id`). " + _ETCD_REQUIRED,
    )
    key_path: Path | None = key(
        PathValue(),
        default=None,
        example="/etc/rustbalance/etcd/node-b-key.pem",
        doc="PEM file of the client certificate's private key, mode 0600 (refused when others "
        "can read it). " + _ETCD_REQUIRED,
    )
    prefix: str = key(
        Text(_etcd_prefix),
        default="/rustbalance/",
        doc="Every key of this cluster lives under it: `<prefix>nodes/<node id>` and "
        "`<prefix>election/<node id>`. 2–128 printable ASCII characters without spaces, "
        "starting and ending with `/`.",
    )
    lease_ttl_secs: int = key(
        Integer(2, 3600),
        default=10,
        doc="TTL of this node's etcd lease. A dead node's keys vanish at most this long after "
        "its last keep-alive; a node cut off from etcd stops publishing `max(1, TTL/4)` "
        "seconds before that.",
    )


@dataclass(frozen=True, kw_only=True)
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
    etcd: EtcdConfig = field(default_factory=EtcdConfig)

    @property
    def is_multi_node(self) -> bool:
        return self.coordination.is_multi_node

    @property
    def clustered(self) -> bool:
        """Part of a cluster by this config: coordination peers, answering joins or a
        WireGuard mesh (members admitted in an earlier run count too: node/startup.py)."""
        return self.is_multi_node or self.join.enabled or self.wireguard.enabled

    @property
    def identity_mode(self) -> IdentityMode:
        """The mode this node runs in: ``node.identity_mode``, else the default for its setup
        (config/identity_mode.py)."""
        return effective_identity_mode(self.node.identity_mode, self.clustered)

    def summary(self) -> str:
        """One line for logs and ``rustbalance config check``; contains no secrets."""
        mode = "multi-node" if self.is_multi_node else "single-node"
        peers = f" ({len(self.coordination.peers)} peers)" if self.coordination.peers else ""
        if self.coordination.backend == "etcd":
            count = len(self.etcd.endpoints)
            peers = f" (etcd, {count} endpoint{'' if count == 1 else 's'})"
        return (
            f"node {self.node.id}, {mode}{peers}, tor {self.tor.mode}, "
            f"target {self.target.address}{' (tls)' if self.target.use_tls else ''}"
        )
