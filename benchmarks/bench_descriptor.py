"""Build + sign a master descriptor: RustBalance vs stem (the path Onionbalance uses).

Both sides start from the same identity key, the same time period and the same intro points
(certified by an instance key) and do the same work: blind the key, re-certify every intro
point with a fresh descriptor-signing key (as Onionbalance's ``_recertify_intro_point``),
encrypt both layers and sign. Reported: median wall time of N runs each, and the ratio.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from rustbalance.crypto.blinding import blind_identity, blinding_factor
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

PERIOD_LENGTH = 1440
SIZES = (1, 10, 20)
OUR_RUNS = 30
STEM_RUNS = 7


def _public(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _intro_points(n: int, now: int) -> list[IntroPoint]:
    instance = Ed25519PrivateKey.generate()
    expiry = expiration_hours_for(now, 20 * 3600)
    points = []
    for i in range(n):
        auth = create_cert(
            CERT_TYPE_HS_IP_V_SIGNING, os.urandom(32), expiry, _public(instance), instance.sign
        )
        enc = create_cert(
            CERT_TYPE_HS_IP_CC_SIGNING, os.urandom(32), expiry, _public(instance), instance.sign
        )
        specs = (
            LinkSpecifier.ipv4("127.0.0.1", 5000 + i),
            LinkSpecifier.legacy_id(os.urandom(20)),
            LinkSpecifier.ed25519_id(os.urandom(32)),
        )
        points.append(IntroPoint(specs, os.urandom(32), auth, os.urandom(32), enc))
    return points


def _ours(seed: bytes, points: list[IntroPoint], period: int, now: int) -> Callable[[], str]:
    def run() -> str:
        key = IdentityKey.from_seed(seed)
        blinded = blind_identity(key, period, PERIOD_LENGTH)
        return build_descriptor(
            identity_public_key=key.public_key,
            blinded=blinded,
            intro_points=points,
            revision_counter=1000,
            now=now,
            randbytes=os.urandom,
        )

    return run


def _stem(seed: bytes, points: list[IntroPoint], period: int) -> Callable[[], bytes]:
    import base64

    from stem.client.datatype import CertType as ClientCertType
    from stem.client.datatype import LinkSpecifier as StemLinkSpecifier
    from stem.descriptor.certificate import (
        Ed25519CertificateV1,
        Ed25519Extension,
        ExtensionType,
    )
    from stem.descriptor.hidden_service import (
        HiddenServiceDescriptorV3,
        InnerLayer,
        IntroductionPointV3,
    )

    identity = Ed25519PrivateKey.from_private_bytes(seed)
    nonce = blinding_factor(_public(identity), period, PERIOD_LENGTH)

    def run() -> bytes:
        signing = Ed25519PrivateKey.generate()
        extensions = [Ed25519Extension(ExtensionType.HAS_SIGNING_KEY, None, _public(signing))]
        stem_points = []
        for point in points:
            expiry = datetime.fromtimestamp(point.auth_key_cert.expires_at, UTC).replace(
                tzinfo=None
            )
            auth = Ed25519CertificateV1(
                ClientCertType.HS_V3_INTRO_AUTH,
                expiry,
                1,
                point.auth_key,
                extensions,
                signing_key=signing,
            )
            enc = Ed25519CertificateV1(
                ClientCertType.HS_V3_NTOR_ENC,
                expiry,
                1,
                point.enc_key_cert.certified_key,
                extensions,
                signing_key=signing,
            )
            stem_points.append(
                IntroductionPointV3(
                    [StemLinkSpecifier(s.type, s.data) for s in point.link_specifiers],
                    base64.b64encode(point.onion_key),
                    auth,
                    base64.b64encode(point.enc_key),
                    enc,
                    None,
                    None,
                )
            )
        content: bytes = HiddenServiceDescriptorV3.content(
            inner_layer=InnerLayer.create(introduction_points=stem_points),
            identity_key=identity,
            signing_key=signing,
            revision_counter=1000,
            blinding_nonce=nonce,
        )
        return content

    return run


def _median_ms(func: Callable[[], object], runs: int) -> float:
    func()  # warm-up
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        func()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1000


def run() -> list[str]:
    now = int(time.time())
    period = (now // 60 - 720) // PERIOD_LENGTH
    seed = os.urandom(32)
    lines = [
        "## Descriptor build + sign (RustBalance vs stem 1.8)",
        "",
        "Blind the master key, re-certify N intro points with a fresh descriptor-signing key, "
        "encrypt both layers, sign. Median of "
        f"{OUR_RUNS} (RustBalance) / {STEM_RUNS} (stem) runs.",
        "",
        "| intro points | RustBalance (ms) | stem (ms) | speed-up |",
        "|---:|---:|---:|---:|",
    ]
    for n in SIZES:
        points = _intro_points(n, now)
        ours = _median_ms(_ours(seed, points, period, now), OUR_RUNS)
        theirs = _median_ms(_stem(seed, points, period), STEM_RUNS)
        lines.append(f"| {n} | {ours:.2f} | {theirs:.2f} | {theirs / ours:.1f}x |")
    lines.append("")
    return lines


if __name__ == "__main__":
    print("\n".join(run()))
