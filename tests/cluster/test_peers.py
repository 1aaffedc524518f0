"""The peer table: liveness, intro points by content, authenticated gossip, persistence."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rustbalance.cluster.messages import (
    CoordinationError,
    Heartbeat,
    IntroPoints,
    PeerAnnounce,
    Role,
    intro_points_digest,
)
from rustbalance.cluster.peers import AddressSource, KnownPeer, PeerTable, load_known_peers
from tests.budget import budget

T0 = 1000.0


def hb(
    *peers: tuple[str, str], role: Role = Role.STANDBY, points: tuple[bytes, ...] = ()
) -> Heartbeat:
    return Heartbeat(role, 10, 1, intro_points_digest(points), None, True, tuple(peers))


def test_upsert_and_liveness_expiry() -> None:
    table = PeerTable("me", "10.0.0.1:51821")
    assert table.on_heartbeat("b", hb(role=Role.PUBLISHER), T0) is True
    assert table.on_heartbeat("b", hb(), T0 + 5) is False
    peer = table.get("b")
    assert peer is not None and peer.role is Role.STANDBY and peer.last_heard == T0 + 5
    assert table.expire(T0 + 20) == ()  # exactly the timeout: still live
    assert [p.node_id for p in table.live_peers(T0 + 20)] == ["b"]
    assert table.live_peers(T0 + 20.5) == []  # dead before the sweep, too
    assert table.expire(T0 + 20.5) == ("b",)
    assert table.get("b") is None


def test_expiry_drops_intro_points_of_dead_peers() -> None:
    table = PeerTable("me", heartbeat_timeout=15)
    table.on_heartbeat("b", hb(), T0)
    table.on_heartbeat("c", hb(), T0)
    table.on_intro_points("b", IntroPoints((b"b1", b"b2")), T0)
    table.on_intro_points("c", IntroPoints((b"c1",)), T0 + 10)
    assert table.intro_points(T0 + 10) == {"b": (b"b1", b"b2"), "c": (b"c1",)}
    assert table.expire(T0 + 16) == ("b",)
    assert table.intro_points(T0 + 16) == {"c": (b"c1",)}


def test_intro_points_replaced_by_content_not_count() -> None:
    table = PeerTable("me")
    table.on_heartbeat("b", hb(points=(b"x", b"y")), T0)
    assert table.on_intro_points("b", IntroPoints((b"x", b"y")), T0) is True
    assert table.get("b").intro_points_current  # type: ignore[union-attr]
    assert table.on_intro_points("b", IntroPoints((b"y", b"x")), T0 + 1) is False  # same set
    assert table.on_intro_points("b", IntroPoints((b"x", b"z")), T0 + 2) is True  # same count
    assert table.intro_points(T0 + 2) == {"b": (b"x", b"z")}
    assert not table.get("b").intro_points_current  # type: ignore[union-attr]
    assert table.on_intro_points("b", IntroPoints((b"x", b"x", b"z")), T0 + 3) is False
    assert table.intro_points(T0 + 3) == {"b": (b"x", b"z")}


def test_intro_points_from_peer_without_heartbeat_are_ignored() -> None:
    table = PeerTable("me")
    assert table.on_intro_points("ghost", IntroPoints((b"x",)), T0) is False
    assert table.intro_points(T0) == {}


def test_own_id_is_never_a_peer() -> None:
    table = PeerTable("me")
    assert table.on_heartbeat("me", hb(), T0) is False
    table.on_heartbeat("b", hb(("me", "6.6.6.6:1")), T0)
    assert table.live_peers(T0)[0].node_id == "b"
    assert table.address_of("me") is None


def test_gossip_learns_peers_and_own_address_wins() -> None:
    table = PeerTable("me", "10.0.0.1:51821")
    table.on_heartbeat("b", hb(("b", "10.0.0.2:51821"), ("c", "10.0.0.3:51821")), T0)
    assert table.address_of("b") == "10.0.0.2:51821"
    assert table.address_of("c") == "10.0.0.3:51821"
    sources = {p.node_id: p.source for p in table.known_peers()}
    assert sources == {"b": AddressSource.SELF, "c": AddressSource.GOSSIP}
    # c says where it is itself; then d's gossip cannot move live b or c elsewhere (hijack).
    table.on_heartbeat("c", hb(("c", "10.0.0.33:51821")), T0 + 1)
    table.on_heartbeat("d", hb(("b", "6.6.6.6:1"), ("c", "6.6.6.6:1")), T0 + 2)
    assert table.address_of("b") == "10.0.0.2:51821"
    assert table.address_of("c") == "10.0.0.33:51821"
    # Once c is dead, gossip may update it (it may have moved).
    table.on_heartbeat("d", hb(("c", "10.0.0.44:51821")), T0 + 30)
    assert table.address_of("c") == "10.0.0.44:51821"
    gossip = table.gossip()
    assert gossip[0] == ("me", "10.0.0.1:51821")
    assert {n for n, _ in gossip} == {"me", "b", "c", "d"} - {"d"}  # d never said its address


def test_peer_announce_self_and_third_party() -> None:
    table = PeerTable("me")
    assert table.on_peer_announce("b", PeerAnnounce("b", "10.0.0.2:1"), T0) is True
    assert table.on_peer_announce("b", PeerAnnounce("b", "10.0.0.2:1"), T0 + 1) is False
    assert table.on_peer_announce("c", PeerAnnounce("b", "6.6.6.6:1"), T0 + 2) is True
    # b was never live, so the third party's news replaced what b announced about itself.
    assert table.address_of("b") == "6.6.6.6:1"


def test_known_peers_bounded_and_live_never_evicted() -> None:
    table = PeerTable("me", max_peers=3)
    table.on_heartbeat("a", hb(("a", "10.0.0.1:1")), T0)
    for i in range(5):
        table.on_peer_announce("a", PeerAnnounce(f"g{i}", f"10.1.0.{i}:1"), T0 + i)
    ids = [p.node_id for p in table.known_peers()]
    assert len(ids) == 3 and "a" in ids and "g4" in ids
    assert len(table.gossip(limit=2)) == 2


def test_live_table_bounded() -> None:
    table = PeerTable("me", max_peers=2)
    assert table.on_heartbeat("a", hb(), T0)
    assert table.on_heartbeat("b", hb(), T0)
    assert table.on_heartbeat("c", hb(), T0) is False
    assert [p.node_id for p in table.live_peers(T0)] == ["a", "b"]


def test_persist_and_restore_round_trip() -> None:
    table = PeerTable("me")
    table.on_heartbeat("b", hb(("b", "[fd00::2]:51821"), ("c", "host.example:7")), T0)
    text = table.to_json()
    assert "token" not in text
    loaded = load_known_peers(text)
    assert [(p.node_id, p.address) for p in loaded] == [
        ("b", "[fd00::2]:51821"),
        ("c", "host.example:7"),
    ]
    upper = load_known_peers(text.replace("fd00", "FD00"))
    assert upper == loaded  # the loader canonicalises addresses
    fresh = PeerTable("me")
    fresh.restore(loaded, T0 + 100)
    assert fresh.address_of("c") == "host.example:7"
    assert {p.source for p in fresh.known_peers()} == {AddressSource.RESTORED}
    # Runtime knowledge outranks the file; the file never overrides runtime knowledge.
    fresh.on_heartbeat("d", hb(("c", "10.9.9.9:7")), T0 + 101)
    fresh.restore(loaded, T0 + 102)
    assert fresh.address_of("c") == "10.9.9.9:7"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "[]",
        "not json",
        '{"version": 1}',
        '{"version": 2, "peers": []}',
        '{"version": true, "peers": []}',
        '{"version": 1, "peers": [], "extra": 1}',
        '{"version": 1, "peers": {}}',
        '{"version": 1, "peers": [["a", "1.2.3.4:5"]]}',
        '{"version": 1, "peers": [{"node_id": "a"}]}',
        '{"version": 1, "peers": [{"node_id": "a", "address": "1.2.3.4:5", "x": 0}]}',
        '{"version": 1, "peers": [{"node_id": 5, "address": "1.2.3.4:5"}]}',
        '{"version": 1, "peers": [{"node_id": "bad id", "address": "1.2.3.4:5"}]}',
        '{"version": 1, "peers": [{"node_id": "a", "address": "1.2.3.4"}]}',
        '{"version": 1, "peers": [{"node_id": "a", "address": "1.2.3.4:5"},'
        ' {"node_id": "a", "address": "1.2.3.4:6"}]}',
        "[" * 100_000,
    ],
)
def test_loader_is_strict(text: str) -> None:
    with pytest.raises(CoordinationError):
        load_known_peers(text)


def test_loader_bounds_entry_count() -> None:
    doc = {"version": 1, "peers": [{"node_id": f"n{i}", "address": "1.2.3.4:5"} for i in range(3)]}
    with pytest.raises(CoordinationError):
        load_known_peers(json.dumps(doc), max_peers=2)


@settings(max_examples=budget(300), deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(),
        lambda c: st.lists(c) | st.dictionaries(st.text(), c),
        max_leaves=20,
    )
)
def test_loader_fuzz_only_raises_coordination_error(doc: object) -> None:
    text = json.dumps({"version": 1, "peers": doc}) if isinstance(doc, list) else json.dumps(doc)
    try:
        peers = load_known_peers(text)
    except CoordinationError:
        return
    assert all(isinstance(p, KnownPeer) for p in peers)
