"""Tor ed25519 certificates v1 (cert-spec section 2.1)."""

from __future__ import annotations

import base64
import contextlib
import struct

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st
from stem.descriptor.certificate import Ed25519Certificate

from rustbalance.crypto.blinding import blind_identity
from rustbalance.crypto.certs import (
    CERT_TYPE_HS_IP_CC_SIGNING,
    CERT_TYPE_HS_IP_V_SIGNING,
    CERT_TYPE_HS_V_SIGNING,
    EXT_SIGNED_WITH_KEY,
    CertExtension,
    Ed25519Cert,
    create_cert,
    expiration_hours_for,
    parse_cert,
)
from rustbalance.crypto.keys import IdentityKey
from rustbalance.errors import CertificateError
from tests.budget import budget

# A type-04 signing-key certificate written by Debian's tor 0.4.9.11 (`tor --list-fingerprint`
# on a fresh DataDirectory; keys/ed25519_signing_cert without its 32-byte file header). It
# carries extension 04 (flags 00) holding the relay's master identity key.
TOR_CERT = bytes.fromhex(
    "010400079f0901a82661782e903b69fd15da71b953108f9a077f47a9b8823462c7527d2574b52c01"
    "00200400afd5d92dca6b8f3a5b2c1c6b5acf860d26a26df779d1bb59bc2ab57d33ce22a9c7aa9027"
    "2848c251f9c5def46a25ee9aac4ad69aa77191010ee5e8a30d7b35548d0adee1ca18d70143842dc5"
    "a88bbea1463f9fd777210fd47c9518d40a937b05"
)
TOR_CERT_SIGNER = bytes.fromhex("afd5d92dca6b8f3a5b2c1c6b5acf860d26a26df779d1bb59bc2ab57d33ce22a9")
TOR_CERT_NOW = 1795480353  # when tor made it; the cert was valid for about 30 days

SIGNING = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
SIGNING_PUBLIC = SIGNING.public_key().public_bytes_raw()
CERTIFIED = Ed25519PrivateKey.from_private_bytes(b"\x05" * 32).public_key().public_bytes_raw()
NOW = 1_770_000_000


def _make(cert_type: int = CERT_TYPE_HS_IP_V_SIGNING, hours: int = 500_000) -> Ed25519Cert:
    return create_cert(cert_type, CERTIFIED, hours, SIGNING_PUBLIC, SIGNING.sign)


def test_parse_and_verify_tor_generated_cert() -> None:
    cert = parse_cert(TOR_CERT)
    assert (cert.version, cert.cert_type, cert.key_type) == (1, 4, 1)
    assert cert.expiration_hours == 0x79F09
    assert cert.extensions == (CertExtension(EXT_SIGNED_WITH_KEY, 0, TOR_CERT_SIGNER),)
    assert cert.signing_key == TOR_CERT_SIGNER
    assert cert.encoded == TOR_CERT
    assert cert.signed_bytes == TOR_CERT[:-64] and cert.signature == TOR_CERT[-64:]
    cert.verify(None, TOR_CERT_NOW)
    cert.verify(TOR_CERT_SIGNER, TOR_CERT_NOW)


def test_tor_cert_with_flipped_bit_fails_signature() -> None:
    damaged = bytearray(TOR_CERT)
    damaged[10] ^= 0x01  # inside the certified key
    with pytest.raises(CertificateError, match="bad signature"):
        parse_cert(bytes(damaged)).verify(None, TOR_CERT_NOW)


def test_created_cert_layout_matches_cert_spec_and_tor() -> None:
    cert = _make()
    raw = cert.encoded
    assert raw[:2] == b"\x01\x09"
    assert struct.unpack(">I", raw[2:6])[0] == 500_000
    assert raw[6] == 1 and raw[7:39] == CERTIFIED and raw[39] == 1
    # extension 04: length 32, type 04, flags 00 (as tor writes it), then the key
    assert raw[40:44] == b"\x00\x20\x04\x00" and raw[44:76] == SIGNING_PUBLIC
    assert len(raw) == 76 + 64
    cert.verify(SIGNING_PUBLIC, NOW)
    cert.verify(None, NOW)


def test_created_cert_decodes_with_stem() -> None:
    for cert_type in (
        CERT_TYPE_HS_V_SIGNING,
        CERT_TYPE_HS_IP_V_SIGNING,
        CERT_TYPE_HS_IP_CC_SIGNING,
    ):
        cert = _make(cert_type)
        stem_cert = Ed25519Certificate.from_base64(base64.b64encode(cert.encoded).decode())
        assert int(stem_cert.type_int) == cert_type
        assert stem_cert.key == CERTIFIED
        assert stem_cert.signing_key() == SIGNING_PUBLIC
        assert stem_cert.signature == cert.signature


def test_type_08_signed_by_blinded_key() -> None:
    blinded = blind_identity(IdentityKey.from_seed(b"\x42" * 32), 20487, 1440)
    cert = create_cert(
        CERT_TYPE_HS_V_SIGNING,
        CERTIFIED,
        expiration_hours_for(NOW, 54 * 3600),
        blinded.public_key,
        blinded.sign,
    )
    assert cert.signing_key == blinded.public_key
    cert.verify(blinded.public_key, NOW)
    reparsed = parse_cert(cert.encoded)
    assert reparsed == cert


def test_without_signing_key_extension_needs_explicit_key() -> None:
    cert = create_cert(
        CERT_TYPE_HS_IP_V_SIGNING,
        CERTIFIED,
        500_000,
        SIGNING_PUBLIC,
        SIGNING.sign,
        include_signing_key=False,
    )
    assert cert.signing_key is None and cert.extensions == ()
    cert.verify(SIGNING_PUBLIC, NOW)
    with pytest.raises(CertificateError, match="no signing key"):
        cert.verify(None, NOW)


def test_verify_with_wrong_key_fails() -> None:
    other = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
    with pytest.raises(CertificateError, match="different key"):
        _make().verify(other, NOW)
    cert = create_cert(
        CERT_TYPE_HS_IP_V_SIGNING,
        CERTIFIED,
        500_000,
        SIGNING_PUBLIC,
        SIGNING.sign,
        include_signing_key=False,
    )
    with pytest.raises(CertificateError, match="bad signature"):
        cert.verify(other, NOW)


def test_expiry_boundary() -> None:
    cert = _make(hours=NOW // 3600 + 1)
    expiry = cert.expiration_hours * 3600
    assert cert.expires_at == expiry
    cert.verify(None, expiry - 1)
    with pytest.raises(CertificateError, match="expired"):
        cert.verify(None, expiry)
    assert cert.is_expired(expiry) and not cert.is_expired(expiry - 1)


def test_expiration_rounds_up_like_tor() -> None:
    # tor_cert_sign_impl: exp_field = CEIL_DIV(now + lifetime, 3600)
    assert expiration_hours_for(3600 * 10, 0) == 10
    assert expiration_hours_for(3600 * 10 + 1, 0) == 11
    assert expiration_hours_for(3600 * 10 - 1, 3600) == 11
    assert expiration_hours_for(NOW, 54 * 3600) * 3600 >= NOW + 54 * 3600
    with pytest.raises(CertificateError, match="32 bits"):
        expiration_hours_for(2**32 * 3600, 0)


def test_create_rejects_bad_signer_and_inputs() -> None:
    with pytest.raises(CertificateError, match="does not verify"):
        create_cert(CERT_TYPE_HS_IP_V_SIGNING, CERTIFIED, 1, SIGNING_PUBLIC, lambda m: bytes(64))
    with pytest.raises(CertificateError, match="64 bytes"):
        create_cert(CERT_TYPE_HS_IP_V_SIGNING, CERTIFIED, 1, SIGNING_PUBLIC, lambda m: b"x")
    with pytest.raises(CertificateError, match="32 bytes"):
        create_cert(CERT_TYPE_HS_IP_V_SIGNING, b"short", 1, SIGNING_PUBLIC, SIGNING.sign)
    with pytest.raises(CertificateError, match="32 bits"):
        create_cert(CERT_TYPE_HS_IP_V_SIGNING, CERTIFIED, 2**32, SIGNING_PUBLIC, SIGNING.sign)


def _with_extensions(extensions: bytes, n_ext: int) -> bytes:
    body = struct.pack(">BBIB32sB", 1, 9, 500_000, 1, CERTIFIED, n_ext) + extensions
    return body + SIGNING.sign(body)


def test_unknown_extension_without_validation_flag_is_kept() -> None:
    raw = _with_extensions(struct.pack(">HBB", 3, 0x77, 0) + b"abc", 1)
    cert = parse_cert(raw)
    assert cert.extensions == (CertExtension(0x77, 0, b"abc"),)
    cert.verify(SIGNING_PUBLIC, NOW)


def test_unknown_extension_affecting_validation_rejected() -> None:
    raw = _with_extensions(struct.pack(">HBB", 3, 0x77, 1) + b"abc", 1)
    with pytest.raises(CertificateError, match="affects validation"):
        parse_cert(raw)
    made = Ed25519Cert(1, 9, 500_000, 1, CERTIFIED, (CertExtension(0x77, 1, b""),), bytes(64), raw)
    with pytest.raises(CertificateError, match="affects validation"):
        made.verify(SIGNING_PUBLIC, NOW)


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (b"", "truncated"),
        (TOR_CERT[:-1], "extension 0 data truncated"),
        (TOR_CERT + b"\x00", "trailing"),
        (b"\x02" + TOR_CERT[1:], "version 2"),
        (TOR_CERT[:39] + b"\x02" + TOR_CERT[40:], "extension 1 header truncated"),
        (TOR_CERT[:39] + b"\x00" + TOR_CERT[40:], "trailing"),
        (
            _with_extensions(struct.pack(">HBB", 31, 4, 0) + bytes(31), 1),
            "must hold 32 bytes",
        ),
        (
            _with_extensions(2 * (struct.pack(">HBB", 32, 4, 0) + SIGNING_PUBLIC), 2),
            "two signed-with-key",
        ),
    ],
)
def test_malformed_certs_rejected(raw: bytes, problem: str) -> None:
    with pytest.raises(CertificateError, match=problem):
        parse_cert(raw)


@settings(max_examples=budget(500), deadline=None)
@given(st.binary(max_size=300))
def test_parse_arbitrary_bytes_only_raises_certificate_error(data: bytes) -> None:
    try:
        cert = parse_cert(data)
    except CertificateError:
        return
    assert cert.encoded == data
    with contextlib.suppress(CertificateError):
        cert.verify(None, NOW)


@settings(max_examples=budget(300), deadline=None)
@given(st.binary(min_size=1, max_size=len(TOR_CERT)), st.integers(0, len(TOR_CERT) - 1))
def test_mutated_tor_cert_never_crashes(patch: bytes, offset: int) -> None:
    data = TOR_CERT[:offset] + patch + TOR_CERT[offset + len(patch) :]
    try:
        parse_cert(data).verify(TOR_CERT_SIGNER, TOR_CERT_NOW)
    except CertificateError:
        return
    assert data == TOR_CERT  # only the genuine cert verifies


@settings(max_examples=budget(200), deadline=None)
@given(
    st.integers(0, 255),
    st.integers(1, 2**32 - 1),
    st.lists(
        st.tuples(st.integers(5, 255), st.binary(max_size=40)),
        max_size=4,
    ),
    st.booleans(),
)
def test_create_parse_round_trip(
    cert_type: int, hours: int, extra: list[tuple[int, bytes]], include: bool
) -> None:
    extensions = [CertExtension(t, 0, d) for t, d in extra]
    cert = create_cert(
        cert_type, CERTIFIED, hours, SIGNING_PUBLIC, SIGNING.sign, include, extensions
    )
    assert parse_cert(cert.encoded) == cert
    assert cert.cert_type == cert_type and cert.expiration_hours == hours
    assert list(cert.extensions[int(include) :]) == extensions
    cert.verify(SIGNING_PUBLIC, hours * 3600 - 1)
