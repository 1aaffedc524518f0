"""Fair round-robin merge of intro points (issue "Descriptor engine"; replaces the original
product's "own first, cut at 20", system.md 3.6)."""

from __future__ import annotations

import pytest

from rustbalance.descriptor.intro_point import IntroPoint
from rustbalance.descriptor.link_specifiers import LS_LEGACY_ID, LinkSpecifier
from rustbalance.descriptor.merge import merge_intro_points
from rustbalance.errors import DescriptorError

from .helpers import NOW, make_intro_point, rng


def _points(seed: int, n: int, lifetime: int = 24 * 3600) -> list[IntroPoint]:
    randbytes = rng(seed)
    return [make_intro_point(randbytes, index=i, lifetime=lifetime) for i in range(n)]


def test_round_robin_gives_each_instance_a_fair_share() -> None:
    a, b, c = _points(1, 10), _points(2, 10), _points(3, 2)
    merged = merge_intro_points([a, b, c], max_points=8, now=NOW, min_remaining_validity=0)
    assert merged == [a[0], b[0], c[0], a[1], b[1], c[1], a[2], b[2]]


def test_small_instances_leave_room_for_others_up_to_the_cap() -> None:
    a, b = _points(1, 1), _points(2, 30)
    merged = merge_intro_points([a, b], max_points=20, now=NOW, min_remaining_validity=0)
    assert len(merged) == 20 and merged[:3] == [a[0], b[0], b[1]]


def _on_relay(point: IntroPoint, relay: bytes) -> IntroPoint:
    return IntroPoint(
        (LinkSpecifier.ed25519_id(relay),),
        point.onion_key,
        point.auth_key_cert,
        point.enc_key,
        point.enc_key_cert,
    )


def _on_legacy_relay(point: IntroPoint, fingerprint: bytes) -> IntroPoint:
    """The point moved to the relay with RSA identity ``fingerprint`` (other specs kept)."""
    specs = tuple(s for s in point.link_specifiers if s.type != LS_LEGACY_ID)
    return IntroPoint(
        (*specs, LinkSpecifier.legacy_id(fingerprint)),
        point.onion_key,
        point.auth_key_cert,
        point.enc_key,
        point.enc_key_cert,
    )


def test_duplicate_auth_keys_are_dropped_and_one_point_per_relay() -> None:
    """A client maps an intro circuit to the *first* intro point of the descriptor on that
    relay (tor circuituse.c -> hs_client.c hs_client_setup_intro_circ_auth_key ->
    find_desc_intro_point_by_legacy_id): a second point on the same relay can never be used,
    and once the first one dies it hides that from the client's failure cache, so the client
    never refetches (issue 14). So the merge lists at most one point per relay."""
    a = _points(1, 2)
    relay = a[1].relay_ed25519_id
    assert relay is not None
    same_relay = _on_relay(make_intro_point(rng(9), extra_specs=()), relay)
    b = [a[0], same_relay, *_points(2, 1)]
    merged = merge_intro_points([a, b], max_points=20, now=NOW, min_remaining_validity=0)
    # a[0] is taken once (same auth key in b). b[1] claims the relay first, so a[1] (same
    # relay) is left out.
    assert merged == [a[0], same_relay, b[2]]
    capped = merge_intro_points([a, b], max_points=2, now=NOW, min_remaining_validity=0)
    assert capped == [a[0], same_relay]


def test_the_relay_is_known_by_its_rsa_identity_as_tor_compares_it() -> None:
    a, b = _points(1, 2), _points(2, 2)
    fingerprint = bytes(range(20))
    a1 = _on_legacy_relay(a[1], fingerprint)
    b0 = _on_legacy_relay(b[0], fingerprint)  # other ed25519 id, same RSA identity
    merged = merge_intro_points([[a[0], a1], [b0, b[1]]], 20, NOW, 0)
    assert merged == [a[0], b0, b[1]]


def test_an_instance_whose_relays_all_collide_gets_no_point_on_them() -> None:
    a = _points(1, 3)
    relays = [p.relay_ed25519_id for p in a]
    assert all(r is not None for r in relays)
    b = [_on_relay(p, r) for p, r in zip(_points(2, 3), relays, strict=True) if r is not None]
    merged = merge_intro_points([a, b], max_points=20, now=NOW, min_remaining_validity=0)
    # Round-robin over distinct relays: a0, b1, a2; every other point shares a relay.
    assert merged == [a[0], b[1], a[2]]
    relays_listed = [p.relay_ed25519_id for p in merged]
    assert len(set(relays_listed)) == len(relays_listed)


def test_points_expiring_within_the_margin_are_dropped() -> None:
    short, long = _points(1, 2, lifetime=1800), _points(2, 2)
    merged = merge_intro_points([short, long], max_points=20, now=NOW, min_remaining_validity=3600)
    assert merged == long
    assert merge_intro_points([short], max_points=20, now=NOW, min_remaining_validity=0) == short


def test_pure_and_deterministic() -> None:
    instances = [_points(1, 5), _points(2, 5)]
    first = merge_intro_points(instances, max_points=7, now=NOW, min_remaining_validity=0)
    assert first == merge_intro_points(instances, max_points=7, now=NOW, min_remaining_validity=0)
    assert merge_intro_points([], max_points=5, now=NOW, min_remaining_validity=0) == []


@pytest.mark.parametrize("max_points", [0, 21])
def test_cap_must_be_1_to_20(max_points: int) -> None:
    with pytest.raises(DescriptorError):
        merge_intro_points([], max_points=max_points, now=NOW, min_remaining_validity=0)
