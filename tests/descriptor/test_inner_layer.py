"""Inner-layer details tor handles specially: legacy-key intro points (verified RSA
cross-certificate, tor hs_descriptor.c decode_intro_legacy_key) and pow-params seeds with or
without base64 padding (tor writes padding, proposal 327 says none)."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable
from unittest import mock

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

import rustbalance.descriptor.builder as builder
from rustbalance.descriptor.builder import PowParams
from rustbalance.descriptor.document import encode_object
from rustbalance.descriptor.intro_point import IntroPoint, encode_intro_point
from rustbalance.descriptor.parser import DecodedDescriptor, decode_descriptor

from .helpers import NOW, PERIOD_LENGTH, TIME_PERIOD, make_descriptor, make_key

KEY = make_key(41)
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=1024)


def _decode(text: str) -> DecodedDescriptor:
    return decode_descriptor(
        text, KEY.onion_address, now=NOW, period_length=PERIOD_LENGTH, time_periods=[TIME_PERIOD]
    )


def _crosscert(ed_key: bytes, expiry_hours: int) -> bytes:
    # cert-spec 2.3 / tor torcert.c: ed_key | expiration hours | siglen | RSA signature of
    # SHA256("Tor TLS RSA/Ed25519 cross-certificate" | ed_key | expiration), PKCS#1 v1.5 type 1
    # padding of the bare digest (tor crypto_pk_private_sign: no DigestInfo).
    signed = ed_key + expiry_hours.to_bytes(4, "big")
    digest = hashlib.sha256(b"Tor TLS RSA/Ed25519 cross-certificate" + signed).digest()
    em = b"\x00\x01" + b"\xff" * (128 - 3 - len(digest)) + b"\x00" + digest
    numbers = RSA_KEY.private_numbers()
    sig = pow(int.from_bytes(em, "big"), numbers.d, numbers.public_numbers.n).to_bytes(128, "big")
    return signed + bytes([len(sig)]) + sig


def _with_legacy(corrupt: bool) -> Callable[[IntroPoint], str]:
    def encode(point: IntroPoint) -> str:
        signing_key = point.auth_key_cert.signing_key
        assert signing_key is not None
        cross = bytearray(_crosscert(signing_key, NOW // 3600 + 24))
        if corrupt:
            cross[-1] ^= 1
        pem = RSA_KEY.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.PKCS1
        )
        return (
            encode_intro_point(point)
            + f"legacy-key\n{encode_object('RSA PUBLIC KEY', pem)}\n"
            + f"legacy-key-cert\n{encode_object('CROSSCERT', bytes(cross))}\n"
        )

    return encode


@pytest.mark.parametrize("corrupt", [False, True])
def test_legacy_key_intro_points_are_kept_only_with_a_valid_crosscert(corrupt: bool) -> None:
    with mock.patch.object(builder, "encode_intro_point", _with_legacy(corrupt)):
        text, points = make_descriptor(KEY, 2)
    decoded = _decode(text)
    if corrupt:
        assert decoded.intro_points == ()
        assert len(decoded.dropped_intro_points) == 2
        assert "legacy-key-cert signature is invalid" in decoded.dropped_intro_points[0]
    else:
        assert [p.auth_key for p in decoded.intro_points] == [p.auth_key for p in points]


@pytest.mark.parametrize("strip_padding", [False, True])
def test_pow_seed_with_or_without_padding(strip_padding: bool) -> None:
    params = PowParams(seed=b"\xfe" * 32, suggested_effort=17, expiration=NOW + 3600)
    padded = base64.b64encode(params.seed).decode()
    assert padded.endswith("=")  # tor's form (44 characters)
    original = builder._inner_plaintext

    def inner(*args: object) -> str:
        text = original(*args)  # type: ignore[arg-type]
        return text.replace(padded, padded.rstrip("=")) if strip_padding else text

    with mock.patch.object(builder, "_inner_plaintext", inner):
        text, _ = make_descriptor(KEY, 1, pow_params=params)
    assert _decode(text).pow_params == params
