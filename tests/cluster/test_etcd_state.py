"""The etcd backend's pure core: keys, member records, lease timing and the election rules.

No sockets, no sleeps: time is a number passed in. The last test runs several nodes against
an in-memory model of etcd (revisions, leases that the *server* expires, create-if-absent)
with random cut-offs and checks that two nodes never hold the publisher lease at once.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rustbalance.cluster.etcd_client import KeyValue, WatchBatch, WatchEvent
from rustbalance.cluster.etcd_state import (
    MAX_RECORD_BYTES,
    EtcdKeys,
    EtcdMembership,
    LeaseTimings,
    decode_record,
    encode_record,
)
from rustbalance.cluster.messages import MAX_INTRO_POINTS, CoordinationError

KEYS = EtcdKeys("/rustbalance/")
TTL = LeaseTimings(10)  # keep-alive every 3.33 s, margin 2.5 s


def point(raw: bytes) -> bytes:
    if raw.startswith(b"bad"):
        raise ValueError("undecodable")
    return raw


def member(node_id: str = "node-a", ttl: LeaseTimings = TTL) -> EtcdMembership[bytes]:
    return EtcdMembership(KEYS, node_id, ttl, point)


def kv(
    key: bytes, value: bytes = b"", create: int = 1, mod: int | None = None, lease: int = 0
) -> KeyValue:
    return KeyValue(key, value, create, create if mod is None else mod, lease)


def record(node_id: str, points: tuple[bytes, ...] = (b"p1",), eligible: bool = True) -> bytes:
    return encode_record(node_id, 10, eligible, None, points)


def put(
    rev: int, key: bytes, value: bytes = b"", create: int | None = None, lease: int = 0
) -> WatchBatch:
    event = WatchEvent("put", kv(key, value, create or rev, rev, lease))
    return WatchBatch(rev, (event,))


def delete(rev: int, key: bytes) -> WatchBatch:
    return WatchBatch(rev, (WatchEvent("delete", KeyValue(key, b"", 0, rev, 0)),))


# -- keys and records ---------------------------------------------------------------------------


def test_key_layout_and_parse() -> None:
    assert KEYS.node("node-a") == b"/rustbalance/nodes/node-a"
    assert KEYS.election("node-a") == b"/rustbalance/election/node-a"
    assert KEYS.parse(b"/rustbalance/nodes/node-a") == ("node", "node-a")
    assert KEYS.parse(b"/rustbalance/election/n.1") == ("election", "n.1")
    for bad in (
        b"/other/nodes/a",
        b"/rustbalance/nodes/",
        b"/rustbalance/x/a",
        b"\xff\xfe",
        b"/rustbalance/nodes/a/b",
        b"/rustbalance/nodes/" + b"a" * 65,
    ):
        assert KEYS.parse(bad) is None
    with pytest.raises(CoordinationError):
        EtcdKeys("rustbalance")


def test_record_round_trip_is_canonical() -> None:
    value = encode_record("node-a", 20, False, 1_700_000_000, [b"\x00\x01", b"xyz"])
    assert value == encode_record("node-a", 20, False, 1_700_000_000, [b"\x00\x01", b"xyz"])
    decoded = decode_record("node-a", value, point)
    assert (decoded.priority, decoded.eligible, decoded.last_publish) == (20, False, 1_700_000_000)
    assert decoded.intro_points == (b"\x00\x01", b"xyz")
    assert decoded.invalid_points == 0


def test_record_with_an_undecodable_intro_point_keeps_the_others() -> None:
    value = encode_record("node-a", 10, True, None, [b"good", b"bad one"])
    decoded = decode_record("node-a", value, point)
    assert decoded.intro_points == (b"good",)
    assert decoded.invalid_points == 1


@pytest.mark.parametrize(
    "document",
    [
        b"not json",
        b"[]",
        b'{"version": 2}',
        json.dumps({"version": 1, "node_id": "node-b"}).encode(),  # another node's record
        json.dumps({"version": 1, "node_id": "node-a", "priority": True}).encode(),
        json.dumps({"version": 1, "node_id": "node-a", "priority": -1}).encode(),
        json.dumps(
            {"version": 1, "node_id": "node-a", "priority": 1, "eligible": 1, "intro_points": []}
        ).encode(),
        json.dumps(
            {
                "version": 1,
                "node_id": "node-a",
                "priority": 1,
                "eligible": True,
                "intro_points": ["x"] * (MAX_INTRO_POINTS + 1),
            }
        ).encode(),
        b"{" * 100_000,
        b" " * (MAX_RECORD_BYTES + 1),
    ],
)
def test_bad_records_are_refused_with_coordination_error(document: bytes) -> None:
    with pytest.raises(CoordinationError):
        decode_record("node-a", document, point)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000))
def test_decode_record_raises_only_coordination_error_on_random_bytes(data: bytes) -> None:
    with contextlib.suppress(CoordinationError):
        decode_record("node-a", data, point)


@settings(max_examples=200, deadline=None)
@given(
    st.integers(0, 2**32 - 1),
    st.booleans(),
    st.one_of(st.none(), st.integers(0, 2**63 - 1)),
    st.lists(
        st.binary(min_size=1, max_size=300).filter(lambda b: not b.startswith(b"bad")),
        max_size=MAX_INTRO_POINTS,
    ),
)
def test_record_round_trip_property(
    priority: int, eligible: bool, last: int | None, points: list[bytes]
) -> None:
    decoded = decode_record("n", encode_record("n", priority, eligible, last, points), point)
    assert (decoded.priority, decoded.eligible, decoded.last_publish) == (priority, eligible, last)
    assert list(decoded.intro_points) == points


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(
            ["version", "node_id", "priority", "eligible", "last_publish", "intro_points", "x"]
        ),
        st.one_of(
            st.none(),
            st.booleans(),
            st.integers(),
            st.text(max_size=5),
            st.lists(st.text(max_size=8), max_size=3),
        ),
        max_size=7,
    )
)
def test_decode_record_on_random_json_objects(document: dict[str, object]) -> None:
    with contextlib.suppress(CoordinationError):
        decode_record("node-a", json.dumps(document).encode(), point)


# -- lease timing ---------------------------------------------------------------------------------


def test_lease_timings() -> None:
    assert TTL.keepalive_interval == pytest.approx(10 / 3)
    assert TTL.margin == 2.5
    assert TTL.valid_until(100.0, 10) == 107.5
    # The server may grant less than asked (never more is trusted).
    assert TTL.valid_until(100.0, 6) == 103.5
    assert LeaseTimings(2).margin == 1.0
    for bad in (0, 1, 3601):
        with pytest.raises(CoordinationError):
            LeaseTimings(bad)


# -- the election ---------------------------------------------------------------------------------


def joined(node_id: str = "node-a", lease: int = 7, sent: float = 0.0) -> EtcdMembership[bytes]:
    m = member(node_id)
    m.reset(5, [])
    m.lease_granted(lease, 10, sent)
    return m


def campaign(m: EtcdMembership[bytes], revision: int) -> None:
    """Our create txn answered ``revision``, and our watch has delivered that event."""
    m.campaigned(revision)
    m.apply(put(revision, KEYS.election(m.node_id), lease=m.lease_id or 0))


def test_a_new_node_registers_and_campaigns_once_synced_and_leased() -> None:
    m = member()
    m.desired_record = record("node-a")
    d = m.decide(0.0, eligible=True)
    assert not d.lease_valid and not d.register and not d.campaign
    m.lease_granted(7, 10, 0.0)
    d = m.decide(0.1, eligible=True)
    assert d.register and not d.campaign  # no view yet: do not campaign blind
    m.reset(5, [])
    assert m.decide(0.1, eligible=True).campaign
    campaign(m, 6)
    d = m.decide(0.2, eligible=True)
    assert d.holds_lease and d.publisher == "node-a" and not d.campaign


def test_the_oldest_candidacy_publishes_and_a_standby_takes_over_when_it_vanishes() -> None:
    b = joined("node-b", lease=8)
    b.apply(put(6, KEYS.election("node-a"), lease=7))
    campaign(b, 9)
    d = b.decide(1.0, eligible=True)
    assert d.publisher == "node-a" and not d.holds_lease
    b.apply(delete(10, KEYS.election("node-a")))  # node-a's lease expired or was revoked
    d = b.decide(1.1, eligible=True)
    assert d.publisher == "node-b" and d.holds_lease


def test_a_publisher_cut_off_steps_down_before_its_lease_can_expire_on_the_server() -> None:
    m = joined(sent=100.0)
    campaign(m, 6)
    assert m.decide(107.4, eligible=True).holds_lease
    # No keep-alive answered since the one sent at 100: etcd may expire the lease at 110; we
    # stop at 107.5, before any standby can see the candidacy vanish.
    d = m.decide(107.5, eligible=True)
    assert not d.holds_lease and not d.lease_valid and not d.register
    m.lease_renewed(10, 107.0)  # the answer to a keep-alive sent at 107.0 arrives
    assert m.decide(108.0, eligible=True).holds_lease
    assert m.decide(114.5, eligible=True).holds_lease is False


def test_a_late_keepalive_answer_never_shortens_the_lease() -> None:
    m = joined(sent=100.0)
    m.lease_renewed(10, 99.0)  # an older round trip answered late
    assert m.lease_deadline == 107.5


def test_lease_lost_drops_candidacy_and_record_then_a_new_lease_starts_over() -> None:
    m = joined()
    m.desired_record = record("node-a")
    m.record_written(m.desired_record, 6)
    m.campaigned(7)
    m.lease_lost()
    d = m.decide(1.0, eligible=True)
    assert not d.holds_lease and not d.register and not d.campaign
    m.lease_granted(9, 10, 1.0)
    m.apply(delete(8, KEYS.election("node-a")))  # the old lease's keys went with it
    d = m.decide(1.1, eligible=True)
    assert d.register and d.campaign and not d.holds_lease


def test_a_candidacy_left_on_an_older_lease_is_cleared_before_campaigning() -> None:
    # A node restarted within the TTL: its old process's candidacy lives on the old lease.
    m = member()
    m.lease_granted(9, 10, 0.0)
    m.reset(20, [kv(KEYS.election("node-a"), create=3, lease=7)])
    d = m.decide(0.1, eligible=True)
    assert d.clear_stale and not d.campaign and not d.holds_lease
    m.stale_cleared()
    m.apply(delete(21, KEYS.election("node-a")))
    d = m.decide(0.2, eligible=True)
    assert d.campaign and not d.clear_stale


def test_a_candidacy_whose_reply_was_lost_is_adopted() -> None:
    m = joined(lease=7)
    m.campaigned(None)  # the retried create found the key: it was our own first attempt
    m.apply(put(6, KEYS.election("node-a"), lease=7))
    assert m.campaign_revision == 6
    assert m.decide(0.1, eligible=True).holds_lease


def test_an_ineligible_node_resigns_and_never_holds() -> None:
    m = joined()
    m.campaigned(6)
    d = m.decide(0.1, eligible=False)
    assert d.resign and not d.holds_lease and not d.campaign
    m.resigned()
    d = m.decide(0.2, eligible=False)
    assert not d.resign and not d.campaign and d.publisher is None


def test_register_when_the_record_changes_or_vanishes() -> None:
    m = joined()
    m.desired_record = record("node-a")
    assert m.decide(0.1, eligible=True).register
    m.record_written(m.desired_record, 6)
    m.apply(put(6, KEYS.node("node-a"), m.desired_record, lease=7))
    assert not m.decide(0.2, eligible=True).register
    m.desired_record = record("node-a", (b"p2",))
    assert m.decide(0.3, eligible=True).register
    m.record_written(m.desired_record, 7)
    m.apply(put(7, KEYS.node("node-a"), m.desired_record, lease=7))
    m.apply(delete(8, KEYS.node("node-a")))  # someone (root) deleted it
    assert m.decide(0.4, eligible=True).register


def test_peers_come_and_go_with_their_records_and_replays_are_ignored() -> None:
    m = joined()
    m.apply(put(6, KEYS.node("node-b"), record("node-b", (b"x", b"y")), lease=8))
    m.apply(put(7, KEYS.node("node-a"), record("node-a"), lease=7))
    assert set(m.live_peers()) == {"node-b"}
    assert m.live_peers()["node-b"].intro_points == (b"x", b"y")
    # A batch replayed after a re-watch (revision already applied) changes nothing.
    assert not m.apply(put(6, KEYS.node("node-b"), record("node-b", (b"old",)), lease=8))
    assert m.live_peers()["node-b"].intro_points == (b"x", b"y")
    m.apply(delete(9, KEYS.node("node-b")))
    assert m.live_peers() == {}


def test_a_malformed_peer_record_is_counted_and_dropped() -> None:
    m = joined()
    m.apply(put(6, KEYS.node("node-b"), record("node-b"), lease=8))
    m.apply(put(7, KEYS.node("node-b"), b"garbage", lease=8))
    assert "node-b" not in m.live_peers()
    assert m.rejected["bad_record"] == 1
    m.apply(put(8, b"/rustbalance/other", b"x"))
    assert m.rejected["unknown_key"] == 1


# -- never two publishers: several nodes against a model of etcd ----------------------------------


@dataclass
class ModelEtcd:
    """etcd as the backend sees it: one revision counter, keys with create revisions, leases
    that the server expires ``ttl`` after the last keep-alive it *received*."""

    revision: int = 1
    keys: dict[bytes, tuple[int, int]] = field(default_factory=dict)  # key -> (create, lease)
    leases: dict[int, float] = field(default_factory=dict)  # lease -> server expiry
    next_lease: int = 100
    log: list[WatchBatch] = field(default_factory=list)

    def expire(self, now: float) -> None:
        for lease, expiry in sorted(self.leases.items()):
            if expiry <= now:
                del self.leases[lease]
                for key in [k for k, (_, owner) in self.keys.items() if owner == lease]:
                    self.revision += 1
                    del self.keys[key]
                    self.log.append(delete(self.revision, key))

    def create(self, key: bytes, lease: int) -> int | None:
        if key in self.keys or lease not in self.leases:
            return None
        self.revision += 1
        self.keys[key] = (self.revision, lease)
        self.log.append(put(self.revision, key, lease=lease))
        return self.revision


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 2), st.sampled_from(["cut", "heal", "tick", "tick"]), st.floats(0.1, 4.0)
        ),
        min_size=5,
        max_size=60,
    )
)
def test_never_two_publishers_with_random_cut_offs(steps: list[tuple[int, str, float]]) -> None:
    ttl = LeaseTimings(6)
    etcd = ModelEtcd()
    names = ("node-a", "node-b", "node-c")
    nodes = {n: EtcdMembership(KEYS, n, ttl, point) for n in names}
    connected = dict.fromkeys(names, True)
    seen = dict.fromkeys(names, 0)  # how much of the watch log each node has applied
    last_sent: dict[str, float] = {}
    now = 0.0

    def sync(name: str) -> None:
        m = nodes[name]
        if not connected[name]:
            return
        for batch in etcd.log[seen[name] :]:
            m.apply(batch)
        seen[name] = len(etcd.log)
        if m.revision == 0:
            m.reset(etcd.revision, [])
        if m.lease_id is None or m.lease_id not in etcd.leases:
            if m.lease_id is not None:
                m.lease_lost()
            lease = etcd.next_lease
            etcd.next_lease += 1
            etcd.leases[lease] = now + ttl.ttl
            m.lease_granted(lease, ttl.ttl, now)
            last_sent[name] = now
        elif now - last_sent[name] >= ttl.keepalive_interval:
            assert m.lease_id is not None
            etcd.leases[m.lease_id] = now + ttl.ttl
            m.lease_renewed(ttl.ttl, now)
            last_sent[name] = now
        d = m.decide(now, eligible=True)
        if d.campaign and m.lease_id is not None:
            m.campaigned(etcd.create(KEYS.election(name), m.lease_id))
        for batch in etcd.log[seen[name] :]:
            m.apply(batch)
        seen[name] = len(etcd.log)

    for index, action, advance in steps:
        name = names[index]
        if action == "cut":
            connected[name] = False
        elif action == "heal":
            connected[name] = True
        # Time passes in small steps; the server expires leases as it goes, and every
        # connected node hears of it at once (the worst case for the old publisher).
        target = now + advance
        while now < target:
            now = min(target, now + 0.25)
            etcd.expire(now)
            for n in names:
                sync(n)
            holders = [n for n in names if nodes[n].decide(now, eligible=True).holds_lease]
            assert len(holders) <= 1, (now, holders)
            for holder in holders:
                # The fencing transaction would pass: the holder's candidacy is in the store.
                create, _ = etcd.keys[KEYS.election(holder)]
                assert create == nodes[holder].campaign_revision


def test_a_watch_answer_with_a_later_header_revision_does_not_skip_pending_events() -> None:
    """Found on the real cluster: the watch's "created" answer carries the store's current
    revision; taking it as the view's revision skipped the events still on their way (a
    candidacy among them), and two nodes both believed they were the oldest candidate."""
    m = joined("node-a", lease=7)  # listed at revision 5
    m.apply(WatchBatch(9, ()))  # created: the store is at 9 already
    m.apply(put(6, KEYS.election("node-b"), lease=8))  # then the events from 6 on arrive
    m.campaigned(9)
    assert m.publisher() == "node-b"
    assert not m.decide(0.1, eligible=True).holds_lease


def test_no_lease_before_the_view_has_caught_up_with_our_own_candidacy() -> None:
    """Found on the real cluster: a node listed the prefix at revision 1, campaigned and got
    revision 7; older candidacies (5, 6) were still on their way through its watch, and it
    believed it was the oldest."""
    m = member("node-c")
    m.lease_granted(9, 10, 0.0)
    m.reset(1, [])
    m.campaigned(7)
    assert not m.decide(0.1, eligible=True).holds_lease  # view at 1, our candidacy at 7
    m.apply(put(5, KEYS.election("node-a"), lease=7))
    m.apply(put(6, KEYS.election("node-b"), lease=8))
    m.apply(put(7, KEYS.election("node-c"), lease=9))
    d = m.decide(0.2, eligible=True)
    assert d.publisher == "node-a" and not d.holds_lease


def test_every_key_of_a_revoked_lease_goes_even_though_they_share_one_revision() -> None:
    """Found on the real cluster: a lease revoke deletes the record and the candidacy in one
    revision; skipping the second event as "already seen" left a dead node in the view."""
    m = joined("node-b", lease=8)
    m.apply(put(6, KEYS.node("node-a"), record("node-a"), lease=7))
    m.apply(put(7, KEYS.election("node-a"), lease=7))
    both = WatchBatch(
        9,
        (
            WatchEvent("delete", KeyValue(KEYS.election("node-a"), b"", 0, 9, 0)),
            WatchEvent("delete", KeyValue(KEYS.node("node-a"), b"", 0, 9, 0)),
        ),
    )
    m.apply(both)
    assert m.live_peers() == {} and m.publisher() is None
