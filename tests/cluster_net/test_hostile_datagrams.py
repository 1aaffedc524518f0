"""Hostile datagrams from a raw socket: forged, replayed, stale, future, oversized, garbage.

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
from rustbalance.cluster.messages import (
    PROTOCOL_VERSION,
    ClusterKey,
    Heartbeat,
    LeaseClaim,
    RejectReason,
    Role,
    Sender,
)
from rustbalance.descriptor.intro_point import IntroPoint
from tests.cluster_net.support import (
    GRACE,
    LOCALHOST,
    TIMEOUT,
    TOKEN,
    cluster,
    free_udp_ports,
    make_node,
    wait_until,
)

TRANSPORT_LOGGER = "rustbalance.cluster.transport"


def snapshot(node: Coordinator[IntroPoint]) -> object:
    """Everything an attacker would like to change."""
    return (
        node.role,
        node.term,
        node.publisher(),
        [(p.node_id, p.role, p.priority, p.term, p.last_heard) for p in node.live_peers()],
        node.peers.known_peers(),
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


def heartbeat(role: Role = Role.PUBLISHER, priority: int = 0, term: int = 99) -> Heartbeat:
    return Heartbeat(role, priority, term, bytes(32), None, True, (("evil", "127.0.0.1:9"),))


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
        good_key = ClusterKey(TOKEN)
        wrong_key = ClusterKey(b"some-other-cluster-token-0000000000")
        hostile: list[tuple[bytes, RejectReason]] = [
            # Right format, wrong token.
            (
                Sender("mallory", wrong_key, boot_time=wall, randbytes=os.urandom).seal(
                    heartbeat(), wall
                ),
                RejectReason.FORGED,
            ),
            # A lease claim with a huge term, wrong token again (second FORGED: not logged).
            (
                Sender("mallory", wrong_key, boot_time=wall, randbytes=os.urandom).seal(
                    LeaseClaim(10**9, 0), wall
                ),
                RejectReason.FORGED,
            ),
            # Valid token, clock 60 s behind / ahead (beyond the 5 s tolerance).
            (
                Sender("skewed", good_key, boot_time=wall - 60, randbytes=os.urandom).seal(
                    heartbeat(), wall - 60
                ),
                RejectReason.STALE,
            ),
            (
                Sender("skewed2", good_key, boot_time=wall + 60, randbytes=os.urandom).seal(
                    heartbeat(), wall + 60
                ),
                RejectReason.FUTURE,
            ),
            # The largest UDP datagram over IPv4: beyond max_datagram_bytes (65000).
            (bytes([PROTOCOL_VERSION]) + os.urandom(65506), RejectReason.OVERSIZED),
            (b"", RejectReason.MALFORMED),
            (bytes([PROTOCOL_VERSION, 0xFF]) + os.urandom(40), RejectReason.MALFORMED),
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
        assert counted[RejectReason.FORGED] == 2
        assert counted[RejectReason.STALE] == 1
        assert counted[RejectReason.FUTURE] == 1
        assert counted[RejectReason.OVERSIZED] == 1
        assert counted[RejectReason.MALFORMED] == 2
        assert counted[RejectReason.UNKNOWN_VERSION] == 2
        assert counted[RejectReason.REPLAYED] == 0
        assert snapshot(node) == before
        assert node.transport.is_open

        lines = [r.getMessage() for r in caplog.records if r.name == TRANSPORT_LOGGER]
        for name in ("forged", "stale", "future", "oversized", "malformed", "unknown_version"):
            # The reason ends the line, or is followed by a hint in parentheses (stale/future).
            mine = [line for line in lines if line.endswith(f": {name}") or f": {name} (" in line]
            assert len(mine) == 1, (name, lines)  # rate-limited: one line per reason
            assert source in mine[0]
        text = caplog.text
        for secret_or_content in ("mallory", "skewed", "evil", "HTTP", TOKEN.decode()):
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
            # the target directly: the target hears it only through us.
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
                if data[2 : 2 + data[1]] == b"peer":
                    captured = data
                    break
            assert captured, "no heartbeat of the peer captured"

            # Delivered once: a legitimate (if late) message.
            received = node.counters.heartbeats_received
            await loop.sock_sendto(capture, captured, (LOCALHOST, port))
            await wait_until(
                lambda: node.counters.heartbeats_received == received + 1, 2.0, "delivery"
            )
            assert [p.node_id for p in node.live_peers()] == ["peer"]
            before = snapshot(node)
            replayed = node.rejected[RejectReason.REPLAYED]
            for _ in range(3):
                await loop.sock_sendto(capture, captured, (LOCALHOST, port))
            await wait_until(
                lambda: node.rejected[RejectReason.REPLAYED] == replayed + 3, 2.0, "replays"
            )
            assert snapshot(node) == before
