"""Fuzzing the coordination message handler (issue 7) with hypothesis.

tests/cluster/test_messages.py fuzzes the receiver (what is rejected before the handler runs).
This drives what comes after: random sequences of *authentic* messages (sealed with the cluster
key, so every one reaches ``Coordinator._on_message``) from several senders, with random payloads
of every type, random timing and undecodable intro points, into the coordinator the daemon runs.
After every message and tick:

- the handler never raised (no "coordination message handler failed" record);
- the node never lists itself as a peer, its tables stay within their bounds;
- the publisher it believes in is itself or a node some message named, and when it publishes
  it believes in itself;
- a peer's intro points are only the decodable ones it sent last.

The coordinator runs with a manual clock and without a socket (sends go nowhere), so each
example takes milliseconds.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rustbalance.cluster.coordinator import Coordinator
from rustbalance.cluster.messages import (
    MAX_KNOWN_PEERS,
    MAX_REPORT_HOPS,
    ClusterKey,
    Heartbeat,
    IntroPoints,
    LeaseClaim,
    LeaseRelease,
    Payload,
    PeerAnnounce,
    PublisherReport,
    Role,
    Sender,
)
from rustbalance.config.schema import CoordinationConfig
from rustbalance.errors import RustBalanceError
from rustbalance.rules import parse_endpoint
from tests.budget import budget

OWN_ID = "node-self"
SENDERS = ("node-a", "node-b", "node-c", "node-d")
TOKEN = secrets.token_hex(32).encode()
U32 = 2**32 - 1
U64 = 2**64 - 1
START = 1_800_000_000.0

ids = st.sampled_from((*SENDERS, OWN_ID, "ghost"))
addresses = st.integers(1, 65535).map(lambda port: f"127.0.0.1:{port}")
# Small numbers collide (equal priorities and terms: the tie-breaks), big ones test the bounds.
numbers32 = st.one_of(st.integers(0, 40), st.integers(0, U32))
numbers64 = st.one_of(st.integers(0, 40), st.integers(0, U64))
reports = st.builds(
    PublisherReport,
    node_id=ids,
    priority=numbers32,
    term=numbers64,
    seq=numbers64,
    age_ms=st.integers(0, U32),
    hops=st.integers(0, MAX_REPORT_HOPS),
)
heartbeats = st.builds(
    Heartbeat,
    role=st.sampled_from(list(Role)),
    priority=numbers32,
    term=numbers64,
    intro_digest=st.binary(min_size=32, max_size=32),
    last_publish=st.none() | st.integers(0, U64),
    publisher_eligible=st.booleans(),
    known_peers=st.lists(st.tuples(ids, addresses), max_size=6).map(tuple),
    believed_publisher=st.none() | reports,
)
# Intro points are opaque here; the decoder below refuses some, as a version mismatch would.
intro_points = st.builds(
    IntroPoints, st.lists(st.binary(min_size=1, max_size=40), max_size=6).map(tuple)
)
payloads: st.SearchStrategy[Payload] = st.one_of(
    heartbeats,
    intro_points,
    st.builds(LeaseClaim, term=numbers64, priority=numbers32),
    st.builds(LeaseRelease, term=numbers64),
    st.builds(PeerAnnounce, node_id=ids, address=addresses),
)
steps = st.lists(
    st.tuples(st.sampled_from(SENDERS), payloads, st.floats(0.0, 4.0)), min_size=1, max_size=40
)


def _decode(data: bytes) -> bytes:
    if data.startswith(b"\x00"):
        raise RustBalanceError("undecodable intro point")
    return data


def _coordinator(clock: Callable[[], float]) -> Coordinator[bytes]:
    config = CoordinationConfig(
        cluster_token_path=Path("/nonexistent/token"),
        listen=parse_endpoint("127.0.0.1:1"),
        peers=(parse_endpoint("127.0.0.1:2"),),
        heartbeat_interval_secs=1.0,
        heartbeat_timeout_secs=3.0,
        takeover_grace_secs=3.0,
    )
    return Coordinator(
        node_id=OWN_ID,
        priority=15,
        publisher_eligible=True,
        config=config,
        key=ClusterKey(TOKEN),
        state_dir=None,
        encode_intro_point=lambda point: point,
        decode_intro_point=_decode,
        clock=clock,
        monotonic=clock,
    )


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


async def _drive(plan: list[tuple[str, Payload, float]]) -> None:
    now = [START]
    node = _coordinator(lambda: now[0])
    senders = {
        name: Sender(name, ClusterKey(TOKEN), boot_time=START, randbytes=secrets.token_bytes)
        for name in SENDERS
    }
    last_points: dict[str, tuple[bytes, ...]] = {}
    named = {OWN_ID}
    for sender, payload, dt in plan:
        now[0] += dt
        named.add(sender)
        if isinstance(payload, Heartbeat):
            named.update(node_id for node_id, _ in payload.known_peers)
            if payload.believed_publisher is not None:
                named.add(payload.believed_publisher.node_id)
        elif isinstance(payload, PeerAnnounce):
            named.add(payload.node_id)
        node.transport._datagram_received(senders[sender].seal(payload, now[0]), ("127.0.0.1", 2))
        if isinstance(payload, IntroPoints):
            last_points[sender] = tuple(
                dict.fromkeys(p for p in payload.intro_points if not p.startswith(b"\x00"))
            )
        await node._tick()
        live = [p.node_id for p in node.live_peers()]
        assert OWN_ID not in live
        assert len(live) <= MAX_KNOWN_PEERS
        assert len(node.peers.known_peers()) <= MAX_KNOWN_PEERS
        assert OWN_ID not in {p.node_id for p in node.peers.known_peers()}
        publisher = node.publisher()
        # Itself or a node some message named (a relayed report may name one not heard directly),
        # never an id out of nowhere; and when it publishes, it knows it.
        assert publisher is None or publisher in named, (publisher, named)
        if node.is_publisher:
            assert publisher == OWN_ID
        assert node.role in set(Role)
        for peer_id, points in node.peer_intro_points().items():
            assert peer_id in live
            assert tuple(points) == last_points.get(peer_id, ()), peer_id
    assert node.transport.datagrams_accepted == len(plan)


@settings(max_examples=budget(300), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan=steps)
def test_authentic_random_messages_never_break_the_handler(
    plan: list[tuple[str, Payload, float]],
) -> None:
    errors = _Errors()
    logger = logging.getLogger("rustbalance")
    logger.addHandler(errors)
    try:
        asyncio.run(_drive(plan))
    finally:
        logger.removeHandler(errors)
    assert not errors.records, [r.getMessage() for r in errors.records]


@pytest.mark.parametrize(
    "payload",
    [
        Heartbeat(Role.PUBLISHER, 0, U64, bytes(32), None, True),
        LeaseClaim(term=U64, priority=0),
        Heartbeat(
            Role.STANDBY,
            5,
            1,
            bytes(32),
            None,
            True,
            (),
            PublisherReport("node-b", 0, U64, 1, 0, 1),
        ),
    ],
    ids=["heartbeat", "lease-claim", "relayed-report"],
)
def test_a_term_at_the_64_bit_limit_is_dropped(payload: Payload) -> None:
    """Found by the fuzz test: adopting term 2**64-1 made the node claim 2**64, which does not
    fit the wire format, so the handler raised on every message and the election was stuck."""
    errors = _Errors()
    logger = logging.getLogger("rustbalance")
    logger.addHandler(errors)
    now = [START]
    node = _coordinator(lambda: now[0])
    sender = Sender("node-a", ClusterKey(TOKEN), boot_time=START, randbytes=secrets.token_bytes)
    try:
        for _ in range(3):
            now[0] += 1.0
            node.transport._datagram_received(sender.seal(payload, now[0]), ("127.0.0.1", 2))
            asyncio.run(node._tick())
    finally:
        logger.removeHandler(errors)
    assert not errors.records, [r.getMessage() for r in errors.records]
    assert node.term < U64
    assert node.live_peers() == []  # the message was dropped, not half-applied


def test_the_handler_failure_is_observable() -> None:
    """The fuzz test can fail: a handler that raises is logged at ERROR, which it checks."""
    errors = _Errors()
    logger = logging.getLogger("rustbalance")
    logger.addHandler(errors)
    now = [START]
    node = _coordinator(lambda: now[0])

    def broken(*_: object) -> None:
        raise RuntimeError("bug")

    node.transport._on_message = broken
    sender = Sender("node-a", ClusterKey(TOKEN), boot_time=START, randbytes=secrets.token_bytes)
    try:
        node.transport._datagram_received(sender.seal(LeaseRelease(1), now[0]), ("127.0.0.1", 2))
    finally:
        logger.removeHandler(errors)
    assert [r.getMessage() for r in errors.records] == [
        "coordination message handler failed for a LEASE_RELEASE"
    ]


pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")
