"""Interoperability with stem 1.8 (an independent implementation, used only in tests):
stem decodes and verifies what we build, and we decode what stem builds."""

from __future__ import annotations

import base64
import time
from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from stem.client.datatype import LinkByEd25519, LinkByFingerprint, LinkByIPv4, LinkByIPv6
from stem.descriptor.hidden_service import (
    HiddenServiceDescriptorV3,
    InnerLayer,
    IntroductionPointV3,
)

from rustbalance.crypto.blinding import blinding_factor
from rustbalance.crypto.keys import IdentityKey
from rustbalance.descriptor.link_specifiers import LinkSpecifier
from rustbalance.descriptor.parser import decode_descriptor

from .helpers import PERIOD_LENGTH, make_descriptor, make_key, rng


@pytest.mark.parametrize("n_points", [1, 20])
def test_stem_decodes_and_verifies_our_descriptor(n_points: int) -> None:
    key = make_key(31)
    text, points = make_descriptor(key, n_points, flow_control="1-2 31")
    desc = HiddenServiceDescriptorV3(text.encode(), validate=True)  # checks cert + signature
    assert desc.revision_counter == 42 and desc.lifetime == 180
    inner = desc.decrypt(key.onion_address)
    assert len(inner.introduction_points) == n_points
    for ours, theirs in zip(points, inner.introduction_points, strict=True):
        assert base64.b64decode(theirs.onion_key_raw) == ours.onion_key
        assert base64.b64decode(theirs.enc_key_raw) == ours.enc_key
        assert theirs.auth_key_cert.key == ours.auth_key
        assert [type(s).__name__ for s in theirs.link_specifiers] == [
            "LinkByIPv4",
            "LinkByFingerprint",
            "LinkByEd25519",
        ]
        # The re-certified intro point certs verify under the descriptor-signing key.
        for cert in (theirs.auth_key_cert, theirs.enc_key_cert):
            assert cert.signing_key() == desc.signing_cert.key
            packed = cert.pack()
            Ed25519PublicKey.from_public_bytes(desc.signing_cert.key).verify(
                packed[-64:], packed[:-64]
            )


def test_we_decode_a_descriptor_built_by_stem() -> None:
    seed = rng(77)(32)
    identity = Ed25519PrivateKey.from_private_bytes(seed)
    key = IdentityKey.from_seed(seed)
    now = int(time.time())
    period = (now // 60 - 720) // PERIOD_LENGTH
    signing = Ed25519PrivateKey.generate()
    expiration = datetime.now(UTC).replace(tzinfo=None) + timedelta(hours=20)
    specs = [
        [LinkByIPv4("10.1.2.3", 9001), LinkByFingerprint(b"\xaa" * 20)],
        [LinkByIPv6("2001:db8:0:0:0:0:0:1", 443), LinkByEd25519(b"\x01" * 32)],
    ]
    ips = [
        IntroductionPointV3.create_for_link_specifiers(
            s, expiration=expiration, signing_key=signing
        )
        for s in specs
    ]
    text = HiddenServiceDescriptorV3.content(
        inner_layer=InnerLayer.create(introduction_points=ips),
        identity_key=identity,
        signing_key=signing,
        revision_counter=987,
        blinding_nonce=blinding_factor(key.public_key, period, PERIOD_LENGTH),
    ).decode()
    decoded = decode_descriptor(
        text,
        key.onion_address,
        now=now,
        period_length=PERIOD_LENGTH,
        time_periods=[period - 1, period, period + 1],
    )
    assert decoded.revision_counter == 987 and decoded.time_period == period
    assert decoded.dropped_intro_points == ()
    assert decoded.intro_points[0].link_specifiers == (
        LinkSpecifier.ipv4("10.1.2.3", 9001),
        LinkSpecifier.legacy_id(b"\xaa" * 20),
    )
    assert decoded.intro_points[1].link_specifiers == (
        LinkSpecifier.ipv6("2001:db8::1", 443),
        LinkSpecifier.ed25519_id(b"\x01" * 32),
    )
    for ours, theirs in zip(decoded.intro_points, ips, strict=True):
        assert ours.auth_key == theirs.auth_key_cert.key
        assert ours.onion_key == base64.b64decode(theirs.onion_key_raw)


def test_stem_reads_client_auth_descriptor_outer_layers() -> None:
    # stem cannot decrypt restricted-discovery inner layers, but it must accept the outer
    # document and parse the 16 auth-client lines of the middle layer.
    from stem.descriptor.hidden_service import OuterLayer

    from rustbalance.crypto.blinding import subcredential
    from rustbalance.descriptor.client_auth import x25519_public

    from .helpers import blinded_for

    key = make_key(5)
    text, _ = make_descriptor(key, 1, client_auth_keys=[x25519_public(b"\x09" * 32)])
    desc = HiddenServiceDescriptorV3(text.encode(), validate=True)
    blinded = blinded_for(key).public_key
    middle = OuterLayer._decrypt(
        desc.superencrypted,
        desc.revision_counter,
        subcredential(key.public_key, blinded),
        blinded,
    )
    assert len(middle.clients) == 16
