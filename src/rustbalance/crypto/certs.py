"""Tor ed25519 certificates, version 1 (cert-spec section 2.1).

Layout (all integers big-endian)::

    VERSION 0x01 (1) | CERT_TYPE (1) | EXPIRATION_DATE hours since epoch (4) |
    CERT_KEY_TYPE (1) | CERTIFIED_KEY (32) | N_EXTENSIONS (1) | EXTENSIONS | SIGNATURE (64)
    extension = ExtLength (2) | ExtType (1) | ExtFlags (1) | ExtData (ExtLength bytes)

The signature is a plain Ed25519 signature over every preceding byte. Parsing follows tor's
trunnel parser (``src/trunnel/ed25519_cert.trunnel``) plus ``tor_cert_parse``
(``src/feature/nodelist/torcert.c``): trailing bytes, a duplicated signed-with-key extension
and an unknown extension with the AFFECTS_VALIDATION flag are rejected.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from rustbalance.errors import CertificateError

__all__ = [
    "CERT_TYPE_HS_IP_CC_SIGNING",
    "CERT_TYPE_HS_IP_V_SIGNING",
    "CERT_TYPE_HS_V_SIGNING",
    "CERT_VERSION",
    "EXT_FLAG_AFFECTS_VALIDATION",
    "EXT_SIGNED_WITH_KEY",
    "KEY_TYPE_ED25519",
    "CertExtension",
    "Ed25519Cert",
    "create_cert",
    "expiration_hours_for",
    "parse_cert",
]

# cert-spec 2.1: the only certificate version.
CERT_VERSION = 1
# cert-spec appendix A.1 "List of certificate types" (tor torcert.h CERT_TYPE_*):
CERT_TYPE_HS_V_SIGNING = 0x08  # blinded key A' certifies the descriptor-signing key
CERT_TYPE_HS_IP_V_SIGNING = 0x09  # descriptor-signing key certifies an intro auth key
CERT_TYPE_HS_IP_CC_SIGNING = 0x0B  # descriptor-signing key certifies the ed25519 enc key
# cert-spec 2.1 CERT_KEY_TYPE: 0x01 = ed25519 key (tor SIGNED_KEY_TYPE_ED25519).
KEY_TYPE_ED25519 = 0x01
# cert-spec 2.2.1 "Signed-with-ed25519-key extension [type 04]".
EXT_SIGNED_WITH_KEY = 0x04
# cert-spec 2.1: ExtFlags bit 1 = AFFECTS_VALIDATION.
EXT_FLAG_AFFECTS_VALIDATION = 0x01

_HEADER = struct.Struct(">BBIB32sB")  # version, type, expiration, key type, key, n_ext
_EXT_HEADER = struct.Struct(">HBB")
_SIGNATURE_LENGTH = 64
_UINT32_MAX = 2**32 - 1
_SECONDS_PER_HOUR = 3600


@dataclass(frozen=True)
class CertExtension:
    """One certificate extension (cert-spec 2.1)."""

    ext_type: int
    flags: int
    data: bytes


@dataclass(frozen=True)
class Ed25519Cert:
    """A parsed or created Tor ed25519 certificate; ``encoded`` holds its exact bytes."""

    version: int
    cert_type: int
    expiration_hours: int
    key_type: int
    certified_key: bytes
    extensions: tuple[CertExtension, ...]
    signature: bytes
    encoded: bytes

    @property
    def signed_bytes(self) -> bytes:
        """The bytes covered by the signature (everything before it)."""
        return self.encoded[:-_SIGNATURE_LENGTH]

    @property
    def expires_at(self) -> int:
        """Expiry as a Unix time (tor ``tor_cert_parse``: ``exp_field * 3600``)."""
        return self.expiration_hours * _SECONDS_PER_HOUR

    @property
    def signing_key(self) -> bytes | None:
        """The signing key carried in extension 04, or None."""
        for ext in self.extensions:
            if ext.ext_type == EXT_SIGNED_WITH_KEY:
                return ext.data
        return None

    def is_expired(self, now: int) -> bool:
        """True once ``now`` (Unix seconds) reaches the expiry hour."""
        # Tor (tor_cert_checksig) treats now == expiry as still valid; we treat the expiry
        # instant as expired, one second stricter, so we never hand out a cert at its edge.
        return now >= self.expires_at

    def verify(self, signing_public_key: bytes | None, now: int) -> None:
        """Check expiry and signature; raise :class:`CertificateError` on any failure.

        ``signing_public_key`` None means: use the key in extension 04 (as tor's
        ``tor_cert_get_checkable_sig`` does); if both are present they must agree.
        """
        embedded = self.signing_key
        key = signing_public_key if signing_public_key is not None else embedded
        if key is None:
            raise CertificateError("certificate carries no signing key and none was given")
        if len(key) != 32:
            raise CertificateError("certificate signing key must be 32 bytes")
        if embedded is not None and embedded != key:
            raise CertificateError("certificate was signed by a different key than expected")
        for ext in self.extensions:
            if ext.ext_type != EXT_SIGNED_WITH_KEY and ext.flags & EXT_FLAG_AFFECTS_VALIDATION:
                raise CertificateError(
                    f"unknown certificate extension {ext.ext_type:#04x} affects validation"
                )
        if self.is_expired(now):
            raise CertificateError(
                f"certificate (type {self.cert_type:#04x}) expired at {self.expires_at}"
            )
        try:
            Ed25519PublicKey.from_public_bytes(key).verify(self.signature, self.signed_bytes)
        except (InvalidSignature, ValueError) as exc:
            raise CertificateError(
                f"certificate (type {self.cert_type:#04x}) has a bad signature"
            ) from exc


def parse_cert(data: bytes) -> Ed25519Cert:
    """Parse an encoded certificate strictly; raise :class:`CertificateError` when malformed."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise CertificateError("certificate must be bytes")
    raw = bytes(data)
    if len(raw) < _HEADER.size + _SIGNATURE_LENGTH:
        raise CertificateError(f"certificate truncated: {len(raw)} bytes")
    version, cert_type, expiration, key_type, certified_key, n_ext = _HEADER.unpack_from(raw)
    if version != CERT_VERSION:
        raise CertificateError(f"unsupported certificate version {version}")
    offset = _HEADER.size
    extensions: list[CertExtension] = []
    for index in range(n_ext):
        if offset + _EXT_HEADER.size > len(raw) - _SIGNATURE_LENGTH:
            raise CertificateError(f"certificate extension {index} header truncated")
        length, ext_type, flags = _EXT_HEADER.unpack_from(raw, offset)
        offset += _EXT_HEADER.size
        if offset + length > len(raw) - _SIGNATURE_LENGTH:
            raise CertificateError(f"certificate extension {index} data truncated")
        ext_data = raw[offset : offset + length]
        offset += length
        if ext_type == EXT_SIGNED_WITH_KEY:
            # cert-spec 2.2.1: the extension data is exactly one 32-byte key; tor_cert_parse
            # rejects a second one.
            if length != 32:
                raise CertificateError("signed-with-ed25519-key extension must hold 32 bytes")
            if any(e.ext_type == EXT_SIGNED_WITH_KEY for e in extensions):
                raise CertificateError("certificate has two signed-with-key extensions")
        elif flags & EXT_FLAG_AFFECTS_VALIDATION:
            # cert-spec 2.1: an unrecognised extension that affects validation makes the
            # certificate invalid.
            raise CertificateError(
                f"certificate has unknown extension {ext_type:#04x} that affects validation"
            )
        extensions.append(CertExtension(ext_type, flags, ext_data))
    if len(raw) - offset != _SIGNATURE_LENGTH:
        raise CertificateError(
            f"certificate has {len(raw) - offset - _SIGNATURE_LENGTH} trailing bytes"
        )
    return Ed25519Cert(
        version=version,
        cert_type=cert_type,
        expiration_hours=expiration,
        key_type=key_type,
        certified_key=certified_key,
        extensions=tuple(extensions),
        signature=raw[offset:],
        encoded=raw,
    )


def expiration_hours_for(now: int, lifetime_seconds: int) -> int:
    """The EXPIRATION_DATE field for a cert valid at least ``lifetime_seconds`` after ``now``.

    tor ``tor_cert_sign_impl`` (``src/feature/nodelist/torcert.c``):
    ``exp_field = CEIL_DIV(now + lifetime, 3600)``, i.e. rounded *up* to the next hour.
    """
    if now < 0 or lifetime_seconds < 0:
        raise CertificateError("certificate time and lifetime must not be negative")
    hours = -(-(now + lifetime_seconds) // _SECONDS_PER_HOUR)
    if hours > _UINT32_MAX:
        raise CertificateError("certificate expiry does not fit in 32 bits")
    return hours


def create_cert(
    cert_type: int,
    certified_key: bytes,
    expiration_hours: int,
    signing_key_public: bytes,
    sign: Callable[[bytes], bytes],
    include_signing_key: bool = True,
    extra_extensions: Sequence[CertExtension] = (),
) -> Ed25519Cert:
    """Encode and sign a certificate.

    ``sign`` signs the encoded body with the key whose public half is ``signing_key_public``
    (e.g. ``BlindedKey.sign`` for type 08, an ed25519 descriptor-signing key for 09/0B).
    With ``include_signing_key`` an extension 04 carries the signing key, with flags 0 as tor
    writes it (``tor_cert_sign_impl`` leaves the trunnel ``ext_flags`` at zero; observed in
    certificates made by tor 0.4.9.11). The result is checked against ``signing_key_public``.
    """
    if not 0 <= cert_type <= 0xFF:
        raise CertificateError(f"certificate type {cert_type} out of range")
    if len(certified_key) != 32 or len(signing_key_public) != 32:
        raise CertificateError("certified key and signing key must be 32 bytes each")
    if not 0 <= expiration_hours <= _UINT32_MAX:
        raise CertificateError("certificate expiration must fit in 32 bits")
    extensions: list[CertExtension] = []
    if include_signing_key:
        extensions.append(CertExtension(EXT_SIGNED_WITH_KEY, 0, signing_key_public))
    extensions.extend(extra_extensions)
    if len(extensions) > 0xFF:
        raise CertificateError("too many certificate extensions")
    body = bytearray(
        _HEADER.pack(
            CERT_VERSION,
            cert_type,
            expiration_hours,
            KEY_TYPE_ED25519,
            certified_key,
            len(extensions),
        )
    )
    for ext in extensions:
        if len(ext.data) > 0xFFFF or not 0 <= ext.ext_type <= 0xFF or not 0 <= ext.flags <= 0xFF:
            raise CertificateError("certificate extension out of range")
        body += _EXT_HEADER.pack(len(ext.data), ext.ext_type, ext.flags) + ext.data
    signature = sign(bytes(body))
    if len(signature) != _SIGNATURE_LENGTH:
        raise CertificateError("signer returned a signature that is not 64 bytes")
    cert = parse_cert(bytes(body) + signature)
    try:
        Ed25519PublicKey.from_public_bytes(signing_key_public).verify(signature, bytes(body))
    except (InvalidSignature, ValueError) as exc:
        raise CertificateError("signer's signature does not verify under the signing key") from exc
    return cert
