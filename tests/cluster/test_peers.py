"""The live-peer table: liveness, intro points by content, removal of revoked peers, bounds.

Addresses are no longer gossiped (issue 16: a node speaks only for itself, and where it is
reached is its admission record's business), so the table holds live state only.
"""

from __future__ import annotations

from rustbalance.cluster.messages import Heartbeat, IntroPoints, Role, intro_points_digest
from rustbalance.cluster.peers import PeerTable

T0 = 1000.0


def hb(
    role: Role = Role.STANDBY, points: tuple[bytes, ...] = (), eligible: bool = True
) -> Heartbeat:
    return Heartbeat(role, 1, intro_points_digest(points), None, eligible, b"\x00" * 32)


def test_upsert_and_liveness_expiry() -> None:
    table = PeerTable("me")
    assert table.on_heartbeat("b", hb(Role.PUBLISHER), T0, priority=5, eligible=True) is True
    assert table.on_heartbeat("b", hb(), T0 + 5, priority=5, eligible=True) is False
    peer = table.get("b")
    assert peer is not None and peer.role is Role.STANDBY and peer.last_heard == T0 + 5
    assert peer.priority == 5  # from the record the coordinator passed, not the message
    assert table.expire(T0 + 20) == ()  # exactly the timeout: still live
    assert [p.node_id for p in table.live_peers(T0 + 20)] == ["b"]
    assert table.live_peers(T0 + 20.5) == []  # dead before the sweep, too
    assert table.expire(T0 + 20.5) == ("b",)
    assert table.get("b") is None


def test_eligibility_is_the_records_lowered_by_the_heartbeat() -> None:
    table = PeerTable("me")
    table.on_heartbeat("b", hb(eligible=True), T0, priority=1, eligible=False)
    assert table.get("b").publisher_eligible is False  # type: ignore[union-attr]
    table.on_heartbeat("c", hb(eligible=False), T0, priority=1, eligible=True)
    assert table.get("c").publisher_eligible is False  # type: ignore[union-attr]
    table.on_heartbeat("d", hb(eligible=True), T0, priority=1, eligible=True)
    assert table.get("d").publisher_eligible is True  # type: ignore[union-attr]


def test_expiry_and_removal_drop_intro_points() -> None:
    table = PeerTable("me", heartbeat_timeout=15)
    for name in ("b", "c", "d"):
        table.on_heartbeat(name, hb(), T0, priority=1, eligible=True)
    table.on_intro_points("b", IntroPoints((b"b1", b"b2")), T0)
    table.on_intro_points("c", IntroPoints((b"c1",)), T0 + 10)
    table.on_intro_points("d", IntroPoints((b"d1",)), T0 + 10)
    assert table.remove("d") is True and table.remove("d") is False  # revoked
    assert table.intro_points(T0 + 10) == {"b": (b"b1", b"b2"), "c": (b"c1",)}
    assert table.expire(T0 + 16) == ("b",)
    assert table.intro_points(T0 + 16) == {"c": (b"c1",)}


def test_intro_points_replaced_by_content_not_count() -> None:
    table = PeerTable("me")
    table.on_heartbeat("b", hb(points=(b"x", b"y")), T0, priority=1, eligible=True)
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
    assert table.on_heartbeat("me", hb(), T0, priority=1, eligible=True) is False
    assert table.live_peers(T0) == []


def test_live_table_bounded() -> None:
    table = PeerTable("me", max_peers=2)
    assert table.on_heartbeat("a", hb(), T0, priority=1, eligible=True)
    assert table.on_heartbeat("b", hb(), T0, priority=1, eligible=True)
    assert table.on_heartbeat("c", hb(), T0, priority=1, eligible=True) is False
    assert [p.node_id for p in table.live_peers(T0)] == ["a", "b"]
