"""A compact binary codec for one :class:`IntroPoint` (what nodes share over the cluster channel).

The descriptor's text block (:func:`~rustbalance.descriptor.intro_point.encode_intro_point`) can
only be parsed back together with the descriptor-signing key that signed its certificates, which
a receiving node does not have. Nodes therefore exchange this binary form (all integers
big-endian)::

    point = version(1) ‖ len(u16) ‖ link_specifier_list ‖ onion_key(32)
            ‖ len(u16) ‖ auth_key_cert ‖ enc_key(32) ‖ len(u16) ‖ enc_key_cert

Certificates are parsed strictly but their signatures are *not* verified here: they are signed by
the sending node's descriptor-signing key, the datagram that carried them is already
authenticated with the cluster key, and the publisher re-certifies every point with its own
signing key (:func:`~rustbalance.descriptor.intro_point.recertify`) before publishing.
:func:`decode_intro_point` raises only :class:`DescriptorError`.
"""

from __future__ import annotations

import struct

from rustbalance.crypto.certs import parse_cert
from rustbalance.descriptor.intro_point import IntroPoint
from rustbalance.descriptor.link_specifiers import decode_link_specifiers, encode_link_specifiers
from rustbalance.errors import CertificateError, DescriptorError

__all__ = ["CODEC_VERSION", "decode_intro_point", "encode_intro_point"]

CODEC_VERSION = 1
_KEY_LEN = 32
_U16 = struct.Struct(">H")


def _put(out: bytearray, data: bytes) -> None:
    if len(data) > 0xFFFF:
        raise DescriptorError("intro point field longer than 65535 bytes")
    out += _U16.pack(len(data))
    out += data


def encode_intro_point(point: IntroPoint) -> bytes:
    """Encode ``point`` in the cluster's binary form (see the module docstring)."""
    out = bytearray([CODEC_VERSION])
    _put(out, encode_link_specifiers(point.link_specifiers))
    out += point.onion_key
    _put(out, point.auth_key_cert.encoded)
    out += point.enc_key
    _put(out, point.enc_key_cert.encoded)
    return bytes(out)


class _Cursor:
    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def take(self, n: int) -> bytes:
        if self._pos + n > len(self._data):
            raise DescriptorError("encoded intro point is truncated")
        chunk = self._data[self._pos : self._pos + n]
        self._pos += n
        return chunk

    def field(self) -> bytes:
        (length,) = _U16.unpack(self.take(_U16.size))
        return self.take(length)

    def end(self) -> None:
        if self._pos != len(self._data):
            raise DescriptorError("encoded intro point has trailing bytes")


def decode_intro_point(data: bytes) -> IntroPoint:
    """Decode one intro point; raises :class:`DescriptorError` on any malformed input."""
    if not isinstance(data, bytes) or not data:
        raise DescriptorError("encoded intro point is empty")
    if data[0] != CODEC_VERSION:
        raise DescriptorError(f"unknown intro point encoding version {data[0]}")
    cursor = _Cursor(data[1:])
    specs = decode_link_specifiers(cursor.field())
    onion_key = cursor.take(_KEY_LEN)
    try:
        auth_cert = parse_cert(cursor.field())
        enc_key = cursor.take(_KEY_LEN)
        enc_cert = parse_cert(cursor.field())
    except CertificateError as exc:
        raise DescriptorError(f"encoded intro point: {exc}") from None
    cursor.end()
    # IntroPoint.__post_init__ checks key lengths and the two cert types.
    return IntroPoint(specs, onion_key, auth_cert, enc_key, enc_cert)
