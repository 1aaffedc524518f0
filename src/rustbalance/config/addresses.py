"""Pure parsing of host names, ``host:port`` endpoints and client-auth keys in the config.

Every function raises :class:`ConfigError` with a message that describes the problem but not
the key; the config parser prefixes the key. Other layers (CLI flags) may use them too.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re

from rustbalance.config.schema import Endpoint
from rustbalance.crypto.onion_address import ONION_SUFFIX, decode_onion_address
from rustbalance.errors import ConfigError, InvalidKeyError

__all__ = [
    "parse_client_auth_key",
    "parse_endpoint",
    "parse_host",
]

_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_PORT = re.compile(r"[0-9]{1,5}")
_MAX_HOSTNAME = 253
# tor's client-auth public key: 32 bytes = 52 base32 characters without padding.
_CLIENT_KEY_PREFIX = "descriptor:x25519:"
_CLIENT_KEY_CHARS = 52
_BASE32 = re.compile(r"[A-Za-z2-7]+")


def parse_host(text: str, *, allow_onion: bool) -> str:
    """Check an IPv4/IPv6 literal (brackets optional), DNS name or v3 onion address.

    Returns the host in its canonical form: IPv6 without brackets, onion addresses and DNS
    names in lower case.
    """
    if text.startswith("[") and text.endswith("]"):
        try:
            return str(ipaddress.IPv6Address(text[1:-1]))
        except ValueError:
            raise ConfigError(f"{text!r} is not a valid IPv6 address") from None
    if ":" in text:
        try:
            return str(ipaddress.IPv6Address(text))
        except ValueError:
            raise ConfigError(f"{text!r} is not a valid IP address or host name") from None
    lowered = text.lower()
    if lowered.endswith(ONION_SUFFIX):
        if not allow_onion:
            raise ConfigError("onion addresses are not allowed here")
        try:
            decode_onion_address(lowered)
        except InvalidKeyError as exc:
            raise ConfigError(f"{text!r}: {exc}") from None
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
        raise ConfigError(f"{text!r} is not a valid IP address or host name")
    return lowered


def parse_endpoint(
    text: str, *, allow_onion: bool = False, allow_port_zero: bool = False
) -> Endpoint:
    """Parse ``host:port``, ``[v6]:port`` or (if allowed) ``<56 chars>.onion:port``."""
    if text.startswith("["):
        close = text.find("]")
        if close < 0 or not text[close + 1 :].startswith(":"):
            raise ConfigError(f"{text!r} must be '[IPv6]:PORT'")
        host_text, port_text = text[: close + 1], text[close + 2 :]
    else:
        host_text, sep, port_text = text.rpartition(":")
        if not sep or not host_text:
            raise ConfigError(f"{text!r} must be 'HOST:PORT'")
        if ":" in host_text:
            raise ConfigError(f"{text!r}: an IPv6 address needs brackets: '[IPv6]:PORT'")
    host = parse_host(host_text, allow_onion=allow_onion)
    if not _PORT.fullmatch(port_text):
        raise ConfigError(f"{text!r}: port {port_text!r} is not a number")
    port = int(port_text)
    low = 0 if allow_port_zero else 1
    if not low <= port <= 65535:
        raise ConfigError(f"{text!r}: port must be {low}-65535, got {port}")
    return Endpoint(host, port)


def parse_client_auth_key(text: str) -> bytes:
    """Parse an x25519 client public key: ``descriptor:x25519:<base32>`` or bare base32.

    This is the form of tor's ``<client>.auth`` files (``ClientOnionAuthDir`` on the server
    side); any case is accepted. Returns the 32 raw bytes.
    """
    body = text
    if body.lower().startswith(_CLIENT_KEY_PREFIX):
        body = body[len(_CLIENT_KEY_PREFIX) :]
    elif ":" in body:
        raise ConfigError(f"must be '{_CLIENT_KEY_PREFIX}<base32 key>' or a bare base32 key")
    if len(body) != _CLIENT_KEY_CHARS:
        raise ConfigError(
            f"an x25519 public key is {_CLIENT_KEY_CHARS} base32 characters, got {len(body)}"
        )
    if not _BASE32.fullmatch(body):
        raise ConfigError("key contains characters outside the base32 alphabet (A-Z, 2-7)")
    try:
        raw = base64.b32decode(body.upper() + "====")
    except (binascii.Error, ValueError):  # unreachable after the checks above
        raise ConfigError("key is not valid base32") from None
    # 52 characters carry 260 bits for 256: the last 4 must be zero, or two spellings would
    # name the same key (and the operator has likely mistyped the last character).
    if base64.b32encode(raw).decode("ascii").rstrip("=") != body.upper():
        raise ConfigError("key is not canonical base32 (last character is wrong)")
    return raw
