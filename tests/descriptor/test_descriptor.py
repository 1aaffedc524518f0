"""Build -> parse round trips, verification failures, limits and padding (rend-spec-v3
section 2.4-2.5; tor src/feature/hs/hs_descriptor.c)."""

from __future__ import annotations

import base64
import re

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from rustbalance.crypto.blinding import subcredential
from rustbalance.crypto.certs import parse_cert
from rustbalance.descriptor.builder import MAX_DESCRIPTOR_SIZE, PowParams, build_descriptor
from rustbalance.descriptor.client_auth import x25519_public
from rustbalance.descriptor.layers import SUPERENCRYPTED_CONSTANT, decrypt_layer
from rustbalance.descriptor.link_specifiers import LinkSpecifier
from rustbalance.descriptor.parser import DecodedDescriptor, decode_descriptor
from rustbalance.errors import DescriptorError

from .helpers import (
    NOW,
    PERIOD_LENGTH,
    TIME_PERIOD,
    blinded_for,
    make_descriptor,
    make_intro_point,
    make_key,
    rng,
)

KEY = make_key()
PERIODS = (TIME_PERIOD - 1, TIME_PERIOD, TIME_PERIOD + 1)


def decode(text: str, **kwargs: object) -> DecodedDescriptor:
    return decode_descriptor(
        text,
        KEY.onion_address,
        now=NOW,
        period_length=PERIOD_LENGTH,
        time_periods=PERIODS,
        **kwargs,  # type: ignore[arg-type]
    )


def _objects(text: str, keyword: str) -> bytes:
    match = re.search(
        keyword + r"\n-----BEGIN [A-Z0-9 ]+-----\n(.*?)\n-----END", text, flags=re.DOTALL
    )
    assert match is not None
    return base64.b64decode(match.group(1).replace("\n", ""))


def test_round_trip_keeps_everything() -> None:
    pow_params = PowParams(seed=b"\x07" * 32, suggested_effort=250, expiration=NOW + 7200)
    text, points = make_descriptor(
        KEY,
        5,
        revision=123456789,
        flow_control="1-2 31",
        pow_params=pow_params,
        single_onion=True,
        intro_auth_required=True,
        lifetime_minutes=240,
    )
    decoded = decode_descriptor(
        text, KEY.onion_address, now=NOW, period_length=PERIOD_LENGTH, time_periods=PERIODS
    )
    assert decoded.lifetime == 240
    assert decoded.revision_counter == 123456789
    assert decoded.time_period == TIME_PERIOD
    assert decoded.blinded_key == blinded_for(KEY).public_key
    assert decoded.flow_control == "1-2 31"
    assert decoded.pow_params == pow_params
    assert decoded.single_onion and decoded.intro_auth_required == ("ed25519",)
    assert not decoded.client_auth and decoded.dropped_intro_points == ()
    # tor HS_DESC_CERT_LIFETIME: 54 h, rounded up to the hour.
    assert NOW + 54 * 3600 <= decoded.signing_cert_expiry < NOW + 55 * 3600
    assert len(decoded.intro_points) == 5
    for original, got in zip(points, decoded.intro_points, strict=True):
        assert got.link_specifiers == original.link_specifiers
        assert got.onion_key == original.onion_key and got.enc_key == original.enc_key
        # Re-certified: same certified keys and expiry, new signer = descriptor-signing key.
        assert got.auth_key == original.auth_key
        assert got.enc_key_cert.certified_key == original.enc_key_cert.certified_key
        assert got.auth_key_cert.expiration_hours == original.auth_key_cert.expiration_hours
        assert got.auth_key_cert.signing_key == decoded.signing_key
        assert got.enc_key_cert.signing_key == decoded.signing_key


def test_outer_format_and_signature_verify_with_cryptography() -> None:
    text, _ = make_descriptor(KEY, 2)
    lines = text.split("\n")
    assert lines[:3] == [
        "hs-descriptor 3",
        "descriptor-lifetime 180",
        "descriptor-signing-key-cert",
    ]
    assert text.endswith("\n") and lines[-2].startswith("signature ")
    assert all(len(line) <= 64 for line in lines if not line.startswith(("signature", "-----")))
    sig_b64 = lines[-2].split(" ")[1]
    assert len(sig_b64) == 86 and "=" not in sig_b64
    signed = text[: text.index("\nsignature ") + 1].encode()
    cert = parse_cert(_objects(text, "descriptor-signing-key-cert"))
    assert cert.cert_type == 8
    Ed25519PublicKey.from_public_bytes(cert.certified_key).verify(
        base64.b64decode(sig_b64 + "=="), b"Tor onion service descriptor sig v3" + signed
    )
    # The 08 cert is signed by the blinded key (extension 04 = A').
    Ed25519PublicKey.from_public_bytes(blinded_for(KEY).public_key).verify(
        cert.signature, cert.signed_bytes
    )
    assert cert.signing_key == blinded_for(KEY).public_key


@pytest.mark.parametrize("n_points", [1, 7, 20])
def test_middle_layer_is_padded_to_10000_and_inner_is_not(n_points: int) -> None:
    text, _ = make_descriptor(KEY, n_points)
    blob = _objects(text, "superencrypted")
    assert (len(blob) - 16 - 32) % 10_000 == 0
    blinded = blinded_for(KEY).public_key
    middle = decrypt_layer(
        blob,
        secret_data=blinded,
        subcredential=subcredential(KEY.public_key, blinded),
        revision_counter=42,
        constant=SUPERENCRYPTED_CONSTANT,
        what="middle",
    )
    assert middle.startswith(b"desc-auth-type x25519\ndesc-auth-ephemeral-key ")
    assert middle.count(b"\nauth-client ") == 16
    assert middle.endswith(b"-----END MESSAGE-----")
    inner_blob = _objects(middle.decode(), "encrypted")
    # The inner layer is not padded: its ciphertext is exactly the plaintext length.
    inner_len = len(inner_blob) - 48
    assert inner_len < 10_000 * n_points and inner_len % 10_000 != 0
    assert len(text) < MAX_DESCRIPTOR_SIZE


def test_limits() -> None:
    randbytes = rng(11)
    points = [make_intro_point(randbytes, index=i) for i in range(21)]
    common = {
        "identity_public_key": KEY.public_key,
        "blinded": blinded_for(KEY),
        "revision_counter": 1,
        "now": NOW,
        "randbytes": randbytes,
    }
    with pytest.raises(DescriptorError, match="1-20 intro points"):
        build_descriptor(intro_points=points, **common)  # type: ignore[arg-type]
    with pytest.raises(DescriptorError, match="1-20 intro points"):
        build_descriptor(intro_points=[], **common)  # type: ignore[arg-type]
    # 20 intro points with bulky unknown link specifiers exceed 50 000 bytes.
    bulky = [
        make_intro_point(randbytes, index=i, extra_specs=[LinkSpecifier(200, b"\0" * 255)] * 4)
        for i in range(20)
    ]
    with pytest.raises(DescriptorError, match="at most 49999"):
        build_descriptor(intro_points=bulky, **common)  # type: ignore[arg-type]
    with pytest.raises(DescriptorError, match="flow-control"):
        build_descriptor(intro_points=points[:1], flow_control="bogus", **common)  # type: ignore[arg-type]


def test_client_auth_round_trip() -> None:
    randbytes = rng(21)
    alice, bob, mallory = randbytes(32), randbytes(32), randbytes(32)
    text, points = make_descriptor(
        KEY, 2, client_auth_keys=[x25519_public(alice), x25519_public(bob)]
    )
    for secret in (alice, bob):
        decoded = decode(text, client_auth_key=secret)
        assert decoded.client_auth
        assert [p.auth_key for p in decoded.intro_points] == [p.auth_key for p in points]
    with pytest.raises(DescriptorError, match="requires client authorization"):
        decode(text)
    with pytest.raises(DescriptorError, match="not authorized"):
        decode(text, client_auth_key=mallory)
    # A key given for a public descriptor is harmless.
    public_text, _ = make_descriptor(KEY, 1)
    assert not decode(public_text, client_auth_key=alice).client_auth


def test_wrong_address_or_period_is_rejected() -> None:
    text, _ = make_descriptor(KEY, 1)
    with pytest.raises(DescriptorError, match="blinded key"):
        decode_descriptor(
            text,
            make_key(99).onion_address,
            now=NOW,
            period_length=PERIOD_LENGTH,
            time_periods=PERIODS,
        )
    with pytest.raises(DescriptorError, match="blinded key"):
        decode_descriptor(
            text,
            KEY.onion_address,
            now=NOW,
            period_length=PERIOD_LENGTH,
            time_periods=[TIME_PERIOD + 5],
        )


def test_expired_signing_cert_is_rejected() -> None:
    text, _ = make_descriptor(KEY, 1)
    with pytest.raises(DescriptorError, match="expired"):
        decode_descriptor(
            text,
            KEY.onion_address,
            now=NOW + 60 * 3600,
            period_length=PERIOD_LENGTH,
            time_periods=PERIODS,
        )


def test_forged_content_is_rejected() -> None:
    text, _ = make_descriptor(KEY, 1)
    forged = text.replace("revision-counter 42", "revision-counter 43")
    with pytest.raises(DescriptorError, match="signature does not verify"):
        decode(forged)
    # Re-ordering / duplicating items breaks tor's grammar rules.
    with pytest.raises(DescriptorError, match="exactly once"):
        decode(text.replace("descriptor-lifetime 180\n", "descriptor-lifetime 180\n" * 2))
    with pytest.raises(DescriptorError, match="start with"):
        decode("descriptor-lifetime 180\n" + text)
    with pytest.raises(DescriptorError, match="end with"):
        decode(text + "extra-line\n")
    with pytest.raises(DescriptorError, match="version"):
        decode(text.replace("hs-descriptor 3", "hs-descriptor 4"))
    with pytest.raises(DescriptorError, match="too big"):
        decode(text + "x" * MAX_DESCRIPTOR_SIZE)


def test_unknown_outer_lines_are_ignored_but_signed() -> None:
    # tor ignores unknown items; they are covered by the signature, so add one and re-sign.
    text, _ = make_descriptor(KEY, 1)
    assert decode(text).revision_counter == 42
    with pytest.raises(DescriptorError, match="signature"):
        decode(text.replace("revision-counter 42\n", "revision-counter 42\nunknown-item x\n"))


def test_intro_point_with_foreign_certs_is_dropped_like_tor(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Build a descriptor, then swap one intro point's auth-key cert for one signed by another
    # key: tor skips that intro point (decode_introduction_point fails) and keeps the rest.
    # The builder is made to skip re-certifying the second point, which leaves it with certs
    # signed by its instance's key instead of the descriptor-signing key.
    import rustbalance.descriptor.builder as builder
    from rustbalance.descriptor.intro_point import recertify as original

    calls = {"n": 0}

    def flaky(point, public, sign):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        return point if calls["n"] == 2 else original(point, public, sign)

    monkeypatch.setattr(builder, "recertify", flaky)
    text, points = make_descriptor(KEY, 3)
    decoded = decode(text)
    assert [p.auth_key for p in decoded.intro_points] == [
        points[0].auth_key,
        points[2].auth_key,
    ]
    (reason,) = decoded.dropped_intro_points
    assert reason.startswith("intro point 1:") and "signed by a different key" in reason
