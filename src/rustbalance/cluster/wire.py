"""Bounds-checked binary encoding shared by the coordination codecs (pure).

All integers are big-endian; a string is ``len(u8) ‖ UTF-8``. Every short read, bad flag or
trailing byte raises :class:`CoordinationError` (reason ``MALFORMED`` unless stated), so a
parser built on :class:`Reader` can only fail in that one way.
"""

from __future__ import annotations

import struct
from enum import StrEnum

from rustbalance.errors import ConfigError, RustBalanceError
from rustbalance.rules import is_node_id, parse_endpoint

__all__ = [
    "MAX_ADDRESS_CHARS",
    "MAX_U8",
    "MAX_U16",
    "MAX_U32",
    "MAX_U64",
    "CoordinationError",
    "Reader",
    "RejectReason",
    "Writer",
    "check_node_id",
    "check_peer_address",
    "check_uint",
]

MAX_U8 = 0xFF
MAX_U16 = 0xFFFF
MAX_U32 = 0xFFFFFFFF
MAX_U64 = 0xFFFFFFFFFFFFFFFF
MAX_ADDRESS_CHARS = 255


class RejectReason(StrEnum):
    """Why a datagram or statement was dropped; the values are metric label values."""

    FORGED = "forged"
    REPLAYED = "replayed"
    STALE = "stale"
    FUTURE = "future"
    OVERSIZED = "oversized"
    MALFORMED = "malformed"
    UNKNOWN_VERSION = "unknown_version"
    UNKNOWN_TYPE = "unknown_type"
    LOOPBACK = "loopback"
    # Protocol v3: the sender is not an admitted member (never admitted, revoked, or not yet
    # known here), or the datagram was sealed for another node.
    UNKNOWN_SENDER = "unknown_sender"
    MISDIRECTED = "misdirected"


class CoordinationError(RustBalanceError):
    """A coordination message is malformed, forged, replayed or cannot be built within limits."""

    def __init__(self, message: str, reason: RejectReason | None = None) -> None:
        super().__init__(message)
        self.reason = reason if reason is not None else RejectReason.MALFORMED


def check_node_id(node_id: str) -> str:
    """Return ``node_id`` if it follows the node-id rule of :mod:`rustbalance.rules`."""
    if not is_node_id(node_id):
        raise CoordinationError(f"invalid node id {node_id!r}")
    return node_id


def check_peer_address(address: str) -> str:
    """Validate ``host:port`` / ``[v6]:port`` and return its canonical form."""
    if not isinstance(address, str) or not 0 < len(address) <= MAX_ADDRESS_CHARS:
        raise CoordinationError("invalid peer address")
    try:
        return str(parse_endpoint(address))
    except ConfigError as exc:
        raise CoordinationError(f"invalid peer address: {exc}") from None


def check_uint(value: int, limit: int, name: str) -> None:
    # bool is an int subclass; a True priority is a programming error, not a value.
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit:
        raise CoordinationError(f"{name} out of range")


class Writer:
    """Appends fields to a bytearray (the inverse of :class:`Reader`)."""

    def __init__(self) -> None:
        self.out = bytearray()

    def u8(self, value: int) -> Writer:
        self.out.append(value)
        return self

    def pack(self, fmt: str, *values: int) -> Writer:
        self.out += struct.pack(fmt, *values)
        return self

    def raw(self, data: bytes) -> Writer:
        self.out += data
        return self

    def text(self, text: str) -> Writer:
        raw = text.encode("utf-8")
        if len(raw) > MAX_U8:
            raise CoordinationError("string longer than 255 bytes")
        self.out.append(len(raw))
        self.out += raw
        return self

    def flag(self, value: bool) -> Writer:
        self.out.append(1 if value else 0)
        return self

    def bytes(self) -> bytes:
        return bytes(self.out)


class Reader:
    """Bounds-checked cursor: every short read is a MALFORMED CoordinationError."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    @property
    def position(self) -> int:
        return self._pos

    def take(self, n: int) -> bytes:
        if n < 0 or self._pos + n > len(self._data):
            raise CoordinationError("truncated message")
        chunk = self._data[self._pos : self._pos + n]
        self._pos += n
        return chunk

    def u8(self) -> int:
        return self.take(1)[0]

    def unpack(self, fmt: str) -> tuple[int, ...]:
        s = struct.Struct(fmt)
        return s.unpack(self.take(s.size))

    def text(self) -> str:
        raw = self.take(self.u8())
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise CoordinationError("string is not UTF-8") from None

    def flag(self) -> bool:
        value = self.u8()
        if value > 1:
            raise CoordinationError("boolean flag must be 0 or 1")
        return value == 1

    def rest(self) -> bytes:
        return self.take(len(self._data) - self._pos)

    def end(self) -> None:
        if self._pos != len(self._data):
            raise CoordinationError("trailing bytes after message")
