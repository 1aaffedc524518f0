"""Unit tests for each election rule (pure state machine, injected time)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from rustbalance.cluster.election import (
    BecomePublisher,
    Election,
    ElectionTimings,
    SendLeaseClaim,
    SendLeaseRelease,
    StepDown,
    validate_timings,
)
from rustbalance.cluster.messages import CoordinationError, Role

P, S = Role.PUBLISHER, Role.STANDBY
T = ElectionTimings()  # 5 / 15 / 15


def node(node_id: str = "b", priority: int = 10, boot: float = 0.0, **kw: object) -> Election:
    return Election(node_id, priority, boot_time=boot, **kw)  # type: ignore[arg-type]


def claimed(actions: Sequence[object]) -> bool:
    return any(isinstance(a, BecomePublisher) for a in actions)


def test_validate_timings() -> None:
    validate_timings(5, 15, 15)
    validate_timings(5, 10.01, 5)
    for bad in [(5, 10, 15), (5, 15, 4.9), (0, 15, 15), (5, -1, 5)]:
        with pytest.raises(CoordinationError):
            validate_timings(*bad)
    with pytest.raises(CoordinationError):
        ElectionTimings(10, 15, 15)
    assert T.failover_bound == 35


def test_single_node_is_publisher_at_once() -> None:
    e = node(single_node=True)
    assert e.tick(0.0) == [BecomePublisher(1), SendLeaseClaim(1, 10)]
    assert e.is_publisher and e.publisher(0.0) == "b"
    assert e.tick(1.0) == []


def test_alone_in_a_cluster_claims_after_timeout_plus_grace() -> None:
    e = node(boot=100.0)
    assert e.tick(129.0) == []
    assert e.tick(130.0) == [BecomePublisher(1), SendLeaseClaim(1, 10)]


def test_ineligible_never_claims() -> None:
    e = node(eligible=False)
    assert e.tick(1000.0) == []
    assert not e.is_publisher


def test_total_order_priority_then_id() -> None:
    e = node("b", 10)
    e.on_heartbeat("a", S, 10, 0, True, 29.0)  # same priority, smaller id: a wins
    assert e.tick(30.0) == []
    e2 = node("b", 5)
    e2.on_heartbeat("a", S, 10, 0, True, 29.0)  # lower priority number wins over id
    assert claimed(e2.tick(30.0))
    e3 = node("b", 10)
    e3.on_heartbeat("a", S, 10, 0, False, 29.0)  # an ineligible better node does not count
    assert claimed(e3.tick(30.0))


def test_standby_waits_for_timeout_plus_grace_of_publisher_silence() -> None:
    e = node("b", 10)
    e.on_heartbeat("a", P, 10, 1, True, 100.0)  # last word of the publisher
    assert e.tick(114.0) == []
    e.on_peer_expired("a", 115.1)
    assert e.publisher(115.1) is None
    assert e.tick(129.9) == []  # still within the grace
    assert e.tick(130.0) == [BecomePublisher(2), SendLeaseClaim(2, 10)]


def test_only_best_live_standby_takes_over() -> None:
    b, c = node("b", 10), node("c", 10)
    for e in (b, c):
        e.on_heartbeat("a", P, 10, 1, True, 100.0)
    b.on_heartbeat("c", S, 10, 1, True, 125.0)
    c.on_heartbeat("b", S, 10, 1, True, 125.0)
    assert claimed(b.tick(130.0))
    assert c.tick(130.0) == []


def test_publisher_steps_down_for_better_live_publisher() -> None:
    e = node("b", 10)
    assert claimed(e.tick(30.0))
    assert e.on_heartbeat("c", P, 10, 5, True, 31.0) == []  # worse-ranked: ignored
    assert e.term == 5
    actions = e.on_heartbeat("a", P, 10, 1, True, 32.0)  # better-ranked, older term: still wins
    assert actions == [StepDown("better-ranked publisher a is live")]
    assert e.role is S and e.publisher(32.0) == "a"


def test_better_standby_preempts_worse_publisher() -> None:
    e = node("a", 1, boot=0.0)
    e.on_heartbeat("b", P, 10, 3, True, 5.0)
    assert e.tick(14.0) == []  # still learning the cluster (up < timeout)
    assert e.tick(15.0) == [BecomePublisher(4), SendLeaseClaim(4, 1)]


def test_lease_release_hands_over_at_once() -> None:
    e = node("b", 10)
    e.on_heartbeat("a", P, 10, 3, True, 100.0)
    assert e.on_lease_release("a", 3, 101.0) == [BecomePublisher(4), SendLeaseClaim(4, 10)]


def test_lease_release_to_second_best_waits_for_best() -> None:
    c = node("c", 10)
    c.on_heartbeat("a", P, 10, 3, True, 100.0)
    c.on_heartbeat("b", S, 10, 3, True, 100.0)
    assert c.on_lease_release("a", 3, 101.0) == []  # b ranks better and is live


def test_stale_lease_release_ignored() -> None:
    e = node("b", 10)
    e.on_heartbeat("a", P, 10, 5, True, 100.0)
    assert e.on_lease_release("a", 4, 101.0) == []
    assert e.publisher(101.0) == "a"
    assert e.on_lease_release("unknown", 9, 101.0) == []


def test_shutdown_releases_lease() -> None:
    e = node("b", single_node=True)
    e.tick(0.0)
    assert e.shutdown(1.0) == [StepDown("shutdown"), SendLeaseRelease(1)]
    assert e.tick(2.0) == [] and not e.is_publisher
    standby = node("c")
    assert standby.shutdown(1.0) == []


def test_claims_with_lower_term_are_ignored() -> None:
    e = node("b", 10)
    assert claimed(e.tick(30.0))
    e.on_heartbeat("x", S, 10, 7, True, 31.0)
    assert e.term == 7
    assert e.on_lease_claim("a", 6, 1, 32.0) == []  # stale: no step-down
    assert e.is_publisher
    assert e.on_lease_claim("a", 7, 1, 33.0) == [StepDown("better-ranked publisher a is live")]


def test_terms_increase_monotonically() -> None:
    e = node("b", 10)
    e.on_heartbeat("a", P, 10, 9, True, 100.0)
    e.on_heartbeat("a", P, 10, 2, True, 101.0)
    assert e.term == 9
    e.on_lease_release("a", 9, 102.0)
    assert e.is_publisher and e.term == 10


def test_standby_heartbeat_from_former_publisher_means_it_stopped() -> None:
    e = node("b", 10)
    e.on_heartbeat("a", P, 1, 3, True, 100.0)
    # a restarted: it is live, better-ranked and eligible, so b still defers to it ...
    assert e.on_heartbeat("a", S, 1, 0, True, 101.0) == []
    # ... but a restarted ineligible node no longer holds b back for the grace period.
    assert claimed(e.on_heartbeat("a", S, 1, 0, False, 102.0))


def test_ineligible_publisher_steps_down_and_releases() -> None:
    e = node("b", single_node=True)
    e.tick(0.0)
    assert e.set_eligible(False, 1.0) == [
        StepDown("no longer publisher-eligible"),
        SendLeaseRelease(1),
    ]
    assert e.set_eligible(True, 2.0) == [BecomePublisher(2), SendLeaseClaim(2, 10)]


def test_better_publisher_within_grace_holds_back_takeover() -> None:
    e = node("b", 10)
    e.on_heartbeat("a", P, 1, 1, True, 100.0)
    e.on_heartbeat("c", P, 20, 1, True, 120.0)  # a worse publisher is live
    assert e.tick(120.0) == []  # a is silent but still in its grace: do not preempt c yet
    assert claimed(e.tick(130.0))


def test_silent_peers_are_forgotten() -> None:
    e = node("b", 10)
    e.on_heartbeat("a", S, 1, 1, True, 100.0)
    e.tick(129.0)
    assert set(e._peers) == {"a"}  # bounded state: silent peers do not accumulate
    e.tick(130.0)
    assert e._peers == {}


def test_own_messages_are_ignored() -> None:
    e = node("b", 10)
    assert e.on_heartbeat("b", P, 0, 50, True, 1.0) == []
    assert e.on_lease_claim("b", 50, 0, 1.0) == []
    assert e.term == 0
