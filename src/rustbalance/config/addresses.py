"""Pure parsing of restricted-discovery client keys (``master.authorized_clients``).

Raises :class:`ConfigError` with a message that describes the problem but not the key; the
config parser prefixes the key. Host names and endpoints follow the shared rules of
:mod:`rustbalance.rules`.
"""

from __future__ import annotations

import base64
import binascii
import re

from rustbalance.errors import ConfigError

__all__ = ["parse_client_auth_key"]

# tor's client-auth public key: 32 bytes = 52 base32 characters without padding.
_CLIENT_KEY_PREFIX = "descriptor:x25519:"
_CLIENT_KEY_CHARS = 52
_BASE32 = re.compile(r"[A-Za-z2-7]+")


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
