"""Whole-cluster simulation: sealed datagrams, peer tables and elections of 2-5 nodes.

Hypothesis drives message loss, delay, partitions and heals, crashes, restarts (with the peers
file), graceful shutdowns and clock skew within tolerance. Invariants:

- once stable (no topology change and no loss for timeout + grace + a few intervals), every
  connected component has at most one publisher, exactly one if it has an eligible node, and it
  is the best-ranked eligible node; after a full heal there is exactly one in the cluster;
- the publisher holds the intro points of exactly the live peers of its component;
- a publisher crash is followed by a takeover within interval + timeout + grace;
- every datagram between honest nodes is accepted (also when reordered or after restarts).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from rustbalance.cluster.election import (
    Action,
    BecomePublisher,
    Election,
    ElectionTimings,
    SendLeaseClaim,
    SendLeaseRelease,
)
from rustbalance.cluster.messages import (
    ClusterKey,
    Envelope,
    Heartbeat,
    IntroPoints,
    LeaseClaim,
    LeaseRelease,
    Payload,
    Receiver,
    RejectReason,
    Sender,
    intro_points_digest,
)
from rustbalance.cluster.peers import PeerTable, load_known_peers

INTERVAL, TIMEOUT, GRACE = 5.0, 15.0, 15.0
TIMINGS = ElectionTimings(INTERVAL, TIMEOUT, GRACE)
STEP = 1.0
MAX_DELAY = 1.0
MAX_SKEW = 1.5  # 2 × skew + delay = 4 s < the 5 s tolerance
START = 1_700_000_000.0
KEY = ClusterKey(b"simulation-cluster-token-0123456789")


@dataclass
class Node:
    node_id: str
    priority: int
    eligible: bool
    skew: float
    boot: float  # global time
    rng: random.Random
    peers_file: str | None = None
    sender: Sender = field(init=False)
    receiver: Receiver = field(init=False)
    table: PeerTable = field(init=False)
    election: Election = field(init=False)
    next_heartbeat: float = field(init=False)
    intro_points: tuple[bytes, ...] = field(init=False)

    def __post_init__(self) -> None:
        local_boot = self.boot + self.skew
        self.sender = Sender(self.node_id, KEY, boot_time=local_boot, randbytes=self.rng.randbytes)
        self.receiver = Receiver(self.node_id, KEY)
        self.table = PeerTable(self.node_id, self.address, heartbeat_timeout=TIMEOUT)
        if self.peers_file is not None:
            self.table.restore(load_known_peers(self.peers_file), local_boot)
        self.election = Election(
            self.node_id,
            self.priority,
            boot_time=local_boot,
            eligible=self.eligible,
            timings=TIMINGS,
        )
        self.next_heartbeat = self.boot + self.rng.uniform(0, INTERVAL)
        generation = self.rng.randrange(1 << 30)
        self.intro_points = tuple(f"{self.node_id}-{generation}-{k}".encode() for k in range(3))

    @property
    def address(self) -> str:
        return f"10.0.0.{1 + int(self.node_id[1:])}:51821"

    def local(self, t: float) -> float:
        return t + self.skew


class ClusterMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.t = START
        self.nodes: dict[str, Node] = {}
        self.down: set[str] = set()
        self.group: dict[str, int] = {}
        self.loss = 0.0
        self.rng = random.Random(0)
        self.queue: list[tuple[float, int, str, bytes]] = []
        self.counter = 0
        self.role_changes = 0

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
        for i in range(n):
            node_id = f"n{i}"
            self.nodes[node_id] = Node(
                node_id,
                priorities[i],
                eligible[i],
                skews[i] * MAX_SKEW / 15,
                self.t,
                random.Random(seed + i),
            )
            self.group[node_id] = 0

    # -- the network --------------------------------------------------------------------------

    def up(self) -> list[str]:
        return [k for k in sorted(self.nodes) if k not in self.down]

    def connected(self, a: str, b: str) -> bool:
        return self.group[a] == self.group[b]

    def broadcast(self, src: str, payload: Payload) -> None:
        node = self.nodes[src]
        datagram = node.sender.seal(payload, node.local(self.t))
        for dst in self.nodes:
            if dst == src or not self.connected(src, dst) or self.rng.random() < self.loss:
                continue
            self.counter += 1
            self.queue.append(
                (self.t + self.rng.uniform(0, MAX_DELAY), self.counter, dst, datagram)
            )

    def apply(self, src: str, actions: list[Action]) -> None:
        node = self.nodes[src]
        for action in actions:
            if isinstance(action, SendLeaseClaim):
                self.broadcast(src, LeaseClaim(action.term, action.priority))
            elif isinstance(action, SendLeaseRelease):
                self.broadcast(src, LeaseRelease(action.term))
            else:
                self.role_changes += 1
                if isinstance(action, BecomePublisher):
                    assert node.election.is_publisher

    def deliver(self, dst: str, datagram: bytes) -> None:
        node = self.nodes[dst]
        now = node.local(self.t)
        result = node.receiver.receive(datagram, now)
        if isinstance(result, RejectReason):
            raise AssertionError(f"honest datagram rejected: {result}")
        assert isinstance(result, Envelope)
        p, sender, e = result.payload, result.sender, node.election
        if isinstance(p, Heartbeat):
            node.table.on_heartbeat(sender, p, now)
            self.apply(
                dst, e.on_heartbeat(sender, p.role, p.priority, p.term, p.publisher_eligible, now)
            )
        elif isinstance(p, IntroPoints):
            node.table.on_intro_points(sender, p, now)
        elif isinstance(p, LeaseClaim):
            self.apply(dst, e.on_lease_claim(sender, p.term, p.priority, now))
        elif isinstance(p, LeaseRelease):
            self.apply(dst, e.on_lease_release(sender, p.term, now))

    def step(self) -> None:
        self.t += STEP
        due = sorted(m for m in self.queue if m[0] <= self.t)
        self.queue = [m for m in self.queue if m[0] > self.t]
        for _, _, dst, datagram in due:
            if dst not in self.down:
                self.deliver(dst, datagram)
        for node_id in self.up():
            node = self.nodes[node_id]
            now = node.local(self.t)
            for dead in node.table.expire(now):
                self.apply(node_id, node.election.on_peer_expired(dead, now))
            self.apply(node_id, node.election.tick(now))
            if self.t >= node.next_heartbeat:
                node.next_heartbeat += INTERVAL
                e = node.election
                self.broadcast(
                    node_id,
                    Heartbeat(
                        e.role,
                        e.priority,
                        e.term,
                        intro_points_digest(node.intro_points),
                        None,
                        e.eligible,
                        node.table.gossip(),
                    ),
                )
                self.broadcast(node_id, IntroPoints(node.intro_points))
                node.peers_file = node.table.to_json()  # the daemon persists learned peers

    def run(self, seconds: float) -> None:
        for _ in range(int(seconds / STEP)):
            self.step()

    def publishers(self) -> list[str]:
        return [k for k in self.up() if self.nodes[k].election.is_publisher]

    def components(self) -> list[list[str]]:
        groups: dict[int, list[str]] = {}
        for k in self.up():
            groups.setdefault(self.group[k], []).append(k)
        return list(groups.values())

    def stabilize_and_check(self) -> None:
        self.loss = 0.0
        self.run(TIMEOUT + GRACE + 3 * INTERVAL)
        before = self.role_changes
        self.run(2 * INTERVAL)
        assert self.role_changes == before, "roles still changing after the stable window"
        for component in self.components():
            pubs = [k for k in component if self.nodes[k].election.is_publisher]
            eligible = [k for k in component if self.nodes[k].eligible]
            assert len(pubs) == (1 if eligible else 0), (component, pubs)
            if pubs:
                best = min(eligible, key=lambda k: (self.nodes[k].priority, k))
                assert pubs == [best]
                table = self.nodes[best].table
                now = self.nodes[best].local(self.t)
                held = table.intro_points(now)
                assert set(held) == set(component) - {best}
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

    @rule()
    def heal_and_check(self) -> None:
        for k in self.nodes:
            self.group[k] = 0
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
        node = self.nodes[node_id]
        self.apply(node_id, node.election.shutdown(node.local(self.t)))
        self.down.add(node_id)

    @precondition(lambda self: bool(self.down))
    @rule(data=st.data())
    def restart(self, data: st.DataObject) -> None:
        node_id = data.draw(st.sampled_from(sorted(self.down)))
        old = self.nodes[node_id]
        self.nodes[node_id] = Node(
            node_id, old.priority, old.eligible, old.skew, self.t, old.rng, old.peers_file
        )
        self.down.discard(node_id)

    @rule()
    def publisher_crash_failover(self) -> None:
        for k in self.nodes:
            self.group[k] = 0
        self.stabilize_and_check()
        pubs = self.publishers()
        others = [k for k in self.up() if self.nodes[k].eligible and k not in pubs]
        if len(pubs) != 1 or not others:
            return
        self.down.add(pubs[0])
        crashed_at = self.t
        while not self.publishers():
            self.step()
            assert self.t - crashed_at <= TIMINGS.failover_bound, "failover too slow"

    @invariant()
    def bounded_state(self) -> None:
        for k in self.up():
            assert len(self.nodes[k].table.live_peers(self.nodes[k].local(self.t))) < len(
                self.nodes
            )


ClusterMachine.TestCase.settings = settings(max_examples=80, stateful_step_count=12, deadline=None)
TestCluster = ClusterMachine.TestCase
