"""Whole-cluster simulation: sealed datagrams, peer tables and elections of 2-5 nodes.

Hypothesis drives message loss, delay, partitions and heals, crashes, restarts (with the members
file), graceful shutdowns and clock skew within tolerance. Links are per pair of nodes, so
besides group partitions it cuts single pairs: non-transitive partitions, where A hears B and B
hears C but A and C do not hear each other (then A and C each see no better node and would both
publish, were it not for the believed publisher each heartbeat carries).

Each node is the daemon's own :class:`~rustbalance.cluster.coordinator.Coordinator` (protocol
v3: every datagram sealed between two members' keys, publisher statements signed, priorities
from the admission records), with its socket replaced by the simulated network and its tick
driven by the simulation clock.

The invariant for such graphs is about *connected components of the link graph*: two nodes are
in one component when a path of working links joins them, even if they cannot talk directly.
Invariants:

- once stable (no topology change and no loss for timeout + grace + a few intervals), every
  connected component has at most one publisher, exactly one if it has an eligible node, and it
  is the component's best-ranked eligible node; every node of the component names it as the
  publisher (``Election.publisher``); after a full heal there is exactly one in the cluster.
  "At most one among nodes that hear each other directly" would be too weak (A and C above),
  and "one in the whole cluster" is impossible while the graph is split;
- the publisher holds the intro points of exactly its live direct neighbours (a node it cannot
  hear cannot give it intro points; in a full mesh that is its whole component);
- a publisher crash is followed by a takeover within interval + timeout + grace (plus one
  datagram transit per relay when the successor only heard it through others);
- a fresh cluster elects its best-ranked eligible node once the discovery window (two
  intervals) is over, not timeout + grace after the start, and nobody else ever claims;
- a node restarting next to a stable publisher (also when the publisher's first heartbeat to
  it is lost) follows it: no claim, no role change anywhere;
- every datagram between honest nodes is accepted (also when reordered or after restarts).
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from rustbalance.cluster.authority import Statement
from rustbalance.cluster.coordinator import Coordinator
from rustbalance.cluster.election import Action, BecomePublisher, ElectionTimings, StepDown
from rustbalance.cluster.membership import Membership
from rustbalance.cluster.transport import Address
from rustbalance.config.schema import CoordinationConfig, Endpoint
from tests.budget import budget
from tests.trust import MASTER, node_key, record, signed

INTERVAL, TIMEOUT, GRACE = 5.0, 15.0, 15.0
TIMINGS = ElectionTimings(INTERVAL, TIMEOUT, GRACE)
STEP = 1.0
MAX_DELAY = 1.0
MAX_SKEW = 1.5  # 2 × skew + delay = 4 s < the 5 s tolerance
START = 1_700_000_000.0


def address_of(node_id: str) -> Address:
    return (f"10.0.0.{1 + int(node_id[1:])}", 51821)


def run_sync(coroutine: object) -> None:
    """Run a coroutine that never suspends (the coordinator's tick without sockets or files)."""
    try:
        coroutine.send(None)  # type: ignore[attr-defined]
    except StopIteration:
        return
    raise AssertionError("the tick suspended")


@dataclass
class Node:
    """One node: the daemon's own Coordinator, its sockets replaced by the simulated network."""

    node_id: str
    priority: int
    eligible: bool
    skew: float
    boot: float  # global time
    rng: random.Random
    machine: ClusterMachine
    members_json: str | None = None  # the saved members file of an earlier run
    coordinator: Coordinator[bytes] = field(init=False)
    intro_points: tuple[bytes, ...] = field(init=False)
    last_heartbeat: float | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        machine = self.machine
        membership = Membership(MASTER.public_key)
        if self.members_json is not None:
            membership.load_json(self.members_json, int(self.local(self.boot) * 1000))
        for statement in machine.records:
            membership.apply(statement, int(self.local(self.boot) * 1000))
        host, port = address_of(self.node_id)
        config = CoordinationConfig(
            listen=Endpoint(host=host, port=port),
            peers=tuple(
                Endpoint(host=address_of(k)[0], port=address_of(k)[1])
                for k in machine.nodes_all
                if k != self.node_id
            ),
            heartbeat_interval_secs=INTERVAL,
            heartbeat_timeout_secs=TIMEOUT,
            takeover_grace_secs=GRACE,
        )
        c: Coordinator[bytes] = Coordinator(
            node_id=self.node_id,
            node_key=node_key(self.node_id),
            membership=membership,
            config=config,
            state_dir=None,
            encode_intro_point=bytes,
            decode_intro_point=bytes,
            clock=lambda: machine.t + self.skew,
            monotonic=lambda: machine.t + self.skew,
            randbytes=self.rng.randbytes,
        )
        node_id = self.node_id

        def send(datagram: bytes, targets: Iterable[Address]) -> int:
            return machine.enqueue(node_id, datagram, list(targets))

        apply = c._apply

        def observed(actions: list[Action]) -> None:
            machine.observe(node_id, actions)
            apply(actions)

        send_heartbeat = c._send_heartbeat

        def heartbeat(node_ids: Iterable[str]) -> None:
            machine.sending_heartbeat = node_id
            try:
                send_heartbeat(node_ids)
            finally:
                machine.sending_heartbeat = None

        broadcast = c._broadcast_heartbeat

        def periodic(now: float) -> None:
            self.last_heartbeat = machine.t
            broadcast(now)

        c.transport.send_datagram = send  # type: ignore[method-assign]
        c._apply = observed  # type: ignore[method-assign]
        c._send_heartbeat = heartbeat  # type: ignore[method-assign]
        c._broadcast_heartbeat = periodic  # type: ignore[method-assign]
        # What run() does, without a socket: running, a fresh election, the first heartbeat
        # at a random phase within an interval.
        c._running = True
        c.election = c._new_election()
        c._next_heartbeat = self.local(self.boot) + self.rng.uniform(0, INTERVAL)
        generation = self.rng.randrange(1 << 30)
        self.intro_points = tuple(f"{self.node_id}-{generation}-{k}".encode() for k in range(3))
        c.set_intro_points(self.intro_points)
        self.coordinator = c

    def local(self, t: float) -> float:
        return t + self.skew

    @property
    def now(self) -> float:
        return self.local(self.machine.t)


class ClusterMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.t = START
        self.nodes: dict[str, Node] = {}
        self.nodes_all: list[str] = []
        self.records: list[Statement] = []
        self.down: set[str] = set()
        self.group: dict[str, int] = {}
        self.cut: set[frozenset[str]] = set()  # pairs whose link is down (both directions)
        self.loss = 0.0
        self.rng = random.Random(0)
        self.queue: list[tuple[float, int, str, str, bytes]] = []
        self.counter = 0
        self.role_changes = 0
        self.claims: list[tuple[float, str]] = []  # (global time, node) of every BecomePublisher
        # (src, dst) pairs whose next heartbeat is lost (a targeted single loss).
        self.lose_next_heartbeat: set[tuple[str, str]] = set()
        self.sending_heartbeat: str | None = None

    def add_nodes(self, priorities: list[int], eligible: list[bool], skews: list[float]) -> None:
        names = [f"n{i}" for i in range(len(priorities))]
        self.nodes_all = names
        host = {k: address_of(k) for k in names}
        self.records = [
            signed(
                record(
                    k,
                    key=node_key(k),
                    priority=priorities[i],
                    eligible=eligible[i],
                    coordination=f"{host[k][0]}:{host[k][1]}",
                    issued_at_ms=int(START * 1000) - 60_000,
                )
            )
            for i, k in enumerate(names)
        ]
        for i, k in enumerate(names):
            self.nodes[k] = Node(
                k, priorities[i], eligible[i], skews[i], self.t, random.Random(i * 7919), self
            )
            self.group[k] = 0

    # -- setup ----------------------------------------------------------------------------

    @initialize(
        n=st.integers(2, 5),
        priorities=st.lists(st.integers(0, 2), min_size=5, max_size=5),
        eligible=st.lists(st.booleans(), min_size=5, max_size=5),
        skews=st.lists(st.integers(-15, 15), min_size=5, max_size=5),
        seed=st.integers(0, 2**32),
    )
    def setup(
        self, n: int, priorities: list[int], eligible: list[bool], skews: list[int], seed: int
    ) -> None:
        self.rng = random.Random(seed)
        eligible[self.rng.randrange(n)] = True  # at least one node may publish
        self.add_nodes(priorities[:n], eligible[:n], [s * MAX_SKEW / 15 for s in skews[:n]])
        for i, k in enumerate(self.nodes_all):
            self.nodes[k].rng.seed(seed + i)

    # -- the network --------------------------------------------------------------------------

    def up(self) -> list[str]:
        return [k for k in sorted(self.nodes) if k not in self.down]

    def connected(self, a: str, b: str) -> bool:
        """Whether the direct link a <-> b works."""
        return self.group[a] == self.group[b] and frozenset((a, b)) not in self.cut

    def enqueue(self, src: str, datagram: bytes, targets: list[Address]) -> int:
        """A node's socket: each datagram to the node at its target address, through the links."""
        by_address = {address_of(k): k for k in self.nodes}
        sent = 0
        for target in targets:
            dst = by_address.get(target)
            sent += 1
            if dst is None or dst == src or not self.connected(src, dst):
                continue
            if self.rng.random() < self.loss:
                continue
            if self.sending_heartbeat == src and (src, dst) in self.lose_next_heartbeat:
                self.lose_next_heartbeat.discard((src, dst))
                continue
            self.counter += 1
            when = self.t + self.rng.uniform(0, MAX_DELAY)
            self.queue.append((when, self.counter, src, dst, datagram))
        return sent

    def observe(self, src: str, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, BecomePublisher | StepDown):
                self.role_changes += 1
            if isinstance(action, BecomePublisher):
                self.claims.append((self.t, src))

    def deliver(self, src: str, dst: str, datagram: bytes) -> None:
        transport = self.nodes[dst].coordinator.transport
        before = sum(transport.rejected.values())
        transport._datagram_received(datagram, address_of(src))
        rejected = {k: v for k, v in transport.rejected.items() if v}
        assert sum(transport.rejected.values()) == before, f"honest datagram rejected: {rejected}"

    def step(self) -> None:
        self.t += STEP
        due = sorted(m for m in self.queue if m[0] <= self.t)
        self.queue = [m for m in self.queue if m[0] > self.t]
        for _, _, src, dst, datagram in due:
            if dst not in self.down:
                self.deliver(src, dst, datagram)
        for node_id in self.up():
            run_sync(self.nodes[node_id].coordinator._tick())

    def run(self, seconds: float) -> None:
        for _ in range(int(seconds / STEP)):
            self.step()

    def publishers(self) -> list[str]:
        return [k for k in self.up() if self.nodes[k].coordinator.is_publisher]

    def components(self) -> list[list[str]]:
        """Connected components of the working links among running nodes (paths count)."""
        seen: set[str] = set()
        result: list[list[str]] = []
        for start in self.up():
            if start in seen:
                continue
            seen.add(start)
            component, frontier = [start], [start]
            while frontier:
                a = frontier.pop()
                for b in self.up():
                    if b not in seen and self.connected(a, b):
                        seen.add(b)
                        component.append(b)
                        frontier.append(b)
            result.append(sorted(component))
        return result

    def stabilize_and_check(self) -> None:
        self.loss = 0.0
        self.run(TIMEOUT + GRACE + 3 * INTERVAL)
        before = self.role_changes
        self.run(2 * INTERVAL)
        assert self.role_changes == before, "roles still changing after the stable window"
        for component in self.components():
            pubs = [k for k in component if self.nodes[k].coordinator.is_publisher]
            eligible = [k for k in component if self.nodes[k].eligible]
            assert len(pubs) == (1 if eligible else 0), (component, pubs, sorted(self.cut))
            if pubs:
                best = min(eligible, key=lambda k: (self.nodes[k].priority, k))
                assert pubs == [best]
                for k in component:  # everyone, also beyond direct reach, names it
                    assert self.nodes[k].coordinator.publisher() == best, (k, best)
                held = self.nodes[best].coordinator.peer_intro_points()
                assert set(held) == {k for k in component if k != best and self.connected(best, k)}
                for peer_id, points in held.items():
                    assert points == self.nodes[peer_id].intro_points

    # -- rules ----------------------------------------------------------------------------

    @rule(seconds=st.integers(1, 25))
    def advance(self, seconds: int) -> None:
        self.run(seconds)

    @rule(loss=st.sampled_from([0.0, 0.1, 0.3, 0.7]))
    def set_loss(self, loss: float) -> None:
        self.loss = loss

    @rule(data=st.data())
    def partition(self, data: st.DataObject) -> None:
        for k in self.nodes:
            self.group[k] = data.draw(st.integers(0, 2))

    @rule(data=st.data())
    def cut_links(self, data: st.DataObject) -> None:
        """Cut any set of single links (mostly non-transitive partitions)."""
        pairs = [frozenset((a, b)) for a in sorted(self.nodes) for b in sorted(self.nodes) if a < b]
        self.cut = set(data.draw(st.lists(st.sampled_from(pairs), max_size=len(pairs))))

    @precondition(lambda self: len(self.nodes) >= 3)
    @rule(data=st.data(), hub_ranks_worst=st.booleans(), check=st.booleans())
    def non_transitive_partition(
        self, data: st.DataObject, hub_ranks_worst: bool, check: bool
    ) -> None:
        """A hears B, B hears C, A and C cannot talk; every other link works.

        With ``hub_ranks_worst`` B ranks worse than A and C: the case where A and C each see
        only worse nodes, so only the believed-publisher reports keep them from both publishing.
        """
        a, b, c = data.draw(st.permutations(sorted(self.nodes)))[:3]
        if hub_ranks_worst:
            a, c, b = sorted((a, b, c), key=lambda k: (self.nodes[k].priority, k))
        for k in self.nodes:
            self.group[k] = 0
        self.cut = {frozenset((a, c))}
        assert self.connected(a, b) and self.connected(b, c) and not self.connected(a, c)
        if check:
            self.stabilize_and_check()

    @rule()
    def heal_and_check(self) -> None:
        for k in self.nodes:
            self.group[k] = 0
        self.cut.clear()
        self.stabilize_and_check()
        if any(self.nodes[k].eligible for k in self.up()):
            assert len(self.publishers()) == 1

    @rule()
    def stable_partition_check(self) -> None:
        self.stabilize_and_check()

    @precondition(lambda self: len(self.up()) > 1)
    @rule(data=st.data())
    def crash(self, data: st.DataObject) -> None:
        self.down.add(data.draw(st.sampled_from(self.up())))

    @precondition(lambda self: len(self.up()) > 1)
    @rule(data=st.data())
    def graceful_shutdown(self, data: st.DataObject) -> None:
        node_id = data.draw(st.sampled_from(self.up()))
        c = self.nodes[node_id].coordinator
        # What shutdown() does, with the simulated socket still open.
        c._stopped = True
        c._apply(c.election.shutdown(self.nodes[node_id].now))
        self.down.add(node_id)

    def reboot(self, node_id: str) -> None:
        """Start a down node again, with its members file, as a new process."""
        old = self.nodes[node_id]
        members = old.coordinator.membership.to_json()
        self.nodes[node_id] = Node(
            node_id, old.priority, old.eligible, old.skew, self.t, old.rng, self, members
        )
        self.down.discard(node_id)
        # Datagrams still in flight were sent to the old process: its socket is gone.
        self.queue = [m for m in self.queue if m[3] != node_id]

    @precondition(lambda self: bool(self.down))
    @rule(data=st.data())
    def restart(self, data: st.DataObject) -> None:
        self.reboot(data.draw(st.sampled_from(sorted(self.down))))

    @precondition(lambda self: len(self.up()) >= 2)
    @rule(
        data=st.data(),
        down_for=st.integers(1, 40),
        phase=st.integers(0, int(INTERVAL / STEP) - 1),
        lose_first=st.booleans(),
    )
    def restart_next_to_a_live_publisher(
        self, data: st.DataObject, down_for: int, phase: int, lose_first: bool
    ) -> None:
        """A node that does not publish restarts while the publisher runs: it follows it."""
        for k in self.nodes:
            self.group[k] = 0
        self.cut.clear()
        self.stabilize_and_check()
        pubs = self.publishers()
        candidates = [k for k in self.up() if k not in pubs]
        if len(pubs) != 1 or not candidates:
            return
        victim = data.draw(st.sampled_from(candidates))
        self.check_restart_follows(pubs[0], victim, down_for, phase, lose_first)

    def check_restart_follows(
        self, publisher: str, victim: str, down_for: int, phase: int, lose_first: bool
    ) -> None:
        """Crash ``victim``, restart it ``phase`` steps after a heartbeat of ``publisher``.

        Phase 0 is the worst case: the publisher's next two heartbeats come at the end of the
        victim's discovery window. With ``lose_first`` the publisher's first heartbeat to it is
        lost too. The window still holds the publisher's answers to the victim's own heartbeats
        and the other nodes' reports, so it must not claim, and nobody's role changes.
        """
        self.down.add(victim)
        self.run(down_for)
        for _ in range(int(INTERVAL / STEP) + 1):
            if self.nodes[publisher].last_heartbeat == self.t:
                break
            self.step()
        self.run(phase * STEP)
        self.reboot(victim)
        if lose_first:
            self.lose_next_heartbeat.add((publisher, victim))
        claims, changes = len(self.claims), self.role_changes
        for _ in range(int((TIMEOUT + GRACE + 2 * INTERVAL) / STEP)):
            self.step()
            assert self.publishers() == [publisher], ("a restarted node stole", victim)
        assert (len(self.claims), self.role_changes) == (claims, changes)
        assert self.nodes[victim].coordinator.publisher() == publisher
        self.lose_next_heartbeat.clear()

    @rule(keep_cuts=st.booleans())
    def publisher_crash_failover(self, keep_cuts: bool) -> None:
        """Crash the publisher; with ``keep_cuts`` its successor may only hear it via relays."""
        for k in self.nodes:
            self.group[k] = 0
        if not keep_cuts:
            self.cut.clear()
        self.stabilize_and_check()
        pubs = self.publishers()
        if not pubs:
            return
        victim = pubs[0]
        self.down.add(victim)
        crashed_at = self.t
        # Every remaining component that can publish needs its own publisher again. A
        # successor that heard the victim through relays learns of it up to one transit
        # (and one simulation step) later per relay.
        bound = TIMINGS.failover_bound + (len(self.nodes) - 2) * (MAX_DELAY + STEP)
        while True:
            waiting = [
                c
                for c in self.components()
                if any(self.nodes[k].eligible for k in c)
                and not any(self.nodes[k].coordinator.is_publisher for k in c)
            ]
            if not waiting:
                break
            self.step()
            assert self.t - crashed_at <= bound, ("failover too slow", waiting, self.cut)

    @invariant()
    def bounded_state(self) -> None:
        for k in self.up():
            c = self.nodes[k].coordinator
            assert len(c.live_peers()) < len(self.nodes)
            assert len(c.membership.members()) == len(self.nodes)


ClusterMachine.TestCase.settings = settings(
    max_examples=budget(120), stateful_step_count=12, deadline=None
)
TestCluster = ClusterMachine.TestCase


def test_non_transitive_triangle_with_the_worst_hub() -> None:
    """The case of the issue, directed: n1 (worst) links n0 and n2, which cannot talk.

    Without the believed publisher in the heartbeats n2 takes over once n0 is silent for timeout
    + grace, and both publish for good; with it n2 keeps hearing, through n1, that the better n0
    publishes, and nothing changes.
    """
    m = ClusterMachine()
    m.add_nodes([0, 2, 1], [True] * 3, [0.0] * 3)
    m.stabilize_and_check()
    assert m.publishers() == ["n0"]
    m.cut = {frozenset(("n0", "n2"))}
    m.stabilize_and_check()  # one component: n0 publishes, n1 and n2 both name it
    assert m.publishers() == ["n0"]
    # n2 hears n1 only
    assert {p.node_id for p in m.nodes["n2"].coordinator.live_peers()} == {"n1"}
    m.cut.clear()
    m.stabilize_and_check()
    assert m.publishers() == ["n0"]


@settings(max_examples=budget(150), deadline=None)
@given(
    n=st.integers(2, 5),
    priorities=st.lists(st.integers(0, 2), min_size=5, max_size=5),
    eligible=st.lists(st.booleans(), min_size=5, max_size=5),
    skews=st.lists(st.integers(-15, 15), min_size=5, max_size=5),
    seed=st.integers(0, 2**32),
)
def test_fresh_cluster_elects_once_the_discovery_window_is_over(
    n: int, priorities: list[int], eligible: list[bool], skews: list[int], seed: int
) -> None:
    """All nodes start together (first heartbeats at random phases within an interval).

    The best-ranked eligible node claims when its window is over (one step of rounding), far
    before timeout + grace; it is the only claim ever made, and everyone names it.
    """
    m = ClusterMachine()
    m.setup(n, priorities, eligible, skews, seed)
    window = TIMINGS.discovery_window
    m.run(window + STEP)
    best = min((k for k in m.nodes if m.nodes[k].eligible), key=lambda k: (m.nodes[k].priority, k))
    assert len(m.claims) == 1, m.claims
    claimed_at, winner = m.claims[0]
    assert winner == best
    assert window <= claimed_at - START <= window + STEP < TIMEOUT + GRACE
    m.stabilize_and_check()
    assert m.claims == [(claimed_at, best)]


@pytest.mark.parametrize("lose_first", [False, True])
@pytest.mark.parametrize("phase", range(int(INTERVAL / STEP)))
@pytest.mark.parametrize(("n", "victim"), [(2, "n1"), (3, "n1"), (3, "n2")])
def test_restart_next_to_a_live_publisher_in_every_phase(
    n: int, victim: str, phase: int, lose_first: bool
) -> None:
    """Every phase of the restart against the publisher's heartbeats, also with the first one
    lost: the restarted node never claims. (Without InformPeer, or with a window of one
    interval, the two-node case with phase 0 and a lost first heartbeat claims.)"""
    m = ClusterMachine()
    m.setup(n, [0, 1, 2, 2, 2], [True] * 5, [0] * 5, 7 + phase)
    m.stabilize_and_check()
    assert m.publishers() == ["n0"]
    m.check_restart_follows("n0", victim, 3, phase, lose_first)
