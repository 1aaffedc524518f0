"""The HSDir hash ring.

Index vectors: tor ``src/test/test_hs_common.c`` test_hs_indexes (public key of 32 bytes 0x42,
SRV of 32 bytes 0x43, period 42, length 1440). Selection: tor's test_responsible_hsdirs and
test_desc_reupload_logic (relays whose ed25519 id is 32 bytes of their index), plus a reference
written independently from rend-spec-v3 [HASHRING] ("the first N relays after the index,
in ring order") as modular distances.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rustbalance.tor.hashring import hs_index, relay_index, responsible_hsdirs
from tests.budget import budget

SRV = b"\x43" * 32
LENGTH = 1440
TP = 20000


@dataclass(frozen=True)
class Relay:
    name: str
    ed25519_id: bytes


def tor_style_relays(count: int) -> list[Relay]:
    # test_hs_common.c helper_add_hsdir_to_networkstatus: identity = memset(idx).
    return [Relay(f"relay{i}", bytes([i]) * 32) for i in range(1, count + 1)]


def reference(
    blinded: bytes, tp: int, length: int, srv: bytes, relays: list[Relay], n: int, spread: int
) -> list[Relay]:
    """rend-spec-v3 [HASHRING] read literally: for each replica, walk relays in order of
    (relay_index - hs_index) mod 2^256, skipping ones already chosen."""
    chosen: list[int] = []
    for replica in range(1, n + 1):
        target = int.from_bytes(hs_index(blinded, replica, length, tp), "big")

        def distance(i: int, target: int = target) -> int:
            value = int.from_bytes(relay_index(relays[i].ed25519_id, srv, tp, length), "big")
            return (value - target) % 2**256

        taken = 0
        for i in sorted(range(len(relays)), key=distance):
            if taken == spread:
                break
            if i not in chosen:
                chosen.append(i)
                taken += 1
    return [relays[i] for i in chosen]


def test_hs_index_vector() -> None:
    assert hs_index(b"\x42" * 32, 1, 1440, 42).hex() == (
        "37e5cbbd56a22823714f18f1623ece5983a0d64c78495a8cfab854245e5f9a8a"
    )


def test_relay_index_vector() -> None:
    assert relay_index(b"\x42" * 32, b"\x43" * 32, 42, 1440).hex() == (
        "db475361014a09965e7e5e4d4a25b8f8d4b8f16cb1d8a7e95eed50249cc1a2d5"
    )


def test_argument_order_matters() -> None:
    # Swapping tp and length must change both indices (the two hashes order them differently).
    assert hs_index(b"\x42" * 32, 1, 42, 1440) != hs_index(b"\x42" * 32, 1, 1440, 42)
    assert relay_index(b"\x42" * 32, SRV, 1440, 42) != relay_index(b"\x42" * 32, SRV, 42, 1440)


def test_two_hsdirs_give_two_responsible() -> None:
    # test_responsible_hsdirs: two HSDirs (the non-HSDir relay is filtered out beforehand).
    relays = tor_style_relays(2)
    result = responsible_hsdirs(b"\x07" * 32, TP, LENGTH, SRV, relays, 2, 4)
    assert sorted(r.name for r in result) == ["relay1", "relay2"]


def test_six_hsdirs_all_used_once() -> None:
    # test_desc_reupload_logic: six HSDirs, 2 replicas x 4 -> all six, each once.
    relays = tor_style_relays(6)
    result = responsible_hsdirs(b"\x42" * 32, TP, LENGTH, SRV, relays, 2, 4)
    assert len(result) == 6
    assert len(set(result)) == 6


def test_big_ring_gives_eight_distinct_in_ring_order() -> None:
    relays = tor_style_relays(250)
    blinded = b"\x11" * 32
    result = responsible_hsdirs(blinded, TP, LENGTH, SRV, relays, 2, 4)
    assert len(result) == 8
    assert len(set(result)) == 8
    assert result == reference(blinded, TP, LENGTH, SRV, relays, 2, 4)
    # The first pick is the relay with the smallest index at or after replica 1's index.
    target = hs_index(blinded, 1, LENGTH, TP)
    after = [r for r in relays if relay_index(r.ed25519_id, SRV, TP, LENGTH) >= target]
    first = min(after or relays, key=lambda r: relay_index(r.ed25519_id, SRV, TP, LENGTH))
    assert result[0] == first


def test_wraps_around_the_end_of_the_ring() -> None:
    relays = tor_style_relays(3)
    # Find a blinded key whose replica-1 index lies after every relay's index.
    for seed in range(1000):
        blinded = seed.to_bytes(32, "big")
        target = hs_index(blinded, 1, LENGTH, TP)
        indices = sorted(relay_index(r.ed25519_id, SRV, TP, LENGTH) for r in relays)
        if target > indices[-1]:
            break
    else:
        pytest.fail("no wrapping key found")
    result = responsible_hsdirs(blinded, TP, LENGTH, SRV, relays, 1, 1)
    assert relay_index(result[0].ed25519_id, SRV, TP, LENGTH) == indices[0]


def test_spread_and_replicas_are_respected() -> None:
    relays = tor_style_relays(40)
    blinded = b"\x99" * 32
    assert len(responsible_hsdirs(blinded, TP, LENGTH, SRV, relays, 1, 3)) == 3
    assert len(responsible_hsdirs(blinded, TP, LENGTH, SRV, relays, 3, 5)) == 15
    # The upload set for replica 1 starts with the fetch set (spread 3 is a prefix of spread 4).
    store = responsible_hsdirs(blinded, TP, LENGTH, SRV, relays, 1, 4)
    fetch = responsible_hsdirs(blinded, TP, LENGTH, SRV, relays, 1, 3)
    assert store[:3] == fetch


def test_ring_depends_on_srv_and_period() -> None:
    relays = tor_style_relays(100)
    blinded = b"\x33" * 32
    base = responsible_hsdirs(blinded, TP, LENGTH, SRV, relays, 2, 4)
    assert responsible_hsdirs(blinded, TP, LENGTH, b"\x44" * 32, relays, 2, 4) != base
    assert responsible_hsdirs(blinded, TP + 1, LENGTH, SRV, relays, 2, 4) != base


def test_empty_ring() -> None:
    assert responsible_hsdirs(b"\x42" * 32, TP, LENGTH, SRV, [], 2, 4) == []


@pytest.mark.parametrize(
    ("blinded", "srv", "n", "spread", "message"),
    [
        (b"\x42" * 31, SRV, 2, 4, "blinded_key"),
        (b"\x42" * 32, b"\x43" * 33, 2, 4, "srv"),
        (b"\x42" * 32, SRV, 0, 4, "n_replicas"),
        (b"\x42" * 32, SRV, 2, 0, "spread"),
    ],
)
def test_rejects_bad_arguments(
    blinded: bytes, srv: bytes, n: int, spread: int, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        responsible_hsdirs(blinded, TP, LENGTH, srv, tor_style_relays(3), n, spread)


def test_index_rejects_bad_lengths() -> None:
    with pytest.raises(ValueError, match="ed25519_id"):
        relay_index(b"\x01" * 20, SRV, TP, LENGTH)
    with pytest.raises(ValueError, match="64-bit"):
        hs_index(b"\x01" * 32, 1, LENGTH, -1)


@settings(max_examples=budget(300), deadline=None)
@given(
    ids=st.lists(st.binary(min_size=32, max_size=32), min_size=1, max_size=30, unique=True),
    blinded=st.binary(min_size=32, max_size=32),
    srv=st.binary(min_size=32, max_size=32),
    tp=st.integers(min_value=0, max_value=2**32),
    length=st.sampled_from([4, 8, 1440]),
    n=st.integers(min_value=1, max_value=4),
    spread=st.integers(min_value=1, max_value=6),
)
def test_matches_reference(
    ids: list[bytes], blinded: bytes, srv: bytes, tp: int, length: int, n: int, spread: int
) -> None:
    relays = [Relay(f"r{i}", ed) for i, ed in enumerate(ids)]
    result = responsible_hsdirs(blinded, tp, length, srv, relays, n, spread)
    assert result == reference(blinded, tp, length, srv, relays, n, spread)
    assert len(result) == min(len(relays), n * spread)
