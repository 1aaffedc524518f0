"""Header rewriting between the master address and the target (pure, no I/O).

Requests go master -> target (Host, Origin, Referer); responses go target -> master
(Location, Set-Cookie Domain, Content-Security-Policy, Access-Control-Allow-Origin), so that
neither the client sees the target's address nor the target sees a foreign Host.

Headers are h11's ``(lowercase name, value)`` byte pairs. Values are decoded as Latin-1,
which is lossless for any byte (RFC 9110 §5.5 treats non-ASCII as opaque octets).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit

Headers = list[tuple[bytes, bytes]]

# Hop-by-hop fields (RFC 9110 §7.6.1): meaningful for one connection only, so a proxy must
# not forward them. Framing fields (Transfer-Encoding, Content-Length) are kept because h11
# re-frames the body from them on the other side (RFC 9112 §6).
_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authorization",
        b"proxy-authenticate",
        b"te",
        b"trailer",
        b"upgrade",
    }
)


@dataclass(frozen=True)
class RewriteRules:
    """The two addresses a rewrite maps between."""

    target_host: str
    target_port: int
    target_tls: bool
    master_host: str | None
    master_scheme: str = "http"

    @property
    def target_scheme(self) -> str:
        return "https" if self.target_tls else "http"

    @property
    def target_authority(self) -> str:
        host = f"[{self.target_host}]" if ":" in self.target_host else self.target_host
        default = 443 if self.target_tls else 80
        return host if self.target_port == default else f"{host}:{self.target_port}"

    @property
    def target_origin(self) -> str:
        return f"{self.target_scheme}://{self.target_authority}"

    @property
    def master_origin(self) -> str | None:
        if self.master_host is None:
            return None
        return f"{self.master_scheme}://{self.master_host}"


def _split(value: str) -> SplitResult | None:
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        return None
    return parts


def _port_of(parts: SplitResult) -> int | None:
    port = parts.port
    if port is not None:
        return port
    return {"http": 80, "https": 443, "ws": 80, "wss": 443}.get(parts.scheme.lower())


def _is_target_url(parts: SplitResult, rules: RewriteRules) -> bool:
    host = parts.hostname
    if host is None or host != rules.target_host.lower():
        return False
    if parts.scheme == "":  # scheme-relative "//host/path": the port decides alone
        return parts.port is None or parts.port == rules.target_port
    return _port_of(parts) == rules.target_port


def _is_master_url(parts: SplitResult, rules: RewriteRules) -> bool:
    return (
        rules.master_host is not None
        and parts.hostname is not None
        and parts.hostname == rules.master_host.lower()
    )


def _path_part(parts: SplitResult) -> str:
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    if parts.fragment:
        path += "#" + parts.fragment
    return path


def rewrite_location(value: str, rules: RewriteRules) -> str:
    """An absolute or scheme-relative URL on the target becomes the same path on the master.

    Without a master address the URL becomes a relative path. Other URLs are unchanged.
    """
    parts = _split(value.strip())
    if parts is None or not parts.netloc or not _is_target_url(parts, rules):
        return value
    if parts.scheme and parts.scheme.lower() not in ("http", "https", "ws", "wss"):
        return value
    path = _path_part(parts)
    origin = rules.master_origin
    if origin is None:
        return path
    return origin + path


def rewrite_set_cookie(value: str, rules: RewriteRules) -> str:
    """``Domain=<target>`` becomes ``Domain=<master>`` (dropped when there is no master)."""
    attributes = value.split(";")
    out = [attributes[0]]
    target = rules.target_host.lower()
    for attribute in attributes[1:]:
        name, sep, domain = attribute.partition("=")
        if (
            sep
            and name.strip().lower() == "domain"
            and domain.strip().lstrip(".").lower() == target
        ):
            if rules.master_host is not None:
                out.append(f" Domain={rules.master_host}")
            continue
        out.append(attribute)
    return ";".join(out)


def _host_pattern(host: str) -> re.Pattern[str]:
    # The host, optionally with a port, not preceded by a label character (so a longer
    # name that merely ends with the target host is left alone) nor followed by one.
    return re.compile(
        r"(?<![A-Za-z0-9.-])" + re.escape(host) + r"(?::\d{1,5})?(?![A-Za-z0-9-])",
        re.IGNORECASE,
    )


def rewrite_csp(value: str, rules: RewriteRules) -> str:
    """Every mention of the target host (with any port) becomes the master host."""
    if rules.master_host is None:
        return value
    master = rules.master_host
    return _host_pattern(rules.target_host).sub(lambda _m: master, value)


def rewrite_origin(value: str, rules: RewriteRules) -> str:
    """``Origin: <master origin>`` becomes the target's origin (RFC 6454); others unchanged."""
    parts = _split(value.strip())
    if parts is None or not parts.netloc or not _is_master_url(parts, rules):
        return value
    return rules.target_origin


def rewrite_referer(value: str, rules: RewriteRules) -> str:
    """A Referer on the master becomes the same path on the target; others unchanged."""
    parts = _split(value.strip())
    if parts is None or not parts.netloc or not _is_master_url(parts, rules):
        return value
    return rules.target_origin + _path_part(parts)


def rewrite_allow_origin(value: str, rules: RewriteRules) -> str:
    """``Access-Control-Allow-Origin: <target origin>`` becomes the master's origin."""
    parts = _split(value.strip())
    origin = rules.master_origin
    if parts is None or origin is None or not parts.netloc or not _is_target_url(parts, rules):
        return value
    return origin


def _connection_tokens(headers: Iterable[tuple[bytes, bytes]]) -> set[bytes]:
    tokens: set[bytes] = set()
    for name, value in headers:
        if name == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return tokens


def _strip_hop_by_hop(headers: Sequence[tuple[bytes, bytes]], keep_upgrade: bool) -> Headers:
    named = _connection_tokens(headers)
    drop = _HOP_BY_HOP | (named - {b"close", b"keep-alive", b"upgrade"})
    out: Headers = []
    for name, value in headers:
        if (name == b"upgrade" and keep_upgrade) or name not in drop:
            out.append((name, value))
    if keep_upgrade:
        out.append((b"connection", b"upgrade"))
    return out


def _fix_framing(headers: Headers) -> Headers:
    # RFC 9112 §6.3: Transfer-Encoding overrides Content-Length, and a sender must not send
    # both, so the length goes when a transfer coding is present.
    if any(name == b"transfer-encoding" for name, _ in headers):
        return [(n, v) for n, v in headers if n != b"content-length"]
    return headers


def _map(value: bytes, func: Callable[[str, RewriteRules], str], rules: RewriteRules) -> bytes:
    return func(value.decode("latin-1"), rules).encode("latin-1")


def is_upgrade_request(headers: Sequence[tuple[bytes, bytes]]) -> bool:
    """True when the request asks to switch protocols (RFC 9110 §7.8), e.g. WebSocket."""
    return b"upgrade" in _connection_tokens(headers) and any(n == b"upgrade" for n, _ in headers)


def rewrite_request_headers(headers: Sequence[tuple[bytes, bytes]], rules: RewriteRules) -> Headers:
    """Headers of a client request as the target should see them.

    Host becomes the target's authority (port left out when it is the scheme's default);
    Origin and Referer that name the master name the target; hop-by-hop fields go, except
    Upgrade on an upgrade request.
    """
    upgrade = is_upgrade_request(headers)
    out: Headers = [(b"host", rules.target_authority.encode("latin-1"))]
    for name, value in _strip_hop_by_hop(headers, upgrade):
        if name == b"host":
            continue
        if name == b"origin":
            value = _map(value, rewrite_origin, rules)
        elif name == b"referer":
            value = _map(value, rewrite_referer, rules)
        out.append((name, value))
    return _fix_framing(out)


def rewrite_response_headers(
    headers: Sequence[tuple[bytes, bytes]], rules: RewriteRules, *, switching: bool = False
) -> Headers:
    """Headers of a target response as the client should see them.

    ``switching`` is true for a 101 response, which keeps its Upgrade field.
    """
    out: Headers = []
    for name, value in _strip_hop_by_hop(headers, switching):
        if name in (b"location", b"content-location"):
            value = _map(value, rewrite_location, rules)
        elif name == b"set-cookie":
            value = _map(value, rewrite_set_cookie, rules)
        elif name in (b"content-security-policy", b"content-security-policy-report-only"):
            value = _map(value, rewrite_csp, rules)
        elif name == b"access-control-allow-origin":
            value = _map(value, rewrite_allow_origin, rules)
        out.append((name, value))
    return _fix_framing(out)


# -- one-pass versions for http mode's fast path ------------------------------------------------
#
# The fast path handles only messages without an upgrade or a transfer coding, so most of the
# general functions' work has nothing to do there. These build the same bytes as
# ``rewrite_*_headers`` followed by the serialisation h11 does (Host first, then the other
# fields in order, lowercase names), in one loop; tests check that they agree.

_REQUEST_SKIP = _HOP_BY_HOP | {b"host"}
_RESPONSE_MAPS: dict[bytes, Callable[[str, RewriteRules], str]] = {
    b"location": rewrite_location,
    b"content-location": rewrite_location,
    b"set-cookie": rewrite_set_cookie,
    b"content-security-policy": rewrite_csp,
    b"content-security-policy-report-only": rewrite_csp,
    b"access-control-allow-origin": rewrite_allow_origin,
}
_KEPT_CONNECTION_TOKENS = frozenset({b"close", b"keep-alive", b"upgrade"})


def request_fields_bytes(
    fields: Sequence[tuple[bytes, bytes]], rules: RewriteRules, host_line: bytes
) -> bytes | None:
    """The field lines (and the blank line) of a request as the target should see them, or
    None when the fields need the general path (an upgrade, a transfer coding, Connection
    naming other fields). ``host_line`` is ``b"host: <target authority>\\r\\n"``."""
    out = [host_line]
    for name, value in fields:
        if name in _REQUEST_SKIP:
            if name == b"connection" and value.lower() not in (b"keep-alive", b"close"):
                return None
            continue
        if name == b"origin":
            value = _map(value, rewrite_origin, rules)
        elif name == b"referer":
            value = _map(value, rewrite_referer, rules)
        elif name == b"transfer-encoding":
            return None
        out.append(b"%s: %s\r\n" % (name, value))
    out.append(b"\r\n")
    return b"".join(out)


def response_fields_bytes(
    fields: Sequence[tuple[bytes, bytes]], rules: RewriteRules
) -> bytes | None:
    """The field lines (and the blank line) of a final response as the client should see
    them, or None when they need the general path (a transfer coding, a Host field)."""
    drop: frozenset[bytes] | set[bytes] = _HOP_BY_HOP
    for name, value in fields:
        if name == b"connection":
            named = {t.strip().lower() for t in value.split(b",") if t.strip()}
            drop = drop | (named - _KEPT_CONNECTION_TOKENS)
        elif name == b"host" or name == b"transfer-encoding":
            return None
    out = []
    for name, value in fields:
        if name in drop:
            continue
        func = _RESPONSE_MAPS.get(name)
        if func is not None:
            value = _map(value, func, rules)
        out.append(b"%s: %s\r\n" % (name, value))
    out.append(b"\r\n")
    return b"".join(out)
