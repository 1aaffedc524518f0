"""Unit tests for each election rule (pure state machine, injected time)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import pytest

from rustbalance.cluster.election import (
    Action,
    BecomePublisher,
    Election,
    ElectionTimings,
    InformPeer,
    PublisherReport,
    RelayBelief,
    SendLeaseClaim,
    SendLeaseRelease,
    StepDown,
    validate_timings,
)
from rustbalance.cluster.messages import MAX_REPORT_HOPS, MAX_U64, CoordinationError, Role

P, S = Role.PUBLISHER, Role.STANDBY
T = ElectionTimings()  # 5 / 15 / 15


def node(node_id: str = "b", priority: int = 10, boot: float = 0.0, **kw: object) -> Election:
    return Election(node_id, priority, boot_time=boot, **kw)  # type: ignore[arg-type]


def claimed(actions: Sequence[object]) -> bool:
    return any(isinstance(a, BecomePublisher) for a in actions)


# Every sender's sequence numbers only grow (messages.Sender); one counter for all is enough.
_SEQ = itertools.count(1000)


def hb(
    e: Election,
    sender: str,
    role: Role,
    priority: int,
    term: int,
    eligible: bool,
    now: float,
    report: PublisherReport | None = None,
    seq: int | None = None,
) -> list[Action]:
    s = next(_SEQ) if seq is None else seq
    return e.on_heartbeat(sender, role, priority, term, eligible, now, seq=s, report=report)


def claim(e: Election, sender: str, term: int, priority: int, now: float) -> list[Action]:
    return e.on_lease_claim(sender, term, priority, now, seq=next(_SEQ))


def release(e: Election, sender: str, term: int, now: float) -> list[Action]:
    return e.on_lease_release(sender, term, now, seq=next(_SEQ))


def test_validate_timings() -> None:
    validate_timings(5, 15, 15)
    validate_timings(5, 10.01, 5)
    for bad in [(5, 10, 15), (5, 15, 4.9), (0, 15, 15), (5, -1, 5)]:
        with pytest.raises(CoordinationError):
            validate_timings(*bad)
    with pytest.raises(CoordinationError):
        ElectionTimings(10, 15, 15)
    assert T.failover_bound == 35
    assert T.discovery_window == 10
    # Always shorter than the timeout: validate_timings keeps the timeout above two intervals.
    assert ElectionTimings(5, 10.01, 5).discovery_window < 10.01


def test_single_node_is_publisher_at_once() -> None:
    e = node(single_node=True)
    assert e.tick(0.0) == [BecomePublisher(1), SendLeaseClaim(1, 10)]
    assert e.is_publisher and e.publisher(0.0) == "b"
    assert e.tick(1.0) == []


def test_alone_in_a_cluster_claims_after_the_discovery_window() -> None:
    # Nothing heard at all: the node claims when its window ends (10 s), not timeout + grace
    # (30 s) after its boot.
    e = node(boot=100.0)
    assert e.tick(109.9) == []
    assert e.tick(110.0) == [BecomePublisher(1), SendLeaseClaim(1, 10)]


def test_ineligible_never_claims() -> None:
    e = node(eligible=False)
    assert e.tick(1000.0) == []
    assert not e.is_publisher


def test_total_order_priority_then_id() -> None:
    e = node("b", 10)
    hb(e, "a", S, 10, 0, True, 9.0)  # same priority, smaller id: a wins
    assert e.tick(10.0) == []
    e2 = node("b", 5)
    hb(e2, "a", S, 10, 0, True, 9.0)  # lower priority number wins over id
    assert claimed(e2.tick(10.0))
    e3 = node("b", 10)
    hb(e3, "a", S, 10, 0, False, 9.0)  # an ineligible better node does not count
    assert claimed(e3.tick(10.0))


def test_standby_waits_for_timeout_plus_grace_of_publisher_silence() -> None:
    e = node("b", 10)
    hb(e, "a", P, 10, 1, True, 100.0)  # last word of the publisher
    assert e.tick(114.0) == []
    e.on_peer_expired("a", 115.1)
    assert e.publisher(115.1) is None
    assert e.tick(129.9) == []  # still within the grace
    assert e.tick(130.0) == [BecomePublisher(2), SendLeaseClaim(2, 10)]


def test_only_best_live_standby_takes_over() -> None:
    b, c = node("b", 10), node("c", 10)
    for e in (b, c):
        hb(e, "a", P, 10, 1, True, 100.0)
    hb(b, "c", S, 10, 1, True, 125.0)
    hb(c, "b", S, 10, 1, True, 125.0)
    assert claimed(b.tick(130.0))
    assert c.tick(130.0) == []


def test_publisher_steps_down_for_better_live_publisher() -> None:
    e = node("b", 10)
    assert claimed(e.tick(30.0))
    # A worse-ranked publisher does not move us; it is told about us at once instead.
    assert hb(e, "c", P, 10, 5, True, 31.0) == [InformPeer("c")]
    assert e.is_publisher and e.term == 5
    actions = hb(e, "a", P, 10, 1, True, 32.0)  # better-ranked, older term: still wins
    # ... and our belief changed (a, not us): relay it at once.
    assert actions == [StepDown("better-ranked publisher a is live"), RelayBelief()]
    assert e.role is S and e.publisher(32.0) == "a"


def test_better_standby_preempts_worse_publisher() -> None:
    e = node("a", 1, boot=0.0)
    hb(e, "b", P, 10, 3, True, 5.0)
    assert e.tick(9.9) == []  # still learning the cluster (up < the discovery window)
    assert e.tick(10.0) == [BecomePublisher(4), SendLeaseClaim(4, 1)]


def test_lease_release_hands_over_at_once() -> None:
    e = node("b", 10)
    hb(e, "a", P, 10, 3, True, 100.0)
    assert release(e, "a", 3, 101.0) == [
        BecomePublisher(4),
        SendLeaseClaim(4, 10),
        RelayBelief(),
    ]


def test_lease_release_to_second_best_waits_for_best() -> None:
    c = node("c", 10)
    hb(c, "a", P, 10, 3, True, 100.0)
    hb(c, "b", S, 10, 3, True, 100.0)
    # b ranks better and is live: c only tells its neighbours it no longer believes in a.
    assert release(c, "a", 3, 101.0) == [RelayBelief()]
    assert c.report(101.0) is None


def test_stale_lease_release_ignored() -> None:
    e = node("b", 10)
    hb(e, "a", P, 10, 5, True, 100.0)
    assert release(e, "a", 4, 101.0) == []
    assert e.publisher(101.0) == "a"
    assert release(e, "unknown", 9, 101.0) == []


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
    hb(e, "x", S, 10, 7, True, 31.0)
    assert e.term == 7
    assert claim(e, "a", 6, 1, 32.0) == []  # stale: no step-down
    assert e.is_publisher
    assert claim(e, "a", 7, 1, 33.0) == [
        StepDown("better-ranked publisher a is live"),
        RelayBelief(),
    ]


def test_terms_increase_monotonically() -> None:
    e = node("b", 10)
    hb(e, "a", P, 10, 9, True, 100.0)
    hb(e, "a", P, 10, 2, True, 101.0)
    assert e.term == 9
    release(e, "a", 9, 102.0)
    assert e.is_publisher and e.term == 10


def test_standby_heartbeat_from_former_publisher_means_it_stopped() -> None:
    e = node("b", 10)
    hb(e, "a", P, 1, 3, True, 100.0)
    # a restarted: it is live, better-ranked and eligible, so b still defers to it ...
    assert hb(e, "a", S, 1, 0, True, 101.0) == [RelayBelief()]
    # ... but a restarted ineligible node no longer holds b back for the grace period.
    assert claimed(hb(e, "a", S, 1, 0, False, 102.0))


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
    hb(e, "a", P, 1, 1, True, 100.0)
    hb(e, "c", P, 20, 1, True, 120.0)  # a worse publisher is live
    assert e.tick(120.0) == []  # a is silent but still in its grace: do not preempt c yet
    assert claimed(e.tick(130.0))


def test_silent_peers_are_forgotten() -> None:
    e = node("b", 10)
    hb(e, "a", S, 1, 1, True, 100.0)
    e.tick(129.0)
    assert set(e._peers) == {"a"}  # bounded state: silent peers do not accumulate
    e.tick(130.0)
    assert e._peers == {}


def test_own_messages_are_ignored() -> None:
    e = node("b", 10)
    assert hb(e, "b", P, 0, 50, True, 1.0) == []
    assert claim(e, "b", 50, 0, 1.0) == []
    assert e.term == 0


# -- believed-publisher reports (non-transitive partitions) ------------------------------------


def rep(
    publisher: str = "a", priority: int = 10, term: int = 1, seq: int = 500, age: float = 0.0
) -> PublisherReport:
    return PublisherReport(publisher, priority, term, seq, int(age * 1000), 0)


def test_relayed_better_publisher_blocks_a_worse_claim() -> None:
    # b hears only c (ranks worse: 30); a publishes on c's side only. Without c's report b
    # would claim, as the control shows: it is the best live eligible node it knows.
    control = node("b", 20)
    hb(control, "c", S, 30, 1, True, 9.0)
    assert claimed(control.tick(10.0))

    e = node("b", 20)
    hb(e, "c", S, 30, 1, True, 9.0, report=rep(age=0.5))
    assert e.tick(10.0) == []
    assert e.publisher(10.0) == "a" and not e.is_publisher
    # b passes the belief on: one more relay, age grown by the time it held it (rounded up).
    assert e.report(11.0) == PublisherReport("a", 10, 1, 500, 2500, 1)


def test_publisher_steps_down_when_a_neighbour_reports_a_better_one() -> None:
    e = node("b", 20)
    assert claimed(e.tick(30.0))
    actions = hb(e, "c", S, 30, 1, True, 31.0, report=rep(seq=900))
    assert actions == [StepDown("better-ranked publisher a is reported live"), RelayBelief()]
    assert e.role is S and e.publisher(31.0) == "a"


def test_worse_reported_publisher_is_preempted() -> None:
    e = node("a", 10)
    hb(e, "c", S, 30, 1, True, 9.0, report=rep("b", 20, 3))
    assert claimed(e.tick(10.0))  # rule (b): the only live publisher ranks worse
    assert e.report(10.0) == PublisherReport("a", 10, 4, 0, 0, 0)  # we publish: we say so


def test_stale_report_does_not_block_failover() -> None:
    # a's last sign of life reached c at t=100; c keeps reporting it (same seq, growing age)
    # until its own timeout, then reports nothing. b takes over timeout + grace after t=100.
    e = node("b", 20)
    for t in range(100, 116):
        hb(e, "c", S, 30, 1, True, float(t), report=rep(seq=700, age=t - 100.0))
        assert e.publisher(float(t)) == "a"
    hb(e, "c", S, 30, 1, True, 116.0, report=rep(seq=700, age=15.0))
    assert e.publisher(116.0) is None  # older than the timeout: not live any more ...
    assert e.tick(129.9) == []  # ... but the grace still holds a better publisher's place
    assert e.tick(130.0) == [BecomePublisher(2), SendLeaseClaim(2, 20)]


def test_echoed_report_is_not_news() -> None:
    # A relay that keeps repeating one sign of life with age 0 (an echo through a cycle) does
    # not keep a dead publisher alive: only a newer sequence number refreshes a sighting.
    e = node("b", 20)
    for t in range(100, 130):
        hb(e, "c", S, 30, 1, True, float(t), report=rep(seq=700, age=0.0))
    assert e.publisher(129.0) is None
    assert e.tick(129.9) == []
    assert claimed(e.tick(130.0))


def test_a_report_older_than_the_timeout_only_holds_back() -> None:
    e = node("b", 20)
    assert claimed(e.tick(30.0))
    assert hb(e, "c", S, 30, 1, True, 31.0, report=rep(age=15.5)) == []  # not live: stays
    assert e.is_publisher


def test_withdrawn_report_is_not_live_but_keeps_its_grace() -> None:
    e = node("b", 20)
    assert claimed(e.tick(30.0))
    hb(e, "c", S, 30, 1, True, 40.0, report=rep())
    assert not e.is_publisher and e.publisher(41.0) == "a"
    # c no longer names a (a went silent for c, or released): not live any more for b ...
    assert hb(e, "c", S, 30, 1, True, 42.0, report=None) == [RelayBelief()]
    assert e.publisher(42.0) is None
    assert e.report(42.0) is None  # ... so b does not pass it on either ...
    # ... but a crash and a release look the same through c: b waits out a's grace.
    assert e.tick(69.9) == []
    assert claimed(e.tick(70.0))


def test_withdrawn_sighting_revives_with_news() -> None:
    e = node("b", 20, eligible=False)
    hb(e, "c", S, 30, 1, True, 40.0, report=rep(seq=10))
    hb(e, "c", S, 30, 1, True, 41.0, report=None)
    hb(e, "c", S, 30, 1, True, 42.0, report=rep(seq=10))  # the same old news: still withdrawn
    assert e.publisher(42.0) is None
    hb(e, "c", S, 30, 1, True, 43.0, report=rep(seq=11))
    assert e.publisher(43.0) == "a"


def test_direct_standby_news_beats_older_reports() -> None:
    e = node("b", 20, eligible=False)  # an observer: its own claims would blur the view
    hb(e, "a", S, 10, 1, True, 40.0, seq=600)  # a itself: standby as of its message 600
    hb(e, "a", S, 10, 1, True, 41.0, seq=601)
    e.on_peer_expired("a", 60.0)
    hb(e, "c", S, 30, 1, True, 60.0, report=rep(seq=550))  # an older message of a
    assert e.publisher(60.0) is None
    hb(e, "c", S, 30, 1, True, 61.0, report=rep(seq=650))  # a newer one: a publishes now
    assert e.publisher(61.0) == "a"


def test_release_beats_reports_of_the_lease() -> None:
    e = node("b", 20)
    hb(e, "a", P, 10, 3, True, 100.0, seq=800)
    assert e.on_lease_release("a", 3, 100.5, seq=801) == [
        BecomePublisher(4),
        SendLeaseClaim(4, 20),
        RelayBelief(),
    ]
    # c still relays a's last heartbeat: it is older than the release, so it changes nothing.
    assert hb(e, "c", S, 30, 3, True, 101.0, report=rep(term=3, seq=800)) == []
    assert e.is_publisher


def test_report_hop_limit() -> None:
    e = node("b", 20, eligible=False)
    far = PublisherReport("a", 10, 1, 500, 0, MAX_REPORT_HOPS)
    hb(e, "c", S, 30, 1, True, 40.0, report=far)
    assert e.publisher(40.0) is None  # one relay too many
    near = PublisherReport("a", 10, 1, 501, 0, MAX_REPORT_HOPS - 1)
    hb(e, "c", S, 30, 1, True, 41.0, report=near)
    report = e.report(41.0)
    assert report is not None and report.hops == MAX_REPORT_HOPS


def test_reports_naming_us_or_their_sender_are_ignored() -> None:
    e = node("b", 20)
    assert claimed(e.tick(30.0))
    hb(e, "c", S, 30, 1, True, 31.0, report=PublisherReport("b", 20, 1, 5, 0, 2))
    assert e.is_publisher and e.publisher(31.0) == "b"
    # c claims to be a better publisher in its report but its heartbeat says standby.
    hb(e, "c", S, 1, 1, True, 32.0, report=PublisherReport("c", 1, 9, 5, 0, 0))
    assert e.is_publisher


def test_relay_only_for_news() -> None:
    e = node("c", 30)
    assert hb(e, "a", P, 10, 1, True, 40.0, seq=900) == [RelayBelief()]  # new belief
    assert hb(e, "a", P, 10, 1, True, 41.0, seq=901) == [RelayBelief()]  # newer sign of life
    assert hb(e, "d", S, 40, 1, True, 41.5, report=rep(seq=901)) == []  # known already
    assert hb(e, "d", S, 40, 1, True, 42.0, report=rep(seq=850)) == []  # older: an echo


# -- fast first election (the discovery window) ------------------------------------------------


def test_fresh_cluster_elects_the_best_node_when_the_window_ends() -> None:
    # Three nodes start together and hear each other's standby heartbeats (no publisher yet).
    nodes = {k: node(k, prio) for k, prio in (("a", 10), ("b", 20), ("c", 30))}
    for t in (0.5, 5.5):
        for k, e in nodes.items():
            for other, o in nodes.items():
                if other != k:
                    assert not claimed(hb(e, other, S, o.priority, 0, True, t, o.report(t)))
    assert all(e.tick(9.9) == [] for e in nodes.values())
    # At 10 s (the window), not 30 s (timeout + grace): only the best-ranked node claims.
    assert nodes["a"].tick(10.0) == [BecomePublisher(1), SendLeaseClaim(1, 10)]
    assert nodes["b"].tick(10.0) == [] and nodes["c"].tick(10.0) == []
    for k in "bc":
        assert claim(nodes[k], "a", 1, 10, 10.1) == [RelayBelief()]  # follows a from now on
    t = 10.5
    while t < 100.0:
        for k in "bc":
            assert not claimed(hb(nodes[k], "a", P, 10, 1, True, t))
            assert not claimed(nodes[k].tick(t + 2.0))
            assert nodes[k].publisher(t + 2.0) == "a"
        t += 5.0


def test_restart_next_to_a_live_publisher_follows_it_and_never_claims() -> None:
    # c (worst) restarts at 100 while a publishes; it hears a once in its window, and keeps
    # hearing it (directly, and through b's reports) every interval afterwards.
    c = node("c", 30, boot=100.0)
    assert hb(c, "a", P, 10, 4, True, 103.0) == [RelayBelief()]
    t = 103.0
    while t < 200.0:
        hb(c, "b", S, 20, 4, True, t + 1.0, rep(term=4, seq=int(t * 10), age=0.1))
        assert not claimed(hb(c, "a", P, 10, 4, True, t + 5.0))
        for step in range(10):
            assert not claimed(c.tick(t + step * 0.5))
        assert c.publisher(t + 5.0) == "a" and not c.is_publisher
        t += 5.0


def test_boot_with_a_lost_first_heartbeat_still_follows() -> None:
    # A two-node cluster: a publishes, c restarts at 100. c's boot heartbeat names no
    # publisher, so a answers it at once ...
    a = node("a", 10)
    assert claimed(a.tick(10.0))
    assert hb(a, "c", S, 30, 0, True, 100.0) == [InformPeer("c")]
    # ... but that answer and a's next periodic heartbeat (102) are lost. a's answer to c's
    # next heartbeat (105), or its periodic one at 107, arrives: inside the window (110).
    c = node("c", 30, boot=100.0)
    for t in (100.0, 101.0, 102.0, 103.0, 104.0, 105.0, 106.0):
        assert c.tick(t) == []
    assert hb(c, "a", P, 10, 1, True, 107.0) == [RelayBelief()]
    t = 107.0
    while t < 200.0:
        assert not claimed(c.tick(t + 2.5))
        assert not claimed(hb(c, "a", P, 10, 1, True, t + 5.0))
        t += 5.0
    assert c.publisher(200.0) == "a"


def test_every_sign_lost_in_the_window_double_publisher_ends_within_a_round_trip() -> None:
    # The fallback: c hears nothing of a during its whole window and claims at 110 ...
    c = node("c", 30, boot=100.0)
    assert c.tick(109.9) == []
    assert claimed(c.tick(110.0))
    # ... a (and any node believing in a) answers the claim at once with its heartbeat ...
    a = node("a", 10)
    assert claimed(a.tick(10.0))
    assert claim(a, "c", 1, 30, 110.01) == [InformPeer("c")]
    assert a.is_publisher
    # ... and c steps down as soon as it arrives: one round trip of double publishing (or,
    # if the answer is lost too, until a's next periodic heartbeat, within an interval).
    actions = hb(c, "a", P, 10, 1, True, 110.02)
    assert actions == [StepDown("better-ranked publisher a is live"), RelayBelief()]
    assert c.publisher(110.02) == "a"


def test_a_publisher_heard_in_the_window_keeps_its_grace() -> None:
    # a was heard (as publisher) at 2 s and then fell silent: the fast path does not apply,
    # b waits timeout + grace after a's last sign of life, as for any publisher death.
    e = node("b", 20)
    hb(e, "a", P, 10, 1, True, 2.0)
    for t in (10.0, 20.0, 31.9):
        assert e.tick(t) == []
    assert claimed(e.tick(32.0))
    # The same through a neighbour's report only (a's sign of life was 1 s old at 2 s).
    r = node("b", 20)
    hb(r, "c", S, 30, 1, True, 2.0, rep(age=1.0))
    hb(r, "c", S, 30, 1, True, 7.0, report=None)  # c stopped hearing a: withdrawn
    assert r.tick(30.9) == []
    assert claimed(r.tick(31.0))


def test_a_release_in_the_window_does_not_hold_back() -> None:
    e = node("b", 20)
    hb(e, "a", P, 10, 3, True, 2.0)
    assert release(e, "a", 3, 3.0) == [RelayBelief()]  # still learning: no claim yet
    assert e.tick(9.9) == []
    assert e.tick(10.0) == [BecomePublisher(4), SendLeaseClaim(4, 20)]


def test_inform_only_peers_that_do_not_know_our_publisher() -> None:
    e = node("b", 20)
    hb(e, "a", P, 10, 1, True, 1.0, seq=100)
    assert hb(e, "c", S, 30, 1, True, 2.0) == [InformPeer("c")]  # names none
    assert hb(e, "c", S, 30, 1, True, 2.5, rep("d", 40, 1, 7)) == [InformPeer("c")]  # worse
    assert hb(e, "c", S, 30, 1, True, 3.0, rep(seq=100, age=2.0)) == []  # the same: nothing
    better = rep("x", 1, 1, 50)  # better than ours: its report moves us instead
    assert hb(e, "c", S, 30, 1, True, 3.5, better) == [RelayBelief()]
    assert e.publisher(3.5) == "x"
    # A worse claim is answered, a better one is followed.
    assert claim(e, "d", 1, 40, 4.0) == [InformPeer("d")]
    assert claim(e, "w", 1, 0, 4.5) == [RelayBelief()]
    # A node that knows no publisher has nothing to tell.
    fresh = node("f", 50)
    assert hb(fresh, "c", S, 30, 0, True, 1.0) == []
    assert claim(fresh, "c", 1, 30, 2.0) == [RelayBelief()]


# -- terms follow the wall clock (issue 16) -----------------------------------------------------


def test_a_claim_takes_the_wall_clock_as_its_term() -> None:
    """Terms are bounded by time: a claim takes max(highest seen + 1, now in ms), so every
    honest term sits at the clock and receivers can refuse anything far ahead of theirs."""
    clock = {"ms": 1_700_000_000_000}
    e = node("a", 10, wall_ms=lambda: clock["ms"])
    assert e.tick(10.0) == [
        BecomePublisher(1_700_000_000_000),
        SendLeaseClaim(1_700_000_000_000, 10),
    ]
    e = node("a", 10, wall_ms=lambda: clock["ms"])
    hb(e, "b", S, 20, 1_700_000_000_500, True, 1.0)  # a higher term was seen: + 1
    assert e.tick(10.0)[0] == BecomePublisher(1_700_000_000_501)


def test_a_claim_at_the_64_bit_limit_never_raises() -> None:
    """Finding 3 of issue 16: a term of 2**64 - 2 once made the next claim overflow the wire
    and a re-claim raise out of the apply step. The coordinator refuses such terms before they
    get here (tests/reliability/test_handler_fuzz.py); the election saturates instead of raising."""
    e = node("a", 10)
    hb(e, "b", S, 20, MAX_U64 - 1, True, 1.0)
    actions = e.tick(10.0)
    assert actions == [BecomePublisher(MAX_U64), SendLeaseClaim(MAX_U64, 10)]
    assert e.set_eligible(False, 11.0)[0] == StepDown("no longer publisher-eligible")
    assert e.set_eligible(True, 11.0)[0] == BecomePublisher(MAX_U64)  # re-claims, no raise
