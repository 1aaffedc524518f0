"""The value rules every layer shares: node ids, endpoints, interface names, tunnel networks,
values written into a torrc.

Each rule is written once, here, and used by every place that reads such a value: the config
parser and the CLI flags, coordination messages and admission records, join requests, join
answers and join tokens, the WireGuard peers, tor's control address and the proxy's target.
A rule written twice drifts (the node id was checked in five places, the tunnel network in
three), and an attacker picks the weaker copy.

Pure functions. A check that fails raises :class:`~rustbalance.errors.RuleError` whose
message describes the value but not where it came from (callers prefix their key, flag or
field). Accepted values come back canonical, and an accepted endpoint prints as printable
ASCII without spaces or quotes: a peer's address may be logged, and must not forge a log line.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from rustbalance.crypto.onion_address import ONION_SUFFIX, decode_onion_address
from rustbalance.errors import InvalidKeyError, RuleError

__all__ = [
    "INTERFACE_NAME_RULE",
    "NODE_ID_RULE",
    "TORRC_VALUE_RULE",
    "TUNNEL_PREFIXES",
    "Endpoint",
    "is_interface_name",
    "is_node_id",
    "node_id_from",
    "parse_endpoint",
    "parse_host",
    "parse_ip_address",
    "parse_tunnel_network",
    "torrc_value_problem",
]

# --- node ids -------------------------------------------------------------------------------

NODE_ID_RULE = "1-64 characters of A-Z a-z 0-9 . _ -"
_NODE_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_NOT_NODE_ID_CHAR = re.compile(r"[^A-Za-z0-9._-]")


def is_node_id(value: object) -> bool:
    """A node's name in the cluster: :data:`NODE_ID_RULE` (short, printable, no spaces, so it
    fits a datagram header's length byte and a log line)."""
    return isinstance(value, str) and _NODE_ID.fullmatch(value) is not None


def node_id_from(text: str) -> str:
    """``text`` (e.g. a host name) reduced to a node id; ``""`` if nothing of it is left."""
    return _NOT_NODE_ID_CHAR.sub("-", text)[:64].strip("-.")


# --- interface names (and IPv6 zone ids) ----------------------------------------------------

# Linux allows any byte but '/', ':' and white space in IFNAMSIZ - 1 = 15 bytes; these are the
# characters `ip`, `wg` and wireguard-go take without quoting.
INTERFACE_NAME_RULE = "1-15 characters of A-Z a-z 0-9 _ = + . -"
_INTERFACE_NAME = re.compile(r"[A-Za-z0-9_=+.-]{1,15}")


def is_interface_name(value: object) -> bool:
    """A network interface name (:data:`INTERFACE_NAME_RULE`); also the rule for IPv6 zone ids,
    which name an interface (or its index)."""
    return isinstance(value, str) and _INTERFACE_NAME.fullmatch(value) is not None


# --- hosts and endpoints --------------------------------------------------------------------

_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_PORT = re.compile(r"[0-9]{1,5}")
_MAX_HOSTNAME = 253


@dataclass(frozen=True, kw_only=True)
class Endpoint:
    """A TCP or UDP ``host:port``. ``host`` is an IPv4/IPv6 literal (no brackets), a DNS name
    or a v3 ``.onion`` address in lower case."""

    host: str
    port: int

    @property
    def is_onion(self) -> bool:
        return self.host.endswith(ONION_SUFFIX)

    def __str__(self) -> str:
        # An IPv6 literal needs brackets, otherwise its colons are ambiguous with the port's.
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


def parse_ip_address(
    text: str, *, allow_zone: bool = True
) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An IPv4 or IPv6 literal without brackets; an IPv6 zone id (``%eth0``), if allowed,
    must be an interface name.

    ``ipaddress`` itself takes any characters after ``%`` (issue 16 finding 7: a gossiped
    ``fe80::1%<newline>...`` forged a log line).
    """
    if not allow_zone and "%" in text:
        raise RuleError(f"{text!r}: an address with a zone id is not allowed here")
    _check_zone(text)
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise RuleError(f"{text!r} is not a valid IP address") from None


def parse_host(text: str, *, allow_onion: bool) -> str:
    """Check an IPv4/IPv6 literal (brackets optional), DNS name or v3 onion address.

    Returns the host in its canonical form: IPv6 without brackets, onion addresses and DNS
    names in lower case.
    """
    if text.startswith("[") and text.endswith("]"):
        return _ipv6(text[1:-1], f"{text!r} is not a valid IPv6 address")
    if ":" in text:
        return _ipv6(text, f"{text!r} is not a valid IP address or host name")
    lowered = text.lower()
    if lowered.endswith(ONION_SUFFIX):
        if not allow_onion:
            raise RuleError("onion addresses are not allowed here")
        try:
            decode_onion_address(lowered)
        except InvalidKeyError as exc:
            raise RuleError(f"{text!r}: {exc}") from None
        return lowered
    try:
        return str(ipaddress.IPv4Address(text))
    except ValueError:
        pass
    labels = lowered.removesuffix(".").split(".")
    if (
        not text
        or len(lowered) > _MAX_HOSTNAME
        or not all(_LABEL.fullmatch(label) for label in labels)
        # An all-numeric name such as "300.1.1.1" is a mistyped IPv4 address, not a host name.
        or labels[-1].isdigit()
    ):
        raise RuleError(f"{text!r} is not a valid IP address or host name")
    return lowered


def _ipv6(text: str, problem: str) -> str:
    _check_zone(text)
    try:
        return str(ipaddress.IPv6Address(text))
    except ValueError:
        raise RuleError(problem) from None


def _check_zone(text: str) -> None:
    _address, percent, zone = text.partition("%")
    if percent and not is_interface_name(zone):
        raise RuleError(f"{text!r}: an IPv6 zone id must be {INTERFACE_NAME_RULE}")


def parse_endpoint(
    text: str, *, allow_onion: bool = False, allow_port_zero: bool = False
) -> Endpoint:
    """Parse ``host:port``, ``[v6]:port`` or (if allowed) ``<56 chars>.onion:port``."""
    if text.startswith("["):
        close = text.find("]")
        if close < 0 or not text[close + 1 :].startswith(":"):
            raise RuleError(f"{text!r} must be '[IPv6]:PORT'")
        host_text, port_text = text[: close + 1], text[close + 2 :]
    else:
        host_text, sep, port_text = text.rpartition(":")
        if not sep or not host_text:
            raise RuleError(f"{text!r} must be 'HOST:PORT'")
        if ":" in host_text:
            raise RuleError(f"{text!r}: an IPv6 address needs brackets: '[IPv6]:PORT'")
    host = parse_host(host_text, allow_onion=allow_onion)
    if not _PORT.fullmatch(port_text):
        raise RuleError(f"{text!r}: port {port_text!r} is not a number")
    port = int(port_text)
    low = 0 if allow_port_zero else 1
    if not low <= port <= 65535:
        raise RuleError(f"{text!r}: port must be {low}-65535, got {port}")
    return Endpoint(host=host, port=port)


# --- the tunnel network ---------------------------------------------------------------------

# Where joiners' tunnel addresses come from: a /20 holds 4094 nodes (far more than a cluster;
# bigger networks would only make the join bookkeeping unbounded), a /30 is the smallest
# network with two hosts.
TUNNEL_PREFIXES = (20, 30)


def parse_tunnel_network(text: str) -> ipaddress.IPv4Network:
    """An IPv4 network ``ADDR/PREFIX`` with no host bits set and a prefix in
    :data:`TUNNEL_PREFIXES`."""
    try:
        network = ipaddress.IPv4Network(text, strict=True)
    except ValueError:
        raise RuleError(f"must be an IPv4 network such as '10.99.0.0/24', got {text!r}") from None
    low, high = TUNNEL_PREFIXES
    if not low <= network.prefixlen <= high:
        raise RuleError(f"must be a /{low} to /{high} network, got {text!r}")
    return network


# --- values written into a torrc ------------------------------------------------------------

# tor reads a config line up to its newline; an unquoted value ends at '#' (a comment), a value
# starting with '"' is a quoted string with escapes, and a '\\' before the newline continues the
# line (tor: src/lib/encoding/confline.c, parse_config_line_from_str_verbose). A value holding
# any of them could end early or smuggle in a second option (issue 17: a newline in
# tor.data_dir wrote "ControlPort 0.0.0.0:9051" into the torrc).
TORRC_VALUE_RULE = "one line without control characters, '#', '\"' or '\\'"
_TORRC_SPECIAL = ("#", '"', "\\")


def torrc_value_problem(value: str) -> str | None:
    """Why ``value`` cannot be written as a torrc value (:data:`TORRC_VALUE_RULE`), or None.
    Paths, addresses and numbers the daemon writes into a torrc all pass through here."""
    if not value:
        return "must not be empty"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        return "must not contain control characters (a torrc value is one line)"
    for special in _TORRC_SPECIAL:
        if special in value:
            return f"must not contain {special!r} (tor would read it as a comment, quote or escape)"
    if value != value.strip():
        return "must not start or end with white space"
    return None
