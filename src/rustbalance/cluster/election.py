"""Publisher election: a pure state machine (the caller passes ``now``; outputs are actions).

Fixes W5 of the original (priorities not gossiped, no tie-break, evaluated every 600 s, no
step-down, no lease release) and the failover time of 10-20 minutes. Rules:

- Nodes are totally ordered by ``(priority, node_id)``; the lower tuple ranks better.
- Liveness is local: a peer is live while its last heartbeat (or claim) is at most
  ``heartbeat_timeout`` old on *our* clock, so clock skew between nodes never matters here.
- A *sighting* is the latest sign of life of another node as publisher: its own heartbeat or
  claim (direct), or a neighbour's *believed publisher* report (relayed, see below). A publisher
  is *live* while its sighting is at most ``heartbeat_timeout`` old.
- A standby claims the lease when it is eligible, up for at least the *discovery window*
  (``2 × heartbeat_interval``, see "Fast first election" below: so it knows the cluster), the
  best-ranked live eligible node among its neighbours, no better-ranked publisher was sighted
  within ``heartbeat_timeout + takeover_grace``, and either
  (a) no publisher was sighted within ``heartbeat_timeout + takeover_grace`` (a publisher that
  sent ``lease_release`` or a standby heartbeat is known to have stopped, so it does not hold
  the takeover back; one never sighted since our boot does not either), or
  (b) every live publisher ranks worse than us (the best-ranked eligible node publishes; the
  worse one steps down when it hears us).
- A publisher steps down as soon as it sights a better-ranked live publisher, so a healed
  partition converges to one publisher within a heartbeat interval.
- ``shutdown`` sends ``lease_release``; receivers treat the releasing publisher as gone at once,
  so the next best node takes over without waiting for the timeout.
- Terms only grow: a claim takes ``max(max seen + 1, now in unix ms)``; a claim with a lower
  term than seen is ignored (a delayed or stale claim). Heartbeats are always trusted for
  liveness and role, whatever their term, because ranking - not terms - decides between two
  publishers. *Terms* follow the wall clock so that they are bounded: the coordinator refuses
  any message whose term is more than the clock-skew tolerance ahead of its own clock, so a
  term can never be pushed towards the 64-bit limit (issue 16: a term of 2^64 - 2 once left
  no room for the next claim), and an honest claim is always below every receiver's bound.
- Who may take part is not the election's business: the coordinator passes only messages of
  admitted nodes, with priority and eligibility from their admission records
  (:mod:`rustbalance.cluster.authority`), and reports only after checking the publisher's
  signed statement.
- ``single_node`` (no peers configured): the node is publisher from its first tick.

Non-transitive partitions (A hears C, C hears B, A and B do not hear each other). Without more,
A and B would both claim when C ranks worse than both. So every heartbeat carries the sender's
*believed publisher* (:class:`PublisherReport`: the best-ranked
publisher it sights live, or itself), and a receiver counts that report as a sighting of that
publisher, exactly like a direct one: so B does not claim, or steps down, while a neighbour
reports a live, better-ranked A. Reports are relayed hop by hop (C's own report names A, and so
on), so once stable there is at most one publisher among nodes connected through *any* path:
the best-ranked eligible node of that connected component. A report is bounded so that a stale
one never blocks failover:

- freshness: the report carries the age of A's sign of life, summed over the relays (each adds
  the time it held it, on its own clock), so a dead A stops counting as live everywhere
  ``heartbeat_timeout`` after its last message reached anyone (plus one datagram transit per
  relay), and stops holding takeovers back ``takeover_grace`` later, as a direct sighting would;
- order: the report carries A's own sequence number; only a newer one refreshes a sighting, so a
  report echoed back through a cycle is never news, and a standby heartbeat or ``lease_release``
  from A itself beats every report of an older message of A;
- withdrawal: a sighting learned from neighbour N stops counting as live as soon as N's next
  heartbeat names another publisher (or none): N changed its mind (A went silent for N's
  timeout, stepped down, released, or N learned of a better one). Its time still holds a
  takeover back until ``timeout + grace`` after A's last sign of life, as a direct silence
  would: through a relay a standby cannot tell a crash from a release, so a release only hands
  over at once to A's direct neighbours;
- hops: reports relayed through more than ``MAX_REPORT_HOPS`` nodes are ignored;
- a report naming ourselves or its own sender is ignored (our own and the sender's heartbeat
  say more).

Relaying only in the periodic heartbeat would add up to one interval of age per hop, so a node
a few hops from the publisher would see it age past the timeout between two refreshes. Instead
a node relays at once (the :class:`RelayBelief` action: the shell sends its heartbeat early,
at most once per half interval) when it learns a newer sign of life of the publisher it
believes in, or its belief changes; in steady state the heartbeats of a cluster run in one wave
behind the publisher's, and a report is as old as its transit time at any distance.

A crashed publisher is replaced ``timeout + grace`` after its last heartbeat reached the best
standby (directly or through relays), so within ``interval + timeout + grace`` of the crash
(35 s with the defaults 5/15/15 s, inside the 45 s target) instead of the original's
10-20 minutes.

Fast first election. The grace protects a publisher that is alive but was not heard for a
while; a node that has just started has heard nothing yet, and waiting ``timeout + grace`` from
its boot (as before) made a fresh cluster publish 30 s late. Instead it listens for the
discovery window ``W = 2 × heartbeat_interval`` (10 s by default; always shorter than the
timeout, which ``validate_timings`` keeps above two intervals) and then claims at once if no
publisher was sighted (directly, in a claim, or in any neighbour's report) and it is the
best-ranked live eligible node it heard, itself included. A publisher seen in the window is
followed as before, and its silence is waited out for ``timeout + grace`` as before.

Why W is long enough for a node (re)starting next to a live publisher P in its connected
component: every neighbour sends a heartbeat at least every ``interval`` (plus the shell's
tick, at most 1 s), and that heartbeat is P's own or names P; moreover a neighbour that hears
a heartbeat naming no publisher, or a worse one than its own belief, or a claim worse than it,
answers that sender at once (the :class:`InformPeer` action). Our first heartbeat goes out at
boot and the next one an interval later, both naming no publisher, so within W every live
neighbour sends us P at least three times (two answers and at least one periodic heartbeat):
one lost datagram, or several, cannot hide P. If all of them are lost, we claim after W
wrongly; the step-down rule ends it as soon as one sign of P arrives: our claim and the early
heartbeat that follows it are answered at once by every neighbour that believes in the better
P (one round trip), else P's next periodic heartbeat or a neighbour's report does it within an
interval (plus a tick and a transit). A better-ranked restarted node claiming after W is no
theft: rule (b) makes the best-ranked eligible node publish anyway.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from rustbalance.cluster.messages import (
    MAX_REPORT_HOPS,
    MAX_U8,
    MAX_U32,
    MAX_U64,
    CoordinationError,
    Role,
    check_node_id,
)
from rustbalance.cluster.wire import check_uint

__all__ = [
    "Action",
    "BecomePublisher",
    "Election",
    "ElectionTimings",
    "InformPeer",
    "PublisherReport",
    "RelayBelief",
    "SendLeaseClaim",
    "SendLeaseRelease",
    "StepDown",
    "validate_timings",
]


def validate_timings(interval: float, timeout: float, grace: float) -> None:
    """Raise CoordinationError unless ``timeout > 2 × interval`` and ``grace >= interval``.

    A timeout of at least two intervals tolerates one lost heartbeat without declaring the
    peer dead; a grace of at least one interval gives a silent publisher one more chance.
    """
    if not (interval > 0 and timeout > 0 and grace > 0):
        raise CoordinationError("heartbeat interval, timeout and takeover grace must be positive")
    if not timeout > 2 * interval:
        raise CoordinationError(
            f"heartbeat timeout ({timeout} s) must exceed twice the interval ({interval} s)"
        )
    if not grace >= interval:
        raise CoordinationError(
            f"takeover grace ({grace} s) must be at least the heartbeat interval ({interval} s)"
        )


@dataclass(frozen=True)
class ElectionTimings:
    heartbeat_interval: float = 5.0
    heartbeat_timeout: float = 15.0
    takeover_grace: float = 15.0

    def __post_init__(self) -> None:
        validate_timings(self.heartbeat_interval, self.heartbeat_timeout, self.takeover_grace)

    @property
    def discovery_window(self) -> float:
        """How long a node that just started listens before its first claim (see the top).

        Two intervals: each live neighbour's heartbeat comes at least once in it, and the
        answers to our own two heartbeats in it (``InformPeer``) come twice. Always shorter than
        the timeout, since ``validate_timings`` requires ``timeout > 2 × interval``.
        """
        return 2 * self.heartbeat_interval

    @property
    def failover_bound(self) -> float:
        """Longest time from a publisher crash until a standby claims (one interval of slack)."""
        return self.heartbeat_interval + self.heartbeat_timeout + self.takeover_grace


@dataclass(frozen=True)
class PublisherReport:
    """A believed publisher as the election sees it (the coordinator has checked the
    publisher's signed statement and taken ``priority`` from its admission record).

    ``seq`` is the publisher's own sequence number (of the message that was its latest sign of
    life): it orders reports of one publisher, so an old report echoed back through a cycle never
    counts as news. ``age_ms`` is how long before this heartbeat that sign of life reached the
    sender (measured on the sender's own clock and summed over the relays, so it never restarts
    at a hop). ``hops`` counts the nodes that relayed it before the sender (0: the sender heard
    the publisher itself, or is the publisher: receivers then ignore the report, the heartbeat's
    role already says it).
    """

    node_id: str
    priority: int
    term: int
    seq: int
    age_ms: int
    hops: int

    def __post_init__(self) -> None:
        check_node_id(self.node_id)
        check_uint(self.priority, MAX_U32, "publisher priority")
        check_uint(self.term, MAX_U64, "publisher term")
        check_uint(self.seq, MAX_U64, "publisher sequence number")
        check_uint(self.age_ms, MAX_U32, "publisher report age")
        check_uint(self.hops, MAX_U8, "publisher report hops")
        if self.hops > MAX_REPORT_HOPS:
            raise CoordinationError(
                f"publisher report relayed through {self.hops} nodes (at most {MAX_REPORT_HOPS})"
            )


@dataclass(frozen=True)
class BecomePublisher:
    term: int


@dataclass(frozen=True)
class StepDown:
    reason: str


@dataclass(frozen=True)
class SendLeaseClaim:
    term: int
    priority: int


@dataclass(frozen=True)
class SendLeaseRelease:
    term: int


@dataclass(frozen=True)
class RelayBelief:
    """Our believed publisher changed or has a newer sign of life: heartbeat early (see top)."""


@dataclass(frozen=True)
class InformPeer:
    """``node_id`` does not know the publisher we believe in (its heartbeat names none or a
    worse one, or it claimed although a better one is live): send it our heartbeat now, so a
    node that just started learns it within a round trip instead of an interval, and a wrong
    claim ends within one (see "Fast first election" at the top)."""

    node_id: str


Action = BecomePublisher | StepDown | SendLeaseClaim | SendLeaseRelease | RelayBelief | InformPeer


@dataclass
class _Peer:
    """A neighbour: a node whose own messages reach us."""

    priority: int
    eligible: bool
    role: Role
    term: int
    last_heard: float
    # The sequence number of its latest message saying it does not publish (standby heartbeat
    # or lease_release): reports of an older message of it as publisher are out of date.
    stopped_seq: int | None = None
    expired: bool = False  # the peer table declared it dead
    released: bool = False  # it sent lease_release: gone until heard again


@dataclass
class _Sighting:
    """The latest known sign of life of a node as publisher."""

    priority: int
    term: int
    seq: int  # the publisher's own sequence number of that message
    seen_at: float  # our clock: when it sent it, as far as we can tell
    hops: int  # relays between it and us (0: heard directly)
    via: str | None  # the neighbour whose report it came from; None if direct
    withdrawn: bool = False  # ``via`` stopped reporting it: not live, but its grace still runs


class Election:
    def __init__(
        self,
        node_id: str,
        priority: int,
        *,
        boot_time: float,
        eligible: bool = True,
        timings: ElectionTimings | None = None,
        single_node: bool = False,
        wall_ms: Callable[[], int] = lambda: 0,
    ) -> None:
        self.node_id = check_node_id(node_id)
        self._wall_ms = wall_ms
        self.priority = priority
        self.eligible = eligible
        self.timings = timings if timings is not None else ElectionTimings()
        self.single_node = single_node
        self.role = Role.STANDBY
        self.term = 0
        self._boot = boot_time
        self._stopped = False
        self._peers: dict[str, _Peer] = {}
        self._sightings: dict[str, _Sighting] = {}
        # What the last RelayBelief was about: (publisher, its seq).
        self._relayed: tuple[str, int] | None = None

    def __repr__(self) -> str:
        return f"Election(node_id={self.node_id!r}, role={self.role.value}, term={self.term})"

    @property
    def rank(self) -> tuple[int, str]:
        return (self.priority, self.node_id)

    @property
    def is_publisher(self) -> bool:
        return self.role is Role.PUBLISHER

    def publisher(self, now: float) -> str | None:
        """Who we believe publishes: ourselves, else the best-ranked live publisher sighted."""
        if self.is_publisher:
            return self.node_id
        best = self._believed(now)
        return best[0] if best is not None else None

    def report(self, now: float) -> PublisherReport | None:
        """The believed publisher for our next heartbeat (None: no live publisher known)."""
        if self._stopped:
            return None
        if self.is_publisher:
            return PublisherReport(self.node_id, self.priority, self.term, 0, 0, 0)
        best = self._believed(now)
        if best is None:
            return None
        node_id, s = best
        # Round the age up: a relay must never make a sign of life look fresher than it is.
        age_ms = min(math.ceil(max(0.0, now - s.seen_at) * 1000), 0xFFFFFFFF)
        return PublisherReport(node_id, s.priority, s.term, s.seq, age_ms, s.hops)

    # -- inputs -------------------------------------------------------------------------------

    def tick(self, now: float) -> list[Action]:
        horizon = self.timings.heartbeat_timeout + self.timings.takeover_grace
        # Forget peers and sightings beyond any timer that could still need them (bounded state).
        for node_id in [k for k, p in self._peers.items() if now - p.last_heard >= horizon]:
            del self._peers[node_id]
        for node_id in [k for k, s in self._sightings.items() if now - s.seen_at >= horizon]:
            del self._sightings[node_id]
        return self._evaluate(now)

    def on_heartbeat(
        self,
        sender: str,
        role: Role,
        priority: int,
        term: int,
        eligible: bool,
        now: float,
        *,
        seq: int,
        report: PublisherReport | None = None,
    ) -> list[Action]:
        """A heartbeat from ``sender``; ``seq`` is its envelope's sequence number."""
        if sender == self.node_id:
            return []
        self.term = max(self.term, term)
        before = self._belief_key(now)
        peer = self._peers.get(sender)
        stopped_seq = peer.stopped_seq if peer is not None else None
        if role is Role.PUBLISHER:
            self._sightings[sender] = _Sighting(priority, term, seq, now, 0, None)
        else:
            # A standby heartbeat is explicit news that the peer stopped publishing (it stepped
            # down or restarted), so its publisher timer no longer holds us back, and reports
            # of its older messages are out of date.
            stopped_seq = seq if stopped_seq is None else max(stopped_seq, seq)
            sighting = self._sightings.get(sender)
            if sighting is not None and (sighting.via is None or sighting.seq <= seq):
                del self._sightings[sender]
        self._peers[sender] = _Peer(
            priority=priority,
            eligible=eligible,
            role=role,
            term=term,
            last_heard=now,
            stopped_seq=stopped_seq,
        )
        self._on_report(sender, report, now)
        actions = self._evaluate(now) + self._relay(before, now)
        return actions + self._inform(sender, report, now)

    def on_lease_claim(
        self, sender: str, term: int, priority: int, now: float, *, seq: int
    ) -> list[Action]:
        if sender == self.node_id or term < self.term:
            return []  # a stale or delayed claim: ignored entirely
        self.term = term
        before = self._belief_key(now)
        old = self._peers.get(sender)
        self._peers[sender] = _Peer(
            priority=priority,
            eligible=True,
            role=Role.PUBLISHER,
            term=term,
            last_heard=now,
            stopped_seq=old.stopped_seq if old is not None else None,
        )
        self._sightings[sender] = _Sighting(priority, term, seq, now, 0, None)
        actions = self._evaluate(now) + self._relay(before, now)
        claimed = PublisherReport(sender, priority, term, seq, 0, 0)
        return actions + self._inform(sender, claimed, now)

    def on_lease_release(self, sender: str, term: int, now: float, *, seq: int) -> list[Action]:
        peer = self._peers.get(sender)
        if peer is None or term < peer.term:
            return []  # a release older than the peer's current lease
        self.term = max(self.term, term)
        before = self._belief_key(now)
        peer.role = Role.STANDBY
        peer.released = True
        peer.stopped_seq = seq if peer.stopped_seq is None else max(peer.stopped_seq, seq)
        self._sightings.pop(sender, None)
        return self._evaluate(now) + self._relay(before, now)

    def on_peer_expired(self, sender: str, now: float) -> list[Action]:
        peer = self._peers.get(sender)
        if peer is None:
            return []
        # Not live any more, but its publisher timer keeps running: the grace still applies.
        peer.expired = True
        return self._evaluate(now)

    def known(self) -> set[str]:
        """Every node this election holds state about (as a peer or a publisher sighting)."""
        return (set(self._peers) | set(self._sightings)) - {self.node_id}

    def forget(self, node_id: str, now: float) -> list[Action]:
        """``node_id`` left the cluster for good (revoked): drop it as a peer and as a publisher
        at once, without the grace a silent publisher gets, and stop trusting what it relayed."""
        self._peers.pop(node_id, None)
        self._sightings.pop(node_id, None)
        for sighting in self._sightings.values():
            if sighting.via == node_id:
                sighting.withdrawn = True
        if self._relayed is not None and self._relayed[0] == node_id:
            self._relayed = None
        return self._evaluate(now)

    def set_eligible(self, eligible: bool, now: float) -> list[Action]:
        """Health changed (e.g. tor down): an ineligible publisher steps down and releases."""
        self.eligible = eligible
        return self._evaluate(now)

    def shutdown(self, now: float) -> list[Action]:
        """Leave the cluster: a publisher releases its lease so the next best takes over now."""
        was_publisher = self.is_publisher
        self._stopped = True
        self.role = Role.STANDBY
        if was_publisher:
            return [StepDown("shutdown"), SendLeaseRelease(self.term)]
        return []

    # -- believed-publisher reports -----------------------------------------------------------

    def _on_report(self, sender: str, report: PublisherReport | None, now: float) -> None:
        """Apply ``sender``'s believed publisher (see the module docstring for the bounds)."""
        reported = report.node_id if report is not None else None
        # Withdrawal: the sender no longer vouches for what it told us before.
        for node_id, sighting in self._sightings.items():
            if sighting.via == sender and node_id != reported:
                sighting.withdrawn = True
        if report is None or report.node_id in (sender, self.node_id):
            return  # its own role is in its heartbeat; ours we know
        hops = report.hops + 1
        if hops > MAX_REPORT_HOPS:
            return
        subject = self._peers.get(report.node_id)
        stopped_seq = subject.stopped_seq if subject is not None else None
        if stopped_seq is not None and report.seq <= stopped_seq:
            return  # it told us itself, later, that it does not publish
        current = self._sightings.get(report.node_id)
        if current is not None and report.seq <= current.seq:
            return  # the same or an older sign of life (e.g. an echo through a cycle): not news
        seen_at = min(now, now - report.age_ms / 1000)
        if current is not None:
            # A newer message was sent after the one we knew, so it was alive at least then.
            seen_at = max(seen_at, current.seen_at)
        self.term = max(self.term, report.term)
        self._sightings[report.node_id] = _Sighting(
            priority=report.priority,
            term=report.term,
            seq=report.seq,
            seen_at=seen_at,
            hops=hops,
            via=sender,
        )

    def _sighting_live(self, node_id: str, s: _Sighting, now: float) -> bool:
        if s.withdrawn or now - s.seen_at > self.timings.heartbeat_timeout:
            return False
        if s.via is None:
            peer = self._peers.get(node_id)
            return peer is not None and self._live(peer, now)
        return True

    def _believed(self, now: float) -> tuple[str, _Sighting] | None:
        live = [
            (s.priority, k, s)
            for k, s in self._sightings.items()
            if k != self.node_id and self._sighting_live(k, s, now)
        ]
        if not live:
            return None
        _, node_id, sighting = min(live, key=lambda item: (item[0], item[1]))
        return node_id, sighting

    def _belief_key(self, now: float) -> tuple[str, int] | None:
        if self.is_publisher:
            return (self.node_id, 0)
        best = self._believed(now)
        return (best[0], best[1].seq) if best is not None else None

    def _inform(self, sender: str, theirs: PublisherReport | None, now: float) -> list[Action]:
        """InformPeer when ``sender`` names no publisher, or a worse one than ours (see top).

        Only then: in a stable cluster every node names the same publisher, so this costs
        nothing; a sender naming a better one than ours needs nothing from us (its report, if
        valid, already changed our belief).
        """
        ours = self.report(now)
        if ours is None or ours.node_id == sender:
            return []  # nothing to tell, or it is the publisher itself and knows
        if theirs is not None and (theirs.priority, theirs.node_id) <= (
            ours.priority,
            ours.node_id,
        ):
            return []
        return [InformPeer(sender)]

    def _relay(self, before: tuple[str, int] | None, now: float) -> list[Action]:
        """RelayBelief when our belief changed or its sign of life is newer than last relayed."""
        after = self._belief_key(now)
        if after == before or after == self._relayed or self._stopped:
            return []
        self._relayed = after
        return [RelayBelief()]

    # -- rules --------------------------------------------------------------------------------

    def _live(self, peer: _Peer, now: float) -> bool:
        return (
            not peer.expired
            and not peer.released
            and now - peer.last_heard <= self.timings.heartbeat_timeout
        )

    def _evaluate(self, now: float) -> list[Action]:
        if self._stopped:
            return []
        if self.is_publisher:
            return self._evaluate_publisher(now)
        return self._evaluate_standby(now)

    def _evaluate_publisher(self, now: float) -> list[Action]:
        if not self.eligible:
            self.role = Role.STANDBY
            return [StepDown("no longer publisher-eligible"), SendLeaseRelease(self.term)]
        if self.single_node:
            return []
        better = sorted(
            (s.priority, k)
            for k, s in self._sightings.items()
            if (s.priority, k) < self.rank and self._sighting_live(k, s, now)
        )
        if better:
            self.role = Role.STANDBY
            node_id = better[0][1]
            how = "is live" if self._sightings[node_id].via is None else "is reported live"
            return [StepDown(f"better-ranked publisher {node_id} {how}")]
        return []

    def _evaluate_standby(self, now: float) -> list[Action]:
        if not self.eligible:
            return []
        if self.single_node:
            return self._claim()
        silence_limit = self.timings.heartbeat_timeout + self.timings.takeover_grace
        if now - self._boot < self.timings.discovery_window:
            return []  # still learning who is out there (why this is long enough: see top)
        for node_id, peer in self._peers.items():
            if self._live(peer, now) and peer.eligible and (peer.priority, node_id) < self.rank:
                return []  # a better candidate is alive: it is the one to publish
        publishers = {
            k: s
            for k, s in self._sightings.items()
            if k != self.node_id and now - s.seen_at < silence_limit
        }
        if any((s.priority, k) < self.rank for k, s in publishers.items()):
            return []  # a better publisher is live, or silent but still within its grace
        if any(self._sighting_live(k, s, now) for k, s in publishers.items()):
            return self._claim()  # rule (b): all live publishers rank worse than us
        if publishers:
            return []  # rule (a): wait until the publisher was silent for timeout + grace
        # Rule (a) with nothing to wait for: no publisher sighted within timeout + grace, or
        # none at all since our boot (the fast first election: the discovery window is over).
        return self._claim()

    def _claim(self) -> list[Action]:
        # Terms follow the wall clock (see "Terms" at the top): receivers refuse a term more
        # than the skew tolerance ahead of their clock, so none can approach the 64-bit limit.
        # The min() only keeps the arithmetic in range for a caller that skips that check.
        self.term = min(MAX_U64, max(self.term + 1, self._wall_ms()))
        self.role = Role.PUBLISHER
        return [BecomePublisher(self.term), SendLeaseClaim(self.term, self.priority)]
