"""Introduction points: the model, their text block, and re-certification.

An intro point block in the inner (second) layer (rend-spec-v3 [HS-DESC-SECOND-LAYER]; tor
``src/feature/hs/hs_descriptor.c`` ``encode_intro_point`` / ``decode_introduction_point``)::

    introduction-point <base64 link specifiers>
    onion-key ntor <base64 curve25519 key>
    auth-key
    -----BEGIN ED25519 CERT-----            type 09, certified = intro auth key,
    ...                                      signed by the descriptor-signing key
    -----END ED25519 CERT-----
    enc-key ntor <base64 curve25519 key>
    enc-key-cert
    -----BEGIN ED25519 CERT-----            type 0B, certified = ed25519 form of enc-key,
    ...                                      signed by the descriptor-signing key
    -----END ED25519 CERT-----
    [legacy-key + legacy-key-cert CROSSCERT] obsolete (never written here)

A balancer merges intro points from other descriptors, so their 09 and 0B certs must be
re-signed with the new descriptor-signing key, keeping each cert's certified key and expiry
(tor.md section 6.2; Onionbalance ``_recertify_intro_point``).
"""

from __future__ import annotations

import base64
import hashlib
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.serialization import load_der_public_key

from rustbalance.crypto.certs import (
    CERT_TYPE_HS_IP_CC_SIGNING,
    CERT_TYPE_HS_IP_V_SIGNING,
    CERT_VERSION,
    EXT_FLAG_AFFECTS_VALIDATION,
    EXT_SIGNED_WITH_KEY,
    KEY_TYPE_ED25519,
    CertExtension,
    Ed25519Cert,
    parse_cert,
)
from rustbalance.descriptor.document import (
    Item,
    b64decode,
    encode_object,
    optional_once,
    require_no_object,
    require_object,
    require_once,
)
from rustbalance.descriptor.link_specifiers import (
    LS_ED25519_ID,
    LS_LEGACY_ID,
    LinkSpecifier,
    decode_link_specifiers,
    encode_link_specifiers,
)
from rustbalance.errors import CertificateError, DescriptorError

__all__ = ["IntroPoint", "encode_intro_point", "parse_intro_point", "recertify"]

Signer = Callable[[bytes], bytes]

_KEY_LEN = 32
# cert-spec 2.1: VERSION, CERT_TYPE, EXPIRATION_DATE, CERT_KEY_TYPE, CERTIFIED_KEY, N_EXTENSIONS;
# extension header ExtLength, ExtType, ExtFlags.
_CERT_HEAD = struct.Struct(">BBIB32sB")
_EXT_HEAD = struct.Struct(">HBB")
# cert-spec 2.3 / tor torcert.c rsa_ed25519_crosscert_check: the RSA->ed25519 cross cert.
_CROSSCERT_PREFIX = b"Tor TLS RSA/Ed25519 cross-certificate"
# hs_descriptor.h HS_DESC_CERT_LIFETIME (54 h); tor accepts legacy crosscerts that expired
# less than this long ago (decode_intro_legacy_key: approx_time() - HS_DESC_CERT_LIFETIME).
_CERT_LIFETIME = 54 * 3600


@dataclass(frozen=True, slots=True)
class IntroPoint:
    """One introduction point (keys are raw 32-byte strings)."""

    link_specifiers: tuple[LinkSpecifier, ...]
    onion_key: bytes
    auth_key_cert: Ed25519Cert
    enc_key: bytes
    enc_key_cert: Ed25519Cert

    def __post_init__(self) -> None:
        if not self.link_specifiers:
            raise DescriptorError("intro point needs at least one link specifier")
        if len(self.onion_key) != _KEY_LEN or len(self.enc_key) != _KEY_LEN:
            raise DescriptorError("intro point onion-key and enc-key must be 32 bytes")
        if self.auth_key_cert.cert_type != CERT_TYPE_HS_IP_V_SIGNING:
            raise DescriptorError("intro point auth-key cert must have type 09")
        if self.enc_key_cert.cert_type != CERT_TYPE_HS_IP_CC_SIGNING:
            raise DescriptorError("intro point enc-key-cert must have type 0B")

    @property
    def auth_key(self) -> bytes:
        """The intro point's ed25519 auth key (the 09 cert's certified key)."""
        return self.auth_key_cert.certified_key

    @property
    def relay_ed25519_id(self) -> bytes | None:
        for spec in self.link_specifiers:
            if spec.type == LS_ED25519_ID:
                return spec.data
        return None

    @property
    def relay_ids(self) -> frozenset[bytes]:
        """The intro relay's identities (RSA fingerprint, which tor clients match intro
        circuits by, and ed25519 id), each tagged with its link specifier type."""
        return frozenset(
            bytes([spec.type]) + spec.data
            for spec in self.link_specifiers
            if spec.type in (LS_LEGACY_ID, LS_ED25519_ID)
        )

    @property
    def expires_at(self) -> int:
        """The earlier expiry of the two certs (Unix seconds)."""
        return min(self.auth_key_cert.expires_at, self.enc_key_cert.expires_at)


def _signed_cert(
    cert_type: int, certified_key: bytes, expiration_hours: int, signer_public: bytes, sign: Signer
) -> Ed25519Cert:
    # cert-spec 2.1 layout with one extension 04 (flags AFFECTS_VALIDATION, as tor writes it).
    # Assembled here rather than with certs.create_cert, which re-verifies every signature:
    # we sign with our own fresh key, and skipping 40 verifications makes a 20-point
    # descriptor several times faster.
    body = (
        _CERT_HEAD.pack(
            CERT_VERSION, cert_type, expiration_hours, KEY_TYPE_ED25519, certified_key, 1
        )
        + _EXT_HEAD.pack(_KEY_LEN, EXT_SIGNED_WITH_KEY, EXT_FLAG_AFFECTS_VALIDATION)
        + signer_public
    )
    signature = sign(body)
    return Ed25519Cert(
        version=CERT_VERSION,
        cert_type=cert_type,
        expiration_hours=expiration_hours,
        key_type=KEY_TYPE_ED25519,
        certified_key=certified_key,
        extensions=(
            CertExtension(EXT_SIGNED_WITH_KEY, EXT_FLAG_AFFECTS_VALIDATION, signer_public),
        ),
        signature=signature,
        encoded=body + signature,
    )


def recertify(point: IntroPoint, signing_public_key: bytes, sign: Signer) -> IntroPoint:
    """Re-sign the 09 and 0B certs with a descriptor-signing key, keeping certified key and
    expiry of each. ``sign`` must sign with the key whose public half is given."""
    if len(signing_public_key) != _KEY_LEN:
        raise DescriptorError("descriptor-signing key must be 32 bytes")
    auth = _signed_cert(
        CERT_TYPE_HS_IP_V_SIGNING,
        point.auth_key_cert.certified_key,
        point.auth_key_cert.expiration_hours,
        signing_public_key,
        sign,
    )
    enc = _signed_cert(
        CERT_TYPE_HS_IP_CC_SIGNING,
        point.enc_key_cert.certified_key,
        point.enc_key_cert.expiration_hours,
        signing_public_key,
        sign,
    )
    return IntroPoint(point.link_specifiers, point.onion_key, auth, point.enc_key, enc)


def encode_intro_point(point: IntroPoint) -> str:
    """The text block, each line ending in NL (tor joins the lines with a final newline).

    Curve25519 keys are base64 with padding (tor ``curve25519_public_to_base64(..., true)``).
    """
    specs = base64.b64encode(encode_link_specifiers(point.link_specifiers)).decode("ascii")
    onion = base64.b64encode(point.onion_key).decode("ascii")
    enc = base64.b64encode(point.enc_key).decode("ascii")
    return (
        f"introduction-point {specs}\n"
        f"onion-key ntor {onion}\n"
        f"auth-key\n{encode_object('ED25519 CERT', point.auth_key_cert.encoded)}\n"
        f"enc-key ntor {enc}\n"
        f"enc-key-cert\n{encode_object('ED25519 CERT', point.enc_key_cert.encoded)}\n"
    )


def _cert(item: Item, cert_type: int, signing_key: bytes, now: int, what: str) -> Ed25519Cert:
    data = require_object(item, "ED25519 CERT", what)
    try:
        cert = parse_cert(data)
        if cert.cert_type != cert_type:
            raise DescriptorError(f"{what}: cert has type {cert.cert_type:#04x}")
        if cert.signing_key is None:
            # tor cert_is_valid: "All certificate must have its signing key included."
            raise DescriptorError(f"{what}: cert does not include its signing key")
        cert.verify(signing_key, now)
    except CertificateError as exc:
        raise DescriptorError(f"{what}: {exc}") from exc
    return cert


def _check_legacy(items: Sequence[Item], signing_key: bytes, now: int, what: str) -> None:
    """tor ``decode_intro_legacy_key``: a 1024-bit RSA key with exponent 65537 and a valid
    RSA->ed25519 cross-certificate of the descriptor-signing key."""
    key_item = optional_once(items, "legacy-key", what)
    if key_item is None:
        return
    key_der = require_object(key_item, "RSA PUBLIC KEY", what)
    cert_item = optional_once(items, "legacy-key-cert", what)
    if cert_item is None:
        raise DescriptorError(f"{what}: legacy-key without legacy-key-cert")
    cross = require_object(cert_item, "CROSSCERT", what)
    try:
        key = load_der_public_key(key_der)
    except (ValueError, TypeError) as exc:
        raise DescriptorError(f"{what}: legacy-key is not an RSA public key") from exc
    if not isinstance(key, rsa.RSAPublicKey) or key.key_size != 1024:
        raise DescriptorError(f"{what}: legacy-key must be a 1024-bit RSA key")
    if key.public_numbers().e != 65537:
        raise DescriptorError(f"{what}: legacy-key has a bad public exponent")
    # trunnel rsa_ed25519_crosscert: ed_key (32) | expiration hours (4) | sig_len (1) | sig.
    if len(cross) < 37 or len(cross) != 37 + cross[36]:
        raise DescriptorError(f"{what}: legacy-key-cert is malformed")
    if cross[:32] != signing_key:
        raise DescriptorError(f"{what}: legacy-key-cert certifies another key")
    if int.from_bytes(cross[32:36], "big") * 3600 < now - _CERT_LIFETIME:
        raise DescriptorError(f"{what}: legacy-key-cert expired")
    digest = hashlib.sha256(_CROSSCERT_PREFIX + cross[:36]).digest()
    try:
        recovered = key.recover_data_from_signature(cross[37:], padding.PKCS1v15(), None)
    except (InvalidSignature, ValueError) as exc:
        raise DescriptorError(f"{what}: legacy-key-cert signature is invalid") from exc
    if recovered != digest:
        raise DescriptorError(f"{what}: legacy-key-cert signature is invalid")


def parse_intro_point(items: Sequence[Item], signing_key: bytes, now: int) -> IntroPoint:
    """Parse one intro point block (its items, the first being ``introduction-point``).

    Follows tor's ``hs_desc_intro_point_v3_token_table`` and ``decode_introduction_point``:
    ``onion-key`` one or more times (the ntor one is used, other types ignored), ``auth-key``,
    ``enc-key`` and ``enc-key-cert`` exactly once, legacy key optional; both certs must verify
    under the descriptor-signing key. Unknown items are ignored.
    """
    when = now
    what = "introduction point"
    head = items[0]
    if head.keyword != "introduction-point" or len(head.args) != 1:
        raise DescriptorError(f"{what}: must start with 'introduction-point <specifiers>'")
    require_no_object(head, what)
    specs = decode_link_specifiers(b64decode(head.args[0], f"{what} link specifiers"))
    onion_key: bytes | None = None
    onion_items = [item for item in items if item.keyword == "onion-key"]
    if not onion_items:
        raise DescriptorError(f"{what}: no onion-key")
    for item in onion_items:
        if len(item.args) < 2:
            raise DescriptorError(f"{what}: onion-key needs a type and a key")
        if item.args[0] == "ntor":
            onion_key = b64decode(item.args[1], f"{what} ntor onion-key", _KEY_LEN)
    if onion_key is None:
        raise DescriptorError(f"{what}: no ntor onion-key")
    auth = _cert(
        require_once(items, "auth-key", what),
        CERT_TYPE_HS_IP_V_SIGNING,
        signing_key,
        when,
        f"{what} auth-key",
    )
    enc_item = require_once(items, "enc-key", what)
    if len(enc_item.args) < 2 or enc_item.args[0] != "ntor":
        raise DescriptorError(f"{what}: enc-key must be 'ntor <key>'")
    enc_key = b64decode(enc_item.args[1], f"{what} ntor enc-key", _KEY_LEN)
    enc_cert = _cert(
        require_once(items, "enc-key-cert", what),
        CERT_TYPE_HS_IP_CC_SIGNING,
        signing_key,
        when,
        f"{what} enc-key-cert",
    )
    _check_legacy(items, signing_key, when, what)
    for item in items[1:]:
        if item.keyword == "introduction-point":
            raise DescriptorError(f"{what}: nested introduction-point")
    return IntroPoint(specs, onion_key, auth, enc_key, enc_cert)
