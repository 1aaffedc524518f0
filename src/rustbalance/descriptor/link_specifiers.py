"""Link specifiers of an introduction point (rend-spec-v3 [ENCRYPTED-DATA], tor-spec
"EXTEND2" link specifiers; trunnel ``src/trunnel/link_handshake.trunnel`` /
``ed25519_cert.trunnel`` ``link_specifier`` and ``link_specifier_list``).

Wire format: ``NSPEC (1)`` then per specifier ``LSTYPE (1) | LSLEN (1) | LSPEC (LSLEN)``.

| LSTYPE | meaning | LSLEN |
|---|---|---|
| 0 | IPv4 address (4) + port (2) | 6 |
| 1 | IPv6 address (16) + port (2) | 18 |
| 2 | legacy RSA identity (SHA-1 of the key) | 20 |
| 3 | ed25519 identity | 32 |

Unknown types are kept verbatim and in order: tor >= 0.4.1 does the same
(``hs_descriptor.c`` ``decode_link_specifiers`` duplicates every trunnel ``link_specifier``,
unrecognized ones included) so that relays can extend to them.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from rustbalance.errors import DescriptorError

__all__ = [
    "LS_ED25519_ID",
    "LS_IPV4",
    "LS_IPV6",
    "LS_LEGACY_ID",
    "LinkSpecifier",
    "decode_link_specifiers",
    "encode_link_specifiers",
]

# tor-spec section 5.1.2 (EXTEND2 link specifier types).
LS_IPV4 = 0
LS_IPV6 = 1
LS_LEGACY_ID = 2
LS_ED25519_ID = 3
_KNOWN_LENGTHS = {LS_IPV4: 6, LS_IPV6: 18, LS_LEGACY_ID: 20, LS_ED25519_ID: 32}
_TYPE_NAMES = {
    LS_IPV4: "ipv4",
    LS_IPV6: "ipv6",
    LS_LEGACY_ID: "legacy_id",
    LS_ED25519_ID: "ed25519_id",
}


@dataclass(frozen=True, slots=True)
class LinkSpecifier:
    """One link specifier: its type and raw payload (``LSPEC``)."""

    type: int
    data: bytes

    def __post_init__(self) -> None:
        if not 0 <= self.type <= 255:
            raise DescriptorError(f"link specifier type {self.type} is not a byte")
        if len(self.data) > 255:
            raise DescriptorError("link specifier payload is longer than 255 bytes")
        expected = _KNOWN_LENGTHS.get(self.type)
        if expected is not None and len(self.data) != expected:
            raise DescriptorError(
                f"link specifier of type {self.type} must be {expected} bytes, got {len(self.data)}"
            )

    @classmethod
    def ipv4(cls, address: str, port: int) -> LinkSpecifier:
        return cls(LS_IPV4, ipaddress.IPv4Address(address).packed + port.to_bytes(2, "big"))

    @classmethod
    def ipv6(cls, address: str, port: int) -> LinkSpecifier:
        return cls(LS_IPV6, ipaddress.IPv6Address(address).packed + port.to_bytes(2, "big"))

    @classmethod
    def legacy_id(cls, fingerprint: bytes) -> LinkSpecifier:
        return cls(LS_LEGACY_ID, fingerprint)

    @classmethod
    def ed25519_id(cls, key: bytes) -> LinkSpecifier:
        return cls(LS_ED25519_ID, key)

    def describe(self) -> dict[str, str | int]:
        """A JSON-friendly description (address and port, or hex of the identity)."""
        if self.type == LS_IPV4:
            addr = ipaddress.IPv4Address(self.data[:4])
            return {"type": "ipv4", "address": str(addr), "port": _port(self.data[4:])}
        if self.type == LS_IPV6:
            addr6 = ipaddress.IPv6Address(self.data[:16])
            return {"type": "ipv6", "address": str(addr6), "port": _port(self.data[16:])}
        if self.type in _TYPE_NAMES:
            return {"type": _TYPE_NAMES[self.type], "value": self.data.hex()}
        return {"type": self.type, "value": self.data.hex()}


def _port(data: bytes) -> int:
    return int.from_bytes(data, "big")


def encode_link_specifiers(specs: Sequence[LinkSpecifier]) -> bytes:
    """Encode a ``link_specifier_list``; tor asserts 1..255 specifiers."""
    if not 1 <= len(specs) <= 255:
        raise DescriptorError(f"an intro point needs 1-255 link specifiers, got {len(specs)}")
    out = bytearray([len(specs)])
    for spec in specs:
        out += bytes([spec.type, len(spec.data)]) + spec.data
    return bytes(out)


def decode_link_specifiers(data: bytes) -> tuple[LinkSpecifier, ...]:
    """Decode a ``link_specifier_list``; trailing bytes are an error, as in tor
    (``link_specifier_list_parse(...) < decoded_len`` fails)."""
    if not data:
        raise DescriptorError("link specifier list is empty")
    count = data[0]
    pos = 1
    specs: list[LinkSpecifier] = []
    for _ in range(count):
        if pos + 2 > len(data):
            raise DescriptorError("link specifier list is truncated")
        ls_type, ls_len = data[pos], data[pos + 1]
        pos += 2
        if pos + ls_len > len(data):
            raise DescriptorError("link specifier payload is truncated")
        specs.append(LinkSpecifier(ls_type, data[pos : pos + ls_len]))
        pos += ls_len
    if pos != len(data):
        raise DescriptorError("link specifier list has trailing bytes")
    return tuple(specs)
