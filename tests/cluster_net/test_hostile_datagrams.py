"""Hostile datagrams from a raw socket: strangers, forged, replayed, stale, future, oversized,
garbage, and a protocol v2 datagram sealed with an old cluster token.

Each is rejected, counted by reason, logged at most once per reason (naming the reason and the
source, never the content), and leaves the node's state exactly as it was.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from rustbalance.cluster.coordinator import Coordinator
from rustbalance.cluster.identity import NodeKey
from rustbalance.cluster.messages import (
    PROTOCOL_VERSION,
    Heartbeat,
    LeaseRelease,
    Payload,
    RejectReason,
    Role,
    Sender,
)
from rustbalance.descriptor.intro_point import IntroPoint
from tests.cluster.legacy_v2 import v2_datagram
from tests.cluster_net.support import (
    GRACE,
    LOCALHOST,
    TIMEOUT,
    cluster,
    free_udp_ports,
    make_node,
    wait_until,
)
from tests.trust import OTHER_MASTER, node_key, record, signed

OLD_TOKEN = b"an-old-protocol-v2-cluster-token-0123456789"

TRANSPORT_LOGGER = "rustbalance.cluster.transport"


def snapshot(node: Coordinator[IntroPoint]) -> object:
    """Everything an attacker would like to change."""
    return (
        node.role,
        node.term,
        node.publisher(),
        [(p.node_id, p.role, p.priority, p.term, p.last_heard) for p in node.live_peers()],
        node.membership.digest(),
        node.peer_intro_points(),
        # What it received (what it sends changes with time, not with what it is sent).
        {k: v for k, v in node.counters.as_dict().items() if not k.endswith("_sent")},
    )


@contextmanager
def raw_socket() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((LOCALHOST, 0))
    sock.setblocking(False)
    try:
        yield sock
    finally:
        sock.close()


def _counted(
    node: Coordinator[IntroPoint], reason: RejectReason, expected: int
) -> Callable[[], bool]:
    return lambda: node.rejected[reason] >= expected


def heartbeat(role: Role = Role.PUBLISHER, term: int = 99) -> Heartbeat:
    return Heartbeat(role, term, bytes(32), None, True, bytes(32))


def sealed_to(target: Coordinator[IntroPoint], name: str, key: NodeKey, payload: Payload) -> bytes:
    sender = Sender(name, key, boot_time=time.time(), randbytes=os.urandom)
    return sender.seal(payload, sender.reserve(time.time()), target.node_id, target.node_key.public)


def hello(name: str, key: NodeKey, at: float, master_signed: bool = True) -> bytes:
    own = record(name, key=key, eligible=False, coordination="127.0.0.1:9")
    statement = signed(own) if master_signed else signed(own, OTHER_MASTER)
    return Sender(name, key, boot_time=at, randbytes=os.urandom).hello(statement, at)


async def test_hostile_datagrams_are_rejected_counted_and_change_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger=TRANSPORT_LOGGER)
    (port,) = free_udp_ports(1)
    async with cluster() as c:
        node = make_node("target", 5, port, [], None)
        await c.start(node)
        await wait_until(lambda: node.is_publisher, TIMEOUT + GRACE + 2, "target to publish")
        target = (LOCALHOST, port)
        before = snapshot(node)
        rejected_before = dict(node.rejected)
        loop = asyncio.get_running_loop()
        wall = time.time()
        mallory = node_key("mallory")
        hostile: list[tuple[bytes, RejectReason]] = [
            # A stranger with its own key, sealed properly: not a member.
            (sealed_to(node, "mallory", mallory, heartbeat()), RejectReason.UNKNOWN_SENDER),
            # It claims our own id: our own datagrams are never taken from the network.
            (sealed_to(node, "target", mallory, LeaseRelease(1)), RejectReason.LOOPBACK),
            # A hello whose record another master key signed: forged.
            (hello("mallory", mallory, wall, master_signed=False), RejectReason.FORGED),
            # Genuine hellos with the clock 60 s behind / ahead (beyond the 5 s tolerance).
            (hello("skewed", node_key("skewed"), wall - 60), RejectReason.STALE),
            (hello("skewed2", node_key("skewed2"), wall + 60), RejectReason.FUTURE),
            # The largest UDP datagram over IPv4: beyond max_datagram_bytes (65000).
            (bytes([PROTOCOL_VERSION]) + os.urandom(65506), RejectReason.OVERSIZED),
            (b"", RejectReason.MALFORMED),
            (bytes([PROTOCOL_VERSION, 0xFF, 0]) + os.urandom(40), RejectReason.MALFORMED),
            # A protocol v2 datagram sealed with an old cluster token.
            (
                v2_datagram(OLD_TOKEN, "mallory", int(wall * 1000), int(wall * 1000), bytes(12)),
                RejectReason.UNKNOWN_VERSION,
            ),
            (b"\x09" + os.urandom(100), RejectReason.UNKNOWN_VERSION),
            (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", RejectReason.UNKNOWN_VERSION),
        ]
        with raw_socket() as attacker:
            source = f"{LOCALHOST}:{attacker.getsockname()[1]}"
            for datagram, reason in hostile:
                expected = node.rejected[reason] + 1
                await loop.sock_sendto(attacker, datagram, target)
                await wait_until(_counted(node, reason, expected), 2.0, reason.value)

        counted = {r: node.rejected[r] - rejected_before[r] for r in RejectReason}
        assert counted[RejectReason.UNKNOWN_SENDER] == 1
        assert counted[RejectReason.LOOPBACK] == 1
        assert counted[RejectReason.FORGED] == 1
        assert counted[RejectReason.STALE] == 1
        assert counted[RejectReason.FUTURE] == 1
        assert counted[RejectReason.OVERSIZED] == 1
        assert counted[RejectReason.MALFORMED] == 2
        assert counted[RejectReason.UNKNOWN_VERSION] == 3
        assert counted[RejectReason.REPLAYED] == 0
        assert snapshot(node) == before
        assert node.transport.is_open

        lines = [r.getMessage() for r in caplog.records if r.name == TRANSPORT_LOGGER]
        for name in (
            "unknown_sender",
            "forged",
            "stale",
            "future",
            "oversized",
            "malformed",
            "unknown_version",
        ):
            # The reason ends the line, or is followed by a hint in parentheses (stale/future).
            mine = [line for line in lines if line.endswith(f": {name}") or f": {name} (" in line]
            assert len(mine) == 1, (name, lines)  # rate-limited: one line per reason
            assert source in mine[0]
        text = caplog.text
        for secret_or_content in ("mallory", "skewed", "HTTP", OLD_TOKEN.decode()):
            assert secret_or_content not in text


async def test_captured_datagram_replayed_is_rejected() -> None:
    port, peer_port, dead_port = free_udp_ports(3)
    async with cluster() as c:
        node = make_node("target", 5, port, [], None)
        await c.start(node)
        await wait_until(lambda: node.is_publisher, TIMEOUT + GRACE + 2, "target to publish")
        with raw_socket() as capture:
            capture_port = capture.getsockname()[1]
            # A real node whose only seed is our capture socket; it advertises a port where
            # nothing listens, so the target's answers never reach it and it never talks to
            # the target directly: the target hears it only through us - its hellos (it does
            # not know the target, so it sends it nothing sealed).
            peer = make_node(
                "peer",
                50,
                peer_port,
                [capture_port],
                None,
                advertise=f"{LOCALHOST}:{dead_port}",
                eligible=False,
            )
            await c.start(peer)
            loop = asyncio.get_running_loop()
            captured = b""
            for _ in range(50):
                data = await asyncio.wait_for(loop.sock_recv(capture, 70000), 2.0)
                if data[3 : 3 + data[2]] == b"peer":
                    captured = data
                    break
            assert captured, "no heartbeat of the peer captured"

            # Delivered once: a legitimate (if late) message; the target learns the peer.
            received = node.counters.hellos_received
            await loop.sock_sendto(capture, captured, (LOCALHOST, port))
            await wait_until(lambda: node.counters.hellos_received == received + 1, 2.0, "delivery")
            assert node.membership.member("peer") is not None
            before = snapshot(node)
            replayed = node.rejected[RejectReason.REPLAYED]
            for _ in range(3):
                await loop.sock_sendto(capture, captured, (LOCALHOST, port))
            await wait_until(
                lambda: node.rejected[RejectReason.REPLAYED] == replayed + 3, 2.0, "replays"
            )
            assert snapshot(node) == before
