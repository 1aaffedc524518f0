"""Proxy settings and target parsing (pure, no I/O).

The config layer maps its ``[target]`` / ``[proxy]`` tables onto :class:`ProxySettings`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from rustbalance.errors import RuleError, RustBalanceError
from rustbalance.rules import parse_host

from .admission import CircuitLimits
from .session import Timeouts
from .wire import Limits

ProxyMode = Literal["http", "tcp"]

# A v3 onion address label is 56 base32 characters (rend-spec-v3 [ONIONADDRESS]); tor also
# accepts subdomains in front of it (``www.<56>.onion``). The checksum is left to tor: a
# wrong one makes the SOCKS CONNECT fail, which we report as an upstream error.
_ONION_RE = re.compile(r"^(?:[a-z0-9-]{1,63}\.)*[a-z2-7]{56}\.onion$")
_HOST_LABEL_RE = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$")
# RFC 9110 §5.1: a field name is a token.
_FIELD_NAME_RE = re.compile(r"^[-!#$%&'*+.^_`|~0-9A-Za-z]{1,64}$")


class ProxyError(RustBalanceError):
    """The reverse proxy was misconfigured or could not reach its target."""


@dataclass(frozen=True)
class Target:
    """Where the proxy sends each connection: the operator's real application."""

    host: str
    port: int
    is_onion: bool
    use_tls: bool = False

    @property
    def authority(self) -> str:
        """``host[:port]`` as in a Host header (RFC 9110 §7.2): the default port left out."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.use_tls else 80
        return host if self.port == default else f"{host}:{self.port}"

    @property
    def scheme(self) -> str:
        return "https" if self.use_tls else "http"

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_target(text: str, *, use_tls: bool | None = None) -> Target:
    """Parse ``host:port``, ``host`` or ``http(s)://host[:port][/]`` into a :class:`Target`.

    ``https://`` (or ``use_tls=True``) turns TLS on and makes 443 the default port; otherwise
    the default is 80. IPv6 literals go in brackets. Raises :class:`ProxyError`.
    """
    raw = text.strip()
    tls = False
    lowered = raw.lower()
    if lowered.startswith("https://"):
        tls, raw = True, raw[len("https://") :]
    elif lowered.startswith("http://"):
        raw = raw[len("http://") :]
    raw = raw.rstrip("/")
    if use_tls is not None:
        tls = use_tls
    if not raw or "/" in raw or "@" in raw or any(c.isspace() for c in raw):
        raise ProxyError(f"invalid target {text!r}: expected host:port")
    port_text: str | None = None
    if raw.startswith("["):
        end = raw.find("]")
        if end < 0:
            raise ProxyError(f"invalid target {text!r}: unterminated IPv6 literal")
        host, rest = raw[1:end], raw[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ProxyError(f"invalid target {text!r}: expected host:port")
            port_text = rest[1:]
        try:
            # The shared rule: also refuses zone ids that are no interface name.
            host = parse_host(f"[{host}]", allow_onion=False)
        except RuleError as exc:
            raise ProxyError(f"invalid target {text!r}: bad IPv6 address") from exc
    else:
        host, sep, port_part = raw.rpartition(":")
        if not sep:
            host, port_text = raw, None
        else:
            port_text = port_part
        if ":" in host:
            raise ProxyError(f"invalid target {text!r}: put IPv6 addresses in brackets")
    host = host.lower()
    if port_text is None:
        port = 443 if tls else 80
    else:
        if not port_text.isascii() or not port_text.isdigit() or len(port_text) > 5:
            raise ProxyError(f"invalid target {text!r}: bad port")
        port = int(port_text)
    if not 1 <= port <= 65535:
        raise ProxyError(f"invalid target {text!r}: port out of range")
    is_onion = host.endswith(".onion")
    if is_onion:
        if not _ONION_RE.match(host):
            raise ProxyError(f"invalid target {text!r}: not a v3 onion address")
    elif ":" not in host:
        labels = host.split(".")
        if not all(_HOST_LABEL_RE.match(label) for label in labels) or len(host) > 253:
            raise ProxyError(f"invalid target {text!r}: bad host name")
    return Target(host=host, port=port, is_onion=is_onion, use_tls=tls)


def format_seconds(value: float) -> str:
    """Seconds as tor operators read them in logs: ``30`` for 30.0, ``0.5`` for 0.5."""
    number = float(value)
    if number.is_integer():
        return str(int(number))
    return repr(number)


@dataclass(frozen=True)
class ProxySettings:
    """Everything the reverse proxy needs; the config layer fills it in.

    ``listen_port=0`` picks a free port (see ``ReverseProxy.port``); ``listen_unix`` (a path)
    listens on a unix socket instead (mode ``unix_mode``, for tor's ``HiddenServicePort 80
    unix:PATH``). ``max_session_seconds`` is off by default: a long download must not be
    cut. ``master_onion`` is the address clients use (``<56>.onion``); without it, responses
    that point at the target are made relative (Location) or lose their Domain attribute
    (Set-Cookie).

    The front door (issue 15): ``head_timeout`` for a whole request head (408),
    ``keep_alive_timeout`` between requests, ``body_timeout`` without request body progress,
    ``idle_timeout`` while waiting for the target; heads of at most ``max_header_bytes`` and
    ``max_header_fields`` (431). ``circuit_ids``: every connection starts with tor's PROXY
    line (``HiddenServiceExportCircuitID haproxy``), and ``circuit_limits`` apply per
    circuit; ``circuit_header`` (a field name) sends the circuit id to the target.
    """

    target: Target
    listen_host: str = "127.0.0.1"
    listen_port: int = 0
    listen_unix: str | None = None
    unix_mode: int = 0o660
    mode: ProxyMode = "http"
    socks_host: str = "127.0.0.1"
    socks_port: int = 9050
    master_onion: str | None = None
    master_scheme: str = "http"
    connect_timeout: float = 30.0
    idle_timeout: float = 300.0
    max_session_seconds: float | None = None
    head_timeout: float = 10.0
    keep_alive_timeout: float = 30.0
    body_timeout: float = 30.0
    max_connections: int = 1024
    drain_timeout: float = 10.0
    tls_ca_file: str | None = None
    read_size: int = 256 * 1024
    max_header_bytes: int = 16 * 1024
    max_header_fields: int = 100
    circuit_ids: bool = False
    circuit_limits: CircuitLimits = field(default_factory=CircuitLimits)
    circuit_header: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("http", "tcp"):
            raise ProxyError(f"proxy mode must be 'http' or 'tcp', not {self.mode!r}")
        if not 0 <= self.listen_port <= 65535:
            raise ProxyError("proxy listen_port out of range")
        if self.listen_unix is not None and not self.listen_unix.startswith("/"):
            raise ProxyError("proxy listen_unix must be an absolute path")
        if self.unix_mode & ~0o660:
            raise ProxyError("proxy unix_mode must be 0660 or tighter")
        if not 1 <= self.socks_port <= 65535:
            raise ProxyError("proxy socks_port out of range")
        for name in (
            "connect_timeout",
            "idle_timeout",
            "drain_timeout",
            "head_timeout",
            "keep_alive_timeout",
            "body_timeout",
        ):
            if not getattr(self, name) > 0:
                raise ProxyError(f"proxy {name} must be positive")
        if self.max_session_seconds is not None and not self.max_session_seconds > 0:
            raise ProxyError("proxy max_session_seconds must be positive or None")
        if self.max_connections < 1:
            raise ProxyError("proxy max_connections must be at least 1")
        if self.read_size < 1024:
            raise ProxyError("proxy read_size must be at least 1024")
        if self.max_header_bytes < 1024 or self.max_header_fields < 1:
            raise ProxyError("proxy head limits must allow 1 KiB and one field")
        if self.master_scheme not in ("http", "https"):
            raise ProxyError("proxy master_scheme must be 'http' or 'https'")
        if self.circuit_header is not None and not _FIELD_NAME_RE.match(self.circuit_header):
            raise ProxyError("proxy circuit_header must be a header field name")
        if self.master_onion is not None:
            master = self.master_onion.lower()
            if not master.endswith(".onion"):
                master += ".onion"
            if not _ONION_RE.match(master):
                raise ProxyError("proxy master_onion is not a v3 onion address")
            object.__setattr__(self, "master_onion", master)

    @property
    def limits(self) -> Limits:
        """The head limits of the wire layer."""
        return Limits(self.max_header_bytes, self.max_header_fields)

    @property
    def timeouts(self) -> Timeouts:
        return Timeouts(
            idle=self.idle_timeout,
            head=self.head_timeout,
            keep_alive=self.keep_alive_timeout,
            body=self.body_timeout,
            session=self.max_session_seconds,
        )

    @property
    def where(self) -> str:
        """Where the proxy listens, for log lines."""
        if self.listen_unix is not None:
            return f"unix:{self.listen_unix}"
        return f"{self.listen_host}:{self.listen_port}"
