"""Shared builders for descriptor tests: synthetic instance intro points and descriptors."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from rustbalance.crypto.blinding import BlindedKey, blind_identity
from rustbalance.crypto.certs import (
    CERT_TYPE_HS_IP_CC_SIGNING,
    CERT_TYPE_HS_IP_V_SIGNING,
    create_cert,
    expiration_hours_for,
)
from rustbalance.crypto.keys import IdentityKey
from rustbalance.descriptor.builder import build_descriptor
from rustbalance.descriptor.intro_point import IntroPoint
from rustbalance.descriptor.link_specifiers import LinkSpecifier

NOW = 1_700_000_000  # 2023-11-14T22:13:20Z
PERIOD_LENGTH = 1440
# rend-spec-v3 [TIME-PERIODS]: tp = (minutes - 720) // 1440.
TIME_PERIOD = (NOW // 60 - 720) // PERIOD_LENGTH

Randbytes = Callable[[int], bytes]


def rng(seed: int = 1) -> Randbytes:
    return random.Random(seed).randbytes


def public_bytes(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def make_intro_point(
    randbytes: Randbytes,
    *,
    index: int = 0,
    signer: Ed25519PrivateKey | None = None,
    lifetime: int = 24 * 3600,
    now: int = NOW,
    extra_specs: Sequence[LinkSpecifier] = (),
) -> IntroPoint:
    """An intro point as an instance's tor would publish it (certs by ``signer``)."""
    key = signer or Ed25519PrivateKey.from_private_bytes(randbytes(32))
    expiry = expiration_hours_for(now, lifetime)
    auth = create_cert(
        CERT_TYPE_HS_IP_V_SIGNING, randbytes(32), expiry, public_bytes(key), key.sign
    )
    enc = create_cert(
        CERT_TYPE_HS_IP_CC_SIGNING, randbytes(32), expiry, public_bytes(key), key.sign
    )
    specs = (
        LinkSpecifier.ipv4("127.0.0.1", 5000 + index),
        LinkSpecifier.legacy_id(randbytes(20)),
        LinkSpecifier.ed25519_id(randbytes(32)),
        *extra_specs,
    )
    return IntroPoint(specs, randbytes(32), auth, randbytes(32), enc)


def make_key(seed: int = 7) -> IdentityKey:
    return IdentityKey.from_seed(random.Random(seed).randbytes(32))


def blinded_for(key: IdentityKey, period: int = TIME_PERIOD) -> BlindedKey:
    return blind_identity(key, period, PERIOD_LENGTH)


def make_descriptor(
    key: IdentityKey,
    n_points: int = 3,
    *,
    seed: int = 3,
    revision: int = 42,
    **kwargs: object,
) -> tuple[str, list[IntroPoint]]:
    randbytes = rng(seed)
    points = [make_intro_point(randbytes, index=i) for i in range(n_points)]
    text = build_descriptor(
        identity_public_key=key.public_key,
        blinded=blinded_for(key),
        intro_points=points,
        revision_counter=revision,
        now=NOW,
        randbytes=randbytes,
        **kwargs,  # type: ignore[arg-type]
    )
    return text, points
