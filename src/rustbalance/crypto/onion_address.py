"""Version 3 onion addresses (rend-spec-v3 [ONIONADDRESS], section 6).

``onion_address = base32(PUBKEY | CHECKSUM | VERSION) + ".onion"`` with
``CHECKSUM = H(".onion checksum" | PUBKEY | VERSION)[:2]`` and ``VERSION = 0x03``,
where H is SHA3-256. The address body is always 56 base32 characters (35 bytes).
"""

from __future__ import annotations

import base64
import binascii
import hashlib

from nacl.bindings import crypto_core_ed25519_is_valid_point

from rustbalance.errors import InvalidKeyError

__all__ = [
    "ADDRESS_BODY_LENGTH",
    "ONION_SUFFIX",
    "VERSION",
    "check_public_key",
    "decode_onion_address",
    "encode_onion_address",
    "onion_checksum",
]

# rend-spec-v3 [ONIONADDRESS]: the only version defined is 3.
VERSION = 3
# rend-spec-v3 [ONIONADDRESS]: the checksum prefix, without a terminating NUL.
_CHECKSUM_PREFIX = b".onion checksum"
# 32-byte key + 2-byte checksum + 1-byte version = 35 bytes = 56 base32 characters.
ADDRESS_BODY_LENGTH = 56
ONION_SUFFIX = ".onion"
_PUBLIC_KEY_LENGTH = 32
# RFC 4648 base32 alphabet in lower case: a-z and 2-7 (tor writes addresses in lower case).
_BASE32_ALPHABET = frozenset("abcdefghijklmnopqrstuvwxyz234567")


def onion_checksum(public_key: bytes, version: int = VERSION) -> bytes:
    """Return the 2-byte address checksum ``H(".onion checksum" | PUBKEY | VERSION)[:2]``."""
    return hashlib.sha3_256(_CHECKSUM_PREFIX + public_key + bytes([version])).digest()[:2]


def check_public_key(public_key: bytes) -> None:
    """Raise :class:`InvalidKeyError` unless ``public_key`` is a usable Ed25519 identity key.

    rend-spec-v3 [ONIONADDRESS] requires rejecting keys with a torsion component; libsodium's
    ``crypto_core_ed25519_is_valid_point`` checks canonical encoding, that the point is on the
    curve, not of small order, and in the prime-order subgroup.
    """
    if not isinstance(public_key, bytes) or len(public_key) != _PUBLIC_KEY_LENGTH:
        raise InvalidKeyError("ed25519 public key must be exactly 32 bytes")
    if not crypto_core_ed25519_is_valid_point(public_key):
        raise InvalidKeyError(
            "ed25519 public key is not a valid point of the prime-order subgroup "
            "(non-canonical, small order or with a torsion component)"
        )


def encode_onion_address(public_key: bytes) -> str:
    """Return ``<56 lower-case base32 characters>.onion`` for a 32-byte identity key."""
    check_public_key(public_key)
    raw = public_key + onion_checksum(public_key) + bytes([VERSION])
    return base64.b32encode(raw).decode("ascii").lower() + ONION_SUFFIX


def decode_onion_address(address: str) -> bytes:
    """Parse a v3 onion address (with or without ``.onion``, any case); return the public key.

    Raises :class:`InvalidKeyError` naming the problem: wrong length, characters outside the
    base32 alphabet, unknown version, bad checksum or an invalid key.
    """
    if not isinstance(address, str):
        raise InvalidKeyError("onion address must be a string")
    body = address.lower()
    if body.endswith(ONION_SUFFIX):
        body = body[: -len(ONION_SUFFIX)]
    if len(body) != ADDRESS_BODY_LENGTH:
        raise InvalidKeyError(
            f"onion address must have {ADDRESS_BODY_LENGTH} base32 characters "
            f"before '.onion', got {len(body)}"
        )
    if not _BASE32_ALPHABET.issuperset(body):
        raise InvalidKeyError("onion address contains characters outside the base32 alphabet")
    try:
        raw = base64.b32decode(body.upper())
    except (binascii.Error, ValueError) as exc:  # unreachable after the alphabet check
        raise InvalidKeyError("onion address is not valid base32") from exc
    public_key, checksum, version = raw[:32], raw[32:34], raw[34]
    if version != VERSION:
        raise InvalidKeyError(f"onion address has version {version}, only version 3 is supported")
    if checksum != onion_checksum(public_key, version):
        raise InvalidKeyError("onion address checksum does not match (typo in the address?)")
    check_public_key(public_key)
    return public_key
