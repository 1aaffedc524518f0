"""Header rewriting between the master address and the target (pure, no I/O).

Requests go master -> target (Host, Origin, Referer); responses go target -> master
(Location, Set-Cookie Domain, Content-Security-Policy, Access-Control-Allow-Origin), so that
neither the client sees the target's address nor the target sees a foreign Host.

Fields are the wire layer's ``(lowercase name, value)`` byte pairs; the result is the field
lines to write (each ending in CRLF). Values are decoded as Latin-1, which is lossless for any
byte (RFC 9110 §5.5 treats non-ASCII as opaque octets). Framing fields are never copied: the
wire layer writes the one framing field from the parsed framing (``wire.framing_line``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit

Headers = list[tuple[bytes, bytes]]

# Hop-by-hop fields (RFC 9110 §7.6.1): meaningful for one connection only, so a proxy must
# not forward them; the framing fields (RFC 9112 §6) are written from the parsed framing.
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
        b"content-length",
        b"transfer-encoding",
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


def _map(value: bytes, func: Callable[[str, RewriteRules], str], rules: RewriteRules) -> bytes:
    return func(value.decode("latin-1"), rules).encode("latin-1")


def _dropped(connection: frozenset[bytes], keep: bytes) -> frozenset[bytes]:
    """Hop-by-hop fields plus those the Connection field names (``connection``: its tokens,
    lower case; RFC 9110 §7.6.1); ``keep`` (``upgrade`` on a protocol switch) survives."""
    named = connection - _KEPT_CONNECTION_TOKENS
    drop = _HOP_BY_HOP | named if named else _HOP_BY_HOP
    return drop - {keep} if keep else drop


_KEPT_CONNECTION_TOKENS = frozenset({b"close", b"keep-alive", b"upgrade"})
_REQUEST_MAPS: dict[bytes, Callable[[str, RewriteRules], str]] = {
    b"origin": rewrite_origin,
    b"referer": rewrite_referer,
}
_RESPONSE_MAPS: dict[bytes, Callable[[str, RewriteRules], str]] = {
    b"location": rewrite_location,
    b"content-location": rewrite_location,
    b"set-cookie": rewrite_set_cookie,
    b"content-security-policy": rewrite_csp,
    b"content-security-policy-report-only": rewrite_csp,
    b"access-control-allow-origin": rewrite_allow_origin,
}


def request_field_lines(
    fields: Sequence[tuple[bytes, bytes]],
    connection: frozenset[bytes],
    rules: RewriteRules,
    host_line: bytes,
    *,
    upgrade: bool = False,
    extra: tuple[bytes, bytes] | None = None,
) -> bytes:
    """The field lines of a client request as the target should see them (``connection``:
    the tokens of its Connection field, as the wire layer read them).

    ``host_line`` (``b"host: <target authority>\\r\\n"``) comes first; Origin and Referer
    that name the master name the target; hop-by-hop fields go, except Upgrade on an upgrade
    request (then ``connection: upgrade`` is added). ``extra`` is a field the proxy adds
    (the circuit id): any field of that name the client sent goes, so it cannot be forged.
    """
    # (No Connection field and no upgrade: the fixed set, without a call.)
    drop = _dropped(connection, b"upgrade" if upgrade else b"") if connection else _HOP_BY_HOP
    if extra is not None:
        drop = drop | {extra[0]}
    out = [host_line]
    for name, value in fields:
        if name in drop or name == b"host":
            continue
        func = _REQUEST_MAPS.get(name)
        if func is not None:
            value = _map(value, func, rules)
        out.append(b"%s: %s\r\n" % (name, value))
    if upgrade:
        out.append(b"connection: upgrade\r\n")
    if extra is not None:
        out.append(b"%s: %s\r\n" % extra)
    return b"".join(out)


def response_field_lines(
    fields: Sequence[tuple[bytes, bytes]],
    connection: frozenset[bytes],
    rules: RewriteRules,
    *,
    switching: bool = False,
) -> bytes:
    """The field lines of a target response as the client should see them: Location,
    Content-Location, Set-Cookie's Domain, Content-Security-Policy and
    Access-Control-Allow-Origin that name the target name the master; hop-by-hop fields
    go. ``switching`` (a 101) keeps Upgrade and adds ``connection: upgrade``."""
    if connection or switching:
        drop = _dropped(connection, b"upgrade" if switching else b"")
    else:
        drop = _HOP_BY_HOP
    out = []
    for name, value in fields:
        if name in drop:
            continue
        func = _RESPONSE_MAPS.get(name)
        if func is not None:
            value = _map(value, func, rules)
        out.append(b"%s: %s\r\n" % (name, value))
    if switching:
        out.append(b"connection: upgrade\r\n")
    return b"".join(out)
