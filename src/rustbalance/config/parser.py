"""TOML text -> validated :class:`Config`.

The parser reads every section with a small typed reader that records problems instead of
stopping at the first one, so the operator sees every mistake at once, one per line, each
naming its key (``tor.mode: must be 'managed' or 'system', got 'foo'``). Unknown sections and
keys are errors: a misspelt key silently falling back to its default is how the original
shipped configs that did not do what their authors thought.

No I/O besides reading the config file in :func:`load_config`: key and token files are only
named here; the daemon opens (and checks the permissions of) them when it starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from datetime import date, datetime, time
from pathlib import Path
from typing import Any, TypeVar, cast

from rustbalance.config.addresses import parse_client_auth_key, parse_endpoint, parse_host
from rustbalance.config.schema import (
    Config,
    CoordinationConfig,
    Endpoint,
    HealthConfig,
    IdentityMode,
    JoinConfig,
    MasterConfig,
    MetricsConfig,
    NodeConfig,
    ProxyConfig,
    ProxyMode,
    PublishConfig,
    TargetConfig,
    TorConfig,
    TorMode,
    WireGuardConfig,
    WireGuardMode,
)
from rustbalance.crypto.onion_address import decode_onion_address
from rustbalance.errors import ConfigError, InvalidKeyError

__all__ = ["ConfigProblems", "load_config", "parse_config"]

T = TypeVar("T")

SECTIONS = (
    "node",
    "master",
    "target",
    "tor",
    "proxy",
    "publish",
    "coordination",
    "metrics",
    "health",
    "wireguard",
    "join",
)
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_NODE_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_U32_MAX = 2**32 - 1
# tor's limit for the intro DoS defence parameters (INT32_MAX).
_I32_MAX = 2**31 - 1
# A year: longer durations are certainly a typo, and bounding them keeps every duration a
# finite float that asyncio timers accept.
_MAX_DURATION = 365 * 24 * 3600
# Linux sun_path is 108 bytes including the terminating NUL.
_MAX_UNIX_SOCKET_PATH = 107
# Largest UDP payload over IPv4; below ~1 KiB a signed heartbeat with peers does not fit.
_MIN_DATAGRAM, _MAX_DATAGRAM = 1024, 65507
_SYSTEM_CONTROL = "127.0.0.1:9051"
_SYSTEM_SOCKS = "127.0.0.1:9050"
_SYSTEM_HS_DIR = "/var/lib/tor/rustbalance_node_hs"
_SYSTEM_TORRC_INCLUDE = "/etc/tor/torrc.d/rustbalance.conf"
# Linux interface names: at most 15 bytes (IFNAMSIZ 16 with the NUL); the characters `ip` and
# wireguard-go accept without quoting.
_IFNAME = re.compile(r"[A-Za-z0-9_=+.-]{1,15}")
# node/join.py's limits on the tunnel network: a /20 holds 4094 nodes (far more than a
# cluster), a /30 the smallest network with two hosts.
_MIN_TUNNEL_PREFIX, _MAX_TUNNEL_PREFIX = 20, 30
_WIREGUARD_PEERS_FILE = "wireguard_peers.json"
# RFC 9110 §5.1: a header field name is a token.
_FIELD_NAME = re.compile(r"[-!#$%&'*+.^_`|~0-9A-Za-z]{1,64}")


class ConfigProblems(ConfigError):
    """A config that cannot be used; ``problems`` holds one message per mistake.

    ``str()`` is the problems one per line, each prefixed with ``source`` when known.
    """

    def __init__(self, problems: Sequence[str], source: str | None = None) -> None:
        self.problems = tuple(problems)
        self.source = source
        prefix = f"{source}: " if source else ""
        super().__init__("\n".join(prefix + problem for problem in self.problems))


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a config file; relative paths in it are resolved against its folder."""
    file = Path(path)
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise ConfigProblems(
            [f"cannot read config file: {exc.strerror or exc}"], str(file)
        ) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigProblems([f"config file is not UTF-8 (line {line})"], str(file)) from None
    try:
        return parse_config(text, file.absolute().parent)
    except ConfigProblems as exc:
        raise ConfigProblems(exc.problems, str(file)) from None


def parse_config(text: str, base_dir: str | os.PathLike[str]) -> Config:
    """Parse TOML text into a :class:`Config`; raise :class:`ConfigProblems` listing every
    problem. Relative paths are resolved against ``base_dir``."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigProblems([f"TOML syntax error: {exc}"]) from None
    except RecursionError:
        # tomllib recurses on nested arrays and inline tables.
        raise ConfigProblems(["TOML syntax error: values nested too deeply"]) from None
    except ValueError as exc:  # e.g. lone surrogates; tomllib documents only TOMLDecodeError
        raise ConfigProblems([f"TOML syntax error: {exc}"]) from None
    return _Builder(document, Path(base_dir).absolute()).build()


# --- the reader ---------------------------------------------------------------------------


def _describe(value: object) -> str:
    """Name a TOML value's type (and the value, if short) for an error message."""
    kinds: tuple[tuple[type, str], ...] = (
        (bool, "boolean"),
        (int, "integer"),
        (float, "float"),
        (str, "string"),
        (list, "array"),
        (dict, "table"),
        (datetime, "date-time"),
        (date, "date"),
        (time, "time"),
    )
    kind = next((name for cls, name in kinds if isinstance(value, cls)), type(value).__name__)
    if isinstance(value, bool):
        shown = "true" if value else "false"
    elif isinstance(value, int | float | str):
        shown = repr(value)
    else:
        return kind
    if len(shown) > 40:
        shown = shown[:37] + "..."
    return f"{kind} {shown}"


def _default(cls: type[Any], name: str) -> Any:
    """The dataclass default of ``cls.name``: the schema is the one place defaults live."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
    raise AssertionError(f"{cls.__name__}.{name} has no default")  # a bug in this module


class _Section:
    """Typed access to one section's table; records problems, remembers which keys it read."""

    def __init__(self, name: str, table: Mapping[str, object], problems: list[str]) -> None:
        self.name = name
        self._table = table
        self._problems = problems
        self._read: set[str] = set()
        self.failed: set[str] = set()

    def problem(self, key: str, message: str) -> None:
        self._problems.append(f"{self.name}.{key}: {message}")
        self.failed.add(key)

    def mark(self, key: str) -> None:
        """Accept ``key`` as known without reading it (callers report on it themselves)."""
        self._read.add(key)

    def has(self, key: str) -> bool:
        return key in self._table

    def ok(self, *keys: str) -> bool:
        """True if none of ``keys`` had a problem (for checks that relate several keys)."""
        return not self.failed.intersection(keys)

    def _get(
        self,
        key: str,
        default: T,
        convert: Callable[[object], T | None],
        required: bool,
    ) -> T:
        self._read.add(key)
        if key not in self._table:
            if required:
                self.problem(key, "is required")
            return default
        # A converter returns None only after reporting the problem.
        result = convert(self._table[key])
        if result is None:
            self.failed.add(key)
            return default
        return result

    def text(
        self,
        key: str,
        default: str,
        *,
        required: bool = False,
        check: Callable[[str], str | None] | None = None,
    ) -> str:
        def convert(value: object) -> str | None:
            if not isinstance(value, str):
                self.problem(key, f"must be a string, got {_describe(value)}")
                return None
            if check is not None and (message := check(value)) is not None:
                self.problem(key, message)
                return None
            return value

        return self._get(key, default, convert, required)

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        def check(value: str) -> str | None:
            if value in choices:
                return None
            options = " or ".join(f"'{c}'" for c in choices)
            return f"must be {options}, got {value!r}"

        return self.text(key, default, check=check)

    def boolean(self, key: str, default: bool) -> bool:
        def convert(value: object) -> bool | None:
            if not isinstance(value, bool):
                self.problem(key, f"must be true or false, got {_describe(value)}")
                return None
            return value

        return self._get(key, default, convert, False)

    def integer(self, key: str, default: int, low: int, high: int | None = None) -> int:
        def convert(value: object) -> int | None:
            # bool is a subclass of int in Python, but `priority = true` is a mistake.
            if isinstance(value, bool) or not isinstance(value, int):
                self.problem(key, f"must be an integer, got {_describe(value)}")
                return None
            if value < low or (high is not None and value > high):
                bound = f"{low}..{high}" if high is not None else f">= {low}"
                self.problem(key, f"must be {bound}, got {value}")
                return None
            return value

        return self._get(key, default, convert, False)

    def duration(self, key: str, default: float, *, zero_means_off: bool = False) -> float:
        def convert(value: object) -> float | None:
            if isinstance(value, bool) or not isinstance(value, int | float):
                self.problem(key, f"must be a number of seconds, got {_describe(value)}")
                return None
            if isinstance(value, float) and not math.isfinite(value):
                self.problem(key, f"must be a finite number of seconds, got {value}")
                return None
            if value < 0 or (value == 0 and not zero_means_off):
                need = ">= 0 (0 = off)" if zero_means_off else "> 0"
                self.problem(key, f"must be {need}, got {value}")
                return None
            if value > _MAX_DURATION:
                self.problem(key, f"must be at most {_MAX_DURATION} (a year), got {value}")
                return None
            return float(value)

        return self._get(key, default, convert, False)

    def path(self, key: str, default: Path, base: Path, *, required: bool = False) -> Path:
        def convert(value: object) -> Path | None:
            if not isinstance(value, str):
                self.problem(key, f"must be a path (string), got {_describe(value)}")
                return None
            if message := _path_problem(value):
                self.problem(key, message)
                return None
            return base / value

        return self._get(key, default, convert, required)

    def optional_path(self, key: str, base: Path) -> Path | None:
        if not self.has(key):
            self._read.add(key)
            return None
        return self.path(key, Path(), base)

    def endpoint(
        self,
        key: str,
        default: str,
        *,
        required: bool = False,
        allow_onion: bool = False,
        allow_port_zero: bool = False,
    ) -> Endpoint:
        fallback = Endpoint("127.0.0.1", 1)
        if default:
            fallback = parse_endpoint(default, allow_port_zero=allow_port_zero)

        def convert(value: object) -> Endpoint | None:
            if not isinstance(value, str):
                self.problem(key, f"must be a 'HOST:PORT' string, got {_describe(value)}")
                return None
            try:
                return parse_endpoint(
                    value, allow_onion=allow_onion, allow_port_zero=allow_port_zero
                )
            except ConfigError as exc:
                self.problem(key, str(exc))
                return None

        return self._get(key, fallback, convert, required)

    def items(self, key: str, item: Callable[[int, object], T | None]) -> tuple[T, ...]:
        """An array; ``item(index, value)`` converts each element or reports and returns None."""

        def convert(value: object) -> tuple[T, ...] | None:
            if not isinstance(value, list):
                self.problem(key, f"must be an array, got {_describe(value)}")
                return None
            results = [item(i, v) for i, v in enumerate(value)]
            if any(r is None for r in results):
                return None
            return tuple(cast(list[T], results))

        return self._get(key, (), convert, False)

    def item_problem(self, key: str, index: int, message: str) -> None:
        self.problem(f"{key}[{index}]", message)
        self.failed.add(key)

    def finish(self) -> None:
        """Report keys nobody read: unknown (probably misspelt) keys."""
        for key in self._table:
            if key not in self._read:
                hint = difflib.get_close_matches(key, sorted(self._read), n=1)
                suffix = f" (did you mean '{hint[0]}'?)" if hint else ""
                self._problems.append(f"{self.name}.{_key_name(key)}: unknown key{suffix}")


def _key_name(key: str) -> str:
    """A key as the operator would write it: quoted (and escaped) unless it is a bare key, so
    a key holding a newline cannot break the one-problem-per-line output."""
    return key if _BARE_KEY.fullmatch(key) else ascii(key)


def _path_problem(value: str) -> str | None:
    if not value:
        return "must not be empty"
    if "\0" in value:
        return "must not contain NUL characters"
    return None


# --- the builder --------------------------------------------------------------------------


class _Builder:
    def __init__(self, document: Mapping[str, object], base: Path) -> None:
        self.document = document
        self.base = base
        self.problems: list[str] = []

    def section(self, name: str) -> _Section:
        table = self.document.get(name, {})
        if not isinstance(table, dict):
            self.problems.append(
                f"{name}: must be a table ([{name}] section), got {_describe(table)}"
            )
            table = {}
        return _Section(name, table, self.problems)

    def build(self) -> Config:
        for name in self.document:
            if name not in SECTIONS:
                hint = difflib.get_close_matches(name, SECTIONS, n=1)
                suffix = f" (did you mean '[{hint[0]}]'?)" if hint else ""
                self.problems.append(f"[{_key_name(name)}]: unknown section{suffix}")
        node = self.node()
        master = self.master(node)
        target = self.target()
        tor = self.tor()
        proxy = self.proxy()
        publish = self.publish()
        coordination = self.coordination()
        metrics = self.metrics()
        health = self.health()
        wireguard = self.wireguard(node)
        join = self.join(wireguard, coordination, proxy)
        if not self.problems:
            self.check_listeners(proxy, metrics)
        if self.problems:
            raise ConfigProblems(self.problems)
        return Config(
            node,
            master,
            target,
            tor,
            proxy,
            publish,
            coordination,
            metrics,
            health,
            wireguard,
            join,
        )

    def node(self) -> NodeConfig:
        s = self.section("node")
        node_id = s.text("id", "", required=True, check=_check_node_id)
        priority = s.integer("priority", _default(NodeConfig, "priority"), 0, _U32_MAX)
        eligible = s.boolean("publisher_eligible", _default(NodeConfig, "publisher_eligible"))
        state_dir = s.path("state_dir", Path("/var/lib/rustbalance"), self.base)
        status_socket = s.path("status_socket", state_dir / "status.sock", self.base)
        if s.ok("state_dir", "status_socket"):
            length = len(os.fsencode(status_socket))
            if length > _MAX_UNIX_SOCKET_PATH:
                s.problem(
                    "status_socket",
                    f"path is {length} bytes; unix socket paths are limited to "
                    f"{_MAX_UNIX_SOCKET_PATH} (set a shorter node.status_socket)",
                )
        identity_mode = cast(
            IdentityMode,
            s.choice(
                "identity_mode", _default(NodeConfig, "identity_mode"), ("shared", "instance")
            ),
        )
        instance_key = s.path("instance_key_path", state_dir / "keys" / "instance.key", self.base)
        s.finish()
        return NodeConfig(
            node_id, state_dir, status_socket, priority, eligible, identity_mode, instance_key
        )

    def master(self, node: NodeConfig) -> MasterConfig:
        s = self.section("master")
        # Instance mode: only a node that may publish (sign the master descriptor) needs the
        # master key; the others host their own key and need just the master address.
        key_needed = node.identity_mode == "shared" or node.publisher_eligible
        key_path = s.optional_path("identity_key_path", self.base)
        if key_path is None and key_needed:
            why = "" if node.identity_mode == "shared" else " (this instance is publisher-eligible)"
            s.problem("identity_key_path", f"is required{why}")
        onion: str | None = None
        if s.has("onion_address"):
            onion = s.text("onion_address", "", check=_check_master_onion).lower()
        elif key_path is None and not key_needed:
            s.mark("onion_address")
            s.problem(
                "onion_address",
                "is required without master.identity_key_path (the node's ob_config names "
                "the master address)",
            )

        def client(index: int, value: object) -> bytes | None:
            if not isinstance(value, str):
                s.item_problem(
                    "authorized_clients", index, f"must be a string, got {_describe(value)}"
                )
                return None
            try:
                return parse_client_auth_key(value)
            except ConfigError as exc:
                s.item_problem("authorized_clients", index, str(exc))
                return None

        clients = s.items("authorized_clients", client)
        seen: set[bytes] = set()
        for index, key in enumerate(clients):
            if key in seen:
                s.item_problem("authorized_clients", index, "the same key is listed twice")
            seen.add(key)
        backends = s.items("backends", lambda i, v: _backend(s, i, v))
        for index, backend in enumerate(backends):
            if backend in backends[:index]:
                s.item_problem("backends", index, f"{backend} is listed twice")
            elif backend == onion:
                s.item_problem("backends", index, f"{backend} is the master address itself")
        m = MasterConfig
        poll = s.duration("backend_poll_secs", _default(m, "backend_poll_secs"))
        max_age = s.duration("backend_max_age_secs", _default(m, "backend_max_age_secs"))
        if s.ok("backend_poll_secs", "backend_max_age_secs") and max_age <= poll:
            # One slow poll must not drop a healthy backend.
            s.problem(
                "backend_max_age_secs",
                f"must be more than master.backend_poll_secs ({poll:g}), got {max_age:g}",
            )
        s.finish()
        return MasterConfig(key_path, onion, clients, backends, poll, max_age)

    def target(self) -> TargetConfig:
        s = self.section("target")
        address = s.endpoint("address", "", required=True, allow_onion=True)
        use_tls = s.boolean("use_tls", _default(TargetConfig, "use_tls"))
        connect = s.duration("connect_timeout_secs", _default(TargetConfig, "connect_timeout_secs"))
        idle = s.duration("idle_timeout_secs", _default(TargetConfig, "idle_timeout_secs"))
        session = s.duration(
            "session_timeout_secs",
            _default(TargetConfig, "session_timeout_secs"),
            zero_means_off=True,
        )
        s.finish()
        return TargetConfig(address, use_tls, connect, idle, session)

    def tor(self) -> TorConfig:
        s = self.section("tor")
        mode = cast(TorMode, s.choice("mode", _default(TorConfig, "mode"), ("managed", "system")))
        managed = mode == "managed"
        data_dir = s.path("data_dir", Path("/var/lib/rustbalance/tor"), self.base)

        def torrc_line(index: int, value: object) -> str | None:
            if not isinstance(value, str):
                s.item_problem("extra_torrc", index, f"must be a string, got {_describe(value)}")
                return None
            # One item is one torrc line; a newline would smuggle in lines we never validated
            # into the torrc we write.
            if any(c in value for c in "\r\n\0"):
                s.item_problem("extra_torrc", index, "must be a single line (no newline or NUL)")
                return None
            return value

        extra = s.items("extra_torrc", torrc_line)
        binary = s.text("binary", _default(TorConfig, "binary"), check=_check_binary)

        control: Endpoint | Path | None = None
        # With an invalid mode, which keys belong to it is unknown: only the mode is reported.
        mode_known = s.ok("mode")
        if managed and s.has("control"):
            s.mark("control")
            if mode_known:
                s.problem(
                    "control",
                    "only used in system mode; managed mode runs its own tor and picks the "
                    "control port (remove the key or set tor.mode = 'system')",
                )
        elif not managed:
            control = self.control(s)

        socks: Endpoint | None = None
        if s.has("socks") or not managed:
            socks = s.endpoint("socks", _SYSTEM_SOCKS)

        hs_default = data_dir / "hidden_service" if managed else Path(_SYSTEM_HS_DIR)
        hs_dir = s.path("hidden_service_dir", hs_default, self.base)

        torrc_include: Path | None = None
        if managed and s.has("torrc_include"):
            s.mark("torrc_include")
            if mode_known:
                s.problem("torrc_include", "only used in system mode (tor.mode = 'system')")
        elif not managed:
            torrc_include = s.path("torrc_include", Path(_SYSTEM_TORRC_INCLUDE), self.base)

        num_intro = s.integer("num_intro_points", _default(TorConfig, "num_intro_points"), 1, 20)
        pow_enabled = s.boolean("pow_enabled", _default(TorConfig, "pow_enabled"))
        pow_rate = s.integer("pow_queue_rate", _default(TorConfig, "pow_queue_rate"), 1, _I32_MAX)
        pow_burst = s.integer(
            "pow_queue_burst", _default(TorConfig, "pow_queue_burst"), 1, _I32_MAX
        )
        if s.ok("pow_queue_rate", "pow_queue_burst") and pow_burst < pow_rate:
            s.problem(
                "pow_queue_burst",
                f"must be >= tor.pow_queue_rate ({pow_rate}), got {pow_burst}",
            )
        dos_enabled = s.boolean("intro_dos_enabled", _default(TorConfig, "intro_dos_enabled"))
        dos_rate = s.integer(
            "intro_dos_rate_per_sec", _default(TorConfig, "intro_dos_rate_per_sec"), 1, _I32_MAX
        )
        dos_burst = s.integer(
            "intro_dos_burst_per_sec", _default(TorConfig, "intro_dos_burst_per_sec"), 1, _I32_MAX
        )
        if s.ok("intro_dos_rate_per_sec", "intro_dos_burst_per_sec") and dos_burst < dos_rate:
            s.problem(
                "intro_dos_burst_per_sec",
                f"must be >= tor.intro_dos_rate_per_sec ({dos_rate}), got {dos_burst}",
            )
        watchdog = s.duration(
            "watchdog_interval_secs", _default(TorConfig, "watchdog_interval_secs")
        )
        bootstrap = s.duration(
            "bootstrap_timeout_secs", _default(TorConfig, "bootstrap_timeout_secs")
        )
        # --- the front door (issue 15): tor's per-circuit stream limit (tor.md; tor's
        # hs_config.c: HiddenServiceMaxStreams is 0..65535) ---
        max_streams = s.integer(
            "max_streams_per_circuit", _default(TorConfig, "max_streams_per_circuit"), 0, 65535
        )
        close_circuit = s.boolean(
            "max_streams_close_circuit", _default(TorConfig, "max_streams_close_circuit")
        )
        s.finish()
        return TorConfig(
            data_dir=data_dir,
            hidden_service_dir=hs_dir,
            mode=mode,
            extra_torrc=extra,
            binary=binary,
            control=control,
            socks=socks,
            torrc_include=torrc_include,
            num_intro_points=num_intro,
            pow_enabled=pow_enabled,
            pow_queue_rate=pow_rate,
            pow_queue_burst=pow_burst,
            intro_dos_enabled=dos_enabled,
            intro_dos_rate_per_sec=dos_rate,
            intro_dos_burst_per_sec=dos_burst,
            watchdog_interval_secs=watchdog,
            bootstrap_timeout_secs=bootstrap,
            max_streams_per_circuit=max_streams,
            max_streams_close_circuit=close_circuit,
        )

    def control(self, s: _Section) -> Endpoint | Path:
        """tor.control in system mode: ``HOST:PORT``, or a unix socket path (``unix:PATH`` as in
        tor's ControlPort, or any value containing a ``/``)."""

        def check(value: str) -> str | None:
            if _is_unix_path(value):
                return _path_problem(value.removeprefix("unix:"))
            try:
                parse_endpoint(value)
            except ConfigError as exc:
                return f"{exc}; or give a unix socket path ('/run/tor/control' or 'unix:PATH')"
            return None

        value = s.text("control", _SYSTEM_CONTROL, check=check)
        if s.ok("control") and _is_unix_path(value):
            return self.base / value.removeprefix("unix:")
        return parse_endpoint(value if s.ok("control") else _SYSTEM_CONTROL)

    def proxy(self) -> ProxyConfig:
        s = self.section("proxy")

        def check_host(value: str) -> str | None:
            try:
                parse_host(value, allow_onion=False)
            except ConfigError as exc:
                return str(exc)
            return None

        host = s.text("listen_host", _default(ProxyConfig, "listen_host"), check=check_host)
        if s.ok("listen_host"):
            host = parse_host(host, allow_onion=False)
        port = s.integer("listen_port", _default(ProxyConfig, "listen_port"), 0, 65535)
        vport = s.integer("virtual_port", _default(ProxyConfig, "virtual_port"), 1, 65535)
        mode = cast(ProxyMode, s.choice("mode", _default(ProxyConfig, "mode"), ("http", "tcp")))
        max_conn = s.integer("max_connections", _default(ProxyConfig, "max_connections"), 1)
        drain = s.duration("drain_timeout_secs", _default(ProxyConfig, "drain_timeout_secs"))
        front_door = self.front_door(s)
        s.finish()
        return dataclasses.replace(
            ProxyConfig(host, port, vport, mode, max_conn, drain), **front_door
        )

    # --- the front door (issue 15): [proxy] timeouts, limits, circuits, unix socket ---------

    def front_door(self, s: _Section) -> dict[str, Any]:
        """The [proxy] keys of the front door, as ProxyConfig keyword arguments."""
        p = ProxyConfig

        def dur(key: str) -> float:
            return s.duration(key, _default(p, key))

        def check_header(value: str) -> str | None:
            if value and not _FIELD_NAME.fullmatch(value):
                return "must be an HTTP header name (letters, digits, - and other token characters)"
            return None

        unix = s.optional_path("listen_unix", self.base)
        if unix is not None and s.ok("listen_unix"):
            length = len(os.fsencode(unix))
            if length > _MAX_UNIX_SOCKET_PATH:
                s.problem(
                    "listen_unix",
                    f"path is {length} bytes; unix socket paths are limited to "
                    f"{_MAX_UNIX_SOCKET_PATH}",
                )

        def per_second(value: object) -> float | None:
            if isinstance(value, bool) or not isinstance(value, int | float):
                s.problem("circuit_request_rate", f"must be a number, got {_describe(value)}")
                return None
            if not math.isfinite(value) or not 0 <= value <= 1_000_000:
                s.problem("circuit_request_rate", f"must be 0..1000000 (0 = off), got {value}")
                return None
            return float(value)

        rate = s._get(
            "circuit_request_rate", _default(p, "circuit_request_rate"), per_second, False
        )
        return {
            "listen_unix": unix,
            "request_head_timeout_secs": dur("request_head_timeout_secs"),
            "keep_alive_timeout_secs": dur("keep_alive_timeout_secs"),
            "request_body_timeout_secs": dur("request_body_timeout_secs"),
            "max_head_bytes": s.integer(
                "max_head_bytes", _default(p, "max_head_bytes"), 1024, 1 << 20
            ),
            "max_head_fields": s.integer(
                "max_head_fields", _default(p, "max_head_fields"), 1, 10_000
            ),
            "export_circuit_id": s.boolean("export_circuit_id", _default(p, "export_circuit_id")),
            "circuit_max_connections": s.integer(
                "circuit_max_connections", _default(p, "circuit_max_connections"), 0, 65535
            ),
            "circuit_request_rate": rate,
            "circuit_request_burst": s.integer(
                "circuit_request_burst", _default(p, "circuit_request_burst"), 1, 1_000_000
            ),
            "circuit_cut_secs": dur("circuit_cut_secs"),
            "circuit_id_header": s.text(
                "circuit_id_header", _default(p, "circuit_id_header"), check=check_header
            ),
        }

    def publish(self) -> PublishConfig:
        s = self.section("publish")
        c = PublishConfig

        def dur(key: str) -> float:
            return s.duration(key, _default(c, key))

        refresh = dur("refresh_interval_secs")
        max_ips = s.integer("max_intro_points", _default(c, "max_intro_points"), 1, 20)
        lifetime = s.integer(
            "descriptor_lifetime_mins", _default(c, "descriptor_lifetime_mins"), 30, 720
        )
        retries = s.integer("retries", _default(c, "retries"), 0, 100)
        retry_base = dur("retry_base_secs")
        retry_max = dur("retry_max_secs")
        if s.ok("retry_base_secs", "retry_max_secs") and retry_max < retry_base:
            s.problem(
                "retry_max_secs",
                f"must be >= publish.retry_base_secs ({retry_base:g}), got {retry_max:g}",
            )
        poll = dur("first_publish_poll_secs")
        max_wait = dur("first_publish_max_wait_secs")
        if s.ok("first_publish_poll_secs", "first_publish_max_wait_secs") and max_wait < poll:
            s.problem(
                "first_publish_max_wait_secs",
                f"must be >= publish.first_publish_poll_secs ({poll:g}), got {max_wait:g}",
            )
        max_age = dur("descriptor_max_age_secs")
        upload = dur("upload_timeout_secs")
        s.finish()
        return PublishConfig(
            refresh,
            max_ips,
            lifetime,
            retries,
            retry_base,
            retry_max,
            poll,
            max_wait,
            max_age,
            upload,
        )

    def coordination(self) -> CoordinationConfig:
        s = self.section("coordination")
        c = CoordinationConfig
        token = s.optional_path("cluster_token_path", self.base)
        listen = s.endpoint("listen", str(_default(c, "listen")))

        def peer(index: int, value: object) -> Endpoint | None:
            if not isinstance(value, str):
                s.item_problem(
                    "peers", index, f"must be a 'HOST:PORT' string, got {_describe(value)}"
                )
                return None
            try:
                return parse_endpoint(value)
            except ConfigError as exc:
                s.item_problem("peers", index, str(exc))
                return None

        peers = s.items("peers", peer)
        for index, endpoint in enumerate(peers):
            if endpoint in peers[:index]:
                s.item_problem("peers", index, f"{endpoint} is listed twice")
            elif endpoint == listen:
                s.item_problem("peers", index, f"{endpoint} is this node's own listen address")
        interval = s.duration("heartbeat_interval_secs", _default(c, "heartbeat_interval_secs"))
        timeout = s.duration("heartbeat_timeout_secs", _default(c, "heartbeat_timeout_secs"))
        grace = s.duration("takeover_grace_secs", _default(c, "takeover_grace_secs"))
        skew = s.duration("clock_skew_tolerance_secs", _default(c, "clock_skew_tolerance_secs"))
        datagram = s.integer(
            "max_datagram_bytes", _default(c, "max_datagram_bytes"), _MIN_DATAGRAM, _MAX_DATAGRAM
        )
        if s.ok("heartbeat_interval_secs", "heartbeat_timeout_secs") and timeout <= 2 * interval:
            # One lost heartbeat must not look like a dead peer.
            s.problem(
                "heartbeat_timeout_secs",
                f"must be more than 2 x coordination.heartbeat_interval_secs "
                f"({2 * interval:g}), got {timeout:g}",
            )
        if s.ok("heartbeat_interval_secs", "takeover_grace_secs") and grace < interval:
            s.problem(
                "takeover_grace_secs",
                f"must be >= coordination.heartbeat_interval_secs ({interval:g}), got {grace:g}",
            )
        if peers and token is None and s.ok("cluster_token_path"):
            # Without a shared secret any host that can reach the port could join the cluster
            # and take over publishing.
            s.problem(
                "cluster_token_path",
                "is required when coordination.peers is not empty (multi-node)",
            )
        advertise = s.endpoint("advertise", "") if s.has("advertise") else None
        s.finish()
        return CoordinationConfig(
            token, listen, peers, interval, timeout, grace, skew, datagram, advertise
        )

    def metrics(self) -> MetricsConfig:
        s = self.section("metrics")
        enabled = s.boolean("enabled", _default(MetricsConfig, "enabled"))
        listen = s.endpoint("listen", str(_default(MetricsConfig, "listen")))
        s.finish()
        return MetricsConfig(enabled, listen)

    def health(self) -> HealthConfig:
        s = self.section("health")
        c = HealthConfig
        enabled = s.boolean("http_probe_enabled", _default(c, "http_probe_enabled"))
        path = s.text("http_probe_path", _default(c, "http_probe_path"), check=_check_probe_path)
        interval = s.duration("http_probe_interval_secs", _default(c, "http_probe_interval_secs"))
        timeout = s.duration("http_probe_timeout_secs", _default(c, "http_probe_timeout_secs"))
        if s.ok("http_probe_interval_secs", "http_probe_timeout_secs") and timeout > interval:
            s.problem(
                "http_probe_timeout_secs",
                f"must be <= health.http_probe_interval_secs ({interval:g}), got {timeout:g}",
            )
        status = s.integer("probe_expected_status", _default(c, "probe_expected_status"), 100, 599)
        threshold = s.integer(
            "probe_failure_threshold", _default(c, "probe_failure_threshold"), 1, 1000
        )
        s.finish()
        return HealthConfig(enabled, path, interval, timeout, status, threshold)

    def wireguard(self, node: NodeConfig) -> WireGuardConfig:
        s = self.section("wireguard")
        c = WireGuardConfig
        enabled = s.boolean("enabled", _default(c, "enabled"))
        interface = s.text("interface", _default(c, "interface"), check=_check_ifname)
        key_path = s.optional_path("private_key_path", self.base)
        address: ipaddress.IPv4Interface | None = None
        if s.has("address"):
            text = s.text("address", "", check=_check_tunnel_address)
            if s.ok("address"):
                address = ipaddress.IPv4Interface(text)
        else:
            s.mark("address")
        port = s.integer("listen_port", _default(c, "listen_port"), 1, 65535)
        mode = cast(
            WireGuardMode,
            s.choice("mode", _default(c, "mode"), ("auto", "kernel", "userspace")),
        )
        peers_path = s.path("peers_path", node.state_dir / _WIREGUARD_PEERS_FILE, self.base)
        endpoint = s.endpoint("endpoint", "") if s.has("endpoint") else None
        if enabled:
            for key, value in (("private_key_path", key_path), ("address", address)):
                if value is None and s.ok(key):
                    s.problem(key, "is required when wireguard.enabled = true")
        s.finish()
        return WireGuardConfig(
            enabled=enabled,
            interface=interface,
            private_key_path=key_path,
            address=address,
            listen_port=port,
            mode=mode,
            peers_path=peers_path,
            endpoint=endpoint,
        )

    def join(
        self,
        wireguard: WireGuardConfig,
        coordination: CoordinationConfig,
        proxy: ProxyConfig,
    ) -> JoinConfig:
        s = self.section("join")
        enabled = s.boolean("enabled", _default(JoinConfig, "enabled"))
        secret_path = s.optional_path("secret_path", self.base)
        network: ipaddress.IPv4Network | None = None
        if s.has("tunnel_network"):
            text = s.text("tunnel_network", "", check=_check_tunnel_network)
            if s.ok("tunnel_network"):
                network = ipaddress.IPv4Network(text)
        else:
            s.mark("tunnel_network")
            if wireguard.address is not None:
                network = wireguard.address.network
        address = wireguard.address
        if network is not None and address is not None and address.ip not in network:
            s.problem(
                "tunnel_network",
                f"{network} does not contain this node's wireguard.address {address.ip}",
            )
        if enabled:
            if secret_path is None and s.ok("secret_path"):
                s.problem("secret_path", "is required when join.enabled = true")
            # The join answer describes this node to the joiner: its WireGuard identity and
            # tunnel address (node/join.py PeerInfo), so these must be known even when the
            # tunnel itself is managed outside rustbalance.
            for key, value in (
                ("private_key_path", wireguard.private_key_path),
                ("address", wireguard.address),
                ("endpoint", wireguard.endpoint),
            ):
                if value is None and not any(
                    p.startswith(f"wireguard.{key}:") for p in self.problems
                ):
                    self.problems.append(f"wireguard.{key}: is required when join.enabled = true")
            if coordination.cluster_token_path is None:
                # Joiners prove they hold the cluster token; without one nothing can be checked.
                self.problems.append(
                    "coordination.cluster_token_path: is required when join.enabled = true"
                )
            reach = coordination.advertise or coordination.listen
            if reach.host in ("0.0.0.0", "::"):
                # Joiners are told where to send heartbeats; a wildcard is nowhere.
                self.problems.append(
                    f"coordination.listen: {reach} is a wildcard address, which joiners cannot "
                    "reach; listen on the tunnel address or set coordination.advertise"
                )
            if proxy.mode != "http":
                # The join request is an HTTP POST answered by the proxy itself; tcp mode
                # copies bytes to the target without looking at them.
                self.problems.append(
                    f"proxy.mode: must be 'http' when join.enabled = true, got '{proxy.mode}'"
                )
        s.finish()
        return JoinConfig(enabled, secret_path, network)

    def check_listeners(self, proxy: ProxyConfig, metrics: MetricsConfig) -> None:
        # Both are TCP listeners; the coordination socket is UDP and may share a port number.
        if (
            metrics.enabled
            and proxy.listen_port != 0
            and proxy.listen_port == metrics.listen.port
            and proxy.listen_host == metrics.listen.host
        ):
            self.problems.append(
                f"metrics.listen: {metrics.listen} is also proxy.listen_host:listen_port"
            )


def _check_node_id(value: str) -> str | None:
    if _NODE_ID.fullmatch(value):
        return None
    return f"must be 1-64 characters of A-Z a-z 0-9 . _ -, got {value!r}"


def _check_master_onion(value: str) -> str | None:
    if not value.lower().endswith(".onion"):
        return f"must be '<56 characters>.onion', got {value!r}"
    try:
        decode_onion_address(value)
    except InvalidKeyError as exc:
        return str(exc)
    return None


def _backend(s: _Section, index: int, value: object) -> str | None:
    """One ``master.backends`` item: a v3 ``<56 chars>.onion``, lower-cased."""
    if not isinstance(value, str):
        s.item_problem("backends", index, f"must be a string, got {_describe(value)}")
        return None
    if (message := _check_master_onion(value)) is not None:
        s.item_problem("backends", index, message)
        return None
    return value.lower()


def _is_unix_path(value: str) -> bool:
    return value.startswith("unix:") or "/" in value


def _check_binary(value: str) -> str | None:
    return _path_problem(value)


def _check_ifname(value: str) -> str | None:
    if _IFNAME.fullmatch(value):
        return None
    return f"must be 1-15 characters of A-Z a-z 0-9 _ = + . -, got {value!r}"


def _check_tunnel_address(value: str) -> str | None:
    example = "an IPv4 address with its network's prefix, such as '10.99.0.1/24'"
    if "/" not in value:
        return f"must be {example}, got {value!r}"
    try:
        interface = ipaddress.IPv4Interface(value)
    except ValueError:
        return f"must be {example}, got {value!r}"
    network = interface.network
    if network.prefixlen < 31 and interface.ip in (
        network.network_address,
        network.broadcast_address,
    ):
        return f"{interface.ip} is the network or broadcast address of {network}"
    return None


def _check_tunnel_network(value: str) -> str | None:
    try:
        network = ipaddress.IPv4Network(value, strict=True)
    except ValueError:
        return f"must be an IPv4 network such as '10.99.0.0/24', got {value!r}"
    if "/" not in value or not _MIN_TUNNEL_PREFIX <= network.prefixlen <= _MAX_TUNNEL_PREFIX:
        return f"must be a /{_MIN_TUNNEL_PREFIX} to /{_MAX_TUNNEL_PREFIX} network, got {value!r}"
    return None


def _check_probe_path(value: str) -> str | None:
    if not value.startswith("/"):
        return f"must start with '/', got {value!r}"
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        return "must not contain spaces or control characters"
    return None
