"""The coordinator's membership handling (issue 16) on a manual clock, its socket replaced by a
list: revocation at once, the revoked node told, statements sent in datagrams that fit."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterable

from rustbalance.cluster.authority import Statement
from rustbalance.cluster.coordinator import ChangeKind, Coordinator
from rustbalance.cluster.membership import Membership
from rustbalance.cluster.messages import (
    Envelope,
    Heartbeat,
    IntroPoints,
    LeaseClaim,
    Members,
    Payload,
    PublisherStatement,
    Receiver,
    Role,
    Sender,
)
from rustbalance.cluster.transport import Address
from rustbalance.config.schema import CoordinationConfig, Endpoint
from tests.trust import MASTER, node_key, record, revocation, signed

START = 1_800_000_000.0
START_MS = int(START * 1000)
ADDRESS = {"node-a": ("127.0.0.1", 1), "node-b": ("127.0.0.1", 2), "node-c": ("127.0.0.1", 3)}


class Node:
    """A coordinator whose sends are recorded as (target, datagram)."""

    def __init__(self, name: str, statements: Iterable[Statement], max_bytes: int = 65000) -> None:
        self.now = START
        self.senders: dict[str, Sender] = {}
        self.sent: list[tuple[Address, bytes]] = []
        self.changes: list[ChangeKind] = []
        membership = Membership(MASTER.public_key)
        for statement in statements:
            membership.apply(statement, START_MS)
        host, port = ADDRESS[name]
        self.c: Coordinator[bytes] = Coordinator(
            node_id=name,
            node_key=node_key(name),
            membership=membership,
            config=CoordinationConfig(
                listen=Endpoint(host=host, port=port),
                heartbeat_interval_secs=1,
                heartbeat_timeout_secs=3,
                takeover_grace_secs=3,
                max_datagram_bytes=max_bytes,
            ),
            state_dir=None,
            encode_intro_point=bytes,
            decode_intro_point=bytes,
            clock=lambda: self.now,
            monotonic=lambda: self.now,
            on_change=self.changes.append,
        )
        self.c._running = True

        def send(datagram: bytes, targets: Iterable[Address]) -> int:
            listed = list(targets)
            self.sent.extend((t, datagram) for t in listed)
            return len(listed)

        self.c.transport.send_datagram = send  # type: ignore[method-assign]

    def deliver(self, sender: str, payload: Payload) -> None:
        s = self.senders.get(sender)
        if s is None:
            s = Sender(sender, node_key(sender), boot_time=self.now, randbytes=os.urandom)
            self.senders[sender] = s
        own = node_key(self.c.node_id).public
        datagram = s.seal(payload, s.reserve(self.now), self.c.node_id, own)
        self.c.transport._datagram_received(datagram, ADDRESS[sender])


def _records() -> list[Statement]:
    return [
        signed(record(n, coordination=f"{h}:{p}", issued_at_ms=START_MS - 1000))
        for n, (h, p) in ADDRESS.items()
    ]


def _opened(node: str, datagram: bytes) -> Envelope:
    keys = {n: node_key(n).public for n in ADDRESS}
    result = Receiver(node, node_key(node), keys.get, MASTER.public_key).receive(datagram, START)
    assert isinstance(result, Envelope), result
    return result


def test_a_revocation_drops_the_peer_and_its_intro_points_at_once_and_tells_it() -> None:
    a = Node("node-a", _records())
    a.deliver("node-b", Heartbeat(Role.STANDBY, 1, bytes(32), None, True, bytes(32)))
    a.deliver("node-b", IntroPoints((b"b-point",)))
    assert a.c.peer_intro_points() == {"node-b": (b"b-point",)}
    a.sent.clear()
    revoked = revocation("node-b", at_ms=START_MS)
    a.deliver("node-c", Members((revoked.data,)))  # relayed by another member
    assert a.c.peer_intro_points() == {} and a.c.live_peers() == []
    assert ChangeKind.PEER_DOWN in a.changes
    # node-b is told (sealed to its old key), so that it stops publishing.
    told = [d for t, d in a.sent if t == ADDRESS["node-b"]]
    assert len(told) == 1
    assert _opened("node-b", told[0]).payload == Members((revoked.data,))
    # And its datagrams are refused from then on.
    rejected = sum(a.c.rejected.values())
    a.deliver("node-b", Heartbeat(Role.STANDBY, 1, bytes(32), None, True, bytes(32)))
    assert sum(a.c.rejected.values()) == rejected + 1 and a.c.live_peers() == []


def test_a_revoked_publisher_is_no_longer_believed() -> None:
    """Found by the handler fuzz: a publisher known only from its lease claim (no heartbeat yet)
    stayed the believed publisher after its revocation, through the grace a silent one gets.
    node-b outranks node-a here: node-a takes over at once, not after the grace."""
    records = [
        signed(record(n, priority=5 if n == "node-b" else 10, coordination=f"{h}:{p}",
                      issued_at_ms=START_MS - 1000))
        for n, (h, p) in ADDRESS.items()
    ]  # fmt: skip
    a = Node("node-a", records)
    for _ in range(5):  # past the start-up wait
        a.now += 1
        asyncio.run(a.c._tick())
    b = Sender("node-b", node_key("node-b"), boot_time=a.now, randbytes=os.urandom)
    a.senders["node-b"] = b
    stamp = b.reserve(a.now)
    claim = LeaseClaim(PublisherStatement.sign(b.key, "node-b", int(a.now * 1000), *stamp))
    own = node_key("node-a").public
    a.c.transport._datagram_received(b.seal(claim, stamp, "node-a", own), ADDRESS["node-b"])
    assert a.c.publisher() == "node-b" and not a.c.is_publisher
    a.deliver("node-c", Members((revocation("node-b", at_ms=START_MS).data,)))
    assert a.c.publisher() == "node-a" and a.c.is_publisher


def test_a_node_told_of_its_own_revocation_stops() -> None:
    b = Node("node-b", _records())
    b.c.election.role = Role.PUBLISHER
    b.deliver("node-a", Members((revocation("node-b", at_ms=START_MS).data,)))
    assert b.c.revoked and not b.c.is_publisher
    b.sent.clear()
    b.now += 5
    asyncio.run(b.c._tick())
    assert b.sent == []  # no heartbeat, no hello: it is out


def test_statements_go_out_in_datagrams_that_fit() -> None:
    """A membership far larger than one small datagram still reaches a peer, in pieces."""
    big = [
        signed(record(f"n{i:03d}-" + "x" * 50, coordination=f"[fd00::{i + 10:x}]:51821",
                      tunnel=f"10.99.{i // 200}.{i % 200 + 1}", endpoint="[2001:db8::1]:51820",
                      issuer="i" * 64, issued_at_ms=START_MS - 1000))
        for i in range(40)
    ]  # fmt: skip
    a = Node("node-a", [*_records(), *big], max_bytes=4096)
    a.c._share_members("node-b", START)
    datagrams = [d for t, d in a.sent if t == ADDRESS["node-b"]]
    assert len(datagrams) > 1 and all(len(d) <= 4096 for d in datagrams)
    delivered = {s for d in datagrams for s in _opened("node-b", d).payload.statements}  # type: ignore[union-attr]
    assert delivered == {s.data for s in a.c.membership.statements()}
